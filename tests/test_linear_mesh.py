"""The fused losses on meshes: plain ``jax.jit`` data and vocabulary parallel, ``vocab_axis``,
and ``axis_name`` inside a user's ``shard_map`` with ``check_vma`` on and off.

The multi-device checks run on 8 host devices in subprocesses (``sharded_fused_mesh_check.py``,
``sharded_fused_vma_check.py``); the argument rules and a one-device mesh run here.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TESTS_DIR, host_devices_env, run_host_devices_script

import jaxce

P = jax.sharding.PartitionSpec
AUTO = (jax.sharding.AxisType.Auto,)
N, D, V = 12, 8, 40


def _data():
    r = np.random.default_rng(0)
    h = r.normal(size=(N, D)).astype(np.float32)
    w = (r.normal(size=(D, V)) / 3).astype(np.float32)
    ht = r.normal(size=(N, 6)).astype(np.float32)
    wt = (r.normal(size=(6, V)) / 3).astype(np.float32)
    y = r.integers(0, V, size=N).astype(np.int32)
    return h, w, ht, wt, y


def _calls(vocab_axis=None, mesh=None, axis_name=None):
    h, w, ht, wt, y = _data()
    options = {"vocab_axis": vocab_axis, "mesh": mesh, "axis_name": axis_name}
    return {
        "ce": lambda: jaxce.linear_softmax_cross_entropy(h, w, y, **options),
        "log_probs": lambda: jaxce.linear_log_probs(h, w, y, return_entropy=True, **options),
        "kl": lambda: jaxce.linear_softmax_kl_divergence(h, w, ht, wt, **options),
        "js": lambda: jaxce.linear_js_divergence(h, w, ht, wt, **options),
    }


@pytest.mark.parametrize("name", ["ce", "log_probs", "kl", "js"])
def test_vocab_axis_and_axis_name_are_exclusive(name):
    with pytest.raises(ValueError, match="mutually exclusive"):
        _calls(vocab_axis="model", axis_name="model")[name]()


def test_vocab_axis_needs_a_mesh_with_that_axis():
    with pytest.raises(ValueError, match="needs a mesh"):
        _calls(vocab_axis="model")["ce"]()
    mesh = jax.make_mesh((1,), ("data",), axis_types=AUTO)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        _calls(vocab_axis="model", mesh=mesh)["kl"]()
    with pytest.raises(ValueError, match="only used with `vocab_axis`"):
        _calls(mesh=mesh)["log_probs"]()


@pytest.mark.parametrize("context", [False, True])
def test_vocab_axis_on_a_one_device_mesh_equals_the_plain_call(context):
    """``vocab_axis`` with ``mesh=`` or the context mesh (one shard: the same numbers)."""
    mesh = jax.make_mesh((1,), ("model",), axis_types=AUTO)
    plain = _calls()
    if context:
        with jax.set_mesh(mesh):
            sharded = {k: f() for k, f in _calls(vocab_axis="model").items()}
    else:
        sharded = {k: f() for k, f in _calls(vocab_axis="model", mesh=mesh).items()}
    for name, f in plain.items():
        for got, want in zip(jax.tree.leaves(sharded[name]), jax.tree.leaves(f()), strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_vocab_axis_gradient_on_a_one_device_mesh():
    h, w, _, _, y = _data()
    mesh = jax.make_mesh((1,), ("model",), axis_types=AUTO)

    def loss(h, w, **kw):
        return jaxce.linear_softmax_cross_entropy(h, w, y, reduction="mean", **kw)

    want = jax.grad(loss, (0, 1))(h, w)
    got = jax.jit(jax.grad(lambda h, w: loss(h, w, vocab_axis="model", mesh=mesh), (0, 1)))(h, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert jnp.shape(got[1]) == (D, V)


@functools.cache
def _mesh_check_output() -> str:
    """``sharded_fused_mesh_check.py`` on 8 host devices, both axis types in one process (the
    unsharded references computed once): what it printed, with its errors."""
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "sharded_fused_mesh_check.py")],
        env=host_devices_env(8), capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    return proc.stdout + (
        "" if proc.returncode == 0 else f"\nexit {proc.returncode}\n" + proc.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_plain_jit_on_meshes_matches_unsharded(kind):
    printed = _mesh_check_output()
    expected = [f"ok {kind} {name} {layout}" for name in ("ce", "log_probs", "kl", "js")
                for layout in ("data", "vocab")]  # fmt: skip
    expected.append(f"ok {kind} ce fsdp")
    expected += [
        f"ok {kind} {what}" for what in ("per-token no collective", "padded vocabulary", "memory")
    ]
    missing = [line for line in expected if f"{line}\n" not in printed]
    assert not missing, f"{missing} not printed:\n{printed}"


@pytest.mark.slow
def test_axis_name_inside_shard_map_with_and_without_check_vma():
    words = " ".join(run_host_devices_script("sharded_fused_vma_check.py", 8))
    for name in ("ce_mean", "ce_none", "log_probs", "kl", "js"):
        for flag in (True, False):
            assert f"ok {name} check_vma={flag}" in words

"""One process of a two-process run of the fused losses: vocab-parallel inside ``shard_map``
and, under plain ``jax.jit``, vocab-parallel and data-parallel.

``tests/test_linear_multiprocess.py`` starts two of these on localhost::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multiprocess_linear_check.py PROCESS_ID NUM_PROCESSES PORT

Each joins JAX's distributed runtime (``jax.distributed.initialize``, CPU collectives through
gloo), builds one global ``(data, vocab)`` mesh over the 2 x 2 devices, places its part of the
global arrays, runs the vocab-parallel loss (and ``sum(a * log_probs + c * entropy)`` of the fused
log-probabilities) and its gradients under ``jit`` and checks every
shard it holds against the single-process unsharded result computed on its own local device.
Then the same under plain ``jit`` on the Explicit mesh (``jax.set_mesh``), no ``shard_map``:
the cross-entropy, the log-probabilities with the entropy and the fused KL with the weights
sharded over the vocabulary (``P(None, "vocab")``: vocab-parallel by the weights' sharding)
and replicated with the tokens over all four devices (data parallel). Last,
``top_entropy_mask``'s global quantile over the tokens of both processes.
Prints ``ok <process_id>`` on success.
"""

from __future__ import annotations

import functools
import sys

import jax
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
N, D, V = 32, 16, 96
OPTIONS = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3}


def data():
    r = np.random.default_rng(0)  # the same arrays in every process
    h = r.normal(size=(N, D)).astype(np.float32)
    w = (r.normal(size=(D, V)) / 3).astype(np.float32)
    b = r.normal(size=V).astype(np.float32)
    cw = r.uniform(0.5, 2.0, size=V).astype(np.float32)
    y = r.integers(0, V, size=N).astype(np.int32)
    y[::5] = -100
    return h, w, b, cw, y


def loss_of(axis_name=None):
    def loss(h, w, b, cw, y):
        total, count = jaxce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, reduction="sum_and_weight",
            axis_name=axis_name, chunk_size=16, **OPTIONS,
        )  # fmt: skip
        if axis_name is not None:
            total, count = jax.lax.psum(total, "data"), jax.lax.psum(count, "data")
        return jaxce.weighted_mean(total, count)

    return loss


def log_probs_of(axis_name=None):
    def loss(h, w, b, y, t, a):
        lp, ent = jaxce.linear_log_probs(
            h, w, y, bias=b, temperature=t, logit_softcap=3.0, ignore_index=-100,
            axis_name=axis_name, chunk_size=16, return_entropy=True,
        )  # fmt: skip
        total = jax.numpy.sum(a * lp + 0.5 * ent)
        return total if axis_name is None else jax.lax.psum(total, "data")

    return loss


def kl_of(axis_name=None):
    def loss(h, w, ht, wt, sw):
        total, count = jaxce.linear_softmax_kl_divergence(
            h, w, ht, wt, temperature=1.5, sample_weights=sw, reduction="sum_and_weight",
            axis_name=axis_name, chunk_size=16,
        )  # fmt: skip
        if axis_name is not None:
            total, count = jax.lax.psum(total, "data"), jax.lax.psum(count, "data")
        return jaxce.weighted_mean(total, count)

    return loss


def global_array(mesh, a, spec):
    sharding = jax.NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def reference(make_loss, arrays, argnums):
    local = jax.local_devices()[0]
    value = jax.jit(jax.value_and_grad(make_loss(), argnums=argnums))(
        *(jax.device_put(a, local) for a in arrays)
    )
    return jax.tree.map(np.asarray, value)


def compare(value, grads, value_want, grads_want, names, what) -> None:
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for shard in value.addressable_shards:
        np.testing.assert_allclose(np.asarray(shard.data), value_want, err_msg=what, **tol)
    for name, got, want in zip(names, grads, grads_want, strict=True):
        assert got.shape == want.shape, (what, name, got.shape)
        for shard in got.addressable_shards:
            np.testing.assert_allclose(
                np.asarray(shard.data), want[shard.index], err_msg=f"{what} {name}", **tol
            )


def check_plain_jit(mesh, make_loss, arrays, specs, names, what) -> None:
    """Plain ``jit`` on global arrays (no ``shard_map``) equals the local unsharded result,
    and every gradient keeps its input's sharding."""
    argnums = tuple(range(len(names)))
    value_want, grads_want = reference(make_loss, arrays, argnums)
    with jax.set_mesh(mesh):
        args = [global_array(mesh, a, s) for a, s in zip(arrays, specs, strict=True)]
        value, grads = jax.jit(jax.value_and_grad(make_loss(), argnums=argnums))(*args)
    compare(value, grads, value_want, grads_want, names, what)

    def padded(spec, ndim):
        return tuple(spec) + (None,) * (ndim - len(spec))

    for name, grad, spec in zip(names, grads, specs, strict=False):
        have = padded(grad.sharding.spec, grad.ndim)
        assert have == padded(spec, grad.ndim), (what, name, have, spec)


def check(mesh, make_loss, arrays, specs, names) -> None:
    """The loss and its gradients w.r.t. ``names`` on the global mesh equal the local ones."""
    argnums = tuple(range(len(names)))
    value_want, grads_want = reference(make_loss, arrays, argnums)
    args = [global_array(mesh, a, s) for a, s in zip(arrays, specs, strict=True)]
    sharded = functools.partial(jax.shard_map, mesh=mesh, in_specs=specs, out_specs=P())(
        make_loss("vocab")
    )
    value, grads = jax.jit(jax.value_and_grad(sharded, argnums=argnums))(*args)
    compare(value, grads, value_want, grads_want, names, "shard_map")


def check_top_entropy_mask(mesh, axes) -> None:
    """``top_entropy_mask``'s quantile is global across the processes: under plain ``jit`` on
    a global array and inside ``shard_map`` with ``axis_name`` over both mesh axes, equal to
    NumPy's quantile of every kept token (each process holding half of them)."""
    r = np.random.default_rng(3)
    entropy = r.gamma(2.0, size=(N, 6)).astype(np.float32)
    keep = r.uniform(size=(N, 6)) < 0.7
    kept = entropy[keep].astype(np.float64)
    want = keep & (entropy >= np.quantile(kept, 0.8))
    spec = P(axes, None)
    args = [global_array(mesh, a, spec) for a in (entropy, keep)]
    masks = {"plain jit": jax.jit(functools.partial(jaxce.top_entropy_mask, fraction=0.2))}
    masks["shard_map"] = jax.jit(
        jax.shard_map(
            functools.partial(jaxce.top_entropy_mask, fraction=0.2, axis_name=axes),
            mesh=mesh, in_specs=(spec, spec), out_specs=spec,
        )
    )  # fmt: skip
    for what, fn in masks.items():
        got = fn(*args)
        for shard in got.addressable_shards:
            assert np.array_equal(np.asarray(shard.data), want[shard.index]), what


def main(process_id: int, num_processes: int, port: int) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=30,
    )
    assert jax.process_count() == num_processes and len(jax.devices()) == 2 * num_processes
    h, w, b, cw, y = data()
    t = np.linspace(0.5, 2.0, N).astype(np.float32)
    a = np.cos(np.arange(N)).astype(np.float32)  # a cotangent per token
    mesh = jax.make_mesh((num_processes, 2), ("data", "vocab"))
    check(
        mesh, loss_of, (h, w, b, cw, y),
        (P("data", None), P(None, "vocab"), P("vocab"), P("vocab"), P("data")),
        ("hidden", "weight", "bias", "class_weights"),
    )  # fmt: skip
    check(
        mesh, log_probs_of, (h, w, b, y, t, a),
        (P("data", None), P(None, "vocab"), P("vocab"), P("data"), P("data"), P("data")),
        ("hidden", "weight", "bias"),
    )  # fmt: skip
    # Plain jit: vocab-parallel from the weights' sharding, then data parallel.
    ht = np.random.default_rng(1).normal(size=(N, 8)).astype(np.float32)
    wt = (np.random.default_rng(2).normal(size=(8, V)) / 3).astype(np.float32)
    sw = np.abs(a)
    every = ("data", "vocab")  # data parallel: the tokens over all four devices
    layouts = {  # hidden rows, per-token arrays, kernels, columns
        "vocab-parallel": (P("data", None), P("data"), P(None, "vocab"), P("vocab")),
        "data-parallel": (P(every, None), P(every), P(None, None), P(None)),
    }
    for layout, (row, tok, ker, col) in layouts.items():
        check_plain_jit(
            mesh, loss_of, (h, w, b, cw, y), (row, ker, col, col, tok),
            ("hidden", "weight", "bias", "class_weights"), f"plain jit {layout} ce",
        )  # fmt: skip
        check_plain_jit(
            mesh, log_probs_of, (h, w, b, y, t, a), (row, ker, col, tok, tok, tok),
            ("hidden", "weight", "bias"), f"plain jit {layout} log_probs",
        )  # fmt: skip
        check_plain_jit(
            mesh, kl_of, (h, w, ht, wt, sw), (row, ker, row, ker, tok),
            ("hidden", "weight", "target_hidden", "target_weight"), f"plain jit {layout} kl",
        )  # fmt: skip
    check_top_entropy_mask(mesh, every)
    print("ok", process_id, flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))

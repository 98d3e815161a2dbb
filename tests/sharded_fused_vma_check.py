"""Every fused loss with ``axis_name`` inside a user's ``shard_map``, ``check_vma`` on and off.

Run as a script (``tests/test_linear_mesh.py`` does, in a subprocess, because the device
count must be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_fused_vma_check.py

On a ``(data=2, model=4)`` mesh, tokens over ``data`` and the vocabulary over ``model``, the
value and every gradient (hidden states, kernels, biases, class weights, temperature, beta)
of ``linear_softmax_cross_entropy`` (both paths: a scalar reduction with a differentiated
``aux.lse``, and per-token losses), ``linear_log_probs`` with the entropy,
``linear_softmax_kl_divergence`` and ``linear_js_divergence`` must equal the unsharded call,
with ``check_vma=True`` and with ``check_vma=False`` (Levanter's and tokamax's way; JAX then
hands a replicated output's cotangent to each device as a share). Prints ``ok <case>
check_vma=<flag>`` per case; any mismatch raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
N, D, DT, V = 32, 16, 12, 96
TOL = {"rtol": 2e-5, "atol": 2e-6}
OPTIONS = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3}


def data():
    r = np.random.default_rng(0)
    arrays = {
        "h": r.normal(size=(N, D)),
        "w": r.normal(size=(D, V)) / 3,
        "b": r.normal(size=V),
        "cw": r.uniform(0.5, 2.0, size=V),
        "ht": r.normal(size=(N, DT)),
        "wt": r.normal(size=(DT, V)) / 3,
        "bt": r.normal(size=V),
        "g": np.cos(np.arange(N)),  # a per-token cotangent
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    y = r.integers(0, V, size=N).astype(np.int32)
    y[::5] = -100
    arrays["y"] = y
    arrays["t"] = np.float32(1.7)
    arrays["beta"] = np.float32(0.3)
    return arrays


def psum_data(x, axis):
    return x if axis is None else jax.lax.psum(x, "data")


# Each case: (name, differentiated arguments, their in_specs, loss(axis_name, **arrays)).
def ce_mean(axis, h, w, b, cw, y, g):
    (total, count), aux = jaxce.linear_softmax_cross_entropy(
        h, w, y, bias=b, class_weights=cw, reduction="sum_and_weight", axis_name=axis,
        return_aux=True, chunk_size=16, **OPTIONS,
    )  # fmt: skip
    mean = jaxce.weighted_mean(psum_data(total, axis), psum_data(count, axis))
    return mean + psum_data(jnp.sum(g * jnp.sin(aux.lse)), axis)


def ce_none(axis, h, w, b, cw, y, g):
    loss = jaxce.linear_softmax_cross_entropy(
        h, w, y, bias=b, class_weights=cw, axis_name=axis, chunk_size=16, **OPTIONS
    )
    return psum_data(jnp.sum(g * loss), axis)


def log_probs(axis, h, w, b, y, t, g):
    lp, ent = jaxce.linear_log_probs(
        h, w, y, bias=b, temperature=t, ignore_index=-100, axis_name=axis, chunk_size=16,
        return_entropy=True,
    )  # fmt: skip
    return psum_data(jnp.sum(g * lp + jnp.sin(ent)), axis)


def kl(axis, h, w, b, ht, wt, bt, t, g):
    loss = jaxce.linear_softmax_kl_divergence(
        h, w, ht, wt, bias=b, target_bias=bt, temperature=t, axis_name=axis, chunk_size=16
    )
    return psum_data(jnp.sum(g * loss), axis)


def js(axis, h, w, b, ht, wt, bt, t, beta, g):
    total, count = jaxce.linear_js_divergence(
        h, w, ht, wt, bias=b, target_bias=bt, temperature=t, beta=beta, axis_name=axis,
        chunk_size=16, sample_weights=jnp.abs(g), reduction="sum_and_weight",
    )  # fmt: skip
    return jaxce.weighted_mean(psum_data(total, axis), psum_data(count, axis))


TOK, ROW, COL, KER, REP = P("data"), P("data", None), P("model"), P(None, "model"), P()
CASES = {
    "ce_mean": (ce_mean, ("h", "w", "b", "cw", "y", "g"), (ROW, KER, COL, COL, TOK, TOK), 4),
    "ce_none": (ce_none, ("h", "w", "b", "cw", "y", "g"), (ROW, KER, COL, COL, TOK, TOK), 4),
    "log_probs": (log_probs, ("h", "w", "b", "y", "t", "g"), (ROW, KER, COL, TOK, REP, TOK), 3),
    "kl": (
        kl, ("h", "w", "b", "ht", "wt", "bt", "t", "g"),
        (ROW, KER, COL, ROW, KER, COL, REP, TOK), 7,
    ),
    "js": (
        js, ("h", "w", "b", "ht", "wt", "bt", "t", "beta", "g"),
        (ROW, KER, COL, ROW, KER, COL, REP, REP, TOK), 8,
    ),
}  # fmt: skip


def main():
    assert len(jax.devices()) == 8, jax.devices()
    arrays = data()
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=auto)
    for name, (loss, names, specs, count) in CASES.items():
        args = [arrays[n] for n in names]
        argnums = tuple(range(count))
        want = jax.jit(jax.value_and_grad(functools.partial(loss, None), argnums))(*args)
        placed = [
            jax.device_put(a, jax.NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)
        ]
        for check_vma in (True, False):
            body = jax.shard_map(
                lambda *a, loss=loss: loss("model", *a), mesh=mesh, in_specs=specs,
                out_specs=P(), check_vma=check_vma,
            )  # fmt: skip
            got = jax.jit(jax.value_and_grad(body, argnums))(*placed)
            what = [f"{name} check_vma={check_vma} {w}" for w in ("value", *names[:count])]
            for w, a, c in zip(what, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(c), err_msg=w, **TOL)
            print("ok", name, f"check_vma={check_vma}", flush=True)


if __name__ == "__main__":
    main()

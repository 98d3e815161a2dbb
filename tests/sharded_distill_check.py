"""Vocab-parallel check of the fused distillation losses (run by ``test_linear_distill.py``).

Needs 8 devices; on a CPU host run it as

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/sharded_distill_check.py

For 8 vocabulary shards (1, 2 and 4: the conformance matrix's shard_map cells) on a
``(data, model)`` mesh, the value and the gradients
(w.r.t. the six arrays, the temperature and ``beta``) of both losses inside ``jax.shard_map``
must equal the unsharded ones, which must equal the materialised losses. Prints ``ok S`` per
shard count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
N, D, DT, V = 48, 24, 40, 301  # 301 is not divisible by 2, 4 or 8: the kernels are padded
TOL = {"rtol": 2e-5, "atol": 2e-6}


def make():
    r = np.random.default_rng(0)
    h = r.normal(size=(N, D)).astype(np.float32)
    w = (r.normal(size=(D, V)) / 3).astype(np.float32)
    b = r.normal(size=V).astype(np.float32)
    ht = r.normal(size=(N, DT)).astype(np.float32)
    wt = (r.normal(size=(DT, V)) / 3).astype(np.float32)
    bt = r.normal(size=V).astype(np.float32)
    sw = r.uniform(0.5, 1.5, size=N).astype(np.float32)
    sw[::7] = 0.0
    return (h, w, b, ht, wt, bt), sw


def loss_fn(kind, **fixed):
    """The loss of (h, w, b, ht, wt, bt, temperature, beta, sample_weights) as a (sum, weight)."""
    fused = {"kl": jaxce.linear_softmax_kl_divergence, "js": jaxce.linear_js_divergence}[kind]

    def loss(h, w, b, ht, wt, bt, t, beta, sw):
        extra = {"beta": beta} if kind == "js" else {}
        return fused(
            h,
            w,
            ht,
            wt,
            bias=b,
            target_bias=bt,
            temperature=t,
            sample_weights=sw,
            reduction="sum_and_weight",
            **extra,
            **fixed,
        )

    return loss


def materialised(kind, h, w, b, ht, wt, bt, t, beta, sw):
    s, u = h @ w + b[None, :], ht @ wt + bt[None, :]
    if kind == "kl":
        return jaxce.softmax_kl_divergence(s, u, temperature=t, sample_weights=sw, reduction="mean")
    return jaxce.js_divergence(s / t, u / t, beta=beta, sample_weights=sw, reduction="mean")


def assert_tree_close(got, want):
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), **TOL)


def check(kind, shards, arrays, sw):
    hyper = (1.7, 0.3)
    argnums = tuple(range(8))

    def unsharded(*args):
        return jaxce.weighted_mean(*loss_fn(kind)(*args, sw))

    want = jax.jit(jax.value_and_grad(unsharded, argnums))(*arrays, *hyper)
    if shards == 1:
        dense = jax.value_and_grad(functools.partial(materialised, kind), argnums)
        assert_tree_close(want, dense(*arrays, *hyper, sw))

    mesh = jax.make_mesh((8 // shards, shards), ("data", "model"))
    padded = -(-V // shards) * shards
    h, w, b, ht, wt, bt = arrays
    pad2 = ((0, 0), (0, padded - V))
    wp, wtp = np.pad(w, pad2), np.pad(wt, pad2)
    bp, btp = np.pad(b, (0, padded - V)), np.pad(bt, (0, padded - V))
    specs = (
        P("data", None),
        P(None, "model"),
        P("model"),
        P("data", None),
        P(None, "model"),
        P("model"),
        P(),
        P(),
        P("data"),
    )
    inner = loss_fn(kind, axis_name="model", vocab_size=V, chunk_size=8)

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=specs, out_specs=P())
    def sharded(*args):
        total, weight = inner(*args)
        return jaxce.weighted_mean(jax.lax.psum(total, "data"), jax.lax.psum(weight, "data"))

    def put(x, spec):
        return jax.device_put(jnp.asarray(x), jax.NamedSharding(mesh, spec))

    args = [put(x, s) for x, s in zip((h, wp, bp, ht, wtp, btp, *hyper, sw), specs, strict=True)]
    value, grads = jax.jit(jax.value_and_grad(sharded, argnums))(*args)
    np.testing.assert_allclose(np.asarray(value), np.asarray(want[0]), **TOL)
    for i, (g, r) in enumerate(zip(grads, want[1], strict=True)):
        g = np.asarray(g)
        if i in (1, 2, 4, 5):  # kernels and biases: compare the real columns, padding is 0
            assert not np.any(g[..., V:]), i
            g = g[..., :V]
        np.testing.assert_allclose(g, np.asarray(r), err_msg=f"argument {i}", **TOL)

    # Per-token values, tokens sharded over "data".
    fused = {"kl": jaxce.linear_softmax_kl_divergence, "js": jaxce.linear_js_divergence}[kind]
    per_token = jax.jit(
        jax.shard_map(
            lambda h, w, ht, wt: fused(h, w, ht, wt, axis_name="model", vocab_size=V),
            mesh=mesh,
            in_specs=(P("data", None), P(None, "model"), P("data", None), P(None, "model")),
            out_specs=P("data"),
        )
    )(args[0], args[1], args[3], args[4])
    np.testing.assert_allclose(np.asarray(per_token), fused(h, w, ht, wt), **TOL)


def main():
    assert len(jax.devices()) == 8, jax.devices()
    arrays, sw = make()
    # 1, 2 and 4 shards: the conformance matrix's shard_map cells run them
    for shards in (8,):
        for kind in ("kl", "js"):
            check(kind, shards, arrays, sw)
        print("ok", shards, flush=True)


if __name__ == "__main__":
    main()

"""Vocab-parallel top-k losses under ``shard_map`` on 4 host devices.

Run as a script (``tests/test_topk.py`` does, in a subprocess, because the device count must
be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_topk_check.py

For 4 vocabulary shards (1 and 2: the conformance matrix's shard_map cells) on a
``(data, model)`` mesh (the vocabulary padded to a multiple of the shard count) it checks
against the unsharded call, outputs and the gradients
w.r.t. hidden, weight and bias:

* ``linear_log_probs(top_k=k)`` with the entropy, for a ``k`` below and one above a shard's
  columns (the shards' lists are padded and merged), with ties in the logits;
* ``linear_sparse_distillation_loss`` with both tails, a temperature, padded teacher entries;

with ``check_vma`` on and (4 shards) off, and both losses under plain ``jax.jit`` on an
Explicit mesh with the kernel sharded over its columns (the mesh dispatch).

Prints ``ok <shards>`` per mesh; any mismatch raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
N, D, V, K = 24, 12, 103, 6  # 103 is not divisible by 2 or 4: the weight is padded
TOL = {"rtol": 2e-5, "atol": 2e-6}


def data():
    r = np.random.default_rng(0)
    h = r.normal(size=(N, D)).astype(np.float32)
    w = (np.round(r.normal(size=(D, V)) * 2) / 4).astype(np.float32)  # coarse: ties
    b = np.round(r.normal(size=V)).astype(np.float32)
    z = h @ w + b
    y = np.argsort(-z, -1, kind="stable")[:, 3].astype(np.int32)
    y[::4] = r.integers(0, V, size=N // 4)
    lp = z - z.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    ids = np.argsort(-(lp + r.normal(size=lp.shape)), -1)[:, :K].astype(np.int32)
    t = np.take_along_axis(lp, ids, -1).astype(np.float32)
    t[1, 4:] = -np.inf
    a, c = r.normal(size=N).astype(np.float32), r.normal(size=N).astype(np.float32)
    return h, w, b, y, ids, t, a, c


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=what, **TOL)


def top_k_objective(sharded_axis, vocab_size, k):
    def f(h, w, b, y, ids, t, a, c):
        lp, ent = jaxce.linear_log_probs(
            h, w, y, bias=b, temperature=0.8, top_k=k, axis_name=sharded_axis,
            vocab_size=vocab_size, chunk_size=8, return_entropy=True,
        )  # fmt: skip
        return jnp.sum(jnp.where(jnp.isinf(lp), 0, a * lp) + c * ent), (lp, ent)

    return f


def sparse_objective(sharded_axis, vocab_size, tail):
    def f(h, w, b, y, ids, t, a, c):
        loss = jaxce.linear_sparse_distillation_loss(
            h, w, ids, t, bias=b, temperature=1.5, tail=tail, axis_name=sharded_axis,
            vocab_size=vocab_size, chunk_size=8,
        )  # fmt: skip
        return jnp.sum(a * loss), loss

    return f


def check(shards, args, objectives, check_vma=True):
    h, w, b = args[:3]
    mesh = jax.make_mesh((4 // shards, shards), ("data", "model"))
    vp = -(-V // shards) * shards
    wp = np.pad(w, ((0, 0), (0, vp - V)))
    bp = np.pad(b, (0, vp - V))
    tok = P("data")

    def put(x, *spec):
        return jax.device_put(x, jax.NamedSharding(mesh, P(*spec)))

    sharded_args = (
        put(h, "data", None), put(wp, None, "model"), put(bp, "model"),
        *(put(x, "data", *([None] * (x.ndim - 1))) for x in args[3:]),
    )  # fmt: skip
    specs = (
        P("data", None), P(None, "model"), P("model"),
        *(P("data", *([None] * (x.ndim - 1))) for x in args[3:]),
    )  # fmt: skip
    for name, make in objectives.items():
        plain = make(None, None)
        (_, want_out), want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True)(
            *args
        )
        local = make("model", V)

        @functools.partial(
            jax.shard_map, mesh=mesh, in_specs=specs, check_vma=check_vma,
            out_specs=(P(), jax.tree.map(lambda _: tok, want_out)),
        )  # fmt: skip
        def sharded(*xs, local=local):
            value, out = local(*xs)
            return jax.lax.psum(value, "data"), out

        (_, out), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2), has_aux=True))(
            *sharded_args
        )
        pairs = zip(jax.tree.leaves(out), jax.tree.leaves(want_out), strict=True)
        for k, (g, wnt) in enumerate(pairs):
            np.testing.assert_array_equal(np.isinf(g), np.isinf(wnt), err_msg=name)
            assert_close(g, wnt, f"{name}: output {k}")
        assert_close(grads[0], want_grads[0], f"{name}: d hidden")
        assert_close(np.asarray(grads[1])[:, :V], want_grads[1], f"{name}: d weight")
        assert_close(np.asarray(grads[2])[:V], want_grads[2], f"{name}: d bias")
        assert not np.any(np.asarray(grads[1])[:, V:]), f"{name}: padding got a gradient"


def explicit_mesh(args):
    """Under plain ``jax.jit`` on an Explicit ``(data=2, model=2)`` mesh: the kernel sharded
    over its columns makes the loss vocabulary-parallel (the mesh dispatch)."""
    h, w, b, y, ids, t, a, c = args
    vp = -(-V // 2) * 2
    wp, bp = np.pad(w, ((0, 0), (0, vp - V))), np.pad(b, (0, vp - V))
    mesh = jax.make_mesh((2, 2), ("data", "model"))

    def loss(h, w, b, ids, t, y):
        sparse = jaxce.linear_sparse_distillation_loss(
            h, w, ids, t, bias=b, temperature=1.5, vocab_size=V, chunk_size=8
        )
        lp, ent = jaxce.linear_log_probs(
            h, w, y, bias=b, top_k=5, vocab_size=V, chunk_size=8, return_entropy=True
        )
        total = jnp.sum(a * sparse) + jnp.sum(jnp.where(jnp.isinf(lp), 0, a * lp) + c * ent)
        return total, (sparse, lp, ent)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, want), want_g = step(h, wp, bp, ids, t, y)
    with jax.set_mesh(mesh):
        put = jax.device_put
        placed = (
            put(h, P("data", None)), put(wp, P(None, "model")), put(bp, P("model")),
            put(ids, P("data", None)), put(t, P("data", None)), put(y, P("data")),
        )  # fmt: skip
        (_, got), got_g = step(*placed)
    for g, wnt in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.isinf(g), np.isinf(wnt))
        assert_close(g, wnt, "explicit mesh: outputs")
    for g, wnt in zip(got_g, want_g, strict=True):
        assert_close(g, wnt, "explicit mesh: gradients")


def main():
    args = data()
    objectives = {
        "top_k=5": functools.partial(top_k_objective, k=5),
        "top_k=40": functools.partial(top_k_objective, k=40),  # more than a shard's 26 columns
        "sparse bucket": functools.partial(sparse_objective, tail="bucket"),
        "sparse renormalize": functools.partial(sparse_objective, tail="renormalize"),
    }
    # 1 and 2 shards: the conformance matrix's shard_map cells (1, 2, 4 devices) run them
    for shards in (4,):
        check(shards, args, objectives)
        if shards == 4:  # JAX hands replicated outputs' cotangents over as shares
            check(shards, args, objectives, check_vma=False)
        print("ok", shards)
    explicit_mesh(args)
    print("ok explicit")


if __name__ == "__main__":
    main()

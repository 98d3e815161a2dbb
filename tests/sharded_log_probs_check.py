"""Vocab-parallel per-token outputs under ``shard_map`` on 4 host devices.

Run as a script (``tests/test_linear_log_probs.py`` does, in a subprocess, because the device
count must be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_log_probs_check.py

For 4 vocabulary shards (1 and 2: the conformance matrix's shard_map cells) on a
``(data, model)`` mesh (the vocabulary padded to a multiple of the shard count) it checks
against the unsharded call:

* ``linear_log_probs``: both outputs and the gradients of ``sum(a * log_probs + c *
  entropy)`` w.r.t. hidden, weight and bias, with a per-sequence temperature, soft cap and
  ``ignore_index``;
* ``linear_softmax_cross_entropy`` with ``reduction="none"`` (and ``return_aux``), with and
  without bias and soft cap: the per-token losses and the gradients of ``sum(a * loss)``
  (issue 18: this gradient used to fail with "Differentiation rule for 'pmin' not
  implemented").

Prints ``ok <shards>`` per mesh; any mismatch raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
N, D, V = 24, 12, 103  # 103 is not divisible by 2 or 4: the weight is padded
TOL = {"rtol": 2e-5, "atol": 2e-6}


def data():
    r = np.random.default_rng(0)
    h = r.normal(size=(N, D)).astype(np.float32)
    w = (r.normal(size=(D, V)) / 2).astype(np.float32)
    b = r.normal(size=V).astype(np.float32)
    y = r.integers(0, V, size=N).astype(np.int32)
    y[::5] = -100
    t = np.repeat(r.uniform(0.5, 2.0, size=N // 4), 4).astype(np.float32)
    a, c = r.normal(size=N).astype(np.float32), r.normal(size=N).astype(np.float32)
    return h, w, b, y, t, a, c


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=what, **TOL)


def log_probs_objective(sharded_axis, vocab_size):
    def f(h, w, b, y, t, a, c):
        lp, ent = jaxce.linear_log_probs(
            h, w, y, bias=b, temperature=t, logit_softcap=3.0, ignore_index=-100,
            axis_name=sharded_axis, vocab_size=vocab_size, chunk_size=8, return_entropy=True,
        )  # fmt: skip
        return jnp.sum(a * lp + c * ent), (lp, ent)

    return f


def ce_objective(sharded_axis, vocab_size, use_bias, cap, aux):
    def f(h, w, b, y, t, a, c):
        out = jaxce.linear_softmax_cross_entropy(
            h, w, y, bias=b if use_bias else None, logit_softcap=cap, ignore_index=-100,
            axis_name=sharded_axis, vocab_size=vocab_size, return_aux=aux,
        )  # fmt: skip
        loss = out[0] if aux else out
        total = jnp.sum(a * loss)
        if aux:
            total = total + jnp.sum(c * out[1].lse)
        return total, loss

    return f


def check(shards, args, objectives):
    h, w, b, y, t, a, c = args
    mesh = jax.make_mesh((4 // shards, shards), ("data", "model"))
    vp = -(-V // shards) * shards
    wp = np.pad(w, ((0, 0), (0, vp - V)))
    bp = np.pad(b, (0, vp - V))
    tok = P("data")

    def put(x, *spec):
        return jax.device_put(x, jax.NamedSharding(mesh, P(*spec)))

    sharded_args = (
        put(h, "data", None), put(wp, None, "model"), put(bp, "model"), put(y, "data"),
        put(t, "data"), put(a, "data"), put(c, "data"),
    )  # fmt: skip
    for name, make in objectives.items():
        plain = make(None, None)
        (_, want_out), want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True)(
            *args
        )
        local = make("model", V)

        @functools.partial(
            jax.shard_map, mesh=mesh, out_specs=(P(), jax.tree.map(lambda _: tok, want_out)),
            in_specs=(P("data", None), P(None, "model"), P("model"), tok, tok, tok, tok),
        )  # fmt: skip
        def sharded(*xs, local=local):
            value, out = local(*xs)
            return jax.lax.psum(value, "data"), out

        (_, out), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2), has_aux=True))(
            *sharded_args
        )
        pairs = zip(jax.tree.leaves(out), jax.tree.leaves(want_out), strict=True)
        for k, (g, wnt) in enumerate(pairs):
            assert_close(g, wnt, f"{name}: output {k}")
        assert_close(grads[0], want_grads[0], f"{name}: d hidden")
        assert_close(np.asarray(grads[1])[:, :V], want_grads[1], f"{name}: d weight")
        assert_close(np.asarray(grads[2])[:V], want_grads[2], f"{name}: d bias")
        assert not np.any(np.asarray(grads[1])[:, V:]), f"{name}: padding got a gradient"


def main():
    args = data()
    objectives = {"log_probs": log_probs_objective}
    for use_bias in (False, True):
        for cap in (None, 4.0):
            for aux in (False, True):
                key = f"ce bias={use_bias} cap={cap} aux={aux}"
                objectives[key] = functools.partial(
                    ce_objective, use_bias=use_bias, cap=cap, aux=aux
                )
    # 1 and 2 shards: the conformance matrix's shard_map cells run them
    for shards in (4,):
        check(shards, args, objectives)
        print("ok", shards)


if __name__ == "__main__":
    main()

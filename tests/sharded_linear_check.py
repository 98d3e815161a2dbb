"""Vocab-parallel ``linear_softmax_cross_entropy`` under ``shard_map`` on 8 host devices.

Run as a script (``tests/test_linear.py`` does, in a subprocess, because the device count
must be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_linear_check.py

For 8 vocabulary shards (1, 2 and 4: the conformance matrix's shard_map cells) on a
``(data, model)`` mesh it checks the loss, its
gradients (hidden, weight, bias, class weights), the per-token losses and the auxiliary
outputs against the unsharded loss, which is itself checked against the materialised one.
Prints ``ok <shards>`` per mesh; any mismatch raises.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
N, D, V = 48, 24, 203  # 203 is not divisible by 2, 4 or 8: the weight is padded
OPTIONS = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 4.0}
TOL = {"rtol": 1e-5, "atol": 1e-6}


def data():
    r = np.random.default_rng(0)
    h = r.normal(size=(N, D)).astype(np.float32)
    w = (r.normal(size=(D, V)) / 3).astype(np.float32)
    b = r.normal(size=V).astype(np.float32)
    cw = r.uniform(0.5, 2.0, size=V).astype(np.float32)
    y = r.integers(0, V, size=N).astype(np.int32)
    y[::7] = -100
    mask = r.uniform(size=N) > 0.2  # a boolean token mask as sample_weights
    return h, w, b, cw, y, mask


def unsharded(h, w, b, cw, y, mask):
    total, count = jaxce.linear_softmax_cross_entropy(
        h, w, y, bias=b, class_weights=cw, sample_weights=mask, reduction="sum_and_weight",
        **OPTIONS,
    )  # fmt: skip
    return jaxce.weighted_mean(total, count)


def materialised(h, w, b, cw, y, mask):
    z = 4.0 * jnp.tanh((h @ w + b[None, :]) / 4.0)
    options = {k: x for k, x in OPTIONS.items() if k != "logit_softcap"}
    return jaxce.softmax_cross_entropy_with_integer_labels(
        z, y, class_weights=cw, sample_weights=mask.astype(np.float32), reduction="mean",
        **options,
    )  # fmt: skip


def assert_close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), err_msg=what, **TOL)


def check(shards, h, w, b, cw, y, mask, want, aux_want, per_token_want):
    mesh = jax.make_mesh((8 // shards, shards), ("data", "model"))
    vp = -(-V // shards) * shards
    wp = np.pad(w, ((0, 0), (0, vp - V)))
    bp = np.pad(b, (0, vp - V))
    cwp = np.pad(cw, (0, vp - V), constant_values=7.0)  # padding entries must be unused
    col, tok = P("model"), P("data")

    @functools.partial(
        jax.shard_map, mesh=mesh, out_specs=P(),
        in_specs=(P("data", None), P(None, "model"), col, col, tok, tok),
    )  # fmt: skip
    def sharded(h, w, b, cw, y, mask):
        t, c = jaxce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, sample_weights=mask,
            reduction="sum_and_weight", axis_name="model", vocab_size=V, chunk_size=8,
            **OPTIONS,
        )  # fmt: skip
        return jaxce.weighted_mean(jax.lax.psum(t, "data"), jax.lax.psum(c, "data"))

    def put(x, *spec):
        return jax.device_put(x, jax.NamedSharding(mesh, P(*spec)))

    args = (
        put(h, "data", None), put(wp, None, "model"), put(bp, "model"), put(cwp, "model"),
        put(y, "data"), put(mask, "data"),
    )  # fmt: skip
    val, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2, 3)))(*args)
    assert_close(val, want[0], "value")
    assert_close(grads[0], want[1][0], "d hidden")
    assert_close(np.asarray(grads[1])[:, :V], want[1][1], "d weight")
    assert_close(np.asarray(grads[2])[:V], want[1][2], "d bias")
    assert_close(np.asarray(grads[3])[:V], want[1][3], "d class_weights")
    for g in grads[1:]:
        assert not np.any(np.asarray(g)[..., V:]), "padding columns got a gradient"

    @functools.partial(
        jax.shard_map, mesh=mesh, out_specs=(tok, tok),
        in_specs=(P("data", None), P(None, "model"), col, col, tok, tok),
    )  # fmt: skip
    def per_token(h, w, b, cw, y, mask):
        loss, aux = jaxce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, sample_weights=mask, axis_name="model",
            vocab_size=V, return_aux=True, **OPTIONS,
        )  # fmt: skip
        return loss, aux

    loss, aux = jax.jit(per_token)(*args)
    assert_close(loss, per_token_want, "per-token loss")
    assert_close(aux.lse, aux_want.lse, "aux.lse")
    assert_close(aux.z_loss, aux_want.z_loss, "aux.z_loss")
    np.testing.assert_array_equal(np.asarray(aux.argmax), np.asarray(aux_want.argmax))

    # Gradients of the auxiliary log-normaliser (the recompute pass of the scalar path).
    @functools.partial(
        jax.shard_map, mesh=mesh, out_specs=P(),
        in_specs=(P("data", None), P(None, "model"), col, col, tok, tok),
    )  # fmt: skip
    def mean_plus_lse(h, w, b, cw, y, mask):
        (t, c), aux = jaxce.linear_softmax_cross_entropy(
            h, w, y, bias=b, class_weights=cw, sample_weights=mask,
            reduction="sum_and_weight", axis_name="model", vocab_size=V, return_aux=True,
            **OPTIONS,
        )  # fmt: skip
        mean = jaxce.weighted_mean(jax.lax.psum(t, "data"), jax.lax.psum(c, "data"))
        return mean + jax.lax.psum(jnp.sum(jnp.sin(aux.lse)), "data")

    got = jax.jit(jax.grad(mean_plus_lse, argnums=(0, 1)))(*args)
    assert_close(got[0], aux_want.grads[0], "d hidden with aux.lse")
    assert_close(np.asarray(got[1])[:, :V], aux_want.grads[1], "d weight with aux.lse")


class _AuxWant:
    def __init__(self, lse, z_loss, argmax, grads):
        self.lse, self.z_loss, self.argmax, self.grads = lse, z_loss, argmax, grads


def main():
    assert len(jax.devices()) == 8, jax.devices()
    h, w, b, cw, y, mask = data()
    want = jax.value_and_grad(unsharded, argnums=(0, 1, 2, 3))(h, w, b, cw, y, mask)
    ref = jax.value_and_grad(materialised, argnums=(0, 1, 2, 3))(h, w, b, cw, y, mask)
    for a, c in zip(jax.tree.leaves(want), jax.tree.leaves(ref), strict=True):
        assert_close(a, c, "unsharded vs materialised")
    loss, aux = jaxce.linear_softmax_cross_entropy(
        h, w, y, bias=b, class_weights=cw, sample_weights=mask, return_aux=True, **OPTIONS
    )
    z = 4.0 * np.tanh((h.astype(np.float64) @ w + b) / 4.0)
    np.testing.assert_array_equal(np.asarray(aux.argmax), np.argmax(z, axis=1))

    def with_lse(h, w):
        return unsharded(h, w, b, cw, y, mask) + jnp.sum(
            jnp.sin(jax.nn.logsumexp(4.0 * jnp.tanh((h @ w + b) / 4.0), axis=-1))
        )

    aux_want = _AuxWant(aux.lse, aux.z_loss, aux.argmax, jax.grad(with_lse, (0, 1))(h, w))
    # 1, 2 and 4 shards: the conformance matrix's shard_map cells run them
    for shards in (8,):
        check(shards, h, w, b, cw, y, mask, want, aux_want, loss)
        print("ok", shards, flush=True)


if __name__ == "__main__":
    main()

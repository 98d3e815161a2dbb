"""The rollout corrections and the policy loss with them on a mesh of 4 host devices.

Run as a script (``tests/test_policy_corrections.py`` does, in a subprocess, because the
device count must be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python tests/sharded_policy_corrections_check.py

* under ``jax.jit`` on an Explicit and an Auto mesh, with the batch sharded over ``data``:
  ``top_entropy_mask`` (its quantile global over the whole array), ``rollout_importance_weights``,
  ``off_policy_sequence_mask`` and ``policy_gradient_loss`` with them as ``token_weights``
  (value and gradient) equal the unsharded call;
* inside ``shard_map`` with ``axis_name="data"``: ``top_entropy_mask`` equals the global mask,
  where a per-shard quantile would differ.

Prints ``OK``; any mismatch raises.
"""

from __future__ import annotations

import jax
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
AxisType = jax.sharding.AxisType


def inputs():
    rng = np.random.default_rng(0)
    b, t = 8, 6
    lp = -rng.uniform(0.1, 3.0, size=(b, t)).astype(np.float32)
    old = (lp + 0.3 * rng.normal(size=(b, t))).astype(np.float32)
    rollout = (old + 0.4 * rng.normal(size=(b, t))).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    # the entropies grow with the row: each shard of 2 rows has its own range
    entropy = (rng.uniform(0, 1, size=(b, t)) + np.arange(b)[:, None]).astype(np.float32)
    mask = np.arange(t)[None] < rng.integers(1, t + 1, size=b)[:, None]
    return lp, old, rollout, adv, entropy, mask


def corrected_loss(lp, old, rollout, adv, entropy, mask):
    tw = jaxce.rollout_importance_weights(old, rollout, mask, bounds=(None, 2.0))
    tw = tw * jaxce.off_policy_sequence_mask(lp, rollout, adv, mask, threshold=0.05)
    tw = tw * jaxce.top_entropy_mask(entropy, mask, fraction=0.5)
    loss = jaxce.policy_gradient_loss(
        lp, old, adv, mask, token_weights=tw, dual_clip=3.0, aggregation="sequence_mean"
    )
    return loss, tw


def main() -> None:
    assert jax.device_count() == 4, jax.devices()
    args = inputs()
    lp, old, rollout, adv, entropy, mask = args
    want_mask = jaxce.top_entropy_mask(entropy, mask, fraction=0.3)
    run = jax.value_and_grad(corrected_loss, has_aux=True)
    (want_loss, want_tw), want_grad = jax.jit(run)(*args)
    assert 0 < np.asarray(want_tw).astype(bool).sum() < mask.sum()

    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
        put = lambda x, m=mesh: jax.device_put(x, jax.NamedSharding(m, P("data")))
        sharded = [put(a) for a in args]
        with jax.set_mesh(mesh):
            got_mask = jax.jit(lambda e, m: jaxce.top_entropy_mask(e, m, fraction=0.3))(
                sharded[4], sharded[5]
            )
            (loss, tw), grad = jax.jit(run)(*sharded)
        np.testing.assert_array_equal(got_mask, want_mask, err_msg=str(axis_type))
        np.testing.assert_allclose(tw, want_tw, rtol=1e-6, err_msg=str(axis_type))
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=str(axis_type))
        np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-8, err_msg=str(axis_type))

    mesh = jax.make_mesh((4,), ("data",))
    inside = jax.jit(
        jax.shard_map(
            lambda e, m: jaxce.top_entropy_mask(e, m, fraction=0.3, axis_name="data"),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P("data"),
        )
    )
    per_shard = jax.jit(
        jax.shard_map(
            lambda e, m: jaxce.top_entropy_mask(e, m, fraction=0.3),
            mesh=mesh,
            in_specs=(P("data"), P("data")),
            out_specs=P("data"),
        )
    )
    e, m = (jax.device_put(x, jax.NamedSharding(mesh, P("data"))) for x in (entropy, mask))
    np.testing.assert_array_equal(inside(e, m), want_mask)
    assert not np.array_equal(per_shard(e, m), want_mask)  # a local quantile differs
    print("OK")


if __name__ == "__main__":
    main()

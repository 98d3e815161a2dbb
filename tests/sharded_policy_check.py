"""``policy_gradient_loss(aggregation="sum_and_weight")`` under ``shard_map`` on 2 host devices.

Run as a script (``tests/test_policy.py`` does, in a subprocess, because the device count must
be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharded_policy_check.py

The batch's sequences are split over a ``data`` axis; each device returns the numerator and
the token count of its shard, ``psum`` adds them, and their ratio must equal the unsharded
``token_mean`` loss, and so must its gradient. Prints ``OK``; any mismatch raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec


def main() -> None:
    assert jax.device_count() == 2, jax.devices()
    rng = np.random.default_rng(0)
    b, t = 6, 5
    lp = -rng.uniform(0.1, 3.0, size=(b, t)).astype(np.float32)
    old = (lp + 0.3 * rng.normal(size=(b, t))).astype(np.float32)
    ref = (lp + 0.3 * rng.normal(size=(b, t))).astype(np.float32)
    adv = rng.normal(size=b).astype(np.float32)
    # uneven lengths: the two shards hold different numbers of tokens
    mask = np.arange(t)[None] < np.array([5, 5, 4, 1, 2, 1])[:, None]
    kw = {"ref_log_probs": None, "kl_coef": 0.1}
    mesh = jax.make_mesh((2,), ("data",))

    def local(x, o, a, m, r):
        total, count = jaxce.policy_gradient_loss(
            x, o, a, m, aggregation="sum_and_weight", **{**kw, "ref_log_probs": r}
        )
        return jaxce.weighted_mean(jax.lax.psum(total, "data"), jax.lax.psum(count, "data"))

    sharded = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data"), P("data"), P("data"), P("data"), P("data")),
            out_specs=P(),
        )
    )
    full = lambda x: jaxce.policy_gradient_loss(x, old, adv, mask, **{**kw, "ref_log_probs": ref})
    want, want_grad = jax.value_and_grad(full)(lp)
    put = lambda x: jax.device_put(x, jax.NamedSharding(mesh, P("data")))
    args = [put(a) for a in (old, adv, mask, ref)]
    got, got_grad = jax.jit(jax.value_and_grad(lambda x: sharded(x, *args)))(put(lp))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-8)
    # a per-shard mean would differ: the shards hold 14 and 4 tokens
    assert (
        abs(
            float(want)
            - float(
                jnp.mean(
                    jnp.stack(
                        [
                            full_half
                            for full_half in (
                                jaxce.policy_gradient_loss(
                                    lp[:3],
                                    old[:3],
                                    adv[:3],
                                    mask[:3],
                                    ref_log_probs=ref[:3],
                                    kl_coef=0.1,
                                ),
                                jaxce.policy_gradient_loss(
                                    lp[3:],
                                    old[3:],
                                    adv[3:],
                                    mask[3:],
                                    ref_log_probs=ref[3:],
                                    kl_coef=0.1,
                                ),
                            )
                        ]
                    )
                )
            )
        )
        > 1e-3
    )
    print("OK")


if __name__ == "__main__":
    main()

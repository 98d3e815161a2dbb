"""The preference losses under ``jax.jit`` on a 2-device mesh sharded over the pairs.

Run as a script (``tests/test_preference_families.py`` does, in a subprocess, because the
device count must be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharded_preference_check.py

On an Explicit and an Auto mesh: every loss, AOT's batch-global sort included, equals the
unsharded call, and so do the gradients; the per-example losses (every DPO type but AOT,
weighted lists, f-divergences, KTO, Bradley-Terry, SimPO) compile without a collective.
Prints ``OK``; any mismatch raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxce

COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def per_example(a, b, c, d, good):
    return (
        jaxce.dpo_loss(
            a, b, c, d, loss_type=("sigmoid", "bco_pair", "discopop"),
            loss_weights=(1.0, 0.0, 0.5), f_divergence="alpha_divergence",
        ),
        jaxce.kto_loss(a, c, good, kl=0.1),
        jaxce.bradley_terry_loss(a, b, margin=c, center_coef=0.1),
        jaxce.simpo_loss(a, b, label_smoothing=0.1),
    )  # fmt: skip


def with_aot(a, b, c, d, good):
    aot = jaxce.dpo_loss(a, b, c, d, loss_type=("aot", "sigmoid"), label_smoothing=0.1)
    grad = jax.grad(
        lambda a: jnp.sum(jaxce.dpo_loss(a, b, c, d, loss_type="aot_unpaired", beta=0.5))
    )(a)
    return (*per_example(a, b, c, d, good), aot, grad)


def main() -> None:
    assert jax.device_count() == 2, jax.devices()
    rng = np.random.default_rng(0)
    x = [(-rng.uniform(1, 6, size=8)).astype(np.float32) for _ in range(4)]
    good = np.arange(8) % 2 == 0
    want = with_aot(*x, good)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            args = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (*x, good)]
            for got, expected in zip(jax.jit(with_aot)(*args), want, strict=True):
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
            hlo = jax.jit(per_example).lower(*args).compile().as_text()
            found = [k for k in COLLECTIVES if k in hlo]
            assert not found, (axis_type, found)
    print("OK")


if __name__ == "__main__":
    main()

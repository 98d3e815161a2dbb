"""Fused ``linear_softmax_cross_entropy`` against the materialised optax loss (not a test).

For each shape, prints forward+backward wall time (``jax.jit(jax.value_and_grad(...))``,
gradients w.r.t. hidden and weight, best of ``--reps`` after a warm-up) and the compiled
temporary memory (``memory_analysis().temp_size_in_bytes``), and the fused/optax ratios.

    python benchmarks/linear_ce.py [--reps 2] [--dtype float32]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

SHAPES = [(4096, 1024, 32768), (1024, 1024, 131072)]


def fused_loss(h, w, y):
    return jaxce.linear_softmax_cross_entropy(h, w, y, reduction="mean")


def optax_loss(h, w, y):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def measure(loss, args, reps):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(step(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return min(times), temp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    opts = parser.parse_args()
    dtype = jnp.dtype(opts.dtype)
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.processor() or ''}"
        f" dtype={dtype.name}, best of {opts.reps} after a warm-up"
    )
    print(
        f"{'N':>6} {'D':>5} {'V':>7} | {'optax s':>8} {'fused s':>8} {'time x':>7} | "
        f"{'optax MiB':>9} {'fused MiB':>9} {'mem x':>7}"
    )
    rng = np.random.default_rng(0)
    for n, d, v in SHAPES:
        h = jnp.asarray(rng.normal(size=(n, d)), dtype)
        w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
        y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
        t_ref, m_ref = measure(optax_loss, (h, w, y), opts.reps)
        t_new, m_new = measure(fused_loss, (h, w, y), opts.reps)
        print(
            f"{n:>6} {d:>5} {v:>7} | {t_ref:8.2f} {t_new:8.2f} {t_new / t_ref:7.2f} | "
            f"{m_ref / 2**20:9.1f} {m_new / 2**20:9.1f} {m_new / m_ref:7.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""Eager per-call cost of every public loss beside optax's equivalent, in one run.

Each public jaxce function is jit-compiled (``jaxce._api.public``), so an eager call costs a
dispatch of a cached executable. This measures it on small inputs, where dispatch is all
there is: ``(32, 10)`` logits. Reported: the median of several rounds of the mean time of
many calls (each call waits for its result), against optax's function of the same name
(where optax has one) and a jitted ``jax.nn.log_softmax`` (the floor of a jitted call).

Run: ``python benchmarks/eager_calls.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

N, C = 32, 10
CALLS, ROUNDS = 200, 7


def per_call_us(f) -> float:
    jax.block_until_ready(f())  # compile, warm the caches
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            jax.block_until_ready(f())
        rounds.append((time.perf_counter() - start) / CALLS * 1e6)
    return statistics.median(rounds)


def cases():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, C)), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, size=N), jnp.int32)
    t = jax.nn.softmax(jnp.asarray(rng.normal(size=(N, C)), jnp.float32))
    b = jnp.asarray(rng.uniform(size=(N, C)), jnp.float32)
    log_t = jnp.log(t)
    return {
        # name: (jaxce call, optax call or None)
        "softmax_cross_entropy_with_integer_labels": (
            lambda: jaxce.softmax_cross_entropy_with_integer_labels(x, y),
            lambda: optax.losses.softmax_cross_entropy_with_integer_labels(x, y),
        ),
        "softmax_cross_entropy": (
            lambda: jaxce.softmax_cross_entropy(x, t),
            lambda: optax.losses.softmax_cross_entropy(x, t),
        ),
        "... with label_smoothing=0.1, z_loss=1e-4": (
            lambda: jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, label_smoothing=0.1, z_loss=1e-4
            ),
            None,
        ),
        "nll_loss": (lambda: jaxce.nll_loss(log_t, y), None),
        "smooth_labels": (
            lambda: jaxce.smooth_labels(t, 0.1),
            lambda: optax.losses.smooth_labels(t, 0.1),
        ),
        "poly_loss_cross_entropy": (
            lambda: jaxce.poly_loss_cross_entropy(x, t),
            lambda: optax.losses.poly_loss_cross_entropy(x, t),
        ),
        "softmax_focal_loss": (lambda: jaxce.softmax_focal_loss(x, y), None),
        "sigmoid_binary_cross_entropy": (
            lambda: jaxce.sigmoid_binary_cross_entropy(x, b),
            lambda: optax.losses.sigmoid_binary_cross_entropy(x, b),
        ),
        "binary_cross_entropy": (lambda: jaxce.binary_cross_entropy(b, b), None),
        "sigmoid_focal_loss": (
            lambda: jaxce.sigmoid_focal_loss(x, b),
            lambda: optax.losses.sigmoid_focal_loss(x, b),
        ),
        "entropy": (lambda: jaxce.entropy(x), None),
        "binary_entropy": (lambda: jaxce.binary_entropy(x), None),
        "kl_divergence": (
            lambda: jaxce.kl_divergence(log_t, t),
            lambda: optax.losses.kl_divergence(log_t, t),
        ),
        "kl_divergence_with_log_targets": (
            lambda: jaxce.kl_divergence_with_log_targets(log_t, log_t),
            lambda: optax.losses.kl_divergence_with_log_targets(log_t, log_t),
        ),
        "softmax_kl_divergence": (lambda: jaxce.softmax_kl_divergence(x, x), None),
        "js_divergence": (lambda: jaxce.js_divergence(x, x), None),
        "weighted_mean": (lambda: jaxce.weighted_mean(x[0, 0], x[0, 1]), None),
        "pytorch.cross_entropy": (lambda: jaxce.pytorch.cross_entropy(x, y), None),
    }


def main() -> None:
    floor = jax.jit(jax.nn.log_softmax)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(N, C)), jnp.float32)
    floor_us = per_call_us(lambda: floor(x))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}, optax {optax.__version__}, load {os.getloadavg()[0]:.1f}"
    )
    print(f"jitted jax.nn.log_softmax on ({N}, {C}): {floor_us:.1f} us per call\n")
    print(f"{'function':46s} {'jaxce us':>9s} {'optax us':>9s} {'/optax':>7s} {'/floor':>7s}")
    for name, (ours, theirs) in cases().items():
        ours_us = per_call_us(ours)
        theirs_us = per_call_us(theirs) if theirs is not None else None
        ratio = f"{ours_us / theirs_us:7.2f}" if theirs_us else f"{'':7s}"
        theirs_text = f"{theirs_us:9.1f}" if theirs_us else f"{'-':>9s}"
        print(f"{name:46s} {ours_us:9.1f} {theirs_text} {ratio} {ours_us / floor_us:7.2f}")


if __name__ == "__main__":
    main()

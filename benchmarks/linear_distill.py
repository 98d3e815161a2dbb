"""Fused distillation losses against the materialised ones (not a test).

For each shape and each loss (``linear_softmax_kl_divergence`` against
``softmax_kl_divergence(h @ W, h_t @ W_t, temperature=2)``, ``linear_js_divergence`` against
``js_divergence(h @ W / 2, h_t @ W_t / 2, beta=0.5)``), prints the forward+backward wall time
of ``jax.jit(jax.value_and_grad(mean loss))`` with gradients w.r.t. the student's hidden states
and kernel (a frozen teacher; ``--teacher-grads`` adds the teacher's two), best of ``--reps``
after a warm-up, the compiled temporary memory (``memory_analysis().temp_size_in_bytes``), and
the fused/materialised ratios, all in the same run.

    python benchmarks/linear_distill.py [--reps 2] [--dtype float32] [--teacher-grads]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

# (N tokens, D student, D_t teacher, V vocabulary)
SHAPES = [(2048, 256, 512, 32768), (512, 256, 512, 131072)]
TEMPERATURE = 2.0


def fused_kl(h, w, ht, wt):
    return jaxce.linear_softmax_kl_divergence(
        h, w, ht, wt, temperature=TEMPERATURE, reduction="mean"
    )


def fused_js(h, w, ht, wt):
    return jaxce.linear_js_divergence(h, w, ht, wt, temperature=TEMPERATURE, reduction="mean")


def logits(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def materialised_kl(h, w, ht, wt):
    return jaxce.softmax_kl_divergence(
        logits(h, w), logits(ht, wt), temperature=TEMPERATURE, reduction="mean"
    )


def materialised_js(h, w, ht, wt):
    s, t = logits(h, w) / TEMPERATURE, logits(ht, wt) / TEMPERATURE
    return jaxce.js_divergence(s, t, reduction="mean")


LOSSES = {"kl": (materialised_kl, fused_kl), "js": (materialised_js, fused_js)}


def measure(loss, args, argnums, reps):
    step = jax.jit(jax.value_and_grad(loss, argnums=argnums))
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
    parser.add_argument("--reps", type=int, default=2, help="timed runs after a warm-up")
    parser.add_argument("--dtype", default="float32", help="dtype of the four arrays")
    parser.add_argument(
        "--teacher-grads", action="store_true", help="differentiate the teacher's arrays too"
    )
    opts = parser.parse_args()
    dtype = jnp.dtype(opts.dtype)
    argnums = (0, 1, 2, 3) if opts.teacher_grads else (0, 1)
    wrt = "student and teacher" if opts.teacher_grads else "student"
    print(
        f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {platform.processor() or ''}"
        f" dtype={dtype.name}, grads w.r.t. {wrt}, best of {opts.reps} after a warm-up"
    )
    print(
        f"{'loss':>4} {'N':>5} {'D':>4} {'D_t':>4} {'V':>7} | {'dense s':>8} {'fused s':>8} "
        f"{'time x':>6} | {'dense MiB':>9} {'fused MiB':>9} {'mem x':>7}"
    )
    rng = np.random.default_rng(0)
    for n, d, dt, v in SHAPES:
        args = (
            jnp.asarray(rng.normal(size=(n, d)), dtype),
            jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype),
            jnp.asarray(rng.normal(size=(n, dt)), dtype),
            jnp.asarray(rng.normal(size=(dt, v)) / np.sqrt(dt), dtype),
        )
        for name, (dense, fused) in LOSSES.items():
            t_ref, m_ref = measure(dense, args, argnums, opts.reps)
            t_new, m_new = measure(fused, args, argnums, opts.reps)
            print(
                f"{name:>4} {n:>5} {d:>4} {dt:>4} {v:>7} | {t_ref:8.2f} {t_new:8.2f} "
                f"{t_new / t_ref:6.2f} | {m_ref / 2**20:9.1f} {m_new / 2**20:9.1f} "
                f"{m_new / m_ref:7.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

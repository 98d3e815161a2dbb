"""Fused top-k sparse distillation against the materialised student logits (not a test).

For each shape, ``linear_sparse_distillation_loss(h, W, ids, t)`` (the teacher's stored top-k
ids and log-probabilities, a tail bucket, ``T = 2``) against
``sparse_distillation_loss(h @ W, ids, t)`` on the materialised ``(N, V)`` logits: the
forward+backward wall time of ``jax.jit(jax.value_and_grad(mean loss))`` w.r.t. the student's
hidden states and kernel, median of ``--reps`` interleaved runs after a warm-up, the compiled
temporary memory (``memory_analysis().temp_size_in_bytes``) and the fused/materialised ratios,
all in the same run.

    python benchmarks/sparse_distill.py [--reps 3] [--dtype float32] [--k 64] [--shape N,D,V]
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np
from linear_ce import add_common_arguments, interleaved_times, machine, problem

import jaxce

SHAPES = [(2048, 256, 32768), (512, 256, 131072)]
TEMPERATURE = 2.0


def fused(h, w, ids, t):
    return jaxce.linear_sparse_distillation_loss(
        h, w, ids, t, temperature=TEMPERATURE, reduction="mean"
    )


def materialised(h, w, ids, t):
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return jaxce.sparse_distillation_loss(z, ids, t, temperature=TEMPERATURE, reduction="mean")


def teacher(rng, n, v, k):
    """A teacher's top-k ids and log-probabilities (a peaked random distribution)."""
    z = jnp.asarray(rng.normal(size=(n, v)) * 3, jnp.float32)
    top, ids = jax.lax.top_k(jax.nn.log_softmax(z), k)
    return ids, top


def step(loss, args):
    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = run.lower(*args).compile().memory_analysis().temp_size_in_bytes
    return (lambda: jax.block_until_ready(run(*args))), temp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--k", type=int, default=64, help="the teacher's stored ids per token")
    opts = parser.parse_args()
    dtype = jnp.dtype(opts.dtype)
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, {machine()}, dtype={dtype.name}, k={opts.k}, median "
        f"of {opts.reps} interleaved after a warm-up, load average {os.getloadavg()}"
    )
    rng = np.random.default_rng(0)
    for n, d, v in opts.shape or SHAPES:
        h, w, _ = problem(rng, n, d, v, dtype)
        ids, t = teacher(rng, n, v, opts.k)
        steps, temps = {}, {}
        for name, loss in (("materialised", materialised), ("fused", fused)):
            steps[name], temps[name] = step(loss, (h, w, ids, t))
        times = interleaved_times(steps, opts.reps)
        ref = float(np.median(times["materialised"]))
        digits = 2 if ref >= 1 else 4
        print(f"N={n} D={d} V={v}  load average {os.getloadavg()}")
        for name, ts in times.items():
            med = float(np.median(ts))
            mem = temps[name] / 2**20
            ratio = temps[name] / temps["materialised"]
            runs = " ".join(f"{x:.{digits}f}" for x in ts)
            print(
                f"  {name:>12}: {med:7.{digits}f} s ({med / ref:.2f}x materialised) [{runs}]  "
                f"temp {mem:9.1f} MiB ({ratio:.3f})"
            )
        print(flush=True)


if __name__ == "__main__":
    main()

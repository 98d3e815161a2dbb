"""Fused ``linear_softmax_cross_entropy`` against the materialised optax loss and torch's
``F.linear_cross_entropy`` (not a test).

For each shape, forward+backward wall time of the mean loss with gradients w.r.t. hidden and
weight, median of ``--reps`` runs interleaved across the methods after a warm-up each, and the
compiled temporaries of the JAX ones (``memory_analysis().temp_size_in_bytes``). Ratios are
against optax measured in the same run. Methods:

* ``optax``: ``jax.jit(jax.value_and_grad(lambda h, W: optax.softmax_cross_entropy_with_
  integer_labels(h @ W, y).mean()))``, the materialised logits;
* ``fused``: ``reduction="mean"``, the gradient-in-forward path (token tiles);
* ``recompute``: ``jnp.mean(reduction="none")``, the recompute path (vocabulary tiles,
  logits recomputed in the backward pass): the other loop order, same result;
* ``torch``: ``F.linear_cross_entropy(h, W.T, y)`` then ``.backward()``, eager, if installed.

    python benchmarks/linear_ce.py [--reps 3] [--dtype float32] [--shape N,D,V ...]

On an accelerator, the issue's GPU case is
``python benchmarks/linear_ce.py --dtype bfloat16 --shape 8192,2304,256000`` (torch's CPU
loss is measured only for float32 on the CPU backend).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

SHAPES = [(4096, 1024, 32768), (1024, 1024, 131072)]


def optax_loss(h, w, y):
    logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fused_loss(h, w, y):
    return jaxce.linear_softmax_cross_entropy(h, w, y, reduction="mean")


def recompute_loss(h, w, y):
    return jnp.mean(jaxce.linear_softmax_cross_entropy(h, w, y, reduction="none"))


def jax_step(loss, args):
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    return (lambda: jax.block_until_ready(step(*args))), temp


def torch_step(h, w, y):
    try:
        import torch
    except ImportError:
        return None
    functional = torch.nn.functional
    if not hasattr(functional, "linear_cross_entropy"):
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    th = torch.tensor(np.asarray(h, np.float32), requires_grad=True)
    tw = torch.tensor(np.asarray(w, np.float32).T.copy(), requires_grad=True)  # (V, D)
    ty = torch.tensor(np.asarray(y), dtype=torch.int64)

    def run():
        th.grad = tw.grad = None
        functional.linear_cross_entropy(th, tw, ty).backward()

    return run


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
            platform.processor(),
        )
    except OSError:
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--reps``, ``--dtype`` and the repeatable ``--shape N,D,V`` of the fused benchmarks."""
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--shape",
        action="append",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        help="N,D,V (repeatable; default: the two CPU shapes)",
    )


def problem(rng, n: int, d: int, v: int, dtype):
    """Hidden states ``(n, d)``, a ``(d, v)`` kernel and int32 labels."""
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32)
    return h, w, y


def interleaved_times(steps: dict, reps: int) -> dict:
    """Seconds per run of each step, ``reps`` rounds interleaved after one warm-up each."""
    for run in steps.values():
        run()  # warm-up (compiles)
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    opts = parser.parse_args()
    dtype = jnp.dtype(opts.dtype)
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, {machine()}, dtype={dtype.name}, median of "
        f"{opts.reps} interleaved after a warm-up, load average {os.getloadavg()}"
    )
    rng = np.random.default_rng(0)
    for n, d, v in opts.shape or SHAPES:
        h, w, y = problem(rng, n, d, v, dtype)
        steps, temps = {}, {}
        for name, loss in (
            ("optax", optax_loss),
            ("fused", fused_loss),
            ("recompute", recompute_loss),
        ):
            steps[name], temps[name] = jax_step(loss, (h, w, y))
        on_cpu = jax.default_backend() == "cpu"
        torch_run = torch_step(h, w, y) if dtype == jnp.float32 and on_cpu else None
        if torch_run is not None:
            steps["torch"] = torch_run
        times = interleaved_times(steps, opts.reps)
        ref = float(np.median(times["optax"]))
        digits = 2 if ref >= 1 else 4  # an accelerator's times are milliseconds
        print(f"N={n} D={d} V={v}  load average {os.getloadavg()}")
        for name, ts in times.items():
            med = float(np.median(ts))
            if name in temps:
                mem = f"{temps[name] / 2**20:9.1f} MiB ({temps[name] / temps['optax']:.3f})"
            else:
                mem = "not measured"
            runs = " ".join(f"{t:.{digits}f}" for t in ts)
            print(f"  {name:>9}: {med:7.{digits}f} s ({med / ref:.2f}x optax) [{runs}]  temp {mem}")
        print(flush=True)


if __name__ == "__main__":
    main()

"""Forward+backward time of integer-label softmax cross-entropy, against its peers.

Measures, in one run on one machine, ``value_and_grad`` of the mean integer-label CE on
``(N, C)`` float32 logits for jaxce, optax and PyTorch (CPU, eager autograd), and a plain copy
of the logits (read + write, the bandwidth floor a fused forward+backward must pay at least
once). Prints times, ratios and XLA's compiled memory.

    python benchmarks/softmax_ce.py [--n 4096] [--c 32768] [--reps 10]
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jaxce


def best_time(fn, reps: int) -> float:
    """Best wall time of ``fn()`` over ``reps`` runs after one warm-up (seconds)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def jax_timer(loss, logits, labels, reps):
    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(logits, labels).compile()
    memory = compiled.memory_analysis()

    def run():
        _, grad = compiled(logits, labels)
        grad.block_until_ready()

    return best_time(run, reps), memory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--c", type=int, default=32768)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    logits_np = rng.normal(size=(args.n, args.c)).astype(np.float32)
    labels_np = rng.integers(0, args.c, size=args.n).astype(np.int32)
    logits, labels = jnp.asarray(logits_np), jnp.asarray(labels_np)
    gib = logits_np.nbytes / 2**30

    def jaxce_loss(x, y):
        return jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

    def optax_loss(x, y):
        return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()

    t_jaxce, m_jaxce = jax_timer(jaxce_loss, logits, labels, args.reps)
    t_optax, m_optax = jax_timer(optax_loss, logits, labels, args.reps)

    copy = jax.jit(lambda x: x * 1.0001)  # one read and one write of the logits
    t_copy = best_time(lambda: copy(logits).block_until_ready(), args.reps)

    xt = torch.from_numpy(logits_np).requires_grad_(True)
    yt = torch.from_numpy(labels_np.astype(np.int64))

    def torch_step():
        xt.grad = None
        torch.nn.functional.cross_entropy(xt, yt).backward()

    t_torch = best_time(torch_step, args.reps)

    print(
        f"machine: {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"integer-label CE, value_and_grad of the mean, logits ({args.n}, {args.c}) float32 "
        f"= {gib:.2f} GiB, best of {args.reps}"
    )
    print(f"  copy (read+write)   {t_copy * 1e3:8.1f} ms")
    print(f"  jaxce               {t_jaxce * 1e3:8.1f} ms")
    print(f"  optax               {t_optax * 1e3:8.1f} ms")
    print(f"  torch CPU           {t_torch * 1e3:8.1f} ms")
    print(f"  jaxce / optax  = {t_jaxce / t_optax:.2f}   (target <= 1)")
    print(f"  jaxce / torch  = {t_jaxce / t_torch:.2f}   (target <= 0.5)")
    print(f"  jaxce / copy   = {t_jaxce / t_copy:.2f}   (target <= 1.5)")
    for name, mem in (("jaxce", m_jaxce), ("optax", m_optax)):
        print(
            f"  compiled temp memory {name}: {mem.temp_size_in_bytes / 2**20:8.1f} MiB "
            f"(output {mem.output_size_in_bytes / 2**20:.1f} MiB)"
        )


if __name__ == "__main__":
    main()

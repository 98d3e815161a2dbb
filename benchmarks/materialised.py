"""Materialised losses against the ``jnp`` formula a user would write and optax's function.

For each loss, ``jax.jit(jax.value_and_grad(mean loss, argnums=<every logits argument>))`` on
float32 ``(N, C)`` inputs, measured side by side in one run: the median of interleaved timed
runs (one call of each contender per round, so load drifts hit all of them alike), XLA's
compiled temporary memory (``memory_analysis().temp_size_in_bytes``) and the number of
full-size ``(N, C)`` arrays the optimised program writes (outputs of the entry computation's
fusions and copies: the passes over memory). Ratios are to the better of the two peers.

The default runs two shapes: 4096 x 32768 (exactly 2**27 elements, where XLA CPU's YNNPACK
fusions write full-size arrays that other sizes would not) and 4095 x 32768.

    python benchmarks/materialised.py [--quick] [--rounds 7] [--only softmax_kl_divergence]

optax has no ``js_divergence`` or ``entropy``: their optax column is the formula built from
optax's own pieces (``kl_divergence_with_log_targets``, ``safe_softmax_cross_entropy``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxce

_LOG_HALF = float(np.log(0.5))


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # the inputs: "two_logits", "soft", "labels", "one", "log_and_probs", "binary"
    argnums: tuple[int, ...]
    jaxce: Callable
    hand: Callable
    optax: Callable


def _hand_kl(s, t):
    log_p, log_q = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _hand_js(a, b):
    log_p, log_q = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    log_m = jnp.log(0.5 * (p + q))
    return 0.5 * jnp.sum(p * (log_p - log_m), -1) + 0.5 * jnp.sum(q * (log_q - log_m), -1)


def _optax_js(a, b):
    log_p, log_q = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    log_m = jnp.logaddexp(log_p, log_q) + _LOG_HALF
    kl = optax.losses.kl_divergence_with_log_targets
    return 0.5 * kl(log_m, log_p) + 0.5 * kl(log_m, log_q)


def _hand_entropy(x):
    log_p = jax.nn.log_softmax(x)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _hand_kl_targets(log_q, p):
    return jnp.sum(p * (jnp.where(p == 0, 0.0, jnp.log(p)) - log_q), axis=-1)


def _hand_bce(x, y):
    return jnp.maximum(x, 0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


CASES = (
    Case(
        "softmax_kl_divergence",
        "two_logits",
        (0, 1),
        jaxce.softmax_kl_divergence,
        _hand_kl,
        lambda s, t: optax.losses.kl_divergence_with_log_targets(
            jax.nn.log_softmax(s), jax.nn.log_softmax(t)
        ),
    ),
    Case("js_divergence", "two_logits", (0, 1), jaxce.js_divergence, _hand_js, _optax_js),
    Case(
        "softmax_cross_entropy",
        "soft",
        (0,),
        jaxce.softmax_cross_entropy,
        lambda x, y: -jnp.sum(y * jax.nn.log_softmax(x), axis=-1),
        optax.losses.softmax_cross_entropy,
    ),
    Case(
        "softmax_cross_entropy_with_integer_labels",
        "labels",
        (0,),
        jaxce.softmax_cross_entropy_with_integer_labels,
        lambda x, y: (
            jax.nn.logsumexp(x, axis=-1) - jnp.take_along_axis(x, y[:, None], axis=-1)[:, 0]
        ),
        optax.losses.softmax_cross_entropy_with_integer_labels,
    ),
    Case(
        "entropy",
        "one",
        (0,),
        jaxce.entropy,
        _hand_entropy,
        lambda x: optax.losses.safe_softmax_cross_entropy(x, jax.nn.softmax(x)),
    ),
    Case(
        "kl_divergence",
        "log_and_probs",
        (0,),
        jaxce.kl_divergence,
        _hand_kl_targets,
        optax.losses.kl_divergence,
    ),
    Case(
        "sigmoid_binary_cross_entropy",
        "binary",
        (0,),
        jaxce.sigmoid_binary_cross_entropy,
        _hand_bce,
        optax.losses.sigmoid_binary_cross_entropy,
    ),
)


def inputs(kind: str, n: int, c: int, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)

    def normal():
        return jnp.asarray(rng.normal(size=(n, c)).astype(np.float32))

    x = normal()
    if kind == "one":
        return (x,)
    if kind == "two_logits":
        return x, x + 0.5 * normal()
    if kind == "soft":
        return x, jax.nn.softmax(normal())
    if kind == "labels":
        return x, jnp.asarray(rng.integers(0, c, size=n).astype(np.int32))
    if kind == "log_and_probs":
        return jax.nn.log_softmax(x), jax.nn.softmax(normal())
    if kind == "binary":
        return x, jnp.asarray((rng.random(size=(n, c)) < 0.3).astype(np.float32))
    raise ValueError(kind)


def step(loss: Callable, argnums: tuple[int, ...]) -> Callable:
    def mean_loss(*args):
        return jnp.mean(loss(*args))

    return jax.jit(jax.value_and_grad(mean_loss, argnums=argnums))


_SKIP = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant")


def full_size_writes(hlo: str, shape: tuple[int, int]) -> int:
    """How many ``(N, C)`` arrays the entry computation's instructions write."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    pattern = re.compile(rf"\b[a-z]+\d*\[{shape[0]},{shape[1]}\]")
    count = 0
    for line in entry.splitlines()[1:]:
        if "=" not in line:
            continue
        lhs, rhs = line.split("=", 1)
        op = re.match(r"\s*(?:\([^=]*\)|\S+)\s+([\w-]+)", rhs)
        if op is None or op.group(1) in _SKIP:
            continue
        count += len(pattern.findall(rhs[: op.end(1)]))
    return count


@dataclass
class Compiled:
    fn: Callable
    temp: int
    writes: int


def compile_contender(loss, argnums, args) -> Compiled:
    compiled = step(loss, argnums).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    return Compiled(compiled, temp, full_size_writes(compiled.as_text(), args[0].shape))


def interleaved_medians(fns: dict[str, Callable], args, rounds: int) -> dict[str, float]:
    def run(fn):
        jax.block_until_ready(fn(*args))

    for fn in fns.values():
        run(fn)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            run(fn)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(case: Case, n: int, c: int, rounds: int) -> None:
    args = inputs(case.kind, n, c)
    contenders = {
        "jaxce": lambda *a: case.jaxce(*a),
        "hand": case.hand,
        "optax": case.optax,
    }
    compiled = {k: compile_contender(f, case.argnums, args) for k, f in contenders.items()}
    if rounds:
        times = interleaved_medians({k: v.fn for k, v in compiled.items()}, args, rounds)
    else:  # compiled memory only
        times = dict.fromkeys(contenders, float("nan"))
    best_time = min(times["hand"], times["optax"])
    best_temp = min(compiled["hand"].temp, compiled["optax"].temp)
    mib = 2**20
    row = "  ".join(
        f"{k} {times[k] * 1e3:7.1f} ms {compiled[k].temp / mib:6.0f} MiB {compiled[k].writes:2d} w"
        for k in contenders
    )
    temp_ratio = compiled["jaxce"].temp / best_temp if best_temp else float("nan")
    temp_text = (
        f"{temp_ratio:.2f}x"
        if best_temp
        else ("=" if compiled["jaxce"].temp == 0 else f"+{compiled['jaxce'].temp / mib:.0f} MiB")
    )
    print(f"{case.name:42s} {row}  | time {times['jaxce'] / best_time:.2f}x  temp {temp_text}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape (512 x 4096)")
    parser.add_argument("--rounds", type=int, default=7, help="0: compiled memory only")
    parser.add_argument("--c", type=int, default=32768)
    parser.add_argument("--rows", type=int, nargs="*", default=None)
    parser.add_argument("--only", nargs="*", default=None, help="loss names to run")
    args = parser.parse_args(argv)
    c = 4096 if args.quick else args.c
    rows = args.rows or ([512] if args.quick else [4096, 4095])
    cases = [k for k in CASES if args.only is None or k.name in args.only]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, optax {optax.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("value_and_grad of the mean, float32; w = full-size arrays written")
    for n in rows:
        print(f"-- ({n}, {c}), median of {args.rounds} interleaved rounds")
        for case in cases:
            measure(case, n, c, args.rounds)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Fused losses on a (data=2, model=4) mesh of 8 host-CPU devices under plain ``jax.jit``
(not a test).

For each layout and each loss, value and gradients w.r.t. hidden and weight, compiled with
``jax.jit(jax.value_and_grad(...))`` on the mesh, and for each method: the per-device compiled
temporaries (``memory_analysis().temp_size_in_bytes``), the collectives of the compiled program
(counted from its HLO text: all-gather, all-reduce, all-to-all, collective-permute,
reduce-scatter, each with the bytes it produces per device; one inside a loop body is counted
once, and marked), the wall time (median of ``--reps`` runs interleaved across the methods after
a warm-up each), the sharding of the weight's gradient and the value's distance from the
materialised one. Ratios are against the two materialised peers measured in the same run.

Layouts (``hidden`` ``P("data", None)``, labels ``P("data")`` in all of them):

* ``explicit-vocab``: Explicit mesh, weight ``P(None, "model")``: the fused loss is
  vocab-parallel from the weight's sharding type, with no argument;
* ``explicit-fsdp``: Explicit mesh, weight ``P("model", None)`` (FSDP: sharded over ``D``):
  the fused loss re-lays the weight out over the vocabulary (an all-to-all);
* ``auto-vocab``: Auto mesh, weight ``P(None, "model")``, the fused loss called with
  ``vocab_axis="model"``; ``fused-plain`` is the same call without it (the partitioner alone).

Losses and methods:

* ``ce``: mean cross-entropy; ``fused`` is ``jaxce.linear_softmax_cross_entropy``;
* ``logp``: ``sum(a * log_probs + c * entropy)`` (random per-token ``a``, ``c``: the cotangents
  of a policy-gradient loss with an entropy bonus); ``fused`` is ``jaxce.linear_log_probs(...,
  return_entropy=True)``;
* ``mat-jaxce``: the materialised ``hidden @ W`` (float32 logits, on the same mesh) and jaxce's
  ``softmax_cross_entropy_with_integer_labels`` (and ``entropy``);
* ``mat-optax``: the same logits and ``optax.softmax_cross_entropy_with_integer_labels`` (the
  entropy as ``optax.softmax_cross_entropy(z, softmax(z))``).

A method that does not trace or compile on a layout is reported with its error, not skipped
silently. Where a materialised peer does not trace (on an Explicit mesh, a label gather from
vocab-sharded logits), it is measured again on the weight gathered whole on every device
(``jax.sharding.reshard(W, P())``, as FSDP does), and marked ``*``.

    python benchmarks/sharded.py [--reps 3] [--shape N,D,V] [--layout NAME] [--quick]

``--reps 0`` times only the one run after compiling (the materialised peers on a gathered
weight take minutes a run on a small CPU); ``--no-run`` only compiles (the temporaries and the
collectives do not depend on the machine's load).

The script sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself (before JAX
starts) unless ``XLA_FLAGS`` already fixes a device count.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from linear_ce import (  # noqa: E402  # this folder's fused cross-entropy benchmark
    add_common_arguments,
    interleaved_times,
    machine,
    problem,
)

import jaxce  # noqa: E402

MESH_SHAPE = (2, 4)
MESH_AXES = ("data", "model")
SHAPES = [(2048, 512, 65536)]
QUICK_SHAPE = (512, 128, 8192)
LAYOUTS = {  # name: (axis type, weight spec, keywords of the fused call)
    "explicit-vocab": (AxisType.Explicit, P(None, "model"), {}),
    "explicit-fsdp": (AxisType.Explicit, P("model", None), {}),
    "auto-vocab": (AxisType.Auto, P(None, "model"), {"vocab_axis": "model"}),
}
PEERS = ("mat-jaxce", "mat-optax", "mat-jaxce*", "mat-optax*")
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip


# ------------------------------------------------------------------------------- the losses


def logits(h, w):
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def row_whole(loss):
    """``loss`` on the weight gathered whole (``reshard(W, P())``): logits ``P("data", None)``.

    On an Explicit mesh ``h @ W`` with a vocab-sharded ``W`` gives vocab-sharded logits, and a
    label gather from them has no output sharding JAX can infer; where the loss then refuses
    to trace, this is the materialised loss a user can write there (FSDP's gather).
    """

    def whole(h, w, *rest):
        return loss(h, jax.sharding.reshard(w, P()), *rest)

    return whole


def ce_fused(**keywords):
    def loss(h, w, y):
        return jaxce.linear_softmax_cross_entropy(h, w, y, reduction="mean", **keywords)

    return loss


def ce_mat_jaxce(h, w, y):
    return jaxce.softmax_cross_entropy_with_integer_labels(logits(h, w), y, reduction="mean")


def ce_mat_optax(h, w, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(h, w), y).mean()


def logp_fused(**keywords):
    def loss(h, w, y, a, c):
        lp, ent = jaxce.linear_log_probs(h, w, y, return_entropy=True, **keywords)
        return jnp.sum(a * lp + c * ent)

    return loss


def logp_mat_jaxce(h, w, y, a, c):
    z = logits(h, w)
    lp = -jaxce.softmax_cross_entropy_with_integer_labels(z, y)
    return jnp.sum(a * lp + c * jaxce.entropy(z))


def logp_mat_optax(h, w, y, a, c):
    z = logits(h, w)
    lp = -optax.softmax_cross_entropy_with_integer_labels(z, y)
    ent = optax.softmax_cross_entropy(z, jax.nn.softmax(z))  # H(p) = CE(p, p)
    return jnp.sum(a * lp + c * ent)


def methods(loss: str, keywords: dict) -> dict:
    """The methods measured for ``loss`` ("ce" or "logp") on a layout."""
    fused, mat_jaxce, mat_optax = {
        "ce": (ce_fused, ce_mat_jaxce, ce_mat_optax),
        "logp": (logp_fused, logp_mat_jaxce, logp_mat_optax),
    }[loss]
    found = {"fused": fused(**keywords)}
    if keywords:
        found["fused-plain"] = fused()
    return found | {"mat-jaxce": mat_jaxce, "mat-optax": mat_optax}


FALLBACKS = {"mat-jaxce": "mat-jaxce*", "mat-optax": "mat-optax*"}  # * : row_whole


# ------------------------------------------------------------------- what a program contains


def _array_bytes(shape_text: str) -> list[int]:
    """Bytes of each array in an HLO shape such as ``f32[8,16]{1,0}`` or a tuple of them."""
    sizes = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape_text):
        count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        sizes.append(count * DTYPE_BYTES.get(dtype, 4))
    return sizes


_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?[\w.\-]+\s.*\{\s*$")
_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)


def collectives(hlo: str) -> dict[str, dict]:
    """``{op: {"count", "bytes", "largest", "nested"}}`` of the collectives in compiled HLO.

    ``bytes`` sums what each produces per device, ``largest`` is the biggest single one and
    ``nested`` counts those outside the entry computation (loop bodies and called
    computations: they run once per call, not once per program).
    """
    found: dict[str, dict] = {}
    in_entry = False
    for line in hlo.splitlines():
        if _COMPUTATION.match(line):
            in_entry = line.startswith("ENTRY")
            continue
        match = _COLLECTIVE.search(line)
        if match is None:
            continue
        sizes = _array_bytes(match["shape"])
        if match["start"] and match["op"] in ("all-gather", "collective-permute") and sizes:
            sizes = sizes[-1:]  # the async start's tuple holds the operand and the result
        entry = found.setdefault(match["op"], Counter())
        entry["count"] += 1
        entry["bytes"] += sum(sizes)
        entry["largest"] = max(entry["largest"], sum(sizes))
        entry["nested"] += 0 if in_entry else 1
    return found


def describe_collectives(found: dict[str, dict]) -> str:
    if not found:
        return "none"
    parts = []
    for op in COLLECTIVES:
        if op in found:
            c = found[op]
            nested = f", {c['nested']} in loops" if c["nested"] else ""
            parts.append(
                f"{op} x{c['count']} {_mib(c['bytes'])} (largest {_mib(c['largest'])}{nested})"
            )
    return "; ".join(parts)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**20 * 10 else f"{n / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------- measuring


def compile_step(loss, args, execute: bool = True):
    """``(run, temp_bytes, collectives, value, dweight_sharding, first_time)`` or an error.

    The compiled step runs once (unless ``execute`` is false: then value, sharding and time
    are ``None``), timed: ``first_time`` is the time of that first run after compiling.
    """
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    value = dw = seconds = None
    try:
        compiled = step.lower(*args).compile()
        if execute:
            start = time.perf_counter()
            value, (_, dw) = jax.block_until_ready(compiled(*args))
            seconds = time.perf_counter() - start
    except Exception as error:  # noqa: BLE001  # reported, not hidden
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"{type(error).__name__}: {first[:160]}"
    temp = compiled.memory_analysis().temp_size_in_bytes
    found = collectives(compiled.as_text())
    run = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
    value = None if value is None else float(value)
    return run, temp, found, value, None if dw is None else dw.sharding.spec, seconds


def place(arrays, specs):
    return [jax.device_put(a, spec) for a, spec in zip(arrays, specs, strict=True)]


def run_layout(name, rng, shape, dtype, reps, execute):
    axis_type, weight_spec, keywords = LAYOUTS[name]
    n, d, v = shape
    mesh = jax.make_mesh(MESH_SHAPE, MESH_AXES, axis_types=(axis_type,) * len(MESH_AXES))
    h, w, y = problem(rng, n, d, v, dtype)
    a = jnp.asarray(rng.normal(size=n), jnp.float32)
    c = jnp.asarray(rng.normal(size=n) * 0.01, jnp.float32)
    weight_bytes = w.size * w.dtype.itemsize
    with jax.set_mesh(mesh):
        ce_args = place((h, w, y), (P("data", None), weight_spec, P("data")))
        logp_args = [*ce_args, *place((a, c), (P("data"), P("data")))]
        for loss, args in (("ce", ce_args), ("logp", logp_args)):
            print(f"{name} {loss}: weight {weight_spec} ({_mib(weight_bytes)} whole)", flush=True)
            results = {}
            for method, f in methods(loss, keywords).items():
                results[method] = compile_step(f, args, execute)
                if isinstance(results[method], str) and method in FALLBACKS:
                    results[FALLBACKS[method]] = compile_step(row_whole(f), args, execute)
            report(results, reps, execute)


def report(results: dict, reps: int, execute: bool) -> None:
    ok = {m: r for m, r in results.items() if not isinstance(r, str)}
    if not execute:
        med = {}
    elif reps == 0:  # the first run after compiling, nothing else
        med = {m: r[5] for m, r in ok.items()}
    else:
        times = interleaved_times({m: r[0] for m, r in ok.items()}, reps) if ok else {}
        med = {m: float(np.median(ts)) for m, ts in times.items()}
    reference = next((ok[m][3] for m in PEERS if m in ok), None)
    for method, result in results.items():
        if isinstance(result, str):
            print(f"  {method:>11}: does not run: {result}")
            continue
        _, temp, found, value, dw_spec, _ = result
        time_ratios = ", ".join(f"{med[method] / med[p]:.2f}x {p}" for p in PEERS if p in med)
        temp_ratios = ", ".join(
            f"{temp / ok[p][1]:.3f} of {p}" for p in PEERS if p in ok and ok[p][1]
        )
        timing = f"{med[method]:6.3f} s ({time_ratios or 'no peer'})  " if med else ""
        checks = f"  dW {dw_spec}" if execute else ""
        if execute and reference is not None:
            checks += f"  |value - mat| {abs(value - reference):.1e}"
        print(f"  {method:>11}: {timing}temp {_mib(temp)} ({temp_ratios or 'no peer'}){checks}")
        print(f"  {'':>11}  collectives: {describe_collectives(found)}")
    print(f"  load average {os.getloadavg()}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument(
        "--quick", action="store_true", help=f"one small shape {QUICK_SHAPE}, one rep"
    )
    parser.add_argument(
        "--layout", action="append", choices=sorted(LAYOUTS), help="repeatable; default: all"
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="compile only: temporaries and collectives, no time and no value check",
    )
    opts = parser.parse_args()
    shapes = [QUICK_SHAPE] if opts.quick else opts.shape or SHAPES
    reps = 1 if opts.quick else opts.reps
    timing = (
        "not timed"
        if opts.no_run
        else (
            f"median of {reps} interleaved after a warm-up" if reps else "one run after compiling"
        )
    )
    dtype = jnp.dtype(opts.dtype)
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
        f"{len(jax.devices())} x {jax.devices()[0].device_kind} devices on {machine()}, mesh "
        f"{dict(zip(MESH_AXES, MESH_SHAPE, strict=True))}, dtype={dtype.name}, {timing}, "
        f"load average {os.getloadavg()}"
    )
    rng = np.random.default_rng(0)
    for shape in shapes:
        print(f"N={shape[0]} D={shape[1]} V={shape[2]}")
        for name in opts.layout or LAYOUTS:
            run_layout(name, rng, shape, dtype, reps, not opts.no_run)
        print(flush=True)


if __name__ == "__main__":
    main()

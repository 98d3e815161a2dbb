"""The conformance matrix's mesh cells: every registry entry data-parallel under plain ``jit``.

Run as a script on 8 host devices (``tests/test_mesh.py`` does, once per test session)::

    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 \
      --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false" \
      python tests/mesh_check.py OUT.json [ENTRY]

For each entry of ``conformance_registry.ENTRIES`` and each of its mesh cells (``CELLS``: an
Explicit mesh, ``jax.make_mesh``'s default, or an Auto one, of 4 or 8 devices, used with
``jax.set_mesh``), the batched inputs (``Entry.batched``) are sharded over their example axis
and the shared ones replicated, and one ``jit`` computes, for every reduction, the output and
``jax.value_and_grad`` of it (a fixed cotangent through every float output) with respect to
the float inputs (``Entry.float_args``). The cell checks:

* ``value``/``grad``: equal to the same program on one device, unsharded;
* ``grad-sharding``: each gradient has its input's sharding;
* ``batch-sharding``: the per-example output (``Entry.per_example``) is sharded over the batch;
* ``hlo``: the per-example program (``reductions[0]``, value only) compiles with no
  collective, and the whole program (scalar reductions, gradients) with all-reduces only.

Entries whose value is a statistic of the whole batch (``per_example=False`` with no
reduction, e.g. ``ntxent``'s all-pairs similarities, and ``BATCH_GLOBAL``) keep only the
value, gradient and sharding checks; the collectives their HLO holds are reported. The script writes
``{cell: {"result": "ok" or what failed, "collectives": {...}}}`` to ``OUT.json``.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
import zlib

import conformance_registry as reg
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

# Compile time is most of the run: ``test_mesh.py`` runs this with ``helpers.FAST_COMPILE_FLAGS``.
# The backend's optimisations do not change which collectives the partitioned HLO holds, nor
# (beyond rounding) the values.
N = 8  # examples: divides every mesh size
AXIS = "batch"
TOL = {"rtol": 2e-5, "atol": 2e-6}
# (axis type, devices) of every entry's cells, and the other combinations for a few entries
# (one or two per family), to keep the product small.
MAIN_CELLS = (("explicit", 8), ("auto", 4))
EXTRA_CELLS = (("explicit", 4), ("auto", 8))
EXTRA_ENTRIES = frozenset(
    {
        "softmax_cross_entropy_with_integer_labels",
        "softmax_focal_loss",
        "js_divergence",
        "sigmoid_focal_loss",
        "ctc_loss",
        "linear_softmax_cross_entropy",
        "pytorch.CrossEntropyLoss",
        "sklearn.log_loss",
        "dpo_loss[sigmoid]",
        "policy_gradient_loss",
    }
)
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_COLLECTIVE = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def checked_reductions(entry: reg.Entry) -> tuple:
    """The reductions a cell checks: all of them for the entries with extra cells; for the
    others the per-example one and the last (the scalar reductions share ``_reduce``'s code)."""
    if entry.id in EXTRA_ENTRIES:
        return entry.reductions
    return tuple(dict.fromkeys((entry.reductions[0], entry.reductions[-1])))


def cells(entry: reg.Entry) -> tuple[tuple[str, int], ...]:
    return MAIN_CELLS + (EXTRA_CELLS if entry.id in EXTRA_ENTRIES else ())


def cell_id(entry_id: str, kind: str, devices: int) -> str:
    return f"{entry_id}-mesh-{kind}{devices}"


def cell_ids(entries=None) -> list[str]:
    """Every mesh cell, ``<entry>-mesh-<explicit|auto><devices>``."""
    entries = reg.ENTRIES if entries is None else entries
    return [cell_id(e.id, kind, n) for e in entries for kind, n in cells(e)]


# Per-example outputs that are functions of the whole batch by contract (API.md: the
# top-entropy quantile is global over the whole mesh).
BATCH_GLOBAL = {"top_entropy_mask"}


def global_statistic(entry: reg.Entry) -> bool:
    """The entry's value couples the examples (no per-example output, no reduction to split,
    or a batch-global statistic by contract)."""
    return (not entry.per_example and entry.reductions == (None,)) or entry.id in BATCH_GLOBAL


# --------------------------------------------------------------------------- the programs


def _inputs(entry: reg.Entry) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(zlib.crc32(entry.id.encode()))
    arrays = entry.inputs(rng, N)
    return tuple(
        np.asarray(a, np.float32) if np.issubdtype(np.asarray(a).dtype, np.floating) else a
        for a in arrays
    )


def _floats(tree) -> list:
    """The floating leaves of an output (integer outputs such as ``aux.argmax`` dropped)."""
    leaves = jax.tree.leaves(tree)
    return [x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.floating)]


def _cotangents(entry: reg.Entry, arrays) -> dict:
    """A fixed cotangent for every float output of every reduction (distinct values, so no
    example's gradient is lost). They are arguments of the programs, sharded like the outputs
    they weigh, as an upstream gradient would be."""
    out = {}
    for r in checked_reductions(entry):
        shapes = jax.eval_shape(lambda *xs, r=r: _floats(entry.call(*xs, reduction=r)), *arrays)
        out[r] = [
            np.cos(np.arange(1, s.size + 1, dtype=np.float32)).reshape(s.shape) for s in shapes
        ]
    return out


def _programs(entry: reg.Entry):
    """``(per_example, everything)``: the jittable programs of an entry.

    ``per_example(arrays)`` is the output of ``reductions[0]``; ``everything(arrays,
    cotangents)`` gives, for every reduction, ``jax.value_and_grad`` of the outputs weighed by
    the cotangents, with the outputs as its auxiliary result: ``((value, outputs), grads)``.
    """
    float_args = entry.float_args

    def everything(xs, cotangents):
        results = []
        for r in checked_reductions(entry):

            def weighed(*diff, r=r):
                full = list(xs)
                for i, d in zip(float_args, diff, strict=True):
                    full[i] = d
                outs = _floats(entry.call(*full, reduction=r))
                total = sum(jnp.sum(o * c) for o, c in zip(outs, cotangents[r], strict=True))
                return total, outs

            argnums = tuple(range(len(float_args)))
            step = jax.value_and_grad(weighed, argnums=argnums, has_aux=True)
            results.append(step(*(xs[i] for i in float_args)))
        return results

    def per_example(xs):
        return _floats(entry.call(*xs, reduction=entry.reductions[0]))

    return per_example, everything


def _collectives(compiled) -> dict[str, int]:
    found: dict[str, int] = {}
    for m in _COLLECTIVE.finditer(compiled.as_text()):
        found[m.group(1)] = found.get(m.group(1), 0) + 1
    return found


# --------------------------------------------------------------------------- one cell


def _mesh(kind: str, devices: int):
    axis_type = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    return jax.make_mesh((devices,), (AXIS,), axis_types=(axis_type,))


def _spec(entry, i, arrays) -> P:
    return P(AXIS) if i in entry.batched_indices(len(arrays)) else P()


def _placed(mesh, values, specs):
    return [jax.device_put(v, NamedSharding(mesh, p)) for v, p in zip(values, specs, strict=True)]


def run_cell(entry, kind, devices, arrays, cotangents, reference, programs):
    """The failures (``"<check> <reduction>: <detail>"``) and the collectives of one cell."""
    per_example, everything = programs
    mesh = _mesh(kind, devices)
    failures: list[str] = []
    specs = [_spec(entry, i, arrays) for i in range(len(arrays))]

    def out_spec(c):  # per-example outputs (and their cotangents) sharded like the batch
        return P(AXIS) if entry.per_example and c.ndim and c.shape[0] == N else P()

    with jax.set_mesh(mesh):
        xs = _placed(mesh, arrays, specs)
        cts = {r: _placed(mesh, c, [out_spec(v) for v in c]) for r, c in cotangents.items()}
        first = jax.jit(per_example).lower(xs).compile()
        whole = jax.jit(everything).lower(xs, cts).compile()
        outputs = first(xs)
        got = whole(xs, cts)
    if kind == "explicit" and global_statistic(entry):
        # Global arrays reach ``jit`` without a context mesh too (their types carry the
        # Explicit mesh): a batch-global statistic's resharding must not need one.
        try:
            for g, w in zip(jax.jit(per_example)(xs), outputs, strict=True):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)
        except Exception as err:  # noqa: BLE001 - reported as the cell's failure
            failures.append(f"no context mesh: {str(err).strip()[:400]}")
    found = {"per_example": _collectives(first), "all": _collectives(whole)}
    if not global_statistic(entry):
        allowed = set() if entry.per_example else {"all-reduce"}
        if set(found["per_example"]) - allowed:
            failures.append(f"hlo {entry.reductions[0]}: collectives {found['per_example']}")
        if set(found["all"]) - {"all-reduce"}:
            failures.append(f"hlo (reductions and gradients): collectives {found['all']}")
    batch = NamedSharding(mesh, P(AXIS))
    for o in outputs:
        if out_spec(o) != P() and not o.sharding.is_equivalent_to(batch, o.ndim):
            failures.append(f"batch-sharding {entry.reductions[0]}: {o.sharding.spec}")
    for r, ((g_val, g_out), g_grads), ((w_val, w_out), w_grads) in zip(
        checked_reductions(entry), got, reference, strict=True
    ):
        try:
            for g, w in zip(g_out, w_out, strict=True):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)
            np.testing.assert_allclose(np.asarray(g_val), np.asarray(w_val), **TOL)
        except AssertionError as err:
            failures.append(f"value {r}: {str(err).strip()[:400]}")
        for i, g, w in zip(entry.float_args, g_grads, w_grads, strict=True):
            name = entry.names[i]
            try:
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL)
            except AssertionError as err:
                failures.append(f"grad {r} d{name}: {str(err).strip()[:400]}")
            want = NamedSharding(mesh, specs[i])
            # A function that claims no autodiff mode (its outputs are constants under
            # ``grad``) has zero gradients, which an Auto mesh may return replicated.
            if entry.modes and not g.sharding.is_equivalent_to(want, g.ndim):
                failures.append(f"grad-sharding {r} d{name}: {g.sharding.spec}, want {want.spec}")
    return failures, found


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:600]}\n{traceback.format_exc(limit=-4)}"


def main(out_path: str, only: str | None = None) -> int:
    results: dict[str, dict] = {}
    timing: dict[str, float] = {}  # CPU seconds per entry
    start = time.perf_counter()
    for entry in reg.ENTRIES:
        if only and only not in entry.id:
            continue
        ids = [(kind, n, cell_id(entry.id, kind, n)) for kind, n in cells(entry)]
        cpu = time.process_time()
        try:
            arrays = _inputs(entry)
            cotangents = _cotangents(entry, arrays)
            programs = _programs(entry)
            with jax.default_device(jax.devices()[0]):
                reference = jax.jit(programs[1])(arrays, cotangents)
        except Exception as err:  # noqa: BLE001 - the unsharded call fails: every cell says so
            for *_, cid in ids:
                results[cid] = {"result": f"unsharded call: {_error(err)}", "collectives": {}}
            continue
        for kind, n, cid in ids:
            try:
                failures, found = run_cell(entry, kind, n, arrays, cotangents, reference, programs)
                results[cid] = {"result": "; ".join(failures) or "ok", "collectives": found}
            except Exception as err:  # noqa: BLE001 - every failure is reported by its cell
                results[cid] = {"result": _error(err), "collectives": {}}
        timing[entry.id] = round(time.process_time() - cpu, 2)
    summary = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time()}
    with open(out_path, "w") as f:
        json.dump({**summary, "entry_cpu_seconds": timing, "cells": results}, f, indent=1)
    return 0 if all(r["result"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))

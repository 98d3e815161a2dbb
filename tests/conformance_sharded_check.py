"""The conformance matrix's ``shard_map`` cells: the fused losses with ``axis_name``.

Run as a script on host devices (``tests/test_conformance.py`` does, in a subprocess with 4,
because the count is fixed when JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/conformance_sharded_check.py

For every fused function, every reduction (or output) and two option sets (none; and bias,
soft cap, a vocabulary padded up to the shards with ``vocab_size``, ``return_aux`` and the
rest), it runs the function inside ``jax.shard_map`` with the vocabulary sharded over a mesh
of each of ``DEVICE_COUNTS`` devices (those the process has) and compares the values and the
gradients (a random cotangent through every float output, ``"none"`` included) with the
unsharded call, which is computed once for all the meshes. It prints one JSON line per case
and device count, ``{"case": ..., "devices": N, "result": "ok" or the error}``, and exits 1
if any case failed.
"""

from __future__ import annotations

import json
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
DEVICE_COUNTS = (1, 2, 4)
N, D, DT = 6, 4, 5  # tokens, hidden size, teacher hidden size
V_EVEN, V_ODD = 12, 11  # 11 does not divide by 2 or 4: the weight is padded
TOL = {"rtol": 2e-5, "atol": 2e-6}


def _ce(a, reduction, extra, axis_name, vocab_size):
    opts = dict(reduction=reduction, axis_name=axis_name, vocab_size=vocab_size, chunk_size=4)
    if extra:
        opts.update(
            bias=a["b"], logit_softcap=3.0, return_aux=True, label_smoothing=0.1, z_loss=1e-2,
            ignore_index=-100, sample_weights=a["sw"],
        )  # fmt: skip
    return jaxce.linear_softmax_cross_entropy(a["h"], a["w"], a["y"], **opts)


def _distill(fn):
    def call(a, reduction, extra, axis_name, vocab_size):
        opts = dict(reduction=reduction, axis_name=axis_name, vocab_size=vocab_size, chunk_size=4)
        if extra:
            opts.update(bias=a["b"], target_bias=a["tb"], temperature=2.0, sample_weights=a["sw"])
        return fn(a["h"], a["w"], a["th"], a["tw"], **opts)

    return call


def _log_probs(a, reduction, extra, axis_name, vocab_size):
    opts = dict(axis_name=axis_name, vocab_size=vocab_size, chunk_size=4)
    opts["return_entropy"] = reduction == "entropy"
    if extra:
        opts.update(bias=a["b"], logit_softcap=3.0, temperature=1.5, ignore_index=-100)
    return jaxce.linear_log_probs(a["h"], a["w"], a["y"], **opts)


REDUCTIONS = ("none", "sum", "mean", "sum_and_weight")
FUNCTIONS = {
    "linear_softmax_cross_entropy": (_ce, REDUCTIONS, ("h", "w", "b")),
    "linear_softmax_kl_divergence": (
        _distill(jaxce.linear_softmax_kl_divergence), REDUCTIONS, ("h", "w", "b", "th", "tw", "tb"),
    ),
    "linear_js_divergence": (
        _distill(jaxce.linear_js_divergence), REDUCTIONS, ("h", "w", "b", "th", "tw", "tb"),
    ),
    # API.md "Post-training"; a case only where jaxce has the name.
    "linear_log_probs": (_log_probs, ("log_probs", "entropy"), ("h", "w", "b")),
}  # fmt: skip
COLUMNS = {"w": 1, "b": 0, "tw": 1, "tb": 0}  # inputs sharded over the vocabulary: their axis
# "plain": no options, a vocabulary that divides evenly. "options": bias (and target_bias), a
# vocabulary padded up to the shards with vocab_size, and per function: the soft cap,
# return_aux, label smoothing, z-loss, ignore_index and sample weights (cross-entropy), the
# temperature and sample weights (distillation), the soft cap, a temperature and ignore_index
# (log-probabilities).
CONFIGS = ("plain", "options")


def case_ids() -> list[str]:
    return [
        f"{name}-{reduction}-{config}"
        for name, (_, reductions, _) in FUNCTIONS.items()
        if hasattr(jaxce, name)
        for reduction in reductions
        for config in CONFIGS
    ]


def cell_id(case: str, devices: int) -> str:
    name, rest = case.split("-", 1)
    return f"{name}-shard_map-{devices}dev-{rest}"


def data(vocab):
    r = np.random.default_rng(vocab)
    y = r.integers(0, vocab, size=N).astype(np.int32)
    y[1] = -100  # an ignored token where ignore_index is set (the plain cases relabel it)
    return {
        "h": r.normal(size=(N, D)).astype(np.float32),
        "w": (r.normal(size=(D, vocab)) / 2).astype(np.float32),
        "b": r.normal(size=vocab).astype(np.float32),
        "th": r.normal(size=(N, DT)).astype(np.float32),
        "tw": (r.normal(size=(DT, vocab)) / 2).astype(np.float32),
        "tb": r.normal(size=vocab).astype(np.float32),
        "y": y,
        "sw": r.uniform(0.5, 2.0, size=N).astype(np.float32),
    }


def _split(tree):
    leaves = jax.tree.leaves(tree)
    floats = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    ints = [x for x in leaves if not jnp.issubdtype(x.dtype, jnp.floating)]
    return floats, ints


def run_group(name, reductions, config, device_counts):
    """Checks ``reductions`` of one function and option set on a mesh of each of
    ``device_counts`` devices (all reductions in one ``jit`` per side; the unsharded side once):
    ``{devices: "ok" or the error}``."""
    fn, _, diff = FUNCTIONS[name]
    extra = config != "plain"
    vocab = V_ODD if extra else V_EVEN
    a = data(vocab)
    if not extra:
        a["y"][1] = 3  # no ignore_index: every label a real class
    diff = diff if extra else tuple(k for k in diff if k not in ("b", "tb"))

    def unsharded(reduction, *xs):
        return _split(fn({**a, **dict(zip(diff, xs, strict=True))}, reduction, extra, None, None))

    def run(f, xs):
        def go(*xs):
            results = []
            for reduction in reductions:
                floats, ints = f(reduction, *xs)
                out, pullback = jax.vjp(lambda *x, r=reduction: f(r, *x)[0], *xs)
                r = np.random.default_rng(7)
                cts = [jnp.asarray(r.normal(size=o.shape), o.dtype) for o in out]
                results.append((floats, ints, pullback(cts)))
            return results

        return jax.jit(go)(*xs)

    want = run(unsharded, [a[k] for k in diff])
    results = {}
    for devices in device_counts:
        try:
            padded = _padded(a, vocab, devices)
            got = run(_sharded(fn, padded, diff, extra, vocab, devices), [padded[k] for k in diff])
            for got_r, want_r in zip(got, want, strict=True):
                _compare(got_r, want_r, diff, vocab)
            results[devices] = "ok"
        except Exception as err:  # noqa: BLE001 - reported for its device count
            results[devices] = _error(err)
    return results


def _padded(a, vocab, devices):
    """The inputs with the vocabulary axis padded with zeros up to a multiple of ``devices``."""
    padded_vocab = -(-vocab // devices) * devices
    padded = dict(a)
    for k, axis in COLUMNS.items():
        width = [(0, 0)] * a[k].ndim
        width[axis] = (0, padded_vocab - vocab)
        padded[k] = np.pad(a[k], width)
    return padded


def _sharded(fn, padded, diff, extra, vocab, devices):
    """``(reduction, *xs) -> outputs``: ``fn`` inside ``shard_map`` over the first
    ``devices`` devices, the vocabulary sharded."""
    mesh = jax.make_mesh(
        (devices,),
        ("model",),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:devices],
    )
    keys = sorted(padded)
    specs = tuple(
        (P(None, "model") if COLUMNS[k] == 1 else P("model")) if k in COLUMNS else P() for k in keys
    )

    def sharded(reduction, *xs):
        full = {**padded, **dict(zip(diff, xs, strict=True))}
        sharded_vocab = vocab if extra else None

        def local(*ys):
            return fn(dict(zip(keys, ys, strict=True)), reduction, extra, "model", sharded_vocab)

        body = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
        return _split(body(*(full[k] for k in keys)))

    return sharded


def _compare(got, want, diff, vocab):
    for g, w in zip(got[0], want[0], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg="value", **TOL)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg="integer output")
    for k, g, w in zip(diff, got[2], want[2], strict=True):
        g = np.asarray(g)
        if k in COLUMNS:
            real = [slice(None)] * g.ndim
            real[COLUMNS[k]] = slice(0, vocab)
            pad = [slice(None)] * g.ndim
            pad[COLUMNS[k]] = slice(vocab, None)
            assert not np.any(g[tuple(pad)]), f"padding columns of {k} got a gradient"
            g = g[tuple(real)]
        np.testing.assert_allclose(g, np.asarray(w), err_msg=f"gradient of {k}", **TOL)


def _error(err):
    return f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"


def main():
    """One ``jit`` per function, option set and side; where a device count fails, each
    reduction alone on it, so that the failing cells name their reduction."""
    counts = [n for n in DEVICE_COUNTS if n <= len(jax.devices())]
    failed = False
    for name, (_, reductions, _) in FUNCTIONS.items():
        if not hasattr(jaxce, name):
            continue
        for config in CONFIGS:
            try:
                grouped = run_group(name, reductions, config, counts)
            except Exception as err:  # noqa: BLE001 - the unsharded side: retried below
                grouped = dict.fromkeys(counts, _error(err))
            for devices in counts:
                results = dict.fromkeys(reductions, grouped[devices])
                if grouped[devices] != "ok":
                    for reduction in reductions:
                        try:
                            results[reduction] = run_group(name, (reduction,), config, [devices])[
                                devices
                            ]
                        except Exception as err:  # noqa: BLE001 - every failure is reported
                            results[reduction] = _error(err)
                for reduction, result in results.items():
                    failed |= result != "ok"
                    case = f"{name}-{reduction}-{config}"
                    line = {"case": case, "devices": devices, "result": result}
                    print(json.dumps(line), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

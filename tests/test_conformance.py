"""The conformance matrix: every public function crossed with what it claims to support.

Each public function of ``jaxce``, ``jaxce.pytorch`` (functions and loss modules) and
``jaxce.sklearn`` has an entry in ``conformance_registry.py``; a public name without one fails
``test_every_public_name_has_an_entry``. Each cell is ``<entry>-<property>`` and compares with
the float64 reference, with the plain call, or checks the contract's rule (API.md,
"Conventions"):

* ``jit``: under ``jax.jit`` (traced, value checks emitted) equals the eager call, every
  reduction;
* ``vmap``: over an extra leading axis equals the stacked calls, every reduction;
* ``grad-<reduction>``: reverse mode (and forward mode where supported) against central
  finite differences in float64, ``"none"`` through a random cotangent (``check_grads``'s
  method, in one ``jit`` per function: ``_first_order``);
* ``checkpoint``: values and gradients under ``jax.checkpoint`` equal the plain ones;
* ``order2``: the same check to second order, in the modes the function supports;
* ``float64``/``float32``/``bfloat16``: the float64 NumPy reference (of the inputs rounded to
  the dtype) at the precision of the computation, the result dtype (half precision in ->
  float32 out) and the gradients' dtypes;
* ``empty``: a zero-size batch: empty per-example output, ``sum`` 0, ``mean`` 0 (NaN in
  ``jaxce.pytorch``), gradients of the input's empty shape;
* ``nan-<argument>``: a NaN in one example of an input that takes part makes that example
  NaN (the others stay finite) and every reduction over it;
* ``identical``: a divergence of two equal distributions is exactly ``0.0`` (or, for two
  representations of one distribution, never negative);
* ``domain-<argument>``: a concrete out-of-domain hyperparameter raises ``ValueError`` naming
  the argument;
* ``unsupported-<what>``: a documented unsupported combination raises the documented error;
* ``shard_map``: the fused losses with ``axis_name`` on 1, 2 and 4 CPU devices (one
  subprocess on 4 host devices for the three meshes, ``conformance_sharded_check.py``) equal
  the unsharded call.
"""

from __future__ import annotations

import functools
import inspect
import json
import subprocess
import sys
import zlib

import conformance_registry as reg
import conformance_sharded_check as sharded
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TESTS_DIR, host_devices_env

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore:The y_prob values do not sum to one"
)

FLOATS = (np.float64, np.float32, jnp.bfloat16)


def _rng(*case):
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _cast(arrays, dtype):
    """Float inputs to ``dtype`` (JAX arrays); integer and boolean inputs as they are."""
    return tuple(
        jnp.asarray(a, dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a)
        for a in arrays
    )


def _floats(tree):
    """The floating leaves of an output (``aux.argmax`` and other integers dropped)."""
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]


def _with(arrays, entry, floats):
    """``arrays`` with the entry's float inputs replaced by ``floats``."""
    out = list(arrays)
    for i, x in zip(entry.float_args, floats, strict=True):
        out[i] = x
    return out


def _assert_trees_close(got, want, rtol=1e-5, atol=1e-6, what=""):
    g, w = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(g) == len(w), what
    for a, b in zip(g, w, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol, err_msg=what)


def _reduction_id(reduction):
    return "grad" if reduction is None else f"grad-{reduction}"


# --------------------------------------------------------------------------- the cells


def cell_jit(entry):
    arrays = _cast(entry.inputs(_rng(entry.id, "jit"), reg.N), jnp.float32)
    eager = [entry.call(*arrays, reduction=r) for r in entry.reductions]
    jitted = jax.jit(lambda *a: [entry.call(*a, reduction=r) for r in entry.reductions])(*arrays)
    _assert_trees_close(jitted, eager)


def cell_vmap(entry):
    draws = [entry.inputs(_rng(entry.id, "vmap", k), reg.N) for k in range(2)]
    stacked = _cast([np.stack(x) for x in zip(*draws, strict=True)], jnp.float32)
    got = jax.jit(
        lambda *a: [
            jax.vmap(functools.partial(entry.call, reduction=r))(*a) for r in entry.reductions
        ]
    )(*stacked)
    for r, g in zip(entry.reductions, got, strict=True):
        want = [entry.call(*_cast(d, jnp.float32), reduction=r) for d in draws]
        want = jax.tree.map(lambda *xs: np.stack(xs), *want)
        _assert_trees_close(g, want, what=f"reduction={r}")


def _float64_function(entry, reduction, seed):
    """``(f, x)``: ``f(*floats)`` the float leaves of the call in float64 (the other inputs
    fixed), ``x`` the float inputs, for the gradient cells."""
    arrays = entry.inputs(_rng(entry.id, seed, reduction), reg.N)
    fixed = _cast(arrays, jnp.float64)

    def f(*floats):
        return _floats(entry.call(*_with(fixed, entry, floats), reduction=reduction))

    return f, tuple(jnp.asarray(arrays[i], jnp.float64) for i in entry.float_args)


def _random_like(tree, seed):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(r.normal(size=np.shape(x)), jnp.float64), tree)


def _vdot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


_EPS = 1e-4  # central differences in float64


def _first_order(f, x, modes):
    """``(run, args)``: ``run(*args)`` traces ``check_grads``'s order-1 quantities of ``f``
    at ``x``: the JVP along a random tangent, the VJP of a random cotangent dotted with the
    tangent, and the central difference along the tangent."""
    v = _random_like(x, 1)
    u = _random_like(jax.eval_shape(f, *x), 2)

    def run(x, v, u):
        plus = f(*(a + _EPS * d for a, d in zip(x, v, strict=True)))
        minus = f(*(a - _EPS * d for a, d in zip(x, v, strict=True)))
        numeric = jax.tree.map(lambda p, m: (p - m) / (2 * _EPS), plus, minus)
        out = {"numeric": numeric, "u.numeric": _vdot(u, numeric)}
        if "fwd" in modes:
            out["jvp"] = jax.jvp(f, x, v)[1]
        if "rev" in modes:
            out["vjp.v"] = _vdot(jax.vjp(f, *x)[1](u), v)
        return out

    return run, (x, v, u)


def _assert_first_order(got, modes, what, rtol=1e-5, atol=1e-6):
    """The JVP equals the central difference; the VJP dotted with the tangent equals the
    cotangent dotted with the central difference."""
    if "fwd" in modes:
        _assert_trees_close(got["jvp"], got["numeric"], rtol, atol, f"JVP of {what}")
    if "rev" in modes:
        np.testing.assert_allclose(
            got["vjp.v"], got["u.numeric"], rtol=rtol, atol=atol, err_msg=f"VJP of {what}"
        )


def _check_first_order(f, x, modes, what):
    run, args = _first_order(f, x, modes)
    _assert_first_order(jax.jit(run)(*args), modes, what)


_SHARED_FIRST_ORDER: dict[str, object] = {}


def _all_reductions_first_order(entry):
    """The order-1 quantities of every reduction of ``entry`` in one ``jit`` (the grad cells
    share the compile), or ``None`` when that fails (each cell then runs its own)."""
    if entry.id not in _SHARED_FIRST_ORDER:
        _SHARED_FIRST_ORDER[entry.id] = _compute_all_reductions_first_order(entry)
    return _SHARED_FIRST_ORDER[entry.id]


def _compute_all_reductions_first_order(entry):
    with jax.enable_x64(True):
        runs = [
            _first_order(*_float64_function(entry, r, "grad"), entry.modes)
            for r in entry.reductions
        ]
        try:
            return jax.jit(lambda args: [run(*a) for (run, _), a in zip(runs, args, strict=True)])(
                [a for _, a in runs]
            )
        except Exception:  # noqa: BLE001 - the failing reduction's own cell reports it
            return None


def cell_grad(entry, reduction):
    """``check_grads``'s order-1 checks in float64 (``"none"``: a random cotangent)."""
    shared = _all_reductions_first_order(entry)
    what = f"reduction={reduction}"
    if shared is not None:
        _assert_first_order(shared[entry.reductions.index(reduction)], entry.modes, what)
        return
    with jax.enable_x64(True):
        f, x = _float64_function(entry, reduction, "grad")
        _check_first_order(f, x, entry.modes, what)


def cell_order2(entry):
    """Second order: the first-order maps of ``check_grads``'s recursion (``x -> jvp(f, x,
    v)`` and ``x -> vjp(f, x)(u)``) checked to first order themselves."""
    with jax.enable_x64(True):
        f, x = _float64_function(entry, entry.reductions[0], "order2")
        v = _random_like(x, 3)
        u = _random_like(jax.eval_shape(f, *x), 4)

        def first(*x):
            out = {}
            if "fwd" in entry.modes:
                out["jvp"] = jax.jvp(f, x, v)[1]
            if "rev" in entry.modes:
                out["vjp"] = jax.vjp(f, *x)[1](u)
            return _floats(out)

        _check_first_order(first, x, entry.modes, "the first derivatives")


def cell_checkpoint(entry):
    arrays = _cast(entry.inputs(_rng(entry.id, "checkpoint"), reg.N), jnp.float32)
    floats = [arrays[i] for i in entry.float_args]
    outs = [entry.call(*arrays, reduction=r) for r in entry.reductions]
    cotangents = [
        [
            jnp.asarray(_rng(entry.id, k).normal(size=np.shape(x)), x.dtype)
            for k, x in enumerate(_floats(o))
        ]
        for o in outs
    ]

    def scalar(*floats):
        full = _with(arrays, entry, floats)
        values = [entry.call(*full, reduction=r) for r in entry.reductions]
        total = sum(
            jnp.sum(u * x)
            for us, v in zip(cotangents, values, strict=True)
            for u, x in zip(us, _floats(v), strict=True)
        )
        return total, values

    argnums = tuple(range(len(floats)))
    plain, remat = jax.jit(
        lambda *fl: (
            jax.value_and_grad(scalar, argnums, has_aux=True)(*fl),
            jax.value_and_grad(jax.checkpoint(scalar), argnums, has_aux=True)(*fl),
        )
    )(*floats)
    _assert_trees_close(remat, plain, what="checkpoint vs plain: values and gradients")
    _assert_trees_close(plain[0][1], outs, what="values vs eager")


_TOL = {np.float64: (1e-9, 1e-10), np.float32: (2e-5, 2e-6), jnp.bfloat16: (2e-5, 2e-6)}


def cell_dtype(entry, dtype):
    """The float64 reference on the inputs rounded to ``dtype``, the result dtype and the
    gradients' dtypes. Half precision is computed in float32 (the contract), so float32
    tolerances apply to it on its rounded inputs."""
    arrays = entry.inputs(_rng(entry.id, "dtype"), reg.N)
    x64 = dtype == np.float64
    with jax.enable_x64(x64):
        inputs = _cast(arrays, dtype)
        rounded = [
            np.asarray(x, np.float64) if jnp.issubdtype(x.dtype, jnp.floating) else np.asarray(x)
            for x in inputs
        ]
        reduction = entry.reductions[0]

        def summed(*floats):
            out = entry.call(*_with(inputs, entry, floats), reduction=reduction)
            return sum(jnp.sum(x) for x in _floats(out)), out

        floats = [inputs[i] for i in entry.float_args]
        (_, out), grads = jax.jit(
            jax.value_and_grad(summed, tuple(range(len(floats))), has_aux=True)
        )(*floats)
        eager = out
    want_dtype = np.float64 if x64 else (dtype if entry.keeps_dtype else np.float32)
    for x in _floats(eager):
        assert x.dtype == want_dtype, f"result dtype {x.dtype} for {np.dtype(dtype).name} inputs"
    for x, g in zip(floats, grads, strict=True):
        assert g.dtype == x.dtype, f"gradient dtype {g.dtype} for a {x.dtype} input"
    rtol, atol = _TOL[dtype] if want_dtype != jnp.bfloat16 else (8e-3, 1e-3)  # bfloat16 out
    want = entry.reference(*rounded)
    got_leaves = jax.tree.leaves(eager) if isinstance(want, tuple) else [eager]
    want_leaves = (
        jax.tree.leaves(want, is_leaf=lambda x: x is None) if isinstance(want, tuple) else [want]
    )
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        if w is None:  # an output without its own reference: checked against the plain call
            continue
        if np.issubdtype(np.asarray(w).dtype, np.integer):
            np.testing.assert_array_equal(np.asarray(g), w)
        else:
            np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


def cell_empty(entry):
    """A zero-size batch, every reduction and the gradients, in one ``jit``."""
    arrays = entry.inputs(_rng(entry.id, "empty"), reg.N)
    empty = list(arrays)
    for i in entry.batched_indices(len(arrays)):
        empty[i] = arrays[i][:0]
    empty = _cast(empty, jnp.float32)
    floats = [empty[i] for i in entry.float_args]

    def run(*fl):
        full = _with(empty, entry, fl)
        outs = [entry.call(*full, reduction=r) for r in entry.reductions]
        return outs, sum(jnp.sum(x) for x in _floats(outs[0]))

    argnums = tuple(range(len(floats)))
    (outs, _), grads = jax.jit(
        lambda *fl: (run(*fl), jax.grad(lambda *g: run(*g)[1], argnums)(*fl))
    )(*floats)
    for r, out in zip(entry.reductions, outs, strict=True):
        first = jax.tree.leaves(out)[0]
        if r == "sum_and_weight":
            total, weight = jax.tree.leaves(out)[:2]
            np.testing.assert_array_equal([total, weight], [0.0, 0.0])
        elif (r is None or r == "none") and entry.per_example:
            assert first.shape[0] == 0, f"per-example output of shape {first.shape}"
        else:
            want = entry.empty_reduced.get(r if r is not None else "value", 0.0)
            np.testing.assert_array_equal(np.asarray(first), want, err_msg=f"reduction={r}")
    for x, g in zip(floats, grads, strict=True):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert np.all(np.isfinite(np.asarray(g)))


def cell_nan(entry, index):
    arrays = [np.array(a) for a in entry.inputs(_rng(entry.id, "nan"), reg.N)]
    batched = index in entry.batched_indices(len(arrays))
    if batched:
        arrays[index][0] = np.nan
    else:
        arrays[index].flat[0] = np.nan
    arrays = _cast(arrays, jnp.float32)
    reductions = [r for r in entry.reductions[1:] if r is not None] if entry.per_example else []
    call = jax.jit(entry.call, static_argnames="reduction") if entry.eager_checks else entry.call
    outs = [call(*arrays, reduction=r) for r in (entry.reductions[0], *reductions)]
    first = np.asarray(jax.tree.leaves(outs[0])[0])
    if entry.per_example and batched:
        assert np.all(np.isnan(first[0])), f"example 0 (with the NaN) gave {first[0]}"
        assert np.all(np.isfinite(first[1:])), f"the NaN leaked into other examples: {first}"
    else:
        assert np.all(np.isnan(first)), f"a NaN in {entry.names[index]} gave {first}"
    for r, out in zip(reductions, outs[1:], strict=True):
        value = np.asarray(jax.tree.leaves(out)[0])
        assert np.all(np.isnan(value)), f"reduction={r} dropped the NaN: {value}"


def cell_identical(entry):
    rng = _rng(entry.id, "identical")
    s = rng.normal(size=(16, 257)) * 3  # large enough for a rounding error to show
    arrays = _cast(entry.identical(s), jnp.float32)
    for options in entry.identical_options:
        out = np.asarray(
            jax.tree.leaves(entry.call(*arrays, reduction=entry.reductions[0], **options))[0]
        )
        assert np.all(out >= 0), f"{options}: negative divergence, min {out.min()}"
        if entry.exact:
            assert np.all(out == 0), f"{options}: not exactly 0, max {out.max()}"


def cell_domain(entry, argument, value):
    arrays = _cast(entry.inputs(_rng(entry.id, "domain"), reg.N), jnp.float32)
    with pytest.raises(ValueError, match=argument):
        entry.call(*arrays, reduction=entry.reductions[0], **{argument: value})


def cell_unsupported(entry, unsupported):
    arrays = _cast(entry.inputs(_rng(entry.id, "unsupported"), reg.N), jnp.float32)
    with pytest.raises(unsupported.error, match=unsupported.match):
        unsupported.run(entry, arrays)


# --------------------------------------------------------------------------- the matrix


def _cells():
    for e in reg.ENTRIES:
        yield pytest.param(cell_jit, e, id=f"{e.id}-jit")
        yield pytest.param(cell_vmap, e, id=f"{e.id}-vmap")
        for r in e.reductions:
            yield pytest.param(
                functools.partial(cell_grad, reduction=r), e, id=f"{e.id}-{_reduction_id(r)}"
            )
        yield pytest.param(cell_checkpoint, e, id=f"{e.id}-checkpoint")
        if e.order2:
            yield pytest.param(cell_order2, e, id=f"{e.id}-order2-{'+'.join(e.modes)}")
        for dtype in FLOATS:
            yield pytest.param(
                functools.partial(cell_dtype, dtype=dtype), e, id=f"{e.id}-{np.dtype(dtype).name}"
            )
        yield pytest.param(cell_empty, e, id=f"{e.id}-empty")
        for i in e.nan_indices():
            yield pytest.param(
                functools.partial(cell_nan, index=i), e, id=f"{e.id}-nan-{e.names[i]}"
            )
        if e.identical is not None:
            yield pytest.param(cell_identical, e, id=f"{e.id}-identical")
        for arg, value in e.domains:
            yield pytest.param(
                functools.partial(cell_domain, argument=arg, value=value),
                e,
                id=f"{e.id}-domain-{arg}",
            )
        for u in e.unsupported:
            yield pytest.param(
                functools.partial(cell_unsupported, unsupported=u),
                e,
                id=f"{e.id}-unsupported-{u.cell}",
            )


@pytest.mark.parametrize(("cell", "entry"), list(_cells()))
def test_cell(cell, entry):
    cell(entry)


# --------------------------------------------------------------------------- coverage


def test_every_public_name_has_an_entry():
    """Each public name (from the modules' ``__all__`` and their public functions) is a
    registry entry or a listed non-function; no entry names something that is not public."""
    names = reg.public_names()
    covered = {e.public for e in reg.ENTRIES} | set(reg.NOT_FUNCTIONS)
    missing = sorted(set(names) - covered)
    assert not missing, f"public names without a conformance entry: {missing}"
    stale = sorted(covered - set(names))
    assert not stale, f"entries for names that are not public: {stale}"


def test_public_functions_of_the_modules_are_in_all():
    """A public function defined in a public module but left out of ``__all__`` would escape
    the registry: none is."""
    import jaxce
    from jaxce import pytorch
    from jaxce import sklearn as jsk

    for module in (jaxce, pytorch, jsk):
        defined = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and (inspect.isfunction(obj) or inspect.isclass(obj))
            and getattr(obj, "__module__", "").startswith("jaxce")
        ]
        assert set(defined) <= set(module.__all__), (
            module.__name__,
            sorted(set(defined) - set(module.__all__)),
        )


@pytest.mark.parametrize("name", sorted(reg.NOT_FUNCTIONS))
def test_non_functions_are_what_the_registry_says(name):
    import jaxce

    obj = jaxce
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    assert isinstance(obj, reg.NOT_FUNCTIONS[name])


# --------------------------------------------------------------------------- shard_map


@functools.cache
def _run_sharded() -> dict[int, dict[str, str]]:
    """The check script on ``max(DEVICE_COUNTS)`` host devices, once for every device count
    (it meshes the first 1, 2 and 4 devices): ``{devices: {case: "ok" or the error}}``."""
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "conformance_sharded_check.py")],
        env=host_devices_env(max(sharded.DEVICE_COUNTS)),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    results: dict[int, dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            item = json.loads(line)
            results.setdefault(item["devices"], {})[item["case"]] = item["result"]
    assert results, proc.stdout + proc.stderr
    return results


@pytest.mark.slow
@pytest.mark.parametrize("devices", sharded.DEVICE_COUNTS, ids=lambda n: f"{n}dev")
def test_shard_map(devices):
    """The fused losses with ``axis_name`` on ``devices`` host devices (one subprocess for
    all device counts and cells, ``conformance_sharded_check.py``): values and gradients
    equal the unsharded call. A failure lists its cells as ``<function>-shard_map-<N>dev-
    <reduction or output>-<options>``."""
    results = _run_sharded().get(devices, {})
    missing = [c for c in sharded.case_ids() if c not in results]
    failed = {sharded.cell_id(c, devices): r for c, r in results.items() if r != "ok"}
    assert not missing, f"the script did not run {missing}"
    assert not failed, "\n\n".join(f"{cell}: {r}" for cell, r in failed.items())

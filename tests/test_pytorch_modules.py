"""``jaxce.pytorch``'s loss modules: parity with ``torch.nn``'s modules, and JAX pytrees.

Expected values come from torch's modules on the same inputs (CPU, float32). Every parity case
passes the criterion *through* a jitted function as an argument, which is itself the pytree
test: its arrays are traced, its options are static.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxce import pytorch

torch = pytest.importorskip("torch")

RTOL = ATOL = 2e-5
C = 4


def _seeded(*case):
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


@jax.jit
def _value_and_input_grad(criterion, x, target, cot):
    out, vjp = jax.vjp(lambda v: criterion(v, target), x)
    (grad,) = vjp(cot)
    return out, grad


def _torch_value_and_input_grad(criterion, x, target, cot):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    out = criterion(xt, target)
    out.backward(torch.from_numpy(np.asarray(cot)))
    return out.detach().numpy(), xt.grad.numpy()


def _inputs(name, shape, rng, **options):
    """``(input, target, torch_target)`` for module ``name`` with inputs of ``shape``."""
    x = rng.normal(size=shape).astype(np.float32)
    if name in ("CrossEntropyLoss", "NLLLoss"):
        if name == "NLLLoss":
            x = (x - np.log(np.exp(x).sum(1, keepdims=True))).astype(np.float32)
        if options.get("prob"):
            e = np.exp(rng.normal(size=shape))
            t = (e / e.sum(1, keepdims=True)).astype(np.float32)
            return x, t, torch.from_numpy(t)
        t = rng.integers(0, C, size=shape[:1] + shape[2:])
        t = np.where(rng.random(t.shape) < 0.3, options.get("ignore_index", -100), t)
        return x, t.astype(np.int32), torch.from_numpy(t.astype(np.int64))
    t = rng.random(shape).astype(np.float32)
    if name == "BCELoss":
        x = (1 / (1 + np.exp(-x))).astype(np.float32)
    if name == "KLDivLoss":
        x = (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)
        t = t / t.sum(-1, keepdims=True)
        if options.get("log_target"):
            t = np.log(t)
    return x, t.astype(np.float32), torch.from_numpy(t.astype(np.float32))


def _cases():
    weight = np.array([0.5, 2.0, 1.0, 1.5], np.float32)
    for reduction in ("none", "sum", "mean"):
        yield "CrossEntropyLoss", (3, C, 2), {"reduction": reduction}, {}
        yield "CrossEntropyLoss", (5, C), {"reduction": reduction, "weight": weight}, {}
        yield (
            "CrossEntropyLoss",
            (5, C),
            {"reduction": reduction, "weight": weight, "ignore_index": 1, "label_smoothing": 0.2},
            {"ignore_index": 1},
        )
        yield (
            "CrossEntropyLoss",
            (5, C),
            {"reduction": reduction, "label_smoothing": 0.1, "weight": weight},
            {"prob": True},
        )
        yield "NLLLoss", (5, C), {"reduction": reduction, "weight": weight}, {}
        yield "NLLLoss", (2, C, 3), {"reduction": reduction, "ignore_index": 2}, {"ignore_index": 2}
        yield "BCELoss", (3, C), {"reduction": reduction}, {}
        yield "BCELoss", (3, C), {"reduction": reduction, "weight": weight}, {}
        yield "BCEWithLogitsLoss", (3, C), {"reduction": reduction, "pos_weight": weight}, {}
        yield (
            "BCEWithLogitsLoss",
            (2, C, 3),
            {"reduction": reduction, "weight": np.float32(0.7), "pos_weight": weight[:, None]},
            {},
        )
    for reduction in ("none", "sum", "mean", "batchmean"):
        for log_target in (False, True):
            yield (
                "KLDivLoss",
                (3, C),
                {"reduction": reduction, "log_target": log_target},
                {"log_target": log_target},
            )


CASES = list(_cases())


@pytest.mark.parametrize(("name", "shape", "kwargs", "options"), CASES, ids=str)
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_module_parity_with_torch(name, shape, kwargs, options):
    rng = _seeded(name, shape, kwargs, options)
    x, target, target_t = _inputs(name, shape, rng, **options)
    ours = getattr(pytorch, name)(**{k: _jax(v) for k, v in kwargs.items()})
    theirs = getattr(torch.nn, name)(**{k: _tensor(v) for k, v in kwargs.items()})
    out_shape = theirs(torch.from_numpy(x), target_t).shape
    cot = rng.normal(size=tuple(out_shape)).astype(np.float32)
    got, got_grad = _value_and_input_grad(ours, jnp.asarray(x), jnp.asarray(target), cot)
    want, want_grad = _torch_value_and_input_grad(theirs, x, target_t, cot)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=RTOL, atol=ATOL)


def _jax(v):
    return jnp.asarray(v) if isinstance(v, np.ndarray | np.floating) else v


def _tensor(v):
    return torch.tensor(np.asarray(v)) if isinstance(v, np.ndarray | np.floating) else v


# --------------------------------------------------------------------------------------------
# Pytrees


def test_arrays_are_leaves_and_options_are_static():
    weight, pos_weight = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    criterion = pytorch.BCEWithLogitsLoss(weight=weight, reduction="sum", pos_weight=pos_weight)
    leaves, treedef = jax.tree_util.tree_flatten(criterion)
    assert len(leaves) == 2
    np.testing.assert_array_equal(leaves[0], weight)
    np.testing.assert_array_equal(leaves[1], pos_weight)
    rebuilt = jax.tree_util.tree_unflatten(treedef, [2 * leaf for leaf in leaves])
    assert isinstance(rebuilt, pytorch.BCEWithLogitsLoss) and rebuilt.reduction == "sum"
    np.testing.assert_array_equal(rebuilt.pos_weight, 2 * pos_weight)
    ce = pytorch.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1)
    assert jax.tree_util.tree_leaves(ce) == []  # weight=None: no leaves
    assert jax.tree_util.tree_leaves(pytorch.KLDivLoss(log_target=True)) == []
    # Options are part of the structure: different options, different treedefs (jit keys).
    assert jax.tree_util.tree_structure(ce) != jax.tree_util.tree_structure(
        pytorch.CrossEntropyLoss(ignore_index=3, label_smoothing=0.2)
    )


def test_closed_over_under_jit_and_grad(rng):
    x = jnp.asarray(rng.normal(size=(6, C)), jnp.float32)
    target = jnp.asarray(rng.integers(0, C, 6))
    criterion = pytorch.CrossEntropyLoss(weight=jnp.array([1.0, 2.0, 0.5, 1.0]))
    eager = jax.grad(lambda v: criterion(v, target))(x)
    jitted = jax.jit(jax.grad(lambda v: criterion(v, target)))(x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    xt = torch.from_numpy(np.array(x)).requires_grad_(True)
    torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.0]))(
        xt, torch.from_numpy(np.asarray(target, np.int64))
    ).backward()
    np.testing.assert_allclose(eager, xt.grad.numpy(), rtol=RTOL, atol=ATOL)


def test_gradient_with_respect_to_a_module_array_matches_torch(rng):
    """``pos_weight`` is a differentiable leaf: ``jax.grad`` of the criterion itself."""
    x = rng.normal(size=(5, 3)).astype(np.float32)
    target = rng.random((5, 3)).astype(np.float32)
    pos_weight = np.array([0.5, 2.0, 1.5], np.float32)
    criterion = pytorch.BCEWithLogitsLoss(pos_weight=jnp.asarray(pos_weight))
    grads = jax.jit(jax.grad(lambda c: c(jnp.asarray(x), jnp.asarray(target))))(criterion)
    assert isinstance(grads, pytorch.BCEWithLogitsLoss)
    # torch cannot differentiate w.r.t. pos_weight; the reference is the formula's derivative:
    # d mean / d w_+[c] = sum_n -y[n, c] log sigmoid(x[n, c]) / (N C).
    x64, t64 = x.astype(np.float64), target.astype(np.float64)
    want = (-t64 * -np.logaddexp(0.0, -x64)).sum(0) / x.size
    np.testing.assert_allclose(grads.pos_weight, want, rtol=RTOL, atol=ATOL)


def test_one_compile_per_static_configuration(rng):
    traces = []

    @jax.jit
    def loss(criterion, x, target):
        traces.append(None)
        return criterion(x, target)

    x = jnp.asarray(rng.normal(size=(4, C)), jnp.float32)
    target = jnp.asarray([0, 1, 2, 3])
    for w in (1.0, 2.0, 3.0):  # new weight values: same program
        loss(pytorch.NLLLoss(weight=jnp.full(C, w)), x, target)
    assert len(traces) == 1
    loss(pytorch.NLLLoss(weight=jnp.ones(C), reduction="sum"), x, target)
    assert len(traces) == 2


def test_module_with_bad_options_raises_like_the_functional(rng):
    x = jnp.asarray(rng.normal(size=(3, C)), jnp.float32)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        pytorch.CrossEntropyLoss(label_smoothing=1.5)(x, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        pytorch.NLLLoss(reduction="avg")(x, jnp.array([0, 1, 2]))
    with pytest.raises(RuntimeError, match=r"\[0, 1\]"):
        pytorch.BCELoss()(jnp.array([1.5]), jnp.array([1.0]))


def test_repr_names_the_class_and_options():
    assert repr(pytorch.KLDivLoss(reduction="batchmean")) == (
        "KLDivLoss(reduction='batchmean', log_target=False)"
    )


# ----------------------------------------------------------------------------- PyTorch's own inputs
def _torch_no_batch_dim_inputs(name: str):
    """The ``(input_fn, target_fn)`` of ``name`` in PyTorch's own criterion tests.

    PyTorch lists them in ``classification_criterion_no_batch`` of
    ``torch/testing/_internal/common_nn.py`` (the ``*_no_batch_dim_{reduction}`` criterion
    tests); that module cannot be imported without PyTorch's test dependencies, so the two
    lambdas are read from its source and evaluated here.
    """
    import ast
    import pathlib

    import torch.testing._internal as internal

    source = (pathlib.Path(internal.__file__).parent / "common_nn.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "classification_criterion_no_batch"
            for t in node.targets
        ):
            for entry in node.value.elts:  # type: ignore[attr-defined]
                if isinstance(entry.elts[0], ast.Constant) and entry.elts[0].value == name:
                    return tuple(
                        eval(compile(ast.Expression(e), "common_nn.py", "eval"), {"torch": torch})
                        for e in entry.elts[1:]
                    )
    raise AssertionError(f"{name} is not in PyTorch's classification_criterion_no_batch")


@pytest.mark.parametrize("options", ["", "weight", "pos_weight", "weight+pos_weight"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_with_logits_loss_passes_pytorchs_no_batch_dim_criterion_tests(reduction, options):
    """PyTorch's ``BCEWithLogitsLoss_no_batch_dim_*`` inputs (``randn`` logits *and* targets:
    many targets lie outside [0, 1]), with and without ``weight``/``pos_weight``: the value and
    the gradients w.r.t. input and target equal torch's, in float64, for the module and the
    function, and the no-batch result equals the batch-of-one one (PyTorch's reference)."""
    input_fn, target_fn = _torch_no_batch_dim_inputs("BCEWithLogitsLoss")
    torch.manual_seed(zlib.crc32(f"{reduction}{options}".encode()))
    for _ in range(3):
        x, t = input_fn(), target_fn()
        assert x.dtype == t.dtype == torch.float64 and x.shape == t.shape == (9,)
        assert ((t < 0) | (t > 1)).any()
        kw_torch = {}
        if "pos_weight" in options:
            kw_torch["pos_weight"] = torch.rand(9, dtype=torch.double) * 3
        if options.startswith("weight"):
            kw_torch["weight"] = torch.rand(9, dtype=torch.double) * 2
        criterion = torch.nn.BCEWithLogitsLoss(reduction=reduction, **kw_torch)
        xt, tt = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
        want = criterion(xt, tt)
        cot = torch.randn(want.shape, dtype=torch.double)
        want.backward(cot)
        batch_of_one = criterion(x[None], t[None])
        np.testing.assert_allclose(
            want.detach().numpy(),
            batch_of_one[0].detach().numpy() if reduction == "none" else batch_of_one.detach(),
        )
        with jax.enable_x64(True):
            kw = {k: jnp.asarray(v.numpy()) for k, v in kw_torch.items()}
            for fn in (
                pytorch.BCEWithLogitsLoss(reduction=reduction, **kw),
                lambda a, b, kw=kw: pytorch.binary_cross_entropy_with_logits(
                    a, b, reduction=reduction, **kw
                ),
            ):
                got, vjp = jax.vjp(fn, jnp.asarray(x.numpy()), jnp.asarray(t.numpy()))
                g_x, g_t = vjp(jnp.asarray(cot.numpy()))
                np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(g_x, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
                np.testing.assert_allclose(g_t, tt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_bce_with_logits_any_real_target_under_jit_and_core_keeps_nan():
    """Outside [0, 1] under ``jit`` too (no eager-only path), while the core keeps the
    contract's rule: a binary label outside [0, 1] is NaN."""
    x = np.array([0.3, -2.0, 5.0, 0.0], np.float32)
    t = np.array([2.0, -1.5, 0.5, -3.0], np.float32)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(x), torch.from_numpy(t), reduction="none"
    ).numpy()
    got = jax.jit(lambda a, b: pytorch.binary_cross_entropy_with_logits(a, b, reduction="none"))(
        x, t
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    import jaxce

    core = np.asarray(jaxce.sigmoid_binary_cross_entropy(x, t))
    assert np.isnan(core[[0, 1, 3]]).all() and np.isfinite(core[2])


def test_bce_on_probabilities_rejects_targets_outside_unit_interval_like_torch():
    """PyTorch's ``binary_cross_entropy`` raises for a target (not only an input) outside
    [0, 1]; so does ``jaxce.pytorch`` (eagerly), for the function and ``BCELoss``."""
    p, t = np.array([0.5, 0.3], np.float32), np.array([2.0, 0.0], np.float32)
    with pytest.raises(RuntimeError, match="target"):
        torch.nn.functional.binary_cross_entropy(torch.from_numpy(p), torch.from_numpy(t))
    for fn in (pytorch.binary_cross_entropy, pytorch.BCELoss()):
        with pytest.raises(RuntimeError, match="target"):
            fn(p, t)

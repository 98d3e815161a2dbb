"""Bad input, swept over every public loss: the contract's outcomes, not just "no exception".

API.md "Conventions": a NaN in an example's inputs makes its loss NaN; empty batches work in
every reduction and under ``grad``; zero classes raise naming the argument; a concrete
hyperparameter outside its domain raises, a traced one gives NaN (and raises under
``checkify``); logits at the dtype's limit give finite results where the exact one is; Python
and NumPy scalars are accepted wherever a hyperparameter is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jaxce
from jaxce import pytorch

N, C = 4, 5


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to call one loss: ``call(first, second, **options)`` gives per-example values."""

    call: Callable
    second: str  # "int", "prob", "logits", "logprob", "binary", "none"
    first: str = "logits"  # the first argument: "logits", "logprob", "probs"
    first_name: str = "logits"
    elementwise: bool = False  # binary family: one value per element
    reductions: tuple[str, ...] = ("sum", "mean")
    empty_mean: float = 0.0  # the mean of an empty batch (PyTorch: NaN)
    uses_other_columns: bool = True  # NLL reads only the label's column


def _no_second(f):
    return lambda x, _, **kw: f(x, **kw)


SPECS = {
    "ce_int": Spec(jaxce.softmax_cross_entropy_with_integer_labels, "int"),
    "ce_int_smooth_weighted": Spec(
        functools.partial(
            jaxce.softmax_cross_entropy_with_integer_labels,
            label_smoothing=0.1,
            class_weights=np.linspace(0.5, 2.0, C, dtype=np.float32),
            z_loss=1e-3,
        ),
        "int",
    ),
    "ce_soft": Spec(
        functools.partial(jaxce.softmax_cross_entropy, label_smoothing=0.1, z_loss=1e-3), "prob"
    ),
    "safe_ce_soft_weighted": Spec(
        functools.partial(
            jaxce.softmax_cross_entropy, class_weights=np.linspace(0.5, 2.0, C, dtype=np.float32)
        ),
        "prob",
    ),
    "nll": Spec(jaxce.nll_loss, "int", "logprob", "log_probs", uses_other_columns=False),
    "poly": Spec(jaxce.poly_loss_cross_entropy, "prob"),
    "focal_int": Spec(functools.partial(jaxce.softmax_focal_loss, alpha=0.25), "int"),
    "focal_soft": Spec(jaxce.softmax_focal_loss, "prob"),
    "entropy": Spec(_no_second(jaxce.entropy), "none"),
    "kl": Spec(jaxce.kl_divergence, "prob", "logprob", "log_predictions"),
    "kl_log": Spec(jaxce.kl_divergence_with_log_targets, "logprob", "logprob", "log_predictions"),
    "softmax_kl": Spec(functools.partial(jaxce.softmax_kl_divergence, temperature=2.0), "logits"),
    "js": Spec(functools.partial(jaxce.js_divergence, beta=0.3), "logits", first_name="logits_p"),
    "sigmoid_bce": Spec(
        functools.partial(jaxce.sigmoid_binary_cross_entropy, label_smoothing=0.1, pos_weight=2.0),
        "binary",
        elementwise=True,
    ),
    "bce": Spec(jaxce.binary_cross_entropy, "binary", "probs", "probs", elementwise=True),
    "sigmoid_focal": Spec(
        functools.partial(jaxce.sigmoid_focal_loss, alpha=0.25), "binary", elementwise=True
    ),
    "binary_entropy": Spec(_no_second(jaxce.binary_entropy), "none", elementwise=True),
    "torch_cross_entropy": Spec(
        lambda x, y, reduction="none", **kw: pytorch.cross_entropy(x, y, reduction=reduction, **kw),
        "int",
        first_name="input",
        empty_mean=np.nan,
    ),
    "torch_nll": Spec(
        lambda x, y, reduction="none", **kw: pytorch.nll_loss(x, y, reduction=reduction, **kw),
        "int",
        "logprob",
        "input",
        empty_mean=np.nan,
        uses_other_columns=False,
    ),
    "torch_bce": Spec(
        lambda p, y, reduction="none": pytorch.binary_cross_entropy(p, y, reduction=reduction),
        "binary",
        "probs",
        "input",
        elementwise=True,
        empty_mean=np.nan,
    ),
    "torch_bce_logits": Spec(
        lambda x, y, reduction="none": pytorch.binary_cross_entropy_with_logits(
            x, y, reduction=reduction
        ),
        "binary",
        first_name="input",
        elementwise=True,
        empty_mean=np.nan,
    ),
    "torch_kl_div": Spec(
        lambda q, p, reduction="none": pytorch.kl_div(q, p, reduction=reduction),
        "prob",
        "logprob",
        "input",
        elementwise=True,
        empty_mean=np.nan,
    ),
}
CORE = [k for k in SPECS if not k.startswith("torch_")]


def _log_softmax(x):
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def inputs(spec: Spec, shape=(N, C), seed=0, dtype=np.float32):
    """``(first, second)`` of ``shape`` (classes last) for ``spec``, well inside every domain."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    first = {"logits": x, "logprob": _log_softmax(x), "probs": rng.uniform(0.05, 0.95, shape)}
    labels = rng.integers(0, shape[-1], size=shape[:-1]) if shape[-1] else np.zeros(shape[:-1])
    p = np.exp(_log_softmax(rng.normal(size=shape)))
    second = {
        "int": labels.astype(np.int32),
        "prob": p,
        "logprob": np.log(p),
        "logits": rng.normal(size=shape),
        "binary": rng.uniform(0.0, 1.0, shape),
        "none": None,
    }[spec.second]
    cast = (
        (lambda a: a)
        if spec.second == "int"
        else (lambda a: None if a is None else a.astype(dtype))
    )
    return first[spec.first].astype(dtype), cast(second)


def _row_or_element(spec: Spec, col: int):
    return (0, col) if spec.elementwise else (0,)


# ----------------------------------------------------------------------------- NaN in, NaN out
def _nan_cases():
    for name, spec in SPECS.items():
        yield name, "first", "label"
        yield name, "first", "other"
        if spec.second not in ("int", "none"):
            yield name, "second", "label"


@pytest.mark.parametrize("name,where_nan,column", list(_nan_cases()))
def test_nan_in_gives_nan_out(name, where_nan, column):
    spec = SPECS[name]
    first, second = inputs(spec)
    label_col = int(second[0]) if spec.second == "int" else 0
    col = label_col if column == "label" else (label_col + 1) % C
    target = first if where_nan == "first" else second
    target[0, col] = np.nan
    out = np.asarray(jax.jit(spec.call)(first, second))
    expect_nan = np.zeros(out.shape, bool)
    if spec.uses_other_columns or column == "label" or spec.elementwise:
        expect_nan[_row_or_element(spec, col)] = True
    np.testing.assert_array_equal(np.isnan(out), expect_nan)
    # Under vmap, and in every reduction, the NaN survives.
    batched = jax.vmap(spec.call)(
        np.stack([first, first]), None if second is None else np.stack([second, second])
    )
    np.testing.assert_array_equal(np.isnan(np.asarray(batched)), np.stack([expect_nan] * 2))
    for reduction in spec.reductions:
        total = jax.jit(functools.partial(spec.call, reduction=reduction))(first, second)
        assert np.isnan(total) == expect_nan.any(), reduction


@pytest.mark.parametrize("name", CORE)
def test_nan_sample_weight_gives_nan(name):
    spec = SPECS[name]
    first, second = inputs(spec)
    weights = np.ones(first.shape if spec.elementwise else first.shape[:-1], np.float32)
    weights[(0,) * weights.ndim] = np.nan
    out = np.asarray(jax.jit(spec.call)(first, second, sample_weights=weights))
    assert np.isnan(out.reshape(-1)[0]) and np.isfinite(out.reshape(-1)[1:]).all()
    mean = jax.jit(functools.partial(spec.call, reduction="mean"))
    assert np.isnan(mean(first, second, sample_weights=weights))


@pytest.mark.parametrize(
    "name",
    [
        "ce_int",
        "ce_int_smooth_weighted",
        "ce_soft",
        "poly",
        "focal_int",
        "focal_soft",
        "entropy",
        "softmax_kl",
        "js",
        "torch_cross_entropy",
    ],
)
def test_row_of_minus_inf_logits_is_nan(name):
    spec = SPECS[name]
    first, second = inputs(spec)
    first[0] = -np.inf
    out = np.asarray(jax.jit(spec.call)(first, second))
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all()


# ----------------------------------------------------------------------------- empty inputs
def _empty_cases():
    for name, spec in SPECS.items():
        yield name, (0,)
        # PyTorch's class axis is 1: its empty spatial case is test_torch_empty.
        if spec.elementwise or not name.startswith("torch_"):
            yield name, (2, 0)


@pytest.mark.parametrize("name,batch", list(_empty_cases()))
def test_empty_inputs(name, batch):
    spec = SPECS[name]
    first, second = inputs(spec, batch + (C,))
    per_example = spec.call(first, second)
    assert per_example.shape == (batch + (C,) if spec.elementwise else batch)
    assert float(spec.call(first, second, reduction="sum")) == 0.0
    mean = float(spec.call(first, second, reduction="mean"))
    np.testing.assert_equal(mean, spec.empty_mean)
    grad = jax.grad(lambda v: spec.call(v, second, reduction="sum"))(first)
    assert grad.shape == first.shape


@pytest.mark.parametrize("reduction,want", [("none", None), ("sum", 0.0), ("mean", np.nan)])
def test_torch_empty(reduction, want):
    x = np.zeros((2, C, 0), np.float32)  # (N, C, d1) with d1 = 0
    y = np.zeros((2, 0), np.int32)
    out = pytorch.cross_entropy(x, y, reduction=reduction)
    if want is None:
        assert out.shape == (2, 0)
    else:
        np.testing.assert_equal(float(out), want)
    assert (
        jax.grad(lambda v: jnp.sum(pytorch.cross_entropy(v, y, reduction="sum")))(x).shape
        == x.shape
    )


@pytest.mark.parametrize("name", [k for k in SPECS if not SPECS[k].elementwise])
def test_zero_classes_raise_naming_the_argument(name):
    spec = SPECS[name]
    first = np.zeros((3, 0), np.float32)
    second = {
        "int": np.zeros(3, np.int32),
        "none": None,
    }.get(spec.second, np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=f"`{spec.first_name}`"):
        spec.call(first, second)


# ----------------------------------------------------------------------------- parameter domains
DOMAIN_CASES = [
    # (spec name, parameter, value outside its domain)
    ("ce_int", "label_smoothing", -0.5),
    ("ce_int", "label_smoothing", 1.5),
    ("ce_int", "z_loss", -1.0),
    ("ce_soft", "label_smoothing", 1.5),
    ("ce_soft", "z_loss", -0.1),
    ("focal_int", "gamma", -1.0),
    ("focal_soft", "gamma", -0.5),
    ("softmax_kl", "temperature", 0.0),
    ("softmax_kl", "temperature", -1.0),
    ("js", "beta", 1.5),
    ("js", "beta", -0.5),
    ("sigmoid_bce", "label_smoothing", -0.5),
    ("sigmoid_bce", "label_smoothing", 1.5),
    ("sigmoid_focal", "gamma", -2.0),
    ("sigmoid_focal", "alpha", 1.1),
    ("sigmoid_focal", "alpha", -0.1),
]


@pytest.mark.parametrize("name,param,value", DOMAIN_CASES)
def test_concrete_parameter_outside_domain_raises(name, param, value):
    spec = SPECS[name]
    first, second = inputs(spec)
    for concrete in (value, np.float32(value), np.float64(value)):
        with pytest.raises(ValueError, match=f"`{param}` must be"):
            spec.call(first, second, **{param: concrete})


@pytest.mark.parametrize("name,param,value", DOMAIN_CASES)
def test_traced_parameter_outside_domain_is_nan_and_checkified(name, param, value):
    spec = SPECS[name]
    first, second = inputs(spec)

    def loss(v):
        return spec.call(first, second, **{param: v})

    assert np.isnan(np.asarray(jax.jit(loss)(value))).all()
    err, _ = checkify.checkify(jax.jit(loss), errors=checkify.user_checks)(value)
    with pytest.raises(checkify.JaxRuntimeError, match=f"`{param}` must be"):
        err.throw()
    inside = {"temperature": 1.0, "gamma": 0.0}.get(param, 0.5)
    err, _ = checkify.checkify(jax.jit(loss), errors=checkify.user_checks)(inside)
    assert err.get() is None


def test_smooth_labels_alpha_domain():
    labels = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="`alpha` must be in"):
        jaxce.smooth_labels(labels, 1.5)
    assert np.isnan(np.asarray(jax.jit(jaxce.smooth_labels)(labels, -0.5))).all()


def test_binary_labels_outside_unit_interval_are_invalid():
    x = np.array([0.5, -1.0, 2.0], np.float32)
    y = np.array([1.0, 2.0, -1.0], np.float32)
    for loss in (
        jaxce.sigmoid_binary_cross_entropy,
        jaxce.sigmoid_focal_loss,
        lambda x, y: jaxce.binary_cross_entropy(jax.nn.sigmoid(x), y),
    ):
        out = np.asarray(jax.jit(loss)(x, y))
        np.testing.assert_array_equal(np.isnan(out), [False, True, True])
        err, _ = checkify.checkify(jax.jit(loss), errors=checkify.user_checks)(x, y)
        with pytest.raises(checkify.JaxRuntimeError, match="must lie in \\[0, 1\\]"):
            err.throw()
    probs = np.array([0.5, 1.5, -0.5], np.float32)
    out = np.asarray(jaxce.binary_cross_entropy(probs, np.ones(3, np.float32)))
    np.testing.assert_array_equal(np.isnan(out), [False, True, True])


# ----------------------------------------------------------------------------- the dtype's limit
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_logits_at_the_dtype_limit(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        fmax = float(jnp.finfo(dtype).max)
        x = jnp.array([[fmax, -fmax]], dtype)
        y = jnp.array([0])
        t = jnp.array([[0.9, 0.1]], dtype)
        cw = jnp.array([1.0, 3.0], dtype)
        cases = {
            # (loss, exact value)
            "ce_int": (lambda v: jaxce.softmax_cross_entropy_with_integer_labels(v, y), 0.0),
            "ce_int_smooth_weighted": (
                lambda v: jaxce.softmax_cross_entropy_with_integer_labels(
                    v, y, label_smoothing=0.2, class_weights=cw
                ),
                0.1 * 3.0 * 2 * fmax,
            ),
            "ce_soft": (lambda v: jaxce.softmax_cross_entropy(v, t), 0.1 * 2 * fmax),
            "poly": (lambda v: jaxce.poly_loss_cross_entropy(v, t), 0.1 * 2 * fmax + 2 * 0.1),
            "focal_int": (lambda v: jaxce.softmax_focal_loss(v, y), 0.0),
            "focal_soft": (lambda v: jaxce.softmax_focal_loss(v, t, gamma=2.0), 0.1 * 2 * fmax),
            "entropy": (lambda v: jaxce.entropy(v), 0.0),
            "softmax_kl": (lambda v: jaxce.softmax_kl_divergence(v, v), 0.0),
            "js": (lambda v: jaxce.js_divergence(v, v[:, ::-1]), np.log(2.0)),
            "sigmoid_bce": (
                lambda v: jaxce.sigmoid_binary_cross_entropy(v, jnp.ones_like(v)),
                None,
            ),
            "sigmoid_focal": (lambda v: jaxce.sigmoid_focal_loss(v, jnp.ones_like(v)), None),
            "binary_entropy": (lambda v: jaxce.binary_entropy(v), 0.0),
        }
        for name, (loss, exact) in cases.items():
            value = np.asarray(jax.jit(loss)(x), np.float64)
            assert np.isfinite(value).all(), name
            if exact is not None:
                np.testing.assert_allclose(value.reshape(-1)[0], exact, rtol=1e-2, err_msg=name)
            grad = jax.jit(jax.grad(lambda v, loss=loss: jnp.sum(loss(v))))(x)
            assert grad.dtype == dtype and np.isfinite(np.asarray(grad, np.float64)).all(), name


def test_zero_class_weight_masks_an_infinite_logit():
    x = jnp.array([[0.0, -jnp.inf]])
    loss = functools.partial(
        jaxce.softmax_cross_entropy_with_integer_labels, class_weights=jnp.array([1.0, 0.0])
    )
    assert float(loss(x, jnp.array([1]))[0]) == 0.0
    grad = jax.grad(lambda v: loss(v, jnp.array([1]), reduction="sum"))(x)
    np.testing.assert_array_equal(grad, 0.0)
    assert float(jaxce.nll_loss(x, jnp.array([1]), class_weights=jnp.array([1.0, 0.0]))[0]) == 0.0


# ----------------------------------------------------------------------------- scalar types
def test_python_and_numpy_scalars_are_accepted():
    first, second = inputs(SPECS["ce_int"])
    ce = jaxce.softmax_cross_entropy_with_integer_labels
    want = ce(first, second, label_smoothing=0.1, z_loss=0.5, ignore_index=2)
    for kw in (
        {
            "label_smoothing": np.float64(0.1),
            "z_loss": np.float32(0.5),
            "ignore_index": np.int64(2),
        },
        {
            "label_smoothing": 0.1,
            "z_loss": 1 / 2,
            "ignore_index": np.int32(2),
            "axis": np.int64(-1),
        },
    ):
        np.testing.assert_allclose(ce(first, second, **kw), want, rtol=1e-6)
    x, y = inputs(SPECS["sigmoid_focal"])
    np.testing.assert_allclose(
        jaxce.sigmoid_focal_loss(x, y, alpha=1, gamma=2),
        jaxce.sigmoid_focal_loss(x, y, alpha=1.0, gamma=2.0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jaxce.softmax_kl_divergence(x, y, temperature=2),
        jaxce.softmax_kl_divergence(x, y, temperature=2.0),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        jaxce.js_divergence(x, y, beta=np.float16(0.5)), jaxce.js_divergence(x, y), rtol=1e-6
    )
    # An ignore_index no int32 label can hold ignores nothing (no OverflowError).
    np.testing.assert_allclose(ce(first, second, ignore_index=2**40), ce(first, second), rtol=1e-6)


def test_boolean_sample_weights_are_masks():
    first, second = inputs(SPECS["ce_int"])
    mask = np.array([True, False, True, True])
    ce = jaxce.softmax_cross_entropy_with_integer_labels
    np.testing.assert_allclose(
        ce(first, second, sample_weights=mask, reduction="mean"),
        ce(first, second, sample_weights=mask.astype(np.float32), reduction="mean"),
        rtol=1e-6,
    )


@pytest.mark.parametrize("axis", [1.0, "1", None, ()])
def test_bad_axis_raises_type_error(axis):
    with pytest.raises(TypeError, match="`axis` must be an int or a non-empty tuple of ints"):
        jaxce.entropy(np.zeros((2, 3), np.float32), axis=axis)


def test_weighted_mean_of_mismatched_parts_raises():
    with pytest.raises(ValueError, match="`total` has shape \\(3,\\) and `weight` has shape"):
        jaxce.weighted_mean(jnp.ones(3), jnp.ones(2))


def test_lower_rank_class_mask_message_shows_the_fix():
    with pytest.raises(ValueError, match=r"where\[None, None, :\]"):
        jaxce.softmax_cross_entropy_with_integer_labels(
            np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int32), where=np.ones(4, bool)
        )


def test_smooth_labels_checks_the_mask_and_handles_empty_rows():
    labels = np.eye(4, dtype=np.float32)[:2]
    with pytest.raises(ValueError, match="`where` has shape \\(1, 3\\)"):
        jaxce.smooth_labels(labels, 0.1, where=np.ones((1, 3), bool))
    mask = np.array([[True, True, False, False], [False] * 4])
    out = np.asarray(jaxce.smooth_labels(labels, 0.2, where=mask))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], 0.8 * labels[1])


# ----------------------------------------------------------------------------- checkify of grad
@pytest.mark.parametrize(
    "loss",
    [
        lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="sum"),
        lambda x, y: jaxce.nll_loss(x, y, reduction="sum"),
        lambda x, y: jaxce.softmax_focal_loss(x, y, reduction="sum"),
    ],
    ids=["ce", "nll", "focal"],
)
def test_checkify_all_checks_of_a_gradient(loss):
    """The label gather is written so that checkify's index checks can transform its gradient."""
    x = np.zeros((2, 3, 4), np.float32)
    good = np.array([[0, 1, 3], [2, 2, 1]], np.int32)
    err, grad = checkify.checkify(jax.grad(loss), errors=checkify.all_checks)(x, good)
    assert err.get() is None and grad.shape == x.shape
    bad = good.copy()
    bad[1, 2] = 7
    err, _ = checkify.checkify(jax.grad(loss), errors=checkify.all_checks)(x, bad)
    assert "invalid integer label 7" in err.get()

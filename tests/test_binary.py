"""Tests of the binary family (sigmoid BCE, BCE on probabilities, sigmoid focal loss).

Float64 NumPy references written from the formulas, gradients to second order in both modes,
extreme logits and probabilities. The optax and PyTorch parity tests are in
``test_parity_optax.py`` and ``test_parity_torch.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BINARY_FOCAL_OPTIONS,
    BINARY_SHAPE,
    assert_close,
    assert_transforms_match_eager,
    binary_data,
    check_grads_2,
    check_half_precision_policy,
    derivatives,
)
from reference import weighted_reduce

import jaxce

INF = np.inf
EXTREME_X = np.array([-INF, -1e30, -30.0, 0.0, 30.0, 1e30, INF])


# ----------------------------------------------------------------------------- references
def _log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def ref_sigmoid_bce(x, y, *, pw=None, eps=0.0, sw=None, reduction="none"):
    """-(pw * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x))), smoothed y, weights."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    y = y * (1 - eps) + eps / 2
    pw = 1.0 if pw is None else np.asarray(pw, np.float64)
    loss = -(pw * y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x))
    w = np.ones_like(loss) if sw is None else np.broadcast_to(sw, loss.shape).astype(np.float64)
    return weighted_reduce(loss * w, w, reduction)


def ref_bce(p, y, *, sw=None, reduction="none"):
    p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
    with np.errstate(divide="ignore"):
        loss = -(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log1p(-p), -100))
    w = np.ones_like(loss) if sw is None else np.broadcast_to(sw, loss.shape).astype(np.float64)
    return weighted_reduce(loss * w, w, reduction)


def ref_focal(x, y, *, alpha=None, gamma=2.0, sw=None, reduction="none"):
    """alpha_t * (1 - p_t)**gamma * BCE, p_t = p y + (1 - p)(1 - y)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    with np.errstate(over="ignore"):
        p, q = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(x))  # q = 1 - p without cancellation
    one_minus_pt = p * (1 - y) + q * y
    loss = one_minus_pt**gamma * ref_sigmoid_bce(x, y)
    if alpha is not None:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    w = np.ones_like(loss) if sw is None else np.broadcast_to(sw, loss.shape).astype(np.float64)
    return weighted_reduce(loss * w, w, reduction)


# ----------------------------------------------------------------------------- values
BCE_OPTIONS = [
    {},
    {"pos_weight": np.array([0.5, 1.0, 2.0, 3.0])},
    {"label_smoothing": 0.1},
    {"sample_weights": np.array([[1.0], [0.0], [2.5]])},
    {
        "pos_weight": np.array([[2.0], [1.0], [0.5]]),
        "label_smoothing": 0.2,
        "sample_weights": np.linspace(0.0, 1.0, 12).reshape(BINARY_SHAPE),
    },
]
_REF_NAMES = {"pos_weight": "pw", "label_smoothing": "eps", "sample_weights": "sw"}


def _ref_kwargs(opts):
    return {_REF_NAMES[k]: v for k, v in opts.items()}


@pytest.mark.parametrize("opts", BCE_OPTIONS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_and_weight"])
def test_sigmoid_bce_matches_reference(rng, opts, reduction):
    x, y = binary_data(rng)
    got = jaxce.sigmoid_binary_cross_entropy(
        x.astype(np.float32), y.astype(np.float32), reduction=reduction, **opts
    )
    assert_close(got, ref_sigmoid_bce(x, y, reduction=reduction, **_ref_kwargs(opts)))


@pytest.mark.parametrize("opts", [BCE_OPTIONS[0], BCE_OPTIONS[-1]])  # plain; every option
def test_sigmoid_bce_grads(rng, opts):
    x, y = binary_data(rng)
    check_grads_2(lambda x: jaxce.sigmoid_binary_cross_entropy(x, y, **opts), (x,))


def test_sigmoid_bce_grads_wrt_labels_and_pos_weight(rng):
    x, y = binary_data(rng)
    pw = np.array([0.5, 1.0, 2.0, 3.0])
    check_grads_2(
        lambda y, pw: jaxce.sigmoid_binary_cross_entropy(x, y, pos_weight=pw, reduction="sum"),
        (y, pw),
    )


def test_sigmoid_bce_integer_and_bool_labels(rng):
    x, y = binary_data(rng, soft=False)
    want = ref_sigmoid_bce(x, y)
    x32 = x.astype(np.float32)
    assert_close(jaxce.sigmoid_binary_cross_entropy(x32, y.astype(np.int32)), want)
    assert_close(jaxce.sigmoid_binary_cross_entropy(x32, y.astype(bool)), want)


def test_sigmoid_bce_stable_form():
    """Equals the documented stable form max(x, 0) - x y + log1p(exp(-|x|))."""
    x = np.array([-50.0, -3.0, -0.5, 0.0, 0.7, 4.0, 60.0])
    y = np.array([0.0, 1.0, 0.3, 0.5, 1.0, 0.0, 0.9])
    want = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    with jax.enable_x64(True):
        assert_close(jaxce.sigmoid_binary_cross_entropy(x, y), want, rtol=1e-12, atol=1e-12)


_BCE_DERIVS = derivatives(lambda x, y, pw: jaxce.sigmoid_binary_cross_entropy(x, y, pos_weight=pw))


@pytest.mark.parametrize("y", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("pw", [1.0, 3.0])
def test_sigmoid_bce_extreme_logits(y, pw):
    """+-inf and +-1e30 logits: no NaN; loss exact (inf only where the math says so);
    gradient = sigmoid(x) (1 - y + pw y) - pw y, finite; Hessian finite, both modes."""
    x = EXTREME_X.astype(np.float32)
    ys = np.full_like(x, y)
    loss, g_rev, g_fwd, h_rev, h_fwd = map(np.asarray, _BCE_DERIVS(x, ys, np.float32(pw)))
    # exact values: softplus terms; infinite exactly where a weighted term meets an inf logit
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.where(ys == 0, 0.0, pw * ys * np.logaddexp(0, -x.astype(np.float64))) + np.where(
            ys == 1, 0.0, (1 - ys) * np.logaddexp(0, x.astype(np.float64))
        )
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    assert not np.isnan(loss).any()
    assert np.isposinf(loss[0]) == (y > 0) and np.isposinf(loss[-1]) == (y < 1)
    with np.errstate(over="ignore"):
        sig = 1 / (1 + np.exp(-x.astype(np.float64)))
    want_g = sig * (1 - y + pw * y) - pw * y
    np.testing.assert_allclose(g_rev, want_g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_fwd, want_g, rtol=1e-5, atol=1e-7)
    want_h = sig * (1 - sig) * (1 - y + pw * y)
    np.testing.assert_allclose(h_rev, want_h, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h_fwd, want_h, rtol=1e-5, atol=1e-7)


def test_sigmoid_bce_label_smoothing_values():
    x = np.array([2.0, -1.0], np.float32)
    y = np.array([1.0, 0.0], np.float32)
    got = jaxce.sigmoid_binary_cross_entropy(x, y, label_smoothing=0.2)
    # targets become 0.9 and 0.1
    want = ref_sigmoid_bce(x, np.array([0.9, 0.1]))
    assert_close(got, want)


def test_all_zero_weights_mean_is_zero(rng):
    x, y = binary_data(rng)
    f = lambda x: jaxce.sigmoid_binary_cross_entropy(
        x, y, sample_weights=np.zeros(BINARY_SHAPE), reduction="mean"
    )
    assert float(f(x)) == 0.0
    np.testing.assert_array_equal(jax.grad(f)(x), np.zeros(BINARY_SHAPE))


# ----------------------------------------------------------------------------- BCE on probs
def test_bce_seed_example():
    """Credit default: y = (1, 0), p = (0.7, 0.2) -> 0.356675, 0.223144, mean 0.289909."""
    probs, labels = np.array([0.7, 0.2], np.float32), np.array([1.0, 0.0], np.float32)
    assert_close(jaxce.binary_cross_entropy(probs, labels), [0.356675, 0.223144], atol=1e-6)
    assert_close(jaxce.binary_cross_entropy(probs, labels, reduction="mean"), 0.289909, atol=1e-6)
    logits = np.log(probs / (1 - probs))
    assert_close(
        jaxce.sigmoid_binary_cross_entropy(logits, labels, reduction="mean"), 0.289909, atol=1e-6
    )
    from sklearn.metrics import log_loss

    assert_close(0.289909, log_loss([[0, 1], [1, 0]], [[0.3, 0.7], [0.8, 0.2]]), atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_and_weight"])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_matches_reference(rng, reduction, weighted):
    p = rng.uniform(0.01, 0.99, size=BINARY_SHAPE)
    y = rng.uniform(size=BINARY_SHAPE)
    sw = rng.uniform(size=(1, 4)) if weighted else None
    got = jaxce.binary_cross_entropy(
        p.astype(np.float32), y.astype(np.float32), sample_weights=sw, reduction=reduction
    )
    assert_close(got, ref_bce(p, y, sw=sw, reduction=reduction), rtol=1e-5, atol=1e-5)


def test_bce_grads(rng):
    p = rng.uniform(0.05, 0.95, size=BINARY_SHAPE)
    y = rng.uniform(size=BINARY_SHAPE)
    sw = rng.uniform(size=BINARY_SHAPE)
    check_grads_2(
        lambda p, y: jaxce.binary_cross_entropy(p, y, sample_weights=sw), (p, y), eps=1e-5
    )


_BCE_PROBS_DERIVS = derivatives(lambda p, y: jaxce.binary_cross_entropy(p, y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_at_zero_and_one(dtype):
    """p exactly 0 and 1: loss 0 or 100 (the clamp), finite gradients and Hessians."""
    with jax.enable_x64(dtype == np.float64):
        p = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0], dtype)
        y = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.5], dtype)
        loss, g_rev, g_fwd, h_rev, h_fwd = _BCE_PROBS_DERIVS(p, y)
        np.testing.assert_allclose(loss, [0.0, 100.0, 100.0, 0.0, 50.0, 50.0], rtol=1e-6)
        # clamped terms are flat; live terms: d/dp -(1-y) log(1-p) = (1-y)/(1-p) at p = 0, etc.
        want = np.array([1.0, 0.0, 0.0, -1.0, 0.5, -0.5])
        np.testing.assert_allclose(g_rev, want, rtol=1e-6)
        np.testing.assert_allclose(g_fwd, want, rtol=1e-6)
        # second derivative of the live term: (1 - y)/(1 - p)^2 at p = 0, y/p^2 at p = 1
        want_h = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])
        np.testing.assert_allclose(h_rev, want_h, rtol=1e-6)
        np.testing.assert_allclose(h_fwd, want_h, rtol=1e-6)
        g_y = jax.grad(lambda y: jnp.sum(jaxce.binary_cross_entropy(p, y)))(y)
        # d/dy = -max(log p, -100) + max(log(1 - p), -100)
        np.testing.assert_allclose(g_y, [100.0, 100.0, -100.0, -100.0, 100.0, -100.0])


def test_bce_out_of_range_probs_are_nan():
    got = np.asarray(
        jaxce.binary_cross_entropy(
            np.array([-0.1, 0.5, 1.1], np.float32), np.array([1.0, 1.0, 1.0], np.float32)
        )
    )
    assert np.isnan(got[0]) and np.isnan(got[2]) and np.isfinite(got[1])


# ----------------------------------------------------------------------------- focal
@pytest.mark.parametrize("opts", BINARY_FOCAL_OPTIONS)
@pytest.mark.parametrize("soft", [False, True])
def test_focal_matches_reference(rng, opts, soft):
    x, y = binary_data(rng, soft=soft)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    got = jaxce.sigmoid_focal_loss(x32, y32, **opts)
    assert_close(got, ref_focal(x, y, **opts), rtol=1e-5, atol=1e-6)


def test_focal_gamma_zero_is_bce(rng):
    x, y = binary_data(rng)
    x, y = x.astype(np.float32), y.astype(np.float32)
    assert_close(
        jaxce.sigmoid_focal_loss(x, y, gamma=0.0), jaxce.sigmoid_binary_cross_entropy(x, y)
    )


@pytest.mark.parametrize("reduction", ["sum", "mean", "sum_and_weight"])
def test_focal_weights_and_reductions(rng, reduction):
    x, y = binary_data(rng)
    sw = rng.uniform(size=(3, 1))
    got = jaxce.sigmoid_focal_loss(
        x.astype(np.float32),
        y.astype(np.float32),
        alpha=0.25,
        sample_weights=sw,
        reduction=reduction,
    )
    assert_close(got, ref_focal(x, y, alpha=0.25, sw=sw, reduction=reduction), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("opts", BINARY_FOCAL_OPTIONS[1:3])
def test_focal_grads(rng, opts):
    x, y = binary_data(rng)
    check_grads_2(lambda x, y: jaxce.sigmoid_focal_loss(x, y, **opts), (x, y))


_FOCAL_DERIVS = derivatives(
    lambda x, y, gamma: jaxce.sigmoid_focal_loss(x, y, gamma=gamma, alpha=0.25)
)


@pytest.mark.parametrize("y", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_extreme_logits(y, gamma):
    """+-inf, +-1e30: loss equals the reference's limit, no NaN anywhere, finite gradients
    and Hessians in both modes (optax gives NaN at +-inf)."""
    x = EXTREME_X.astype(np.float32)
    ys = np.full_like(x, y)
    loss, g_rev, g_fwd, h_rev, h_fwd = map(np.asarray, _FOCAL_DERIVS(x, ys, np.float32(gamma)))
    assert not np.isnan(loss).any()
    # infinite exactly where BCE is; elsewhere the reference (in float64, finite logits)
    assert np.isposinf(loss[0]) == (y > 0) and np.isposinf(loss[-1]) == (y < 1)
    want = ref_focal(x[1:-1].astype(np.float64), ys[1:-1], alpha=0.25, gamma=gamma)
    np.testing.assert_allclose(loss[1:-1], want, rtol=1e-5, atol=1e-30)
    assert np.isfinite(g_rev).all() and np.isfinite(g_fwd).all()
    np.testing.assert_allclose(g_rev, g_fwd, rtol=1e-5)
    # at +-inf and +-1e30 the gradient is the limit alpha_t * (1 - p_t)**gamma * (sigmoid(x) - y)
    alpha_t = 0.25 * y + 0.75 * (1 - y)
    for i, s in ((0, 0.0), (1, 0.0), (5, 1.0), (6, 1.0)):
        one_minus_pt = s * (1 - y) + (1 - s) * y
        np.testing.assert_allclose(g_rev[i], alpha_t * one_minus_pt**gamma * (s - y), atol=1e-7)
    assert np.isfinite(h_rev).all() and np.isfinite(h_fwd).all()
    np.testing.assert_allclose(h_rev, h_fwd, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- transforms
LOSSES = {
    "sigmoid_bce": lambda x, y: jaxce.sigmoid_binary_cross_entropy(x, y, label_smoothing=0.1),
    "bce": lambda p, y: jaxce.binary_cross_entropy(p, y),
    "focal": lambda x, y: jaxce.sigmoid_focal_loss(x, y, alpha=0.25),
}


def _inputs(rng, name):
    x, y = binary_data(rng)
    if name == "bce":
        x = rng.uniform(0.05, 0.95, size=BINARY_SHAPE)
    return x, y


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_jit_vmap_checkpoint(rng, name):
    x, y = _inputs(rng, name)
    assert_transforms_match_eager(LOSSES[name], x.astype(np.float32), y.astype(np.float32))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(rng, name, dtype):
    f = LOSSES[name]
    x, y = _inputs(rng, name)
    check_half_precision_policy(f, x, y, dtype, rtol=1e-2, atol=1e-2)


def test_float64_stays_float64(rng):
    x, y = binary_data(rng)
    with jax.enable_x64(True):
        assert jaxce.sigmoid_binary_cross_entropy(x, y).dtype == jnp.float64
        assert jaxce.binary_cross_entropy(jax.nn.sigmoid(x), y).dtype == jnp.float64
        assert jaxce.sigmoid_focal_loss(x, y).dtype == jnp.float64


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "fn, first",
    [
        (jaxce.sigmoid_binary_cross_entropy, "logits"),
        (jaxce.binary_cross_entropy, "probs"),
        (jaxce.sigmoid_focal_loss, "logits"),
    ],
)
def test_bad_input(fn, first):
    x = np.zeros(BINARY_SHAPE, np.float32)
    y = np.zeros(BINARY_SHAPE, np.float32)
    with pytest.raises(TypeError, match=first):
        fn(x.astype(np.int32), y)
    with pytest.raises(TypeError, match="labels"):
        fn(x, y.astype(np.complex64))
    with pytest.raises(ValueError, match=r"`labels` has shape \(5,\)"):
        fn(x, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="sample_weights"):
        fn(x, y, sample_weights=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="reduction"):
        fn(x, y, reduction="batchmean")


def test_bad_pos_weight_and_alpha():
    x = np.zeros(BINARY_SHAPE, np.float32)
    with pytest.raises(ValueError, match="pos_weight"):
        jaxce.sigmoid_binary_cross_entropy(x, x, pos_weight=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="pos_weight"):
        jaxce.sigmoid_binary_cross_entropy(x, x, pos_weight=np.ones(4, np.int32))
    with pytest.raises(ValueError, match="alpha"):
        jaxce.sigmoid_focal_loss(x, x, alpha=np.ones(3, np.float32))

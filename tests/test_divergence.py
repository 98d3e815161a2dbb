"""Tests of the information-theoretic family: entropies, KL divergences, distillation, JSD.

Float64 NumPy references written from the formulas (row by row, masks by boolean indexing),
gradients to second order in both modes, zero targets and extreme logits, and Hypothesis
properties (CE = H + KL, KL >= 0, JSD symmetric and <= log 2, ...). The optax and PyTorch
parity tests are in ``test_parity_optax.py`` and ``test_parity_torch.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BINARY_SHAPE,
    assert_close,
    assert_transforms_match_eager,
    check_grads_2,
    check_half_precision_policy,
    derivatives,
    divergence_inputs,
    probability_targets,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import log_softmax, weighted_reduce, xlogy

import jaxce

N, C = BINARY_SHAPE
LOG2 = np.log(2.0)


# ----------------------------------------------------------------------------- references
def _softmax(x):
    return np.exp(log_softmax(x))


def ref_entropy(x):
    """-sum p log p of softmax(x) for one row (already restricted to the kept classes)."""
    lp = log_softmax(x)
    return -np.sum(xlogy(np.exp(lp), lp))


def ref_kl(log_q, p):
    """sum p (log p - log q) for one row, 0 log 0 = 0."""
    p, log_q = np.asarray(p, np.float64), np.asarray(log_q, np.float64)
    with np.errstate(divide="ignore"):
        return np.sum(xlogy(p, np.log(p)) - xlogy(p, log_q))


def ref_kl_log(log_q, log_p):
    return ref_kl(log_q, np.exp(np.asarray(log_p, np.float64)))


def ref_softmax_kl(s, t, temperature=1.0):
    return temperature**2 * ref_kl(log_softmax(s / temperature), _softmax(t / temperature))


def ref_js(a, b, beta=0.5):
    p, q = _softmax(a), _softmax(b)
    m = beta * p + (1 - beta) * q
    with np.errstate(divide="ignore"):
        return beta * ref_kl(np.log(m), p) + (1 - beta) * ref_kl(np.log(m), q)


def ref_binary_entropy(x):
    x = np.asarray(x, np.float64)
    p, q = 1 / (1 + np.exp(-x)), 1 / (1 + np.exp(x))
    log_p, log_q = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)  # log sigmoid(+-x)
    return -(xlogy(p, log_p) + xlogy(q, log_q))


# name -> (jaxce call f(a, b, **kw), row reference ref(a_row, b_row), second-input maker)
CASES = {
    "entropy": (lambda a, b, **kw: jaxce.entropy(a, **kw), lambda a, b: ref_entropy(a), None),
    "kl": (jaxce.kl_divergence, ref_kl, "probs"),
    "kl_log": (jaxce.kl_divergence_with_log_targets, ref_kl_log, "log_probs"),
    "softmax_kl": (
        lambda a, b, **kw: jaxce.softmax_kl_divergence(a, b, temperature=2.0, **kw),
        lambda a, b: ref_softmax_kl(a, b, 2.0),
        "logits",
    ),
    "js": (
        lambda a, b, **kw: jaxce.js_divergence(a, b, beta=0.3, **kw),
        lambda a, b: ref_js(a, b, 0.3),
        "logits",
    ),
}
NAMES = sorted(CASES)


def _inputs(rng, name, shape=(N, C)):
    return divergence_inputs(rng, CASES[name][2], shape)


def _row_reference(name, a, b, class_mask=None, example_mask=None):
    ref = CASES[name][1]
    out = np.zeros(a.shape[0])
    for i in range(a.shape[0]):
        keep = np.ones(a.shape[1], bool) if class_mask is None else class_mask[i]
        if (example_mask is not None and not example_mask[i]) or not keep.any():
            continue
        out[i] = ref(a[i][keep], b[i][keep])
    return out


def _masks(rng):
    class_mask = rng.uniform(size=(N, C)) > 0.3
    class_mask[0] = False  # a row with every class masked counts as dropped
    class_mask[1] = True
    example_mask = np.array([True, False, True])
    return class_mask, example_mask


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("where", [None, "class", "example"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_and_boolean_indexing(rng, name, where):
    a, b = _inputs(rng, name)
    class_mask, example_mask = _masks(rng)
    kw, ref_kw = {}, {}
    if where == "class":
        kw["where"], ref_kw["class_mask"] = class_mask, class_mask
    elif where == "example":
        kw["where"], ref_kw["example_mask"] = example_mask, example_mask
    got = CASES[name][0](a.astype(np.float32), b.astype(np.float32), **kw)
    assert got.shape == (N,) and got.dtype == jnp.float32
    assert_close(got, _row_reference(name, a, b, **ref_kw), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean", "sum_and_weight"])
@pytest.mark.parametrize("name", NAMES)
def test_weights_and_reductions(rng, name, reduction):
    a, b = _inputs(rng, name)
    sw = rng.uniform(size=N)
    sw[2] = 0.0
    got = CASES[name][0](
        a.astype(np.float32), b.astype(np.float32), sample_weights=sw, reduction=reduction
    )
    want = weighted_reduce(_row_reference(name, a, b) * sw, sw, reduction)
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_binary_entropy_matches_reference(rng):
    x = rng.normal(size=(N, C)) * 4
    assert_close(jaxce.binary_entropy(x.astype(np.float32)), ref_binary_entropy(x), atol=1e-6)
    sw = rng.uniform(size=(N, 1))
    assert_close(
        jaxce.binary_entropy(x.astype(np.float32), sample_weights=sw, reduction="mean"),
        weighted_reduce(ref_binary_entropy(x) * sw, np.broadcast_to(sw, x.shape), "mean"),
    )


def test_binary_entropy_is_two_class_entropy(rng):
    x = rng.normal(size=(N,)).astype(np.float32) * 3
    two_class = np.stack([np.zeros_like(x), x], axis=-1)  # softmax([0, x]) = (1 - p, p)
    assert_close(jaxce.binary_entropy(x), jaxce.entropy(two_class), atol=1e-6)


def test_seed_identity_ce_is_entropy_plus_kl():
    """SEED_EXAMPLES item 5 with p = (0.9, 0.1), q = (0.6, 0.4): CE = H + KL."""
    p, q = np.array([0.9, 0.1], np.float32), np.array([0.6, 0.4], np.float32)
    h, kl = jaxce.entropy(np.log(p)), jaxce.kl_divergence(np.log(q), p)
    ce = jaxce.softmax_cross_entropy(np.log(q), p)
    assert_close(h + kl, ce, atol=1e-6)
    assert_close(ce, -(0.9 * np.log(0.6) + 0.1 * np.log(0.4)), atol=1e-6)


def test_js_bounds_and_limits():
    disjoint = jaxce.js_divergence(np.array([0.0, -np.inf]), np.array([-np.inf, 0.0]))
    assert_close(disjoint, LOG2, atol=1e-6)
    x = np.array([1.0, 2.0, 3.0], np.float32)
    y = np.array([3.0, 1.0, 0.0], np.float32)
    for beta in (0.0, 1.0):  # M equals P or Q: one of the KL terms has weight 0
        assert float(jaxce.js_divergence(x, y, beta=beta)) == pytest.approx(0.0, abs=1e-6)


def test_softmax_kl_temperature_and_gradient_flow(rng):
    s, t = rng.normal(size=(2, N, C)).astype(np.float32)
    assert_close(
        jaxce.softmax_kl_divergence(s, t, temperature=3.0),
        [ref_softmax_kl(s[i].astype(np.float64), t[i].astype(np.float64), 3.0) for i in range(N)],
        atol=1e-5,
    )
    g_t = jax.grad(lambda t: jnp.sum(jaxce.softmax_kl_divergence(s, t)))(t)
    assert np.abs(g_t).max() > 1e-3  # flows into the teacher ...
    g_frozen = jax.grad(
        lambda t: jnp.sum(jaxce.softmax_kl_divergence(s, jax.lax.stop_gradient(t)))
    )(t)
    np.testing.assert_array_equal(g_frozen, np.zeros_like(t))  # ... unless stopped


# ----------------------------------------------------------------------------- zero targets
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_zero_targets(log_target):
    """Zero targets (and -inf log-predictions there): finite loss equal to torch's on the
    support, gradient w.r.t. predictions -p (finite), w.r.t. a zero target 0, never NaN.
    optax and PyTorch give NaN for the same inputs."""
    p = np.array([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
    with np.errstate(divide="ignore"):
        log_q = np.log(np.array([[0.25, 0.25, 0.5, 0.0], [0.0, 0.5, 0.25, 0.25]], np.float32))
        target = np.log(p) if log_target else p
    fn = jaxce.kl_divergence_with_log_targets if log_target else jaxce.kl_divergence
    loss = fn(log_q, target)
    assert_close(loss, [LOG2, LOG2], atol=1e-6)
    g_q, g_t = jax.grad(lambda q, t: jnp.sum(fn(q, t)), argnums=(0, 1))(log_q, target)
    np.testing.assert_allclose(g_q, -p)
    with np.errstate(divide="ignore"):
        # d/dp p (log p - log q) = log p + 1 - log q on the support, 0 off it
        want_t = np.where(p > 0, np.log(np.where(p > 0, p, 1)) + 1 - log_q, 0.0)
        if log_target:  # d/d(log p) = p * (log p + 1 - log q)
            want_t = np.where(p > 0, p * want_t, 0.0)
    np.testing.assert_allclose(g_t, want_t, rtol=1e-6)
    # forward mode and second order are NaN-free too
    tangent = jax.jvp(
        lambda q, t: fn(q, t),
        (log_q, target),
        (np.ones_like(log_q), np.where(p > 0, 1.0, 0.0).astype(np.float32)),
    )[1]
    assert np.isfinite(tangent).all()
    hess = jax.hessian(lambda q: jnp.sum(fn(q, target)))(log_q)
    assert np.isfinite(hess).all()


def test_kl_targets_on_masked_or_infinite_predictions():
    """p > 0 where q = 0 is +inf (the math); the gradient w.r.t. log q is still -p."""
    p = np.array([0.5, 0.5], np.float32)
    log_q = np.array([0.0, -np.inf], np.float32)
    assert np.isposinf(jaxce.kl_divergence(log_q, p))
    np.testing.assert_allclose(jax.grad(lambda q: jaxce.kl_divergence(q, p))(log_q), -p)
    # a masked class drops out of the sum
    assert_close(jaxce.kl_divergence(log_q, p, where=np.array([True, False])), 0.5 * np.log(0.5))


# ----------------------------------------------------------------------------- gradients
GRAD_CASES = {
    "entropy_where": lambda a, b: jaxce.entropy(a, where=GRAD_MASK),
    "binary_entropy": lambda a, b: jaxce.binary_entropy(a, sample_weights=b),
    "kl": lambda a, b: jaxce.kl_divergence(a, b, where=GRAD_MASK),
    "kl_log": lambda a, b: jaxce.kl_divergence_with_log_targets(a, b, reduction="mean"),
    "softmax_kl": lambda a, b: jaxce.softmax_kl_divergence(a, b, temperature=2.0, where=GRAD_MASK),
    "js": lambda a, b: jaxce.js_divergence(a, b, beta=0.3),
}
GRAD_MASK = np.array([[True, True, False, True]] * N)


_SLOW_GRADS = {"binary_entropy", "entropy_where", "js", "softmax_kl"}  # > 3 s each on 2 cores


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_GRADS else n
        for n in sorted(GRAD_CASES)
    ],
)
def test_grads(rng, name):
    a = rng.normal(size=(N, C))
    b = probability_targets(rng, (N, C))
    if name == "kl_log":
        a, b = log_softmax(a), np.log(b)
    elif name == "kl":
        a = log_softmax(a)
    elif name in ("softmax_kl", "js"):
        b = rng.normal(size=(N, C))
    check_grads_2(GRAD_CASES[name], (a, b), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- extremes
EXTREME_ROWS = np.array(
    [
        [0.0, -np.inf, 1.0, -np.inf, 2.0],
        [1e30, -1e30, 0.0, 3.0, -np.inf],
        [-1e30, -1e30, -1e30, -1e30, -1e30],
        [3e38, 3e38, -3e38, 0.0, 1.0],
    ],
    np.float32,
)
EXTREME_FNS = {
    "entropy": derivatives(lambda x, y: jaxce.entropy(x)),
    "softmax_kl": derivatives(lambda x, y: jaxce.softmax_kl_divergence(x, y)),
    "softmax_kl_teacher": derivatives(lambda y, x: jaxce.softmax_kl_divergence(x, y)),
    "js": derivatives(lambda x, y: jaxce.js_divergence(x, y)),
}


def _ref_rows(name, x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    if name == "entropy":
        return [ref_entropy(r) for r in x]
    if name == "softmax_kl":
        return [ref_softmax_kl(r, s) for r, s in zip(x, y, strict=True)]
    if name == "softmax_kl_teacher":
        return [ref_softmax_kl(s, r) for r, s in zip(x, y, strict=True)]
    return [ref_js(r, s) for r, s in zip(x, y, strict=True)]


@pytest.mark.parametrize("name", sorted(EXTREME_FNS))
def test_extreme_logits(name):
    """-inf, +-1e30 and +-3e38 logits: values match the float64 reference, gradients and
    Hessian-vector products are finite in both modes."""
    x = EXTREME_ROWS
    # the other argument: -inf exactly where x is (finite divergences), else x's rows reversed
    y = np.where(np.isfinite(x[::-1]), x[::-1], 0.5)
    y = np.where(np.isfinite(x), y, -np.inf).astype(np.float32)
    out = [np.asarray(v) for v in EXTREME_FNS[name](x, y)]
    with np.errstate(invalid="ignore", over="ignore"):
        want = np.asarray(_ref_rows(name, x, y))
    # an exact value beyond float32's range is +inf in float32; any other must not overflow
    want = np.where(want > np.finfo(np.float32).max, np.inf, want)
    assert_close(out[0], want, rtol=1e-5, atol=1e-6)
    # gradients are finite wherever the loss is; a row whose exact loss overflows float32
    # (the teacher case, 3.5e38) has an overflowing gradient too
    finite = np.isfinite(out[0])
    assert finite.sum() >= 3
    for v in out[1:]:
        assert np.isfinite(v[finite]).all(), (name, v)
    np.testing.assert_allclose(out[1][finite].sum(), out[2][finite].sum(), rtol=1e-5, atol=1e-5)


def test_binary_entropy_extremes():
    x = np.array([-np.inf, -1e30, -30.0, 0.0, 30.0, 1e30, np.inf], np.float32)
    value, g_rev, g_fwd, h_rev, h_fwd = (
        np.asarray(v) for v in derivatives(lambda x: jaxce.binary_entropy(x))(x)
    )
    want = ref_binary_entropy(np.clip(x.astype(np.float64), -700, 700))
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-30)
    for v in (g_rev, h_rev):
        assert np.isfinite(v).all()
        assert v[0] == 0 and v[1] == 0 and v[-1] == 0 and v[-2] == 0
    # dH/dx = -x sigmoid(x) sigmoid(-x): 0 at 0, antisymmetric
    assert g_rev[3] == 0 and g_rev[2] == pytest.approx(-g_rev[4], rel=1e-5)
    np.testing.assert_allclose(g_fwd, g_rev, rtol=1e-6)  # elementwise: jvp along ones
    np.testing.assert_allclose(h_fwd, h_rev, rtol=1e-5, atol=1e-30)


# ----------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_and_moved_axis(rng, name):
    f = CASES[name][0]
    a, b = _inputs(rng, name, shape=(2, 3, C))
    a, b = a.astype(np.float32), b.astype(np.float32)
    moved = lambda a, b: f(np.moveaxis(a, -1, 1), np.moveaxis(b, -1, 1), axis=1)
    assert_close(moved(a, b), np.asarray(f(a, b)))
    assert_transforms_match_eager(f, a, b)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", NAMES + ["binary_entropy"])
def test_half_precision(rng, name, dtype):
    if name == "binary_entropy":
        f, (a, b) = (lambda a, b: jaxce.binary_entropy(a)), _inputs(rng, "entropy")
    else:
        f, (a, b) = CASES[name][0], _inputs(rng, name)
    check_half_precision_policy(f, a, b, dtype, rtol=1e-5, atol=1e-5)


def test_float64_stays_float64(rng):
    a, b = _inputs(rng, "js")
    with jax.enable_x64(True):
        assert jaxce.js_divergence(a, b).dtype == jnp.float64
        assert jaxce.entropy(a).dtype == jnp.float64


# ----------------------------------------------------------------------------- bad input
BAD = [
    (jaxce.kl_divergence, "log_predictions", "targets"),
    (jaxce.kl_divergence_with_log_targets, "log_predictions", "log_targets"),
    (jaxce.softmax_kl_divergence, "logits", "target_logits"),
    (jaxce.js_divergence, "logits_p", "logits_q"),
]


@pytest.mark.parametrize("fn, first, second", BAD)
def test_bad_input(fn, first, second):
    x = np.zeros((N, C), np.float32)
    with pytest.raises(TypeError, match=first):
        fn(x.astype(np.int32), x)
    with pytest.raises(TypeError, match=second):
        fn(x, x.astype(np.int32))
    with pytest.raises(ValueError, match=rf"`{second}` has shape \(3,\)"):
        fn(x, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="where"):
        fn(x, x, where=np.ones((N, 3), bool))
    with pytest.raises(ValueError, match="axis"):
        fn(x, x, axis=2)
    with pytest.raises(ValueError, match="sample_weights"):
        fn(x, x, sample_weights=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="reduction"):
        fn(x, x, reduction="batchmean")


def test_bad_input_entropies():
    with pytest.raises(TypeError, match="logits"):
        jaxce.entropy(np.zeros((2, 3), np.int32))
    with pytest.raises(TypeError, match="logits"):
        jaxce.binary_entropy(np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="where"):
        jaxce.entropy(np.zeros((2, 3), np.float32), where=np.ones((2, 3)))
    with pytest.raises(ValueError, match="sample_weights"):
        jaxce.binary_entropy(np.zeros(3, np.float32), sample_weights=np.ones(2))


# ----------------------------------------------------------------------------- properties
_rows = hnp.arrays(np.float32, (N, C), elements=st.floats(-20, 20, width=32))
_ce_parts = jax.jit(
    lambda a, b: (
        jaxce.softmax_cross_entropy(b, jax.nn.softmax(a)),
        jaxce.entropy(a),
        jaxce.kl_divergence(jax.nn.log_softmax(b), jax.nn.softmax(a)),
        jaxce.softmax_kl_divergence(b, a),
    )
)
_js_pair = jax.jit(lambda a, b: (jaxce.js_divergence(a, b), jaxce.js_divergence(b, a)))
_entropies = jax.jit(lambda a: (jaxce.entropy(a), jaxce.entropy(jnp.zeros_like(a))))


@settings(max_examples=30, deadline=None)
@given(_rows, _rows)
def test_property_ce_is_entropy_plus_kl(a, b):
    ce, h, kl, softmax_kl = (np.asarray(v, np.float64) for v in _ce_parts(a, b))
    np.testing.assert_allclose(ce, h + kl, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(kl, softmax_kl, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(_rows, _rows)
def test_property_kl_nonnegative_zero_iff_equal(a, b):
    _, _, kl, softmax_kl = (np.asarray(v) for v in _ce_parts(a, b))
    assert (kl >= -1e-5).all() and (softmax_kl >= -1e-5).all()
    _, _, kl_self, softmax_kl_self = (np.asarray(v) for v in _ce_parts(a, a))
    np.testing.assert_allclose(kl_self, 0.0, atol=1e-5)
    np.testing.assert_allclose(softmax_kl_self, 0.0, atol=1e-6)
    differ = np.abs(_softmax(a.astype(np.float64)) - _softmax(b.astype(np.float64))).sum(-1)
    assert (softmax_kl[differ > 1e-2] > 0).all()


@settings(max_examples=30, deadline=None)
@given(_rows, _rows)
def test_property_js_symmetric_and_bounded(a, b):
    pq, qp = (np.asarray(v) for v in _js_pair(a, b))
    np.testing.assert_allclose(pq, qp, rtol=1e-5, atol=1e-6)
    assert (pq >= -1e-6).all() and (pq <= LOG2 + 1e-6).all()
    np.testing.assert_allclose(
        pq,
        [ref_js(r.astype(np.float64), s.astype(np.float64)) for r, s in zip(a, b, strict=True)],
        atol=1e-5,
    )


@settings(max_examples=30, deadline=None)
@given(_rows)
def test_property_entropy_maximal_at_uniform(a):
    h, h_uniform = (np.asarray(v) for v in _entropies(a))
    np.testing.assert_allclose(h_uniform, np.log(C), rtol=1e-6)
    assert (h >= -1e-6).all() and (h <= h_uniform + 1e-5).all()


def test_kl_divergence_negative_target_is_nan_for_that_example_only():
    log_q = np.log(np.array([[0.25, 0.25, 0.5], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]))
    p = np.array([[0.5, 0.5, 0.0], [1.2, -0.2, 0.0], [0.6, 0.4, -0.1]])
    mask = np.array([[True, True, True], [True, True, True], [True, True, False]])
    got = np.asarray(jaxce.kl_divergence(log_q, p, where=mask))
    assert np.isnan(got[1]) and np.isfinite(got[0]) and np.isfinite(got[2])
    np.testing.assert_allclose(got[0], 0.5 * np.log(2) * 2, rtol=1e-6)
    assert np.isnan(jaxce.kl_divergence(log_q, p, reduction="mean"))


# ----------------------------------------------------------------------------- identical inputs
def _same_distribution_cases(s):
    """name -> the divergence of two arrays that are (or represent) the same distribution."""
    ls, p = jax.nn.log_softmax(s), jax.nn.softmax(s)
    pt = jaxce.pytorch
    cases = {
        f"softmax_kl T={t}": lambda t=t: jaxce.softmax_kl_divergence(s, s, temperature=t)
        for t in (1.0, 2.0, 3.0)
    }
    cases |= {
        f"js beta={b}": lambda b=b: jaxce.js_divergence(s, s, beta=b)
        for b in (0.0, 0.1, 0.5, 0.9, 1.0)
    }
    cases |= {
        "kl(log_softmax, softmax)": lambda: jaxce.kl_divergence(ls, p),
        "kl(log_softmax, exp(log_softmax))": lambda: jaxce.kl_divergence(ls, jnp.exp(ls)),
        "kl_log": lambda: jaxce.kl_divergence_with_log_targets(ls, ls),
        "generalized_kl(log p, p)": lambda: jaxce.generalized_kl_divergence(jnp.log(p), p),
        "softmax_kl mean": lambda: jaxce.softmax_kl_divergence(s, s, reduction="mean"),
    }
    for reduction in ("none", "sum", "mean", "batchmean"):
        cases[f"torch kl_div {reduction}"] = lambda r=reduction: pt.kl_div(ls, p, reduction=r)
        cases[f"torch kl_div log {reduction}"] = lambda r=reduction: pt.kl_div(
            ls, ls, reduction=r, log_target=True
        )
        cases[f"torch KLDivLoss {reduction}"] = lambda r=reduction: pt.KLDivLoss(reduction=r)(ls, p)
    return cases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identical_inputs_give_exactly_zero(dtype):
    """The contract: a divergence of two copies of one distribution is exactly 0.0 (64 rows of
    1000 logits, normal x 3; before the fix softmax_kl at T=3 ranged over +-8.6e-6)."""
    with jax.enable_x64(dtype == np.float64), pytest.warns(DeprecationWarning):
        s = jnp.asarray(np.random.default_rng(7).normal(size=(64, 1000)) * 3, dtype)
        cases = _same_distribution_cases(s)
        cases["convex_kl"] = lambda: jaxce.convex_kl_divergence(
            jnp.log(jax.nn.softmax(s)), jax.nn.softmax(s)
        )
        bad = {}
        for name, f in cases.items():
            got = np.asarray(f())
            if not (got == 0).all():
                bad[name] = (got.min(), got.max())
    assert not bad, bad


@pytest.mark.parametrize("name", ["softmax_kl", "softmax_kl_teacher", "js", "kl_log"])
def test_gradient_at_identical_inputs(name):
    """At p = q the divergences have a zero gradient and a positive-definite Hessian: the exact
    zero of the value must not kill either (second order checked against finite differences)."""
    f = {
        "softmax_kl": lambda a, b: jaxce.softmax_kl_divergence(a, b, temperature=2.0),
        "softmax_kl_teacher": lambda a, b: jaxce.softmax_kl_divergence(b, a, temperature=2.0),
        "js": lambda a, b: jaxce.js_divergence(a, b, beta=0.3),
        "kl_log": lambda a, b: jaxce.kl_divergence_with_log_targets(
            jax.nn.log_softmax(a), jax.nn.log_softmax(b)
        ),
    }[name]
    x = np.random.default_rng(3).normal(size=(4, 7)) * 2
    g = jax.grad(lambda a: f(a, jnp.asarray(x, jnp.float32)).sum())(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(g, 0.0, atol=1e-6)
    # a unit-norm direction: the second derivative along it is the Fisher information, > 0
    v = np.random.default_rng(4).normal(size=x.shape)
    with jax.enable_x64(True):
        xx = jnp.asarray(x)
        curve = jax.grad(jax.grad(lambda t: f(xx + t * v, xx).sum()))(0.0)
    assert curve > 1e-3
    check_grads_2(lambda a: f(a, jnp.asarray(x)).sum(), (x,), rtol=1e-4, atol=1e-4)


_near = st.floats(-(2.0**-10), 2.0**-10, width=32)


@jax.jit
def _all_divergences(a, b, temperature):
    return (
        jaxce.softmax_kl_divergence(a, b, temperature=temperature),
        jaxce.js_divergence(a, b, beta=temperature / 4),
        jaxce.kl_divergence(jax.nn.log_softmax(a), jax.nn.softmax(b)),
        jaxce.kl_divergence_with_log_targets(jax.nn.log_softmax(a), jax.nn.log_softmax(b)),
        jaxce.generalized_kl_divergence(jax.nn.log_softmax(a), jax.nn.softmax(b)),
        jaxce.pytorch.kl_div(jax.nn.log_softmax(a), jax.nn.softmax(b), reduction="batchmean"),
    )


@settings(max_examples=25, deadline=None)
@given(_rows, hnp.arrays(np.float32, (N, C), elements=_near), st.sampled_from([0.5, 1.0, 3.0]))
def test_property_divergences_never_negative(a, noise, temperature):
    """On random and on nearly identical logits every divergence is >= 0 (no tolerance), and
    exactly 0 on identical ones."""
    for b in (a + noise, a[::-1]):
        for got in _all_divergences(a, b, temperature):
            assert (np.asarray(got) >= 0).all()
    for got in _all_divergences(a, a, temperature)[:4]:  # generalized KL: exact tiny values
        assert (np.asarray(got) == 0).all()


@pytest.mark.parametrize("setting", [1.0, 3.0, "js 0.5", "js 0.1"])
@pytest.mark.parametrize("delta", [1e-2, 1e-3])
def test_near_identical_keeps_precision(delta, setting):
    """Logits ``delta`` apart (1000 classes, float32): the divergence (~delta**2) keeps a small
    relative error; as a difference of sums of log-probabilities it was off by 16x for the
    KL (delta = 1e-3, T = 3: the rounding of log p, ~1e-6, swamps a KL of 5e-7) and 25x for
    the JSD at beta = 0.1."""
    rng = np.random.default_rng(11)
    s = (rng.normal(size=(8, 1000)) * 3).astype(np.float32)
    t = (s + delta * rng.normal(size=s.shape)).astype(np.float32)
    if isinstance(setting, str):
        beta = float(setting.split()[1])
        got = np.asarray(jaxce.js_divergence(s, t, beta=beta))
        ref = lambda a, b: ref_js(a, b, beta)  # noqa: E731
    else:
        got = np.asarray(jaxce.softmax_kl_divergence(s, t, temperature=setting))
        ref = lambda a, b: ref_softmax_kl(a, b, setting)  # noqa: E731
    want = [ref(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(s, t, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-2)


def test_generalized_kl_overflow_is_inf():
    """A log-prediction beyond log(max) makes exp overflow: the exact value exceeds the dtype,
    so the result is +inf (was 1.97e38 at float32 max and -inf at +inf), with a gradient
    q - p = +inf in log q and log p - log q in p, never NaN."""
    fmax = np.finfo(np.float32).max
    log_q = jnp.array([[fmax, 0.0], [np.inf, 0.0], [100.0, 0.0], [-np.inf, 0.0]], jnp.float32)
    p = jnp.full((4, 2), 0.5, jnp.float32)
    with pytest.warns(DeprecationWarning):
        for f in (jaxce.generalized_kl_divergence, jaxce.convex_kl_divergence):
            got = np.asarray(f(log_q, p))
            assert np.isposinf(got).all(), (f, got)
    g_q, g_p = jax.grad(lambda a, b: jaxce.generalized_kl_divergence(a, b).sum(), (0, 1))(log_q, p)
    assert not np.isnan(g_q).any() and not np.isnan(g_p).any()
    assert np.isposinf(g_q[:3, 0]).all() and g_q[3, 0] == -0.5
    np.testing.assert_allclose(g_p[:, 1], np.log(0.5), rtol=1e-6)  # log p - log q
    np.testing.assert_allclose(g_p[0, 0], np.log(0.5) - fmax, rtol=1e-6)
    # the overflow guard leaves ordinary values alone: 88 is still finite in float32
    q88 = np.asarray(jaxce.generalized_kl_divergence(jnp.array([88.0], jnp.float32), p[0, :1]))
    want = np.exp(88.0) - 0.5 + 0.5 * np.log(0.5) - 0.5 * 88.0
    np.testing.assert_allclose(q88, want, rtol=1e-5)


def test_generalized_kl_is_a_nonnegative_precise_bregman_sum():
    """Termwise p log(p/q) - p + q >= 0: equal inputs give 0 and close ones their (tiny, exact)
    value, not rounding noise of either sign."""
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        p = rng.uniform(0.1, 2.0, size=(4, 30))
        log_q = np.log(p) + 1e-6 * rng.normal(size=p.shape)
        got = np.asarray(jaxce.generalized_kl_divergence(log_q, p))
        d = log_q - np.log(p)
        want = np.sum(p * (np.expm1(d) - d), axis=-1)  # the same sum, d tiny: p d^2 / 2
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert (got > 0).all()

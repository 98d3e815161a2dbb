"""``jaxce.sklearn.log_loss`` against ``sklearn.metrics.log_loss`` and a float64 reference."""

from __future__ import annotations

import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads_2
from jax.experimental import checkify

from jaxce import sklearn as jsk

metrics = pytest.importorskip("sklearn.metrics")


def _seeded(*case):
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _probabilities(rng, n, c, dtype=np.float64):
    e = rng.exponential(size=(n, c))
    return (e / e.sum(1, keepdims=True)).astype(dtype)


def _reference(y_true, y_proba, classes, weight=None, normalize=True):
    """The formula in float64: one-hot over ``classes``, clip to eps, weighted mean/sum."""
    p = np.asarray(y_proba)
    eps = np.finfo(p.dtype).eps
    p = p.astype(np.float64)
    if p.ndim == 1:
        p = np.stack([1 - p, p], 1)
    t = (np.asarray(y_true)[:, None] == np.asarray(classes)[None, :]).astype(np.float64)
    loss = -(t * np.log(np.clip(p, eps, 1 - eps))).sum(1)
    w = np.ones(len(loss)) if weight is None else np.asarray(weight, np.float64)
    return (w * loss).sum() / w.sum() if normalize else (w * loss).sum()


# One compile per case instead of one per primitive (eager); the eager checks are tested below.
_jitted_log_loss = jax.jit(jsk.log_loss, static_argnames=("normalize", "labels"))

GRID = [
    (n, c, weighted, normalize, dtype)
    for n in (1, 40)
    for c in (2, 5)
    for weighted in (False, True)
    for normalize in (True, False)
    for dtype in (np.float32, np.float64)
]


@pytest.mark.parametrize(("n", "c", "weighted", "normalize", "dtype"), GRID)
@pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one")
def test_parity_with_scikit_learn(n, c, weighted, normalize, dtype):
    rng = _seeded(n, c, weighted, normalize, dtype)
    labels = tuple(range(c))
    y_true = rng.integers(0, c, n)
    y_proba = _probabilities(rng, n, c, dtype)
    y_proba[0, 0] = 0.0  # clipping at both ends
    y_proba[0, 1] = 1.0
    weight = rng.uniform(0.1, 2.0, n) if weighted else None
    want = metrics.log_loss(
        y_true, y_proba, normalize=normalize, sample_weight=weight, labels=labels
    )
    with jax.enable_x64(dtype == np.float64):
        got = _jitted_log_loss(
            y_true, y_proba, normalize=normalize, sample_weight=weight, labels=labels
        )
        assert got.dtype == dtype
        rtol = 1e-12 if dtype == np.float64 else 2e-6
        np.testing.assert_allclose(float(got), want, rtol=rtol)
        np.testing.assert_allclose(
            float(got), _reference(y_true, y_proba, labels, weight, normalize), rtol=rtol
        )


def test_credit_default_example_from_the_articles():
    want = metrics.log_loss([[0, 1], [1, 0]], [[0.3, 0.7], [0.8, 0.2]])
    assert round(want, 6) == 0.289909
    for y_true, y_proba in [
        ([[0, 1], [1, 0]], [[0.3, 0.7], [0.8, 0.2]]),  # indicator matrix, as the article
        ([1, 0], [[0.3, 0.7], [0.8, 0.2]]),
        ([1, 0], [0.7, 0.2]),  # positive-class probabilities
    ]:
        np.testing.assert_allclose(float(jsk.log_loss(y_true, y_proba)), want, rtol=1e-6)


def test_one_dimensional_probabilities_are_the_positive_class(rng):
    y_true = rng.integers(0, 2, 20)
    p = rng.random(20)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            float(jsk.log_loss(y_true, p)), metrics.log_loss(y_true, p), rtol=1e-12
        )


def test_class_values_are_inferred_from_concrete_labels_as_scikit_learn(rng):
    y_true = rng.choice([3, 7, 11], 15)
    y_true[:3] = [3, 7, 11]
    y_proba = _probabilities(rng, 15, 3)
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            float(jsk.log_loss(y_true, y_proba)), metrics.log_loss(y_true, y_proba), rtol=1e-12
        )
        # Under jit the values must be given as static `labels`.
        jitted = jax.jit(lambda t, p: jsk.log_loss(t, p, labels=(3, 7, 11)))
        np.testing.assert_allclose(
            float(jitted(y_true, y_proba)), metrics.log_loss(y_true, y_proba), rtol=1e-12
        )


def test_labels_for_classes_absent_from_y_true(rng):
    y_true = np.array([0, 1, 1, 0, 3])
    y_proba = _probabilities(rng, 5, 4)
    want = metrics.log_loss(y_true, y_proba, labels=[0, 1, 2, 3])
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            float(jsk.log_loss(y_true, y_proba, labels=(0, 1, 2, 3))), want, rtol=1e-12
        )
    with pytest.raises(ValueError, match="labels"):
        metrics.log_loss(y_true, y_proba)
    with pytest.raises(ValueError, match="labels"):
        jsk.log_loss(y_true, y_proba)


def test_unsorted_labels_warn_and_follow_sorted_order_as_scikit_learn(rng):
    y_true = np.array([0, 1, 2, 1])
    y_proba = _probabilities(rng, 4, 3)
    with pytest.warns(UserWarning):
        want = metrics.log_loss(y_true, y_proba, labels=[2, 0, 1])
    with pytest.warns(UserWarning, match="sorted"), jax.enable_x64(True):
        got = jsk.log_loss(y_true, y_proba, labels=[2, 0, 1])
    np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_rows_not_summing_to_one_are_used_as_given_with_a_warning(rng):
    y_true = np.array([0, 1, 2, 1])
    y_proba = _probabilities(rng, 4, 3) * np.array([[0.5], [1.0], [1.7], [0.9]])
    y_proba = np.clip(y_proba, 0, 1)
    with pytest.warns(UserWarning, match="sum to one"):
        want = metrics.log_loss(y_true, y_proba)
    with pytest.warns(UserWarning, match="sum to one"), jax.enable_x64(True):
        got = jsk.log_loss(y_true, y_proba)
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
    np.testing.assert_allclose(float(got), _reference(y_true, y_proba, (0, 1, 2)), rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing can warn under jit
        jax.jit(jsk.log_loss)(y_true, y_proba)


def test_jit_equals_eager_with_traced_weights(rng):
    y_true = rng.integers(0, 3, 9)
    y_proba = _probabilities(rng, 9, 3, np.float32)
    weight = rng.random(9).astype(np.float32)
    for normalize in (True, False):
        eager = jsk.log_loss(y_true, y_proba, sample_weight=weight, normalize=normalize)
        jitted = jax.jit(jsk.log_loss, static_argnames=("normalize", "labels"))(
            y_true, y_proba, sample_weight=weight, normalize=normalize, labels=(0, 1, 2)
        )
        np.testing.assert_allclose(jitted, eager, rtol=1e-6)
        np.testing.assert_allclose(
            eager,
            metrics.log_loss(y_true, y_proba, sample_weight=weight, normalize=normalize),
            rtol=2e-6,
        )


def test_gradient_with_respect_to_probabilities(rng):
    y_true = rng.integers(0, 3, 6)
    y_proba = _probabilities(rng, 6, 3)
    weight = rng.random(6)
    with jax.enable_x64(True):
        grad = jax.grad(lambda p: jsk.log_loss(y_true, p, sample_weight=weight))(y_proba)
    t = np.eye(3)[y_true]
    # d/dP of sum_n w_n (-sum_c T log P) / sum w
    np.testing.assert_allclose(grad, -(weight[:, None] * t / y_proba) / weight.sum(), rtol=1e-10)
    check_grads_2(
        lambda p, w: jsk.log_loss(y_true, p, sample_weight=w, labels=(0, 1, 2)), (y_proba, weight)
    )


def test_bad_values_raise_eagerly_as_scikit_learn(rng):
    y_proba = _probabilities(rng, 3, 2)
    for bad in (1.2, -0.1):
        p = y_proba.copy()
        p[1, 0] = bad
        with pytest.raises(ValueError):
            metrics.log_loss([0, 1, 1], p)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            jsk.log_loss([0, 1, 1], p)
    with pytest.raises(ValueError):
        metrics.log_loss([1, 1, 1], y_proba)
    with pytest.raises(ValueError, match="two classes"):
        jsk.log_loss([1, 1, 1], y_proba)
    with pytest.raises(ValueError):
        metrics.log_loss([0, 1, 5], y_proba, labels=[0, 1])
    with pytest.raises(ValueError, match="5"):
        jsk.log_loss([0, 1, 5], y_proba, labels=(0, 1))
    with pytest.raises(ValueError, match="y_true"):
        jsk.log_loss([0, 1], y_proba)
    with pytest.raises(TypeError, match="y_true"):
        jsk.log_loss([0.0, 1.0, 1.0], y_proba, labels=(0, 1))


def test_hard_integer_predictions_are_converted_as_scikit_learn():
    y_true, y_proba = [0, 1, 1], [[0, 1], [0, 1], [1, 0]]
    # scikit-learn converts them to float64, whose eps sets the clipping: enable x64 to match.
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            float(jsk.log_loss(y_true, y_proba)), metrics.log_loss(y_true, y_proba), rtol=1e-12
        )
    eps32 = np.finfo(np.float32).eps
    np.testing.assert_allclose(float(jsk.log_loss(y_true, y_proba)), -2 * np.log(eps32) / 3)


def test_under_jit_an_unknown_class_value_gives_nan(rng):
    y_proba = _probabilities(rng, 3, 2, np.float32)
    got = jax.jit(lambda t: jsk.log_loss(t, y_proba, labels=(0, 1)))(jnp.array([0, 1, 5]))
    assert np.isnan(got)


def test_nan_probability_gives_nan_empty_batch_and_zero_weights(rng):
    y_proba = _probabilities(rng, 3, 3, np.float32)
    y_proba[2, 0] = np.nan  # not the true class's column: still NaN, never swallowed
    assert np.isnan(jsk.log_loss([0, 1, 2], y_proba))
    empty = np.zeros((0, 3), np.float32)
    labels = (0, 1, 2)
    assert np.isnan(jsk.log_loss(np.zeros(0, int), empty, labels=labels))
    assert float(jsk.log_loss(np.zeros(0, int), empty, labels=labels, normalize=False)) == 0.0
    grad = jax.grad(lambda p: jsk.log_loss(np.zeros(0, int), p, labels=labels))(empty)
    assert grad.shape == (0, 3)
    assert np.isnan(jsk.log_loss([0, 1, 2], _probabilities(rng, 3, 3), sample_weight=np.zeros(3)))


def test_boolean_sample_weight_is_a_mask(rng):
    y_true = rng.integers(0, 3, 8)
    y_proba = _probabilities(rng, 8, 3)
    mask = rng.random(8) < 0.5
    mask[0] = True
    with jax.enable_x64(True):
        got = jsk.log_loss(y_true, y_proba, sample_weight=mask, labels=(0, 1, 2))
    want = metrics.log_loss(y_true, y_proba, sample_weight=mask.astype(float), labels=[0, 1, 2])
    np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_vmap_over_a_batch_of_evaluations(rng):
    y_true = rng.integers(0, 3, (4, 6))
    y_proba = np.stack([_probabilities(rng, 6, 3, np.float32) for _ in range(4)])
    got = jax.vmap(lambda t, p: jsk.log_loss(t, p, labels=(0, 1, 2)))(y_true, y_proba)
    want = [metrics.log_loss(t, p, labels=[0, 1, 2]) for t, p in zip(y_true, y_proba, strict=True)]
    np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("bad", [1.25, -0.25, 1.0 + 1e-6])
def test_under_jit_probabilities_outside_unit_interval_give_nan(bad):
    """Eagerly such a row raises (as scikit-learn); under ``jit`` it was clipped into
    [eps, 1 - eps], a finite loss: it is NaN for that row, a zero weight masks it, and
    ``checkify`` names the argument."""
    y_true = jnp.array([1, 0, 1])
    y_proba = np.array([[0.3, 0.7], [0.4, 0.6], [0.5, 0.5]], np.float32)
    y_proba[1] = [1 - bad, bad]
    with pytest.raises(ValueError, match="outside"):
        jsk.log_loss(y_true, y_proba, labels=(0, 1))
    loss = jax.jit(lambda p, w: jsk.log_loss(y_true, p, sample_weight=w, labels=(0, 1)))
    assert np.isnan(loss(y_proba, jnp.ones(3)))
    one_d = jax.jit(lambda p: jsk.log_loss(y_true, p, normalize=False))(y_proba[:, 1])
    assert np.isnan(one_d)
    masked = loss(y_proba, jnp.array([1.0, 0.0, 1.0]))
    want = metrics.log_loss([1, 1], y_proba[[0, 2]], labels=[0, 1])
    np.testing.assert_allclose(float(masked), want, rtol=1e-6)
    grad = jax.grad(loss)(jnp.asarray(y_proba), jnp.array([1.0, 0.0, 1.0]))
    assert np.isfinite(np.asarray(grad)).all() and (np.asarray(grad)[1] == 0).all()
    checked = checkify.checkify(loss, errors=checkify.user_checks)
    error, _ = checked(y_proba, jnp.ones(3))
    with pytest.raises(checkify.JaxRuntimeError, match="y_proba"):
        error.throw()

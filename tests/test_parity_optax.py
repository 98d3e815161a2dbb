"""optax parity of the core families, for the names and options both define: softmax
cross-entropy (integer and probability labels, ``where``, tuple ``axis``), poly loss, label
smoothing, sigmoid BCE and focal loss, KL divergence. Skipped where optax is not installed;
the core tests (``test_softmax.py``, ``test_binary.py``, ``test_divergence.py``) do not need it.
"""

import jax
import numpy as np
import pytest
from helpers import (
    BINARY_FOCAL_OPTIONS,
    SOFTMAX_SHAPE,
    assert_close,
    binary_data,
    divergence_inputs,
    softmax_data,
)

import jaxce

optax = pytest.importorskip("optax")

C = SOFTMAX_SHAPE[1]


# ----------------------------------------------------------------------------- softmax
def test_optax_parity_for_shared_names():
    x, y, t, mask, *_ = softmax_data(20)
    row_keep = np.array([True, True, False, True, True, False])
    # one compile for the whole comparison: optax's losses run op by op when called eagerly
    pairs = jax.jit(
        lambda x, y, t, mask, row_keep: [
            (jaxce.softmax_cross_entropy(x, t), optax.softmax_cross_entropy(x, t)),
            (
                jaxce.softmax_cross_entropy(x, t, where=mask),
                optax.softmax_cross_entropy(x, t, where=mask),
            ),
            (
                jaxce.softmax_cross_entropy(x, t, -1, row_keep),
                optax.softmax_cross_entropy(x, t, -1, row_keep),
            ),
            (
                jaxce.softmax_cross_entropy_with_integer_labels(x, y),
                optax.softmax_cross_entropy_with_integer_labels(x, y),
            ),
            (
                jaxce.softmax_cross_entropy_with_integer_labels(x, y, -1, mask),
                optax.softmax_cross_entropy_with_integer_labels(x, y, -1, mask),
            ),
            (
                jaxce.softmax_cross_entropy_with_integer_labels(x, y, -1, row_keep),
                optax.softmax_cross_entropy_with_integer_labels(x, y, -1, row_keep),
            ),
        ]
    )(x, y, t, mask, row_keep)
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fully_masked_rows_give_zero_like_optax():
    x, y, *_ = softmax_data(21)
    mask = np.ones_like(x, bool)
    mask[2] = False
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=mask),
        optax.softmax_cross_entropy_with_integer_labels(x, y, where=mask),
        rtol=1e-5,
    )


def test_tuple_axis_matches_optax():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    y = rng.integers(0, 15, size=(2, 4))
    got = jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=(1, 3))
    np.testing.assert_allclose(
        got, optax.softmax_cross_entropy_with_integer_labels(x, y, axis=(1, 3)), rtol=1e-5
    )


def test_poly_loss_matches_optax():
    x, _, t, mask, *_ = softmax_data(17)
    got = jaxce.poly_loss_cross_entropy(x, t, epsilon=2.0)
    np.testing.assert_allclose(
        got, optax.losses.poly_loss_cross_entropy(x, t, epsilon=2.0), rtol=1e-5
    )
    np.testing.assert_allclose(
        jaxce.poly_loss_cross_entropy(x, t, 1.0, -1, mask),
        optax.losses.poly_loss_cross_entropy(x, t, epsilon=1.0, axis=-1, where=mask),
        rtol=1e-5,
    )


def test_smooth_labels_matches_optax():
    _, y, _, mask, *_ = softmax_data(18)
    onehot = np.eye(C, dtype=np.float32)[y]
    np.testing.assert_allclose(
        jaxce.smooth_labels(onehot, 0.1), optax.smooth_labels(onehot, 0.1), rtol=1e-6
    )
    np.testing.assert_allclose(
        jaxce.smooth_labels(onehot, 0.1, where=mask),
        optax.smooth_labels(onehot, 0.1, where=mask),
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------- binary
def test_sigmoid_bce_matches_optax(rng):
    x, y = binary_data(rng)
    x, y = x.astype(np.float32), y.astype(np.float32)
    assert_close(jaxce.sigmoid_binary_cross_entropy(x, y), optax.sigmoid_binary_cross_entropy(x, y))


@pytest.mark.parametrize("opts", BINARY_FOCAL_OPTIONS)
@pytest.mark.parametrize("soft", [False, True])
def test_sigmoid_focal_matches_optax(rng, opts, soft):
    x, y = (v.astype(np.float32) for v in binary_data(rng, soft=soft))
    want = optax.sigmoid_focal_loss(x, y, **opts)
    assert_close(jaxce.sigmoid_focal_loss(x, y, **opts), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- divergences
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_matches_optax(rng, log_target):
    a, b = divergence_inputs(rng, "log_probs" if log_target else "probs")
    a, b = a.astype(np.float32), b.astype(np.float32)
    if log_target:
        got = jaxce.kl_divergence_with_log_targets(a, b)
        want_optax = optax.losses.kl_divergence_with_log_targets(a, b)
    else:
        got = jaxce.kl_divergence(a, b)
        want_optax = optax.losses.kl_divergence(a, b)
    assert_close(got, want_optax, atol=1e-6)

"""``ntxent``: float64 reference from the formula, optax parity, gradients, bad-input rules."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads_2, check_half_precision_policy

import jaxce

optax = pytest.importorskip("optax")


def _reference(x, labels, temperature):
    """Mean over positive pairs (i, j), i != j, of
    -log(e^{s_ij} / (e^{s_ij} + sum over negatives k of e^{s_ik}))."""
    x = np.asarray(x, np.float64)
    norms = np.sqrt(np.maximum((x * x).sum(1, keepdims=True), np.finfo(np.float64).eps))
    s = (x / norms) @ (x / norms).T / temperature
    terms = []
    for i in range(len(x)):
        negatives = [k for k in range(len(x)) if labels[k] != labels[i]]
        for j in range(len(x)):
            if j != i and labels[j] == labels[i]:
                denominator = np.exp(s[i, j]) + sum(np.exp(s[i, k]) for k in negatives)
                terms.append(-(s[i, j] - np.log(denominator)))
    return np.mean(terms) if terms else 0.0


LABELS = [
    [0, 0, 1, 1],
    [0, 0, 0, 1],
    [0, 1, 2, 0, 1, 2],
    [3, 3, 3, 3],  # no negatives: every pair costs 0
    [5, 1, 5, 2, 2, 9, 1],  # a singleton group (9) is only ever a negative
]


@pytest.mark.parametrize("labels", LABELS, ids=str)
@pytest.mark.parametrize("temperature", [0.07, 0.5, 2.0])
def test_matches_reference_and_optax(labels, temperature, rng):
    labels = np.asarray(labels)
    x = rng.normal(size=(len(labels), 3))
    with jax.enable_x64(True):
        got = jax.jit(jaxce.ntxent)(x, labels, temperature)
        want = jax.jit(optax.losses.ntxent)(x, labels, temperature)
        np.testing.assert_allclose(got, _reference(x, labels, temperature), rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
        grad = jax.jit(jax.grad(jaxce.ntxent))(x, labels, temperature)
        want = jax.jit(jax.grad(optax.losses.ntxent))(x, labels, temperature)
        np.testing.assert_allclose(grad, want, rtol=1e-8, atol=1e-12)


def test_zero_embedding_matches_optax(rng):
    x = rng.normal(size=(4, 2))
    x[0] = 0.0
    labels = np.array([0, 0, 1, 1])
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            jaxce.ntxent(x, labels), optax.losses.ntxent(x, labels), rtol=1e-10
        )
        np.testing.assert_allclose(jaxce.ntxent(x, labels), _reference(x, labels, 0.07), rtol=1e-10)


def test_second_order_gradients_in_embeddings_and_temperature(rng):
    labels = np.array([0, 1, 0, 1, 2])
    check_grads_2(lambda x, t: jaxce.ntxent(x, labels, t), (rng.normal(size=(5, 3)), 0.4))


def test_jit_vmap_and_traced_temperature(rng):
    x = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    labels = jnp.array([0, 0, 1, 1, 2, 2])
    eager = jnp.stack([jaxce.ntxent(x[i], labels, 0.3) for i in range(3)])
    np.testing.assert_allclose(
        jax.vmap(lambda e: jaxce.ntxent(e, labels, 0.3))(x), eager, rtol=1e-5
    )
    np.testing.assert_allclose(jax.jit(jaxce.ntxent)(x[0], labels, 0.3), eager[0], rtol=1e-5)
    temperatures = jnp.array([0.3, 0.0, -1.0, jnp.nan])
    out = jax.vmap(lambda t: jaxce.ntxent(x[0], labels, t))(temperatures)
    np.testing.assert_allclose(out[0], eager[0], rtol=1e-5)
    assert np.isnan(out[1:]).all()  # traced temperature outside (0, inf): NaN


def test_concrete_bad_temperature_raises():
    x, labels = jnp.ones((2, 3)), jnp.array([0, 0])
    for bad in (0.0, -0.5, np.float32(0), 0):
        with pytest.raises(ValueError, match="temperature"):
            jaxce.ntxent(x, labels, bad)
    assert np.isfinite(jaxce.ntxent(x, labels, 1))  # a Python int is accepted


def test_no_positive_pair_and_empty_batch_give_zero_with_zero_gradient(rng):
    x = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    value, grad = jax.value_and_grad(jaxce.ntxent)(x, jnp.array([0, 1, 2]))
    assert value == 0.0 and (grad == 0).all()
    empty = jnp.zeros((0, 4))
    value, grad = jax.value_and_grad(jaxce.ntxent)(empty, jnp.zeros((0,), jnp.int32))
    assert value == 0.0 and grad.shape == (0, 4)


def test_nan_propagates_and_bad_shapes_raise(rng):
    x = rng.normal(size=(4, 3)).astype(np.float32)
    x[2, 1] = np.nan
    assert np.isnan(jaxce.ntxent(x, jnp.array([0, 0, 1, 1])))
    with pytest.raises(ValueError, match="labels"):
        jaxce.ntxent(x, jnp.array([0, 0, 1]))
    with pytest.raises(ValueError, match="embeddings"):
        jaxce.ntxent(x[0], jnp.array([0, 0, 1]))
    with pytest.raises(TypeError, match="labels"):
        jaxce.ntxent(x, jnp.array([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(TypeError, match="embeddings"):
        jaxce.ntxent(jnp.ones((4, 3), int), jnp.array([0, 0, 1, 1]))


def test_zero_features_raise_naming_embeddings():
    """D = 0 (no feature to normalise) is a shape error, not a NumPy crash in a reduction."""
    with pytest.raises(ValueError, match=r"`embeddings` has shape \(4, 0\)"):
        jaxce.ntxent(jnp.zeros((4, 0)), jnp.array([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="embeddings"):
        jaxce.ntxent(jnp.zeros((0, 0)), jnp.zeros((0,), int))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype, rng):
    labels = jnp.array([0, 0, 1, 1])
    check_half_precision_policy(
        lambda x, t: jaxce.ntxent(x, labels, t), rng.normal(size=(4, 3)), 0.5, dtype, 1e-5, 1e-5
    )


def test_signature_is_optaxs():
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(jaxce.ntxent) == params(optax.losses.ntxent)


@pytest.mark.parametrize("scale", [1e30, 1e-30, np.finfo(np.float32).max / 2])
def test_scale_free_for_large_and_tiny_embeddings(scale):
    """Cosine similarity does not depend on the norm: an embedding scaled by 1e30 or by
    float32's max/2 gives the loss of the unscaled one (it overflowed to 0.745 vs 0.141).
    A row scaled to 1e-30 is below optax's norm floor sqrt(eps) and keeps optax's meaning."""
    base = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]], np.float32)
    labels = np.array([0, 0, 1])
    scaled = base.copy()
    scaled[0] *= np.float32(scale)
    got = float(jaxce.ntxent(scaled, labels, temperature=0.5))
    if scale < 1:
        want = float(optax.ntxent(jnp.asarray(scaled), jnp.asarray(labels), temperature=0.5))
    else:
        want = float(jaxce.ntxent(base, labels, temperature=0.5))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_gradients_at_float32_max(sign):
    """The gradient is finite (not NaN) for embeddings at +-float32 max."""
    top = np.finfo(np.float32).max
    x = np.array([[sign * top, 0.0], [1.0, 0.1], [0.0, -top], [top, top]], np.float32)
    labels = np.array([0, 0, 1, 1])
    value, grad = jax.value_and_grad(lambda e: jaxce.ntxent(e, labels, temperature=0.5))(x)
    unit = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(value, jaxce.ntxent(unit.astype(np.float32), labels, 0.5), 1e-6)
    assert np.isfinite(np.asarray(grad)).all()
    unit[1] = x[1]  # the one row of ordinary size: its gradient is the same
    want = jax.grad(lambda e: jaxce.ntxent(e, labels, temperature=0.5))(unit.astype(np.float32))
    np.testing.assert_allclose(grad[1], want[1], rtol=1e-5)

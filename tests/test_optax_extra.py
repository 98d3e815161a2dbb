"""``safe_softmax_cross_entropy``, ``generalized_kl_divergence`` and ``convex_kl_divergence``.

Float64 NumPy references written from the docstring formulas, second-order gradient checks,
jit/vmap, optax parity on the same calls, and the contract's bad-input rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads_2, check_half_precision_policy
from reference import log_softmax, xlogy

import jaxce

optax = pytest.importorskip("optax")


def _ref_safe_ce(logits, labels):
    return -xlogy(np.asarray(labels, np.float64), log_softmax(logits)).sum(-1)


def _ref_generalized_kl(log_q, p, axis=-1, where=None):
    p, log_q = np.asarray(p, np.float64), np.asarray(log_q, np.float64)
    with np.errstate(divide="ignore"):
        term = xlogy(p, np.log(p)) - xlogy(p, log_q) - p + np.exp(log_q)
    if where is not None:
        term = np.where(where, term, 0.0)
    return term.sum(axis=axis)


def _dirichlet(rng, shape):
    e = rng.exponential(size=shape)
    return e / e.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# safe_softmax_cross_entropy


@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 4)], ids=str)
def test_safe_ce_matches_reference_and_optax(shape, rng):
    logits = rng.normal(size=shape) * 3
    labels = _dirichlet(rng, shape)
    # -inf logits where the label is 0: the case the name exists for.
    flat_logits, flat_labels = logits.reshape(-1, shape[-1]), labels.reshape(-1, shape[-1])
    flat_logits[0, 0] = -np.inf
    flat_labels[0] = np.r_[0.0, _dirichlet(rng, (shape[-1] - 1,))]
    with jax.enable_x64(True):
        got = jaxce.safe_softmax_cross_entropy(logits, labels)
        np.testing.assert_allclose(got, _ref_safe_ce(logits, labels), rtol=1e-12)
        np.testing.assert_allclose(
            got, optax.losses.safe_softmax_cross_entropy(logits, labels), rtol=1e-12
        )
        grads = jax.grad(lambda x, y: jaxce.safe_softmax_cross_entropy(x, y).sum(), (0, 1))
        want = jax.grad(lambda x, y: optax.losses.safe_softmax_cross_entropy(x, y).sum(), (0, 1))
        (got_logits, got_labels), (want_logits, want_labels) = (
            grads(logits, labels),
            want(logits, labels),
        )
        np.testing.assert_allclose(got_logits, want_logits, rtol=1e-10, atol=1e-12)
        assert np.isfinite(got_logits).all()
        # d/dy of -y log p at p = 0 is +inf (optax's); jaxce, like its core losses, gives 0.
        dead = np.isneginf(logits)
        np.testing.assert_allclose(got_labels[~dead], want_labels[~dead], rtol=1e-10)
        assert (got_labels[dead] == 0).all() and (want_labels[dead] == np.inf).all()


def test_safe_ce_second_order_gradients(rng):
    check_grads_2(
        jaxce.safe_softmax_cross_entropy, (rng.normal(size=(3, 4)), _dirichlet(rng, (3, 4)))
    )


def test_safe_ce_hessian_is_finite_at_minus_infinity():
    logits = jnp.array([-jnp.inf, 0.5, 1.0])
    labels = jnp.array([0.0, 0.3, 0.7])
    hessian = jax.hessian(jaxce.safe_softmax_cross_entropy)(logits, labels)
    assert np.isfinite(hessian).all()
    assert np.isfinite(jax.jacfwd(jax.grad(jaxce.safe_softmax_cross_entropy))(logits, labels)).all()


def test_safe_ce_infinities_and_nan():
    labels = jnp.array([[0.4, 0.3, 0.3], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5], [0.2, np.nan, 0.8]])
    logits = jnp.array(
        [[-jnp.inf, 0.0, 0.0], [-jnp.inf, 0.0, -jnp.inf], [-jnp.inf] * 3, [0.0, 1.0, 2.0]]
    )
    got = jaxce.safe_softmax_cross_entropy(logits, labels)
    assert got[0] == np.inf  # positive mass on an impossible class
    assert got[1] == 0.0
    assert np.isnan(got[2])  # no class has probability
    assert np.isnan(got[3])  # NaN label


def test_safe_ce_jit_vmap_broadcast_and_empty(rng):
    logits = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    labels = jnp.asarray(_dirichlet(rng, (6, 4)), jnp.float32)
    eager = jaxce.safe_softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(
        jax.jit(jaxce.safe_softmax_cross_entropy)(logits, labels), eager, rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.vmap(jaxce.safe_softmax_cross_entropy)(logits, labels), eager, rtol=1e-6
    )
    np.testing.assert_allclose(
        jaxce.safe_softmax_cross_entropy(logits, labels[0]),
        _ref_safe_ce(logits, np.broadcast_to(labels[0], (6, 4))),
        rtol=1e-5,
    )
    empty = jnp.zeros((0, 4))
    assert jaxce.safe_softmax_cross_entropy(empty, empty).shape == (0,)
    grad = jax.grad(lambda x: jaxce.safe_softmax_cross_entropy(x, jnp.zeros((0, 4))).sum())(empty)
    assert grad.shape == (0, 4)
    with pytest.raises(ValueError, match="logits"):
        jaxce.safe_softmax_cross_entropy(jnp.zeros((3, 0)), jnp.zeros((3, 0)))
    with pytest.raises(ValueError, match="broadcast"):
        jaxce.safe_softmax_cross_entropy(logits, labels[:, :3])
    with pytest.raises(TypeError, match="logits"):
        jaxce.safe_softmax_cross_entropy(jnp.zeros((2, 3), int), labels[:2, :3])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_safe_ce_half_precision(dtype, rng):
    check_half_precision_policy(
        jaxce.safe_softmax_cross_entropy,
        rng.normal(size=(4, 5)),
        _dirichlet(rng, (4, 5)),
        dtype,
        rtol=1e-5,
        atol=1e-5,
    )


# --------------------------------------------------------------------------------------------
# generalized_kl_divergence


@pytest.mark.parametrize(
    ("shape", "axis"), [((6,), -1), ((3, 6), -1), ((4, 5, 6), 0), ((4, 5, 6), (1, 2))], ids=str
)
def test_generalized_kl_matches_reference_and_optax(shape, axis, rng):
    log_q = rng.normal(size=shape) - 1.0
    p = rng.exponential(size=shape)  # unnormalised measures
    p.reshape(-1)[0] = 0.0
    with jax.enable_x64(True):
        got = jaxce.generalized_kl_divergence(log_q, p, axis=axis)
        np.testing.assert_allclose(got, _ref_generalized_kl(log_q, p, axis), rtol=1e-12)
        np.testing.assert_allclose(
            got, optax.losses.generalized_kl_divergence(log_q, p, axis=axis), rtol=1e-12
        )


def test_generalized_kl_where_and_axis_none_match_optax(rng):
    log_q, p = rng.normal(size=(3, 7)), rng.exponential(size=(3, 7))
    where = rng.random((3, 7)) < 0.6
    with jax.enable_x64(True):
        for kwargs in ({"where": where}, {"axis": None}, {"axis": None, "where": where}):
            got = jaxce.generalized_kl_divergence(log_q, p, **kwargs)
            np.testing.assert_allclose(
                got, optax.losses.generalized_kl_divergence(log_q, p, **kwargs), rtol=1e-12
            )
        np.testing.assert_allclose(
            jaxce.generalized_kl_divergence(log_q, p, where=where),
            _ref_generalized_kl(log_q, p, where=where),
            rtol=1e-12,
        )


def test_generalized_kl_is_kl_for_distributions(rng):
    p, q = _dirichlet(rng, (4, 5)), _dirichlet(rng, (4, 5))
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            jaxce.generalized_kl_divergence(np.log(q), p),
            (p * np.log(p / q)).sum(-1),
            rtol=1e-12,
        )


def test_generalized_kl_second_order_gradients(rng):
    check_grads_2(
        jaxce.generalized_kl_divergence,
        (rng.normal(size=(3, 4)), rng.uniform(0.2, 2.0, (3, 4))),
    )


def test_generalized_kl_zero_targets_give_finite_gradients_and_nan_propagates():
    log_q = jnp.array([-jnp.inf, -1.0, 0.5])
    p = jnp.array([0.0, 0.0, 0.7])
    value, grad = jax.value_and_grad(jaxce.generalized_kl_divergence)(log_q, p)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert np.isfinite(jax.hessian(jaxce.generalized_kl_divergence)(log_q, p)).all()
    assert np.isnan(jaxce.generalized_kl_divergence(log_q, p.at[1].set(jnp.nan)))
    assert np.isnan(jaxce.generalized_kl_divergence(log_q.at[2].set(jnp.nan), p))


def test_generalized_kl_jit_vmap_empty_and_errors(rng):
    log_q = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    p = jnp.asarray(rng.exponential(size=(5, 3)), jnp.float32)
    eager = jaxce.generalized_kl_divergence(log_q, p)
    np.testing.assert_allclose(jax.jit(jaxce.generalized_kl_divergence)(log_q, p), eager, rtol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jaxce.generalized_kl_divergence)(log_q, p), eager, rtol=1e-6
    )
    empty = jnp.zeros((0, 3))
    assert jaxce.generalized_kl_divergence(empty, empty).shape == (0,)
    assert float(jaxce.generalized_kl_divergence(empty, empty, axis=None)) == 0.0
    grad = jax.grad(lambda x: jaxce.generalized_kl_divergence(x, empty).sum())(empty)
    assert grad.shape == (0, 3)
    with pytest.raises(ValueError, match="broadcast"):
        jaxce.generalized_kl_divergence(log_q, p[:, :2])
    with pytest.raises(TypeError, match="where"):
        jaxce.generalized_kl_divergence(log_q, p, where=jnp.ones((5, 3)))


def test_convex_kl_divergence_is_a_deprecated_alias_warning_as_optax(rng):
    log_q, p = rng.normal(size=(2, 4)), rng.exponential(size=(2, 4))
    with pytest.warns(DeprecationWarning, match="use generalized_kl_divergence"):
        optax.losses.convex_kl_divergence(log_q, p)
    with pytest.warns(DeprecationWarning, match="use generalized_kl_divergence"):
        got = jaxce.convex_kl_divergence(log_q, p, axis=-1)
    np.testing.assert_allclose(got, jaxce.generalized_kl_divergence(log_q, p), rtol=1e-6)


@pytest.mark.parametrize(
    "name", ["safe_softmax_cross_entropy", "generalized_kl_divergence", "convex_kl_divergence"]
)
def test_signatures_are_optaxs(name):
    import inspect

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(jaxce, name)) == params(getattr(optax.losses, name))

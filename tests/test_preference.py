"""Preference losses (DPO and variants, SimPO, ORPO) against float64 NumPy references written
from the formulas, plus the exact invariants, transforms and bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_transforms_match_eager, check_grads_2
from jax.experimental import checkify

import jaxce

DPO_TYPES = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
)
# a label smoothing each type accepts (exo_pair needs one in (0, 1))
SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 0.1}


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def dpo_ref(pc, pr, rc, rr, beta, loss_type, eps):
    """The docstring's formulas, literally, in float64."""
    c, r = pc - rc, pr - rr
    d = c - r
    z = beta * d
    return {
        "sigmoid": -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z),
        "robust": (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps),
        "hinge": np.maximum(0.0, 1 - z),
        "ipo": (d - 1 / (2 * beta)) ** 2,
        "exo_pair": sigmoid(z) * (log_sigmoid(z) - np.log(1 - eps))
        + sigmoid(-z) * (log_sigmoid(-z) - np.log(eps if eps else 1.0)),
        "nca_pair": -log_sigmoid(beta * c)
        - 0.5 * log_sigmoid(-beta * c)
        - 0.5 * log_sigmoid(-beta * r),
        "sppo_hard": (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2,
        "apo_zero": 1 - sigmoid(beta * c) + sigmoid(beta * r),
        "apo_down": sigmoid(beta * c) + 1 - sigmoid(z),
    }[loss_type]


def simpo_ref(c, r, beta, gamma, eps):
    m = beta * (c - r) - gamma
    return -(1 - eps) * log_sigmoid(m) - eps * log_sigmoid(-m)


def orpo_ref(c, r, beta):
    log_odds = (c - r) - (np.log(-np.expm1(c)) - np.log(-np.expm1(r)))
    return -beta * log_sigmoid(log_odds)


def pairs(rng, n=5, scale=3.0):
    pc = -rng.uniform(5, 30, size=n)
    pr = -rng.uniform(5, 30, size=n)
    rc = pc + scale * rng.normal(size=n)
    rr = pr + scale * rng.normal(size=n)
    return pc, pr, rc, rr


def mean_pairs(rng, n=5):
    return -rng.uniform(0.05, 3.0, size=n), -rng.uniform(0.05, 3.0, size=n)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("loss_type", DPO_TYPES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_dpo_matches_reference(rng, loss_type, reduction):
    args = pairs(rng)
    eps = SMOOTHING.get(loss_type, 0.0)
    want = dpo_ref(*args, 0.3, loss_type, eps)
    want = {"none": want, "sum": want.sum(), "mean": want.mean()}[reduction]
    kw = {"beta": 0.3, "loss_type": loss_type, "label_smoothing": eps, "reduction": reduction}
    with jax.enable_x64(True):
        got = jaxce.dpo_loss(*args, **kw)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    got32 = jaxce.dpo_loss(*(a.astype(np.float32) for a in args), **kw)
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-5)


def test_dpo_cdpo_without_smoothing_equals_plain_dpo(rng):
    args = pairs(rng)
    for t in ("sigmoid", "robust"):
        np.testing.assert_array_equal(
            jaxce.dpo_loss(*args, loss_type=t, label_smoothing=0.0),
            jaxce.dpo_loss(*args, loss_type="sigmoid"),
        )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_and_weight"])
def test_simpo_orpo_match_reference(rng, reduction):
    c, r = mean_pairs(rng)
    simpo = simpo_ref(c, r, 2.5, 0.7, 0.15)
    orpo = orpo_ref(c, r, 0.25)

    def red(x):
        if reduction == "sum_and_weight":
            return (x.sum(), float(x.size))
        return {"none": x, "sum": x.sum(), "mean": x.mean()}[reduction]

    with jax.enable_x64(True):
        got = jaxce.simpo_loss(c, r, beta=2.5, gamma=0.7, label_smoothing=0.15, reduction=reduction)
        np.testing.assert_allclose(got, red(simpo), rtol=1e-12)
        got = jaxce.orpo_loss(c, r, beta=0.25, reduction=reduction)
        np.testing.assert_allclose(got, red(orpo), rtol=1e-12)


def test_dpo_is_exactly_log_2_at_the_reference(rng):
    """Policy == reference: log 2 rounded to the compute dtype, bit for bit, with smoothing."""
    pc, pr, _, _ = pairs(rng, n=64)
    for dtype, want in (
        (np.float32, np.float32(math.log(2))),
        (jnp.bfloat16, np.float32(math.log(2))),
    ):
        a, b = jnp.asarray(pc, dtype), jnp.asarray(pr, dtype)
        for t, eps in (("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 1.0), ("robust", 0.3)):
            out = np.asarray(jaxce.dpo_loss(a, b, a, b, loss_type=t, label_smoothing=eps))
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, want)
            assert want == jnp.log(jnp.float32(2.0))
    with jax.enable_x64(True):
        out = np.asarray(jaxce.dpo_loss(pc, pr, pc, pr, beta=7.0, label_smoothing=0.25))
        np.testing.assert_array_equal(out, math.log(2))
        # the gradient there is the DPO one: -beta sigmoid(0) = -beta / 2 for the chosen
        g = jax.grad(lambda x: jnp.sum(jaxce.dpo_loss(x, pr, pc, pr, beta=7.0)))(pc)
        np.testing.assert_allclose(g, -3.5, rtol=1e-15)


def test_extreme_margins_are_finite_and_exact():
    big = jnp.array([-1e30, -3e4, 3e4, 1e30])
    zero = jnp.zeros(4)
    for t in DPO_TYPES:
        eps = SMOOTHING.get(t, 0.0)
        out = jaxce.dpo_loss(big, zero, zero, zero, beta=1.0, loss_type=t, label_smoothing=eps)
        if t not in ("ipo", "sppo_hard"):  # squares overflow where the exact value does
            assert np.isfinite(out).all(), (t, out)
        g = jax.grad(
            lambda x, t=t, e=eps: jnp.sum(
                jaxce.dpo_loss(x, zero, zero, zero, beta=1.0, loss_type=t, label_smoothing=e)
            )
        )(big)
        assert not np.isnan(g).any(), (t, g)
    # sigmoid at a huge margin: softplus(-z) + eps z, no cancellation
    out = jaxce.dpo_loss(
        jnp.array([-3e4]), zero[:1], zero[:1], zero[:1], beta=1.0, label_smoothing=0.1
    )
    np.testing.assert_allclose(out, 0.9 * 3e4, rtol=1e-6)  # -(1 - eps) log sigmoid(-3e4)


def test_orpo_log1mexp_is_stable_near_zero():
    """Average log-probs just below 0 (confident completions), where log1p(-exp(x)) cancels."""
    c = np.array([-1e-7, -1e-4, -0.3], np.float32)
    r = np.array([-2e-7, -0.5, -1e-6], np.float32)
    got = np.asarray(jaxce.orpo_loss(c, r, beta=1.0), np.float64)
    want = orpo_ref(c.astype(np.float64), r.astype(np.float64), 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # a completion of probability 1 has infinite odds: loss 0, finite gradients
    out = jaxce.orpo_loss(jnp.array([0.0]), jnp.array([-1.0]))
    assert out[0] == 0.0
    g = jax.grad(lambda x: jnp.sum(jaxce.orpo_loss(x, jnp.array([-1.0]))))(jnp.array([0.0]))
    assert np.isfinite(g).all()
    assert np.isnan(jaxce.orpo_loss(jnp.array([0.5]), jnp.array([-1.0]))).all()


# ----------------------------------------------------------------------------- gradients


def test_dpo_check_grads_all_types(rng):
    pc, pr, rc, rr = pairs(rng, n=2, scale=1.0)
    # hinge is not differentiable at its kink; the points here are away from it
    assert np.all(np.abs(1 - 0.3 * ((pc - rc) - (pr - rr))) > 1e-2)
    # the references enter only through c = pc - rc, r = pr - rr: checking pc and pr suffices

    def f(a, b):
        return jnp.stack(
            [
                jaxce.dpo_loss(
                    a, b, rc, rr, beta=0.3, loss_type=t, label_smoothing=SMOOTHING.get(t, 0.0)
                )
                for t in DPO_TYPES
            ],
            axis=-1,
        )

    with jax.enable_x64(True):
        rc, rr = jnp.asarray(rc), jnp.asarray(rr)
        check_grads_2(f, (pc, pr))


def test_simpo_orpo_check_grads(rng):
    c, r = mean_pairs(rng, n=3)
    check_grads_2(
        lambda a, b: jnp.stack(
            [
                jaxce.simpo_loss(a, b, beta=2.0, gamma=0.5, label_smoothing=0.1),
                jaxce.orpo_loss(a, b, beta=0.3),
            ]
        ),
        (c, r),
        eps=1e-5,
    )


# ----------------------------------------------------------------------------- transforms


def test_transforms_half_precision_and_empty(rng):
    pc, pr, rc, rr = (np.stack([a, a + 1]).astype(np.float32) for a in pairs(rng, n=4))
    f = lambda a, b, c, d: jnp.stack(
        [
            jaxce.dpo_loss(a, b, c, d, loss_type=t, label_smoothing=SMOOTHING.get(t, 0.0))
            for t in DPO_TYPES
        ]
        + [jaxce.simpo_loss(a / 10, b / 10), jaxce.orpo_loss(a / 30, b / 30)],
        axis=-1,
    )
    assert_transforms_match_eager(f, pc, pr, rc, rr)
    half = [jnp.asarray(a, jnp.bfloat16) for a in (pc, pr, rc, rr)]
    assert jaxce.dpo_loss(*half).dtype == jnp.float32
    assert jaxce.simpo_loss(*half[:2]).dtype == jnp.float32
    g = jax.grad(lambda x: jnp.sum(jaxce.dpo_loss(x, *half[1:])))(half[0])
    assert g.dtype == jnp.bfloat16
    e = jnp.zeros((0,))
    for red, want in (("none", (0,)), ("sum", ()), ("mean", ())):
        assert jaxce.dpo_loss(e, e, e, e, reduction=red).shape == want
        assert jaxce.orpo_loss(e, e, reduction=red).shape == want
    assert jaxce.simpo_loss(e, e, reduction="mean") == 0.0
    # scalar references broadcast to the pairs
    assert jaxce.dpo_loss(pc, pr, -20.0, -20.0).shape == pc.shape


def test_nan_in_nan_out(rng):
    pc, pr, rc, rr = pairs(rng, n=3)
    pc[1] = np.nan
    for t in DPO_TYPES:
        out = np.asarray(
            jaxce.dpo_loss(pc, pr, rc, rr, loss_type=t, label_smoothing=SMOOTHING.get(t, 0.0))
        )
        np.testing.assert_array_equal(np.isnan(out), [False, True, False])
    assert np.isnan(jaxce.simpo_loss(pc / 10, pr / 10)[1]) and np.isnan(jaxce.orpo_loss(pc, pr)[1])
    assert np.isnan(jaxce.dpo_loss(pc, pr, rc, rr, reduction="mean"))


# ----------------------------------------------------------------------------- bad input


def test_bad_hyperparameters_concrete_raise_and_traced_give_nan(rng):
    args = pairs(rng, n=3)
    cases = [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "exo_pair"}, "label_smoothing"),
        ({"loss_type": "exo_pair", "label_smoothing": 1.0}, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": np.float32(0.2)}, "label_smoothing"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            jaxce.dpo_loss(*args, **kw)
    for kw, name in cases:
        value = kw[name] if name in kw else 0.0
        rest = {k: v for k, v in kw.items() if k != name}
        f = jax.jit(lambda v, rest=rest, name=name: jaxce.dpo_loss(*args, **{**rest, name: v}))
        assert np.isnan(f(value)).all(), kw
        g = jax.grad(
            lambda x, v, rest=rest, name=name: jnp.sum(
                jaxce.dpo_loss(x, *args[1:], **{**rest, name: v})
            )
        )(args[0], jnp.asarray(value))  # a JAX array is not checked eagerly: it acts as traced
        assert np.isnan(g).all(), kw
    c, r = mean_pairs(rng, n=3)
    for fn, kw, name in (
        (jaxce.simpo_loss, {"beta": 0.0}, "beta"),
        (jaxce.simpo_loss, {"gamma": -0.1}, "gamma"),
        (jaxce.simpo_loss, {"label_smoothing": 1.1}, "label_smoothing"),
        (jaxce.orpo_loss, {"beta": -0.1}, "beta"),
    ):
        with pytest.raises(ValueError, match=name):
            fn(c, r, **kw)
        assert np.isnan(jax.jit(lambda v, fn=fn, name=name: fn(c, r, **{name: v}))(kw[name])).all()
    # within the domain a traced value is fine, and checkify names an out-of-domain one
    assert np.isfinite(jax.jit(lambda b: jaxce.dpo_loss(*args, beta=b))(0.2)).all()
    err, _ = checkify.checkify(
        jax.jit(lambda b: jaxce.dpo_loss(*args, beta=b)), errors=checkify.user_checks
    )(-1.0)
    with pytest.raises(checkify.JaxRuntimeError, match="beta"):
        err.throw()


def test_bad_shapes_types_and_options(rng):
    pc, pr, rc, rr = pairs(rng, n=3)
    with pytest.raises(ValueError, match="rejected_log_probs"):
        jaxce.dpo_loss(pc, pr[:2], rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_log_probs"):
        jaxce.dpo_loss(pc, pr, rc, np.ones((2, 3)))
    with pytest.raises(TypeError, match="ref_chosen_log_probs"):
        jaxce.dpo_loss(pc, pr, np.ones(3, np.int32), rr)
    with pytest.raises(ValueError, match="loss_type"):
        jaxce.dpo_loss(pc, pr, rc, rr, loss_type="kto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reduction"):
        jaxce.dpo_loss(pc, pr, rc, rr, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rejected_log_probs"):
        jaxce.simpo_loss(pc, pr[:2])
    with pytest.raises(ValueError, match="rejected_log_probs"):
        jaxce.orpo_loss(pc, pr[:2])

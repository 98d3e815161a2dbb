"""The rest of TRL's preference families: DPO's bco_pair / aot / aot_unpaired / discopop,
weighted lists of types and f-divergence scores, KTO and the Bradley-Terry reward loss.

Float64 references from the docstrings' formulas, the limits at ``-inf`` and ``-f32max``
log-probabilities (never NaN), derivatives to second order, transforms, empty batches, NaN
and bad input. (Parity with TRL's trainers is in ``test_trl_parity.py``.) One tuple of every
DPO type with traced one-hot ``loss_weights`` picks one type at a time, so the types share a
compile.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_transforms_match_eager, check_grads_2, run_host_devices_script
from jax.experimental import checkify

import jaxce

# every DPO type but ipo (reverse KL only; tested in test_preference.py)
TYPES = (
    "sigmoid", "robust", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop",
)  # fmt: skip
ELEMENTWISE = tuple(t for t in TYPES if not t.startswith("aot"))
EPS, BETA, TAU, BCO = 0.1, 0.3, 0.2, 0.05
ONE_HOT = np.eye(len(TYPES))
F32MAX = float(np.finfo(np.float32).max)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def score(x, f_divergence, f_alpha=0.5):
    if f_divergence == "reverse_kl":
        return x
    if f_divergence == "forward_kl":
        return -np.exp(-x)
    if f_divergence == "js_divergence":
        return log_sigmoid(x)
    return np.exp((f_alpha - 1) * x) / (f_alpha - 1)


def dpo_ref(pc, pr, rc, rr, loss_type, f_divergence="reverse_kl", f_alpha=0.5):
    """The docstring's table, literally, in float64."""
    c, r = pc - rc, pr - rr
    sc, sr = score(c, f_divergence, f_alpha), score(r, f_divergence, f_alpha)
    z = BETA * (sc - sr)
    eps = EPS

    def smoothed(z):
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)

    return {
        "sigmoid": lambda: smoothed(z),
        "robust": lambda: (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps),
        "hinge": lambda: np.maximum(0.0, 1 - z),
        "exo_pair": lambda: (
            sigmoid(z) * (log_sigmoid(z) - np.log(1 - eps))
            + sigmoid(-z) * (log_sigmoid(-z) - np.log(eps))
        ),
        "nca_pair": lambda: (
            -log_sigmoid(BETA * sc) - 0.5 * log_sigmoid(-BETA * sc) - 0.5 * log_sigmoid(-BETA * sr)
        ),
        "bco_pair": lambda: -log_sigmoid(BETA * sc - BCO) - log_sigmoid(BCO - BETA * sr),
        "sppo_hard": lambda: (sc - 1 / (2 * BETA)) ** 2 + (sr + 1 / (2 * BETA)) ** 2,
        "aot": lambda: smoothed(BETA * (np.sort(pc - pr) - np.sort(rc - rr))),
        "aot_unpaired": lambda: smoothed(BETA * (np.sort(c) - np.sort(r))),
        "apo_zero": lambda: 1 - sigmoid(BETA * c) + sigmoid(BETA * r),
        "apo_down": lambda: sigmoid(BETA * c) + 1 - sigmoid(z),
        "discopop": lambda: (
            (1 - sigmoid(z / TAU)) * -log_sigmoid(z) + sigmoid(z / TAU) * np.exp(-z)
        ),
    }[loss_type]()


def all_types(f_divergence="reverse_kl", f_alpha=0.5, eps=EPS, types=TYPES, **kw):
    """``dpo_loss`` of the tuple ``types``; ``weights`` (traced) pick the types."""

    def loss(pc, pr, rc, rr, weights):
        return jaxce.dpo_loss(
            pc, pr, rc, rr, beta=BETA, loss_type=types, loss_weights=weights,
            label_smoothing=eps, f_divergence=f_divergence, f_alpha=f_alpha,
            discopop_tau=TAU, bco_running_mean=BCO if "bco_pair" in types else 0.0, **kw,
        )  # fmt: skip

    return loss


def per_type(f_divergence="reverse_kl", f_alpha=0.5, eps=EPS, types=TYPES):
    """``(...) -> (..., len(types))``: each type's loss, one jitted call per type, sharing
    one compile (the one-hot weights are traced)."""
    f = jax.jit(all_types(f_divergence, f_alpha, eps, types))
    eye = np.eye(len(types))
    return lambda *a: jnp.stack([f(*a, eye[k]) for k in range(len(types))], axis=-1)


def per_type_grads(f_divergence="reverse_kl", f_alpha=0.5, eps=EPS, types=TYPES):
    """For each type, the gradient of the sum of its losses w.r.t. the four inputs."""
    f = all_types(f_divergence, f_alpha, eps, types)
    g = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a[:4], a[4])), argnums=(0, 1, 2, 3)))
    eye = np.eye(len(types))
    return lambda *a: [g(*a, eye[k]) for k in range(len(types))]


def pairs(rng, n=5):
    pc, pr = -rng.uniform(1, 6, size=n), -rng.uniform(1, 6, size=n)
    return pc, pr, pc + rng.normal(size=n), pr + rng.normal(size=n)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("f_divergence", "f_alpha"),
    [("reverse_kl", 0.5), ("forward_kl", 0.5), ("alpha_divergence", 1.5)],
)
def test_dpo_types_match_the_formulas(rng, f_divergence, f_alpha):
    args = pairs(rng)
    with jax.enable_x64(True):
        got = per_type(f_divergence, f_alpha)(*args)
    for k, t in enumerate(TYPES):
        want = dpo_ref(*args, t, f_divergence, f_alpha)
        np.testing.assert_allclose(got[:, k], want, rtol=1e-12, atol=1e-14, err_msg=t)
    # float32 agrees to float32 accuracy
    got32 = per_type(f_divergence, f_alpha)(*(a.astype(np.float32) for a in args))
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, np.asarray(got), rtol=2e-5, atol=2e-6)


def test_dpo_every_type_and_f_divergence_at_the_reference(rng):
    """Policy == reference: every score margin is exactly 0, so sigmoid is log 2 bit for bit."""
    pc, pr, _, _ = (a.astype(np.float32) for a in pairs(rng, n=8))
    for f, alpha in (("reverse_kl", 0.5), ("forward_kl", 0.5), ("js_divergence", 0.5),
                     ("alpha_divergence", 0.3), ("alpha_divergence", 2.0)):  # fmt: skip
        out = jaxce.dpo_loss(pc, pr, pc, pr, f_divergence=f, f_alpha=alpha)
        np.testing.assert_array_equal(out, np.float32(math.log(2)))
    for t in ("aot", "aot_unpaired"):
        out = jaxce.dpo_loss(pc, pr, pc, pr, loss_type=t, label_smoothing=0.3)
        np.testing.assert_array_equal(out, np.float32(math.log(2)))
    out = jaxce.dpo_loss(pc, pr, pc, pr, loss_type="bco_pair")
    np.testing.assert_array_equal(out, 2 * np.float32(math.log(2)))


def test_aot_sorts_over_the_leading_axis_only(rng):
    """(B, K): each column is sorted on its own (axis 0, as TRL's dim=0)."""
    cols = [pairs(rng, n=6) for _ in range(3)]
    args = [np.stack([c[i] for c in cols], axis=1) for i in range(4)]
    with jax.enable_x64(True):
        for t in ("aot", "aot_unpaired"):
            got = jaxce.dpo_loss(*args, beta=BETA, loss_type=t, label_smoothing=EPS)
            for j in range(3):
                want = dpo_ref(*(a[:, j] for a in args), t)
                np.testing.assert_allclose(got[:, j], want, rtol=1e-12)
            # vmap over the non-pair axis: the same thing
            v = jax.vmap(
                lambda *a, t=t: jaxce.dpo_loss(*a, beta=BETA, loss_type=t, label_smoothing=EPS),
                in_axes=1,
                out_axes=1,
            )(*args)
            np.testing.assert_allclose(v, got, rtol=1e-14)


def test_weighted_list_is_the_weighted_sum_and_zero_weight_drops_an_infinite_term(rng):
    args = pairs(rng)
    f = jax.jit(all_types())
    w = np.linspace(-0.5, 2.0, len(TYPES))
    each = np.asarray(per_type()(*args))
    np.testing.assert_allclose(f(*args, w), each @ w, rtol=1e-5)
    # sppo_hard is inf at a -inf chosen log-probability; with weight 0 it drops out exactly
    pc = args[0].copy()
    pc[0] = -np.inf
    w = ONE_HOT[TYPES.index("apo_zero")]
    got = f(pc, *args[1:], w)
    assert np.isfinite(got).all()
    # a single type in a tuple is that type
    np.testing.assert_array_equal(
        jaxce.dpo_loss(*args, loss_type=("hinge",)), jaxce.dpo_loss(*args, loss_type="hinge")
    )


# ----------------------------------------------------------------------------- limits


def _limit_inputs():
    """float32 pairs: -inf chosen, -inf rejected, -inf reference (log-ratio +inf), margins of
    +-2 f32max, and one ordinary pair."""
    m = np.float32(F32MAX)
    ninf = np.float32(-np.inf)
    pc = np.array([ninf, -3, -3, -m, 0, -2], np.float32)
    pr = np.array([-4, ninf, -4, 0, -m, -3], np.float32)
    rc = np.array([-3, -3, ninf, 0, -m, -2.5], np.float32)
    rr = np.array([-4, -5, -4, -m, 0, -3.5], np.float32)
    return pc, pr, rc, rr


@pytest.mark.parametrize(
    "f_divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
)
def test_infinite_and_extreme_log_probs_never_give_nan(f_divergence):
    args = _limit_inputs()
    out = np.asarray(per_type(f_divergence, 0.5)(*args))
    elementwise = [TYPES.index(t) for t in ELEMENTWISE]
    assert not np.isnan(out[:, elementwise]).any(), (f_divergence, out)
    # (aot is left out of the tuple here: two infinities at one rank make it NaN)
    grads = per_type_grads(f_divergence, 0.5, types=ELEMENTWISE)(*args)
    for t, g4 in zip(ELEMENTWISE, grads, strict=True):
        for g in g4:
            assert not np.isnan(g).any(), (f_divergence, t, g)
    # aot sorts: two infinite log-ratios at one rank are undefined (NaN); one is not
    aot = ("aot", "aot_unpaired")
    aot_values, aot_grads = per_type(f_divergence, 0.5, types=aot), per_type_grads(types=aot)
    for i in range(len(args[0]) - 1):
        one = [np.concatenate([a[i : i + 1], a[-1:]]) for a in args]
        values = np.asarray(aot_values(*one))
        assert not np.isnan(values).any(), (f_divergence, i, values)
        if f_divergence == "reverse_kl":  # aot does not use the f-divergence
            for t, grads in zip(aot, aot_grads(*one), strict=True):
                for g in grads:
                    assert not np.isnan(g).any(), (t, i, g)
    if f_divergence != "reverse_kl":
        return
    # the limits: -inf chosen -> inf, -inf rejected -> 0 (inf with smoothing), and a margin
    # of -2 f32max is finite after beta = 0.3 (no intermediate overflow)
    sig = {e: np.asarray(jaxce.dpo_loss(*args, beta=BETA, label_smoothing=e)) for e in (0.0, EPS)}
    assert sig[0.0][0] == np.inf and sig[0.0][1] == 0.0 and sig[EPS][1] == np.inf
    assert sig[EPS][0] == np.inf
    np.testing.assert_allclose(sig[0.0][3], BETA * 2 * F32MAX, rtol=1e-6)
    np.testing.assert_allclose(sig[EPS][3], (1 - EPS) * BETA * 2 * F32MAX, rtol=1e-6)
    np.testing.assert_allclose(sig[EPS][4], EPS * BETA * 2 * F32MAX, rtol=1e-6)
    assert sig[0.0][4] == 0.0
    ipo = np.asarray(jaxce.dpo_loss(*args, beta=BETA, loss_type="ipo"))
    assert not np.isnan(ipo).any() and np.isinf(ipo[:2]).all()
    # eps = 1: all the mass on the flipped label
    one = np.asarray(jaxce.dpo_loss(*args, label_smoothing=1.0))
    assert one[0] == 0.0 and one[1] == np.inf
    # gradients of the reverse-KL sigmoid at the limits are the formula's: beta (eps - sigmoid(-z))
    g = jax.grad(lambda x: jnp.sum(jaxce.dpo_loss(x, *args[1:], beta=BETA, label_smoothing=EPS)))(
        args[0]
    )
    np.testing.assert_allclose(g[:2], [BETA * (EPS - 1), BETA * EPS], rtol=1e-6)


def test_half_precision_limits_are_float32():
    args = [jnp.asarray(a, jnp.bfloat16) for a in _limit_inputs()]
    f = all_types(types=ELEMENTWISE)
    w = np.eye(len(ELEMENTWISE))
    for k in range(len(ELEMENTWISE)):
        out = f(*args, w[k])
        assert out.dtype == jnp.float32 and not np.isnan(out).any()
        want = f(*(np.asarray(a, np.float32) for a in args), w[k])
        np.testing.assert_array_equal(out, want)
    g = jax.grad(lambda x: jnp.sum(jaxce.dpo_loss(x, *args[1:], loss_type="discopop")))(args[0])
    assert g.dtype == jnp.bfloat16 and not np.isnan(np.asarray(g, np.float32)).any()


def test_simpo_orpo_kto_bt_limits():
    ninf = -np.inf
    m = np.float32(F32MAX)
    c = np.array([ninf, -1.0, -m], np.float32)
    r = np.array([-1.0, ninf, -0.0], np.float32)
    for eps in (0.0, 0.2):
        out = np.asarray(jaxce.simpo_loss(c, r, beta=0.5, label_smoothing=eps))
        assert out[0] == np.inf and out[1] == (np.inf if eps else 0.0)
        np.testing.assert_allclose(out[2], (1 - eps) * 0.5 * F32MAX, rtol=1e-6)
        g = jax.grad(lambda x, e=eps: jnp.sum(jaxce.simpo_loss(x, r, label_smoothing=e)))(c)
        assert np.isfinite(g).all()
    assert not np.isnan(jaxce.orpo_loss(c[:2], r[:2])).any()
    # KTO: a -inf log-probability is a certain loss (desirable) or none (undesirable)
    out = jaxce.kto_loss(np.array([ninf, ninf, -m]), 0.0, np.array([True, False, True]), kl=0.5)
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])
    # rewards of +-f32max: a margin of 2 f32max without overflow, loss 0 and inf
    big = np.array([m, -m], np.float32)
    out = np.asarray(jaxce.bradley_terry_loss(big, -big))
    assert out[0] == 0.0 and out[1] == np.inf
    out = np.asarray(jaxce.bradley_terry_loss(big, -big, margin=np.float32(m)))
    np.testing.assert_allclose(out, [0.0, np.inf])  # m_c - m_r - m = f32max: softplus(-f32max)


# ----------------------------------------------------------------------------- KTO and BT


def kto_ref(lp, ref, good, kl, beta, wd, wu, loss_type="kto"):
    x = lp - ref
    if loss_type == "kto":
        return np.where(
            good, wd * (1 - sigmoid(beta * (x - kl))), wu * (1 - sigmoid(beta * (kl - x)))
        )
    return np.where(good, wd * (1 - sigmoid(beta * x)), wu * sigmoid(beta * x))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_and_weight"])
def test_kto_and_bradley_terry_match_the_formulas(rng, reduction):
    lp = -rng.uniform(2, 8, size=6)
    ref = lp + rng.normal(size=6)
    good = rng.uniform(size=6) < 0.5
    kl = np.array(0.3)

    def red(x):
        if reduction == "sum_and_weight":
            return (x.sum(), float(x.size))
        return {"none": x, "sum": x.sum(), "mean": x.mean()}[reduction]

    rc, rj, m = rng.normal(size=6), rng.normal(size=6), rng.uniform(size=6)
    with jax.enable_x64(True):
        for t in ("kto", "apo_zero_unpaired"):
            got = jaxce.kto_loss(
                lp, ref, good, kl=kl, beta=0.5, desirable_weight=1.2, undesirable_weight=0.8,
                loss_type=t, reduction=reduction,
            )  # fmt: skip
            want = kto_ref(lp, ref, good, kl, 0.5, 1.2, 0.8, t)
            np.testing.assert_allclose(got, red(want), rtol=1e-12)
        got = jaxce.bradley_terry_loss(rc, rj, margin=m, center_coef=0.05, reduction=reduction)
        want = -log_sigmoid(rc - rj - m) + 0.05 * (rc + rj) ** 2
        np.testing.assert_allclose(got, red(want), rtol=1e-12)


def test_kto_kl_is_a_constant_and_exact_values(rng):
    lp = -rng.uniform(2, 8, size=4)
    good = np.array([True, False, True, False])
    # the reference point takes no gradient
    g = jax.grad(lambda k: jnp.sum(jaxce.kto_loss(lp, lp, good, kl=k)))(0.3)
    assert g == 0.0
    # at the reference with kl = 0 the loss is exactly w / 2
    out = jaxce.kto_loss(lp, lp, good, kl=0.0, desirable_weight=2.0, undesirable_weight=0.5)
    np.testing.assert_array_equal(out, np.where(good, 1.0, 0.25))
    # apo_zero_unpaired needs no kl
    assert jaxce.kto_loss(lp, lp, good, kl=None, loss_type="apo_zero_unpaired").shape == (4,)
    # equal rewards: log 2
    np.testing.assert_array_equal(jaxce.bradley_terry_loss(lp, lp), np.float32(math.log(2)))


# ----------------------------------------------------------------------------- gradients


def test_dpo_new_types_check_grads(rng):
    pc, pr, rc, rr = pairs(rng, n=2)
    # the new types with the reverse KL, and the score-using types with the alpha-divergence
    # (exponential scores and their log-space margin), each as the sum of the tuple's types:
    # one compile each. The older types' own derivatives are checked in
    # test_preference.py, every type's first derivatives under every f-divergence against
    # TRL in test_trl_parity.py.
    for types, f_divergence in (
        (("bco_pair", "aot", "aot_unpaired", "discopop"), "reverse_kl"),
        (("sigmoid", "nca_pair", "sppo_hard"), "alpha_divergence"),
    ):
        f = all_types(f_divergence, 0.7, types=types)
        with jax.enable_x64(True):
            fixed = jnp.asarray(rc), jnp.asarray(rr), None  # all weights 1: no cond
            check_grads_2(lambda a, b, f=f, fixed=fixed: f(a, b, *fixed), (pc, pr))


def test_kto_bradley_terry_check_grads(rng):
    lp, ref = -rng.uniform(2, 8, size=4), -rng.uniform(2, 8, size=4)
    good = np.array([True, False, True, False])

    def f(a, b):
        return jnp.stack(
            [
                jaxce.kto_loss(a, b, good, kl=0.2, beta=0.5),
                jaxce.kto_loss(a, b, good, kl=None, loss_type="apo_zero_unpaired"),
                jaxce.bradley_terry_loss(a / 4, b / 4, margin=0.1, center_coef=0.05),
            ]
        )

    check_grads_2(f, (lp, ref))


# ----------------------------------------------------------------------------- transforms


def test_transforms_empty_and_nan(rng):
    args = tuple(np.stack([a, a - 1]).astype(np.float32) for a in pairs(rng, n=4))
    ew = per_type(types=ELEMENTWISE)
    f = lambda a, b, c, d: jnp.concatenate(
        [
            ew(a, b, c, d),
            jnp.stack(
                [jaxce.kto_loss(a, c, b > a, kl=0.1), jaxce.bradley_terry_loss(a / 4, b / 4)], -1
            ),
        ],
        axis=-1,
    )
    assert_transforms_match_eager(f, *args)
    # empty batches, every reduction
    e = jnp.zeros((0,))
    for red, want in (("none", (0,)), ("sum", ()), ("mean", ())):
        assert all_types(reduction=red)(e, e, e, e, ONE_HOT[0]).shape == want
        assert jaxce.kto_loss(e, e, jnp.zeros((0,), bool), kl=0.0, reduction=red).shape == want
        assert jaxce.bradley_terry_loss(e, e, reduction=red).shape == want
    assert jaxce.kto_loss(e, e, jnp.zeros((0,), bool), kl=0.0, reduction="mean") == 0.0
    total, count = jaxce.bradley_terry_loss(e, e, reduction="sum_and_weight")
    assert total == 0.0 and count == 0.0
    g = jax.grad(lambda x: all_types(reduction="sum")(x, e, e, e, ONE_HOT[7]))(e)
    assert g.shape == (0,)
    # NaN in, NaN out: its pair only, except aot (every rank: the sort moves it)
    pc, pr, rc, rr = pairs(rng, n=3)
    pr[1] = np.nan
    out = np.asarray(per_type()(pc, pr, rc, rr))
    for k, t in enumerate(TYPES):
        want = [True] * 3 if t.startswith("aot") else [False, True, False]
        np.testing.assert_array_equal(np.isnan(out[:, k]), want, err_msg=t)
    rc[2] = np.nan
    out = jaxce.kto_loss(pc, rc, np.array([True, False, True]), kl=0.1)
    np.testing.assert_array_equal(np.isnan(out), [False, False, True])
    assert np.isnan(jaxce.kto_loss(pc, pc, np.array([True, False, True]), kl=np.nan)).all()
    out = jaxce.bradley_terry_loss(pc, pr, reduction="mean")
    assert np.isnan(out)


# ----------------------------------------------------------------------------- bad input


def test_bad_input(rng):
    args = pairs(rng, n=3)
    cases = [
        ({"loss_type": ("sigmoid", "kto")}, ValueError, "loss_type"),
        ({"loss_type": ("sigmoid", "sigmoid")}, ValueError, "repeats"),
        ({"loss_type": ()}, ValueError, "loss_type"),
        ({"loss_type": ("sigmoid", "hinge"), "loss_weights": (1.0,)}, ValueError, "loss_weights"),
        ({"f_divergence": "hellinger"}, ValueError, "f_divergence"),
        ({"loss_type": "ipo", "f_divergence": "forward_kl"}, ValueError, "ipo"),
        ({"bco_running_mean": 0.1}, ValueError, "bco_running_mean"),
        ({"loss_type": "discopop", "discopop_tau": 0.0}, ValueError, "discopop_tau"),
        # the intersection of robust's [0, 0.5) and exo_pair's (0, 1)
        ({"loss_type": ("robust", "exo_pair"), "label_smoothing": 0.6}, ValueError, "smoothing"),
        ({"loss_type": ("robust", "exo_pair")}, ValueError, "label_smoothing"),
        ({"loss_type": ("hinge", "bco_pair"), "label_smoothing": 0.1}, ValueError, "smoothing"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            jaxce.dpo_loss(*args, **kw)
    # a list works as a tuple, and the label smoothing of the types that use it
    out = jaxce.dpo_loss(*args, loss_type=["robust", "exo_pair", "hinge"], label_smoothing=0.2)
    assert np.isfinite(out).all()
    # traced values outside their domain give NaN, checkify names them
    f = jax.jit(lambda t: jaxce.dpo_loss(*args, loss_type="discopop", discopop_tau=t))
    assert np.isnan(f(-1.0)).all()
    err, _ = checkify.checkify(f, errors=checkify.user_checks)(-1.0)
    with pytest.raises(checkify.JaxRuntimeError, match="discopop_tau"):
        err.throw()
    lp, ref = args[0], args[2]
    good = np.array([True, False, True])
    with pytest.raises(TypeError, match="desirable"):
        jaxce.kto_loss(lp, ref, np.array([1, 0, 1]), kl=0.0)
    with pytest.raises(ValueError, match="kl"):
        jaxce.kto_loss(lp, ref, good, kl=None)
    with pytest.raises(ValueError, match="loss_type"):
        jaxce.kto_loss(lp, ref, good, kl=0.0, loss_type="bco")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="desirable"):
        jaxce.kto_loss(lp, ref, good[:2], kl=0.0)
    for kw, name in (({"beta": 0.0}, "beta"), ({"undesirable_weight": -1.0}, "undesirable_weight")):
        with pytest.raises(ValueError, match=name):
            jaxce.kto_loss(lp, ref, good, kl=0.0, **kw)
        g = jax.jit(lambda v, name=name: jaxce.kto_loss(lp, ref, good, kl=0.0, **{name: v}))
        assert np.isnan(g(kw[name])).any()
    with pytest.raises(ValueError, match="center_coef"):
        jaxce.bradley_terry_loss(lp, ref, center_coef=-0.1)
    with pytest.raises(ValueError, match="margin"):
        jaxce.bradley_terry_loss(lp, ref, margin=np.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        jaxce.bradley_terry_loss(lp, ref, reduction="avg")  # type: ignore[arg-type]


def test_sharded_over_the_pairs_on_explicit_and_auto_meshes():
    words = run_host_devices_script("sharded_preference_check.py", 2)
    assert words[-1] == "OK", words

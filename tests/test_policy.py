"""Post-training, per token: sampled KL estimators, per-sequence reductions (padded and
packed), and the clipped policy-gradient surrogate, against float64 NumPy references written
from the formulas."""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_transforms_match_eager, check_grads_2, run_host_devices_script
from jax.experimental import checkify

import jaxce

# ----------------------------------------------------------------------------- references


def kl_ref(lp, ref, estimator):
    d = np.asarray(ref, np.float64) - np.asarray(lp, np.float64)
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return d**2 / 2
    # exp(d) - 1 - d, a series where the literal form cancels
    series = sum(d**n / math.factorial(n) for n in range(2, 30))
    return np.where(np.abs(d) < 1, series, np.expm1(d) - d)


def k3_exact(d: float) -> float:
    """exp(d) - 1 - d for a float d in exact rational arithmetic (a converging series)."""
    q = Fraction(d)
    total, term = Fraction(0), Fraction(1)
    for n in range(1, 60 + int(6 * abs(d))):
        term = term * q / n
        if n >= 2:
            total += term
    return float(total)


def seq_reduce_ref(values, keep, reduction):
    total = np.where(keep, values, 0.0).sum(-1)
    if reduction == "sum":
        return total
    count = keep.sum(-1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def pg_ref(
    lp,
    old,
    adv,
    mask,
    *,
    eps_low=0.2,
    eps_high=None,
    level="token",
    ref=None,
    kl_coef=0.0,
    est="k3",
    aggregation="token_mean",
    max_length=None,
):
    """The formula in float64 NumPy, padded layout, ``adv`` per row ``(B,)`` or per token."""
    lp, old, adv = (np.asarray(a, np.float64) for a in (lp, old, adv))
    mask = np.asarray(mask, bool)
    if adv.ndim == lp.ndim - 1:
        adv = adv[..., None] * np.ones_like(lp)
    log_ratio = np.where(mask, lp - old, 0.0)
    if level == "sequence":
        count = np.maximum(mask.sum(-1, keepdims=True), 1)
        log_ratio = log_ratio.sum(-1, keepdims=True) / count * np.ones_like(lp)
    r = np.exp(log_ratio)
    if eps_low is None:
        surr = r * adv
    else:
        eps_high = eps_low if eps_high is None else eps_high
        surr = np.minimum(r * adv, np.clip(r, 1 - eps_low, 1 + eps_high) * adv)
    loss = -surr
    if ref is not None and kl_coef:
        loss = loss + kl_coef * kl_ref(lp, ref, est)
    loss = np.where(mask, loss, 0.0)
    if aggregation == "none":
        return loss
    if aggregation == "token_mean":
        return loss.sum() / max(mask.sum(), 1)
    nseq = math.prod(lp.shape[:-1])
    if aggregation == "sequence_mean":
        per = loss.sum(-1) / np.maximum(mask.sum(-1), 1)
        return per.sum() / max(nseq, 1)
    if aggregation == "sequence_sum":
        return loss.sum() / max(nseq * max_length, 1)
    raise AssertionError(aggregation)


def pg_data(rng, b=4, t=5, spread=0.3):
    lp = -rng.uniform(0.1, 3.0, size=(b, t))
    old = lp + spread * rng.normal(size=(b, t))
    ref = lp + 0.5 * rng.normal(size=(b, t))
    adv = rng.normal(size=b)
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    return lp, old, ref, adv, mask


def pack(values, mask, row_length, num_segments):
    """Packs the kept tokens of each padded row into rows of ``row_length`` tokens (greedy,
    at most ``num_segments`` per row). Returns (packed values (R, L), segment ids (R, L),
    the (row, segment index) of each padded row)."""
    rows_v, rows_id, where = [], [], []
    cur_v, cur_id, seg = [], [], 0
    for i in range(values.shape[0]):
        seq = list(values[i][mask[i]])
        if len(cur_v) + len(seq) > row_length or seg == num_segments:
            rows_v.append(cur_v)
            rows_id.append(cur_id)
            cur_v, cur_id, seg = [], [], 0
        seg += 1
        cur_v += seq
        cur_id += [seg] * len(seq)
        where.append((len(rows_v), seg - 1))
    rows_v.append(cur_v)
    rows_id.append(cur_id)
    out_v = np.zeros((len(rows_v), row_length))
    out_id = np.zeros((len(rows_v), row_length), np.int32)
    for r, (v, ids) in enumerate(zip(rows_v, rows_id, strict=True)):
        out_v[r, : len(v)] = v
        out_id[r, : len(ids)] = ids
    return out_v, out_id, where


# ----------------------------------------------------------------------------- KL estimators


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_matches_reference(rng, estimator):
    lp = -rng.uniform(0.01, 5.0, size=(3, 4))
    ref = lp + rng.normal(size=(3, 4)) * np.array([1e-4, 0.1, 1.0, 4.0])
    got = jaxce.sampled_kl_divergence(
        lp.astype(np.float32), ref.astype(np.float32), estimator=estimator
    )
    want = kl_ref(lp.astype(np.float32), ref.astype(np.float32), estimator)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    with jax.enable_x64(True):
        got64 = jaxce.sampled_kl_divergence(lp, ref, estimator=estimator)
        assert got64.dtype == jnp.float64
        np.testing.assert_allclose(got64, kl_ref(lp, ref, estimator), rtol=1e-14, atol=0)


def test_k3_relative_accuracy_float32_and_float64():
    """k3 to a few ulps for tiny and large |d|, where ``expm1(d) - d`` loses every digit."""
    ds = np.array(
        [
            1e-30,
            -1e-20,
            1e-12,
            -3e-8,
            1e-6,
            -2e-4,
            0.01,
            -0.3,
            0.7,
            -0.999,
            1.0,
            -1.0,
            1.5,
            -3.0,
            10.0,
            -60.0,
            50.0,
        ]
    )
    exact = np.array([k3_exact(float(np.float32(d))) for d in ds])
    d32 = ds.astype(np.float32)
    got = np.asarray(jaxce.sampled_kl_divergence(np.zeros_like(d32), d32), np.float64)
    normal = exact > np.finfo(np.float32).tiny  # 1e-30**2 / 2 underflows to 0
    assert got[~normal].tolist() == [0.0, 0.0]
    rel = np.abs(got - exact)[normal] / exact[normal]
    assert rel.max() < 4 * np.finfo(np.float32).eps, rel
    naive = np.asarray(jnp.expm1(jnp.asarray(d32)) - jnp.asarray(d32), np.float64)
    assert np.abs(naive - exact)[2:6].max() / exact[2:6].min() > 0.01  # the literal form fails
    exact64 = np.array([k3_exact(float(d)) for d in ds])
    with jax.enable_x64(True):
        got64 = np.asarray(jaxce.sampled_kl_divergence(np.zeros_like(ds), ds))
    rel64 = np.abs(got64 - exact64) / exact64
    assert rel64.max() < 8 * np.finfo(np.float64).eps, rel64


def test_kl_exact_zero_sign_and_nan():
    lp = jnp.array([-1.5, -0.0, -jnp.inf, -20.0, jnp.nan, -1.0])
    ref = jnp.array([-1.5, -0.0, -jnp.inf, -20.0, -1.0, jnp.nan])
    for est in ("k1", "k2", "k3"):
        out = np.asarray(jaxce.sampled_kl_divergence(lp, ref, estimator=est))
        assert np.all(out[:4] == 0.0) and not np.any(np.signbit(out[:4]))
        assert np.isnan(out[4:]).all()
        g = jax.grad(
            lambda x, e=est: jnp.sum(jaxce.sampled_kl_divergence(x, ref[:4], estimator=e))
        )(lp[:4])
        assert np.isfinite(g).all()
    d = jnp.asarray(np.random.default_rng(1).normal(size=200) * 10, jnp.float32)
    for est in ("k2", "k3"):
        assert np.all(
            np.asarray(jaxce.sampled_kl_divergence(jnp.zeros_like(d), d, estimator=est)) >= 0
        )
    assert jaxce.sampled_kl_divergence(jnp.array([-jnp.inf]), jnp.array([0.0]))[0] == jnp.inf


def test_kl_grads(rng):
    lp = -rng.uniform(0.1, 3.0, size=(2, 3))
    ref = lp + rng.normal(size=(2, 3)) * np.array([0.01, 0.5, 2.0])
    estimators = ("k1", "k2", "k3")
    check_grads_2(
        lambda a, b: jnp.stack(
            [jaxce.sampled_kl_divergence(a, b, estimator=e) for e in estimators], axis=-1
        ),
        (lp, ref),
    )
    # the gradient is the formula's own: d k / d log_probs
    d = ref - lp
    for estimator, want in zip(estimators, (np.ones_like(d), -d, -np.expm1(d)), strict=True):
        with jax.enable_x64(True):
            g = jax.grad(
                lambda a, e=estimator: jnp.sum(jaxce.sampled_kl_divergence(a, ref, estimator=e))
            )(lp)
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-14)


def test_k3_derivatives_at_infinite_log_ratios():
    """k3's derivative is expm1(d) (its custom_jvp), in forward and reverse mode, to order 2."""
    ref = jnp.array([-jnp.inf, 0.0, -1.0])
    lp = jnp.array([-2.0, -jnp.inf, -1.0])  # d = -inf, +inf, 0
    f = lambda x: jaxce.sampled_kl_divergence(x, ref)
    np.testing.assert_array_equal(f(lp), [jnp.inf, jnp.inf, 0.0])
    rev = jax.grad(lambda x: jnp.sum(f(x)))(lp)
    fwd = jax.jvp(f, (lp,), (jnp.ones(3),))[1]
    np.testing.assert_array_equal(rev, [1.0, -jnp.inf, 0.0])  # -expm1(d)
    np.testing.assert_array_equal(fwd, rev)
    second = jax.jvp(jax.grad(lambda x: jnp.sum(f(x))), (lp,), (jnp.ones(3),))[1]
    np.testing.assert_array_equal(second, [0.0, jnp.inf, 1.0])  # exp(d)
    hess = jax.hessian(lambda x: jnp.sum(jaxce.sampled_kl_divergence(x, ref[::2])))(lp[::2])
    np.testing.assert_array_equal(hess, [[0.0, 0.0], [0.0, 1.0]])


def test_kl_expected_gradients_follow_the_documented_kls():
    """Over every token weighted by pi (the exact expectation), the gradient of k1 is 0, of k2
    the reverse KL's, of k3 the forward KL's (with respect to the policy's logits)."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        theta = jnp.asarray(rng.normal(size=7))
        ref = jax.nn.log_softmax(jnp.asarray(rng.normal(size=7)))
        pi = jax.nn.softmax(theta)

        def expected(est):
            f = lambda th: jnp.sum(
                pi * jaxce.sampled_kl_divergence(jax.nn.log_softmax(th), ref, estimator=est)
            )
            return jax.grad(f)(theta)

        reverse = jax.grad(lambda th: jnp.sum(jax.nn.softmax(th) * (jax.nn.log_softmax(th) - ref)))
        forward = jax.grad(lambda th: jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(th))))
        np.testing.assert_allclose(expected("k1"), 0.0, atol=1e-15)
        np.testing.assert_allclose(expected("k2"), reverse(theta), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(expected("k3"), forward(theta), rtol=1e-12, atol=1e-15)
        # and k1, k3 values are unbiased for the reverse KL
        kl = jnp.sum(pi * (jnp.log(pi) - ref))
        for est in ("k1", "k3"):
            value = jnp.sum(pi * jaxce.sampled_kl_divergence(jnp.log(pi), ref, estimator=est))
            np.testing.assert_allclose(value, kl, rtol=1e-12)


def test_kl_transforms_half_and_bad_input(rng):
    lp = -rng.uniform(0.1, 3.0, size=(3, 4)).astype(np.float32)
    ref = (lp + rng.normal(size=(3, 4))).astype(np.float32)
    assert_transforms_match_eager(lambda a, b: jaxce.sampled_kl_divergence(a, b), lp, ref)
    out = jaxce.sampled_kl_divergence(jnp.asarray(lp, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16))
    assert out.dtype == jnp.float32
    assert jaxce.sampled_kl_divergence(jnp.zeros((0, 3)), jnp.zeros((0, 3))).shape == (0, 3)
    assert jaxce.sampled_kl_divergence(lp, ref[:1]).shape == (3, 4)  # ref broadcasts
    with pytest.raises(ValueError, match="ref_log_probs"):
        jaxce.sampled_kl_divergence(lp, ref[:2])
    with pytest.raises(ValueError, match="estimator"):
        jaxce.sampled_kl_divergence(lp, ref, estimator="k4")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="log_probs"):
        jaxce.sampled_kl_divergence(np.zeros(3, np.int32), ref[0, :3])


# ----------------------------------------------------------------------------- sequence_reduce


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_reduce_padded(rng, reduction):
    v = rng.normal(size=(2, 3, 5))
    keep = rng.uniform(size=(2, 3, 5)) > 0.4
    keep[0, 0] = False  # a sequence with no kept token
    got = jaxce.sequence_reduce(v.astype(np.float32), keep, reduction=reduction)
    np.testing.assert_allclose(got, seq_reduce_ref(v, keep, reduction), rtol=1e-6, atol=1e-6)
    assert got[0, 0] == 0.0
    all_kept = jaxce.sequence_reduce(v.astype(np.float32), reduction=reduction)
    np.testing.assert_allclose(
        all_kept, seq_reduce_ref(v, np.ones_like(keep), reduction), rtol=1e-6
    )
    g = jax.grad(lambda x: jnp.sum(jaxce.sequence_reduce(x, keep, reduction=reduction)))(v)
    np.testing.assert_array_equal(g[0, 0], 0.0)
    f = lambda x, m: jaxce.sequence_reduce(x, m, reduction=reduction)
    assert_transforms_match_eager(f, v.astype(np.float32), keep)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_reduce_packed_equals_padded(rng, reduction):
    v = rng.normal(size=(6, 4))
    lengths = np.array([4, 1, 3, 2, 4, 2])
    mask = np.arange(4)[None] < lengths[:, None]
    padded = np.asarray(jaxce.sequence_reduce(v, mask, reduction=reduction))
    pv, pid, where = pack(v, mask, row_length=7, num_segments=3)
    packed = np.asarray(
        jaxce.sequence_reduce(pv, segment_ids=pid, num_segments=3, reduction=reduction)
    )
    assert packed.shape == (pv.shape[0], 3)
    np.testing.assert_allclose([packed[r, s] for r, s in where], padded, rtol=1e-6)
    # a where on top of the packed layout drops further tokens
    drop = rng.uniform(size=pid.shape) > 0.3
    with_where = jaxce.sequence_reduce(
        pv, drop, segment_ids=pid, num_segments=3, reduction=reduction
    )
    want = np.stack([seq_reduce_ref(pv, drop & (pid == s + 1), reduction) for s in range(3)], -1)
    np.testing.assert_allclose(with_where, want, rtol=1e-6, atol=1e-7)
    f = lambda x, ids: jaxce.sequence_reduce(
        x, segment_ids=ids, num_segments=3, reduction=reduction
    )
    x32 = pv.astype(np.float32)
    eager = np.asarray(f(x32, pid))
    np.testing.assert_allclose(jax.jit(f)(x32, pid), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(f)(x32, pid), eager, rtol=1e-6)
    two = jax.vmap(f, (1, None), 1)(np.stack([x32, 2 * x32], 1), pid)
    np.testing.assert_allclose(two, np.stack([eager, 2 * eager], 1), rtol=1e-6)


def test_sequence_reduce_check_grads(rng):
    v = rng.normal(size=(2, 5))
    keep = np.array([[True, False, True, True, False], [False] * 5])
    ids = np.array([[1, 1, 0, 2, 2], [3, 0, 3, 3, 1]])
    check_grads_2(
        lambda x: jnp.concatenate(
            [jaxce.sequence_reduce(x, keep, reduction=r)[..., None] for r in ("sum", "mean")]
            + [
                jaxce.sequence_reduce(x, segment_ids=ids, num_segments=3, reduction=r)
                for r in ("sum", "mean")
            ],
            axis=-1,
        ),
        (v,),
    )


def test_sequence_reduce_nan_empty_and_invalid_ids():
    v = jnp.array([[1.0, jnp.nan, 2.0], [jnp.nan, 1.0, 1.0]])
    m = jnp.array([[True, False, True], [True, True, False]])
    for red in ("sum", "mean"):
        out = jaxce.sequence_reduce(v, m, reduction=red)
        assert np.isfinite(out[0]) and np.isnan(out[1])
        g = jax.grad(lambda x, r=red: jaxce.sequence_reduce(x, m, reduction=r)[0])(v)
        assert np.isfinite(g).all()
    ids = jnp.array([[1, 0, 1], [2, 2, 0]])
    out = jaxce.sequence_reduce(v, segment_ids=ids, num_segments=2)
    np.testing.assert_array_equal(np.isnan(out), [[False, False], [False, True]])
    assert jaxce.sequence_reduce(jnp.zeros((0, 4))).shape == (0,)
    assert jaxce.sequence_reduce(jnp.zeros((2, 0)), reduction="mean").tolist() == [0.0, 0.0]
    empty = jaxce.sequence_reduce(
        jnp.zeros((0, 4)), segment_ids=jnp.zeros((0, 4), int), num_segments=2
    )
    assert empty.shape == (0, 2)
    bad = jnp.array([[1, 3, 0]])
    out = jaxce.sequence_reduce(jnp.ones((1, 3)), segment_ids=bad, num_segments=2)
    assert np.isnan(out).all()
    checked = checkify.checkify(
        jax.jit(lambda x, i: jaxce.sequence_reduce(x, segment_ids=i, num_segments=2)),
        errors=checkify.user_checks,
    )
    err, _ = checked(jnp.ones((1, 3)), bad)
    with pytest.raises(checkify.JaxRuntimeError, match="segment_ids"):
        err.throw()
    err, _ = checked(jnp.ones((1, 3)), jnp.array([[1, 2, 0]]))
    err.throw()
    assert jaxce.sequence_reduce(jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.float32


def test_sequence_reduce_bad_input():
    v = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="where"):
        jaxce.sequence_reduce(v, jnp.ones((2, 4), bool))
    with pytest.raises(TypeError, match="where"):
        jaxce.sequence_reduce(v, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="num_segments"):
        jaxce.sequence_reduce(v, segment_ids=jnp.ones((2, 3), int))
    with pytest.raises(ValueError, match="num_segments"):
        jaxce.sequence_reduce(v, num_segments=2)
    with pytest.raises(ValueError, match="num_segments"):
        jaxce.sequence_reduce(v, segment_ids=jnp.ones((2, 3), int), num_segments=0)
    with pytest.raises(ValueError, match="segment_ids"):
        jaxce.sequence_reduce(v, segment_ids=jnp.ones((2, 4), int), num_segments=2)
    with pytest.raises(TypeError, match="segment_ids"):
        jaxce.sequence_reduce(v, segment_ids=jnp.ones((2, 3)), num_segments=2)
    with pytest.raises(ValueError, match="reduction"):
        jaxce.sequence_reduce(v, reduction="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="values"):
        jaxce.sequence_reduce(jnp.float32(1.0))


# ----------------------------------------------------------------------------- policy gradient

PG_CASES = [
    {},
    {"eps_high": 0.28},
    {"eps_low": None},
    {"level": "sequence", "eps_low": 3e-4, "eps_high": 4e-4},
    {"kl": "k3", "kl_coef": 0.04},
    {"kl": "k2", "kl_coef": 0.1, "aggregation": "sequence_mean"},
    {"kl": "k1", "kl_coef": 0.1, "aggregation": "sequence_sum", "max_length": 8},
    {"aggregation": "none"},
    {"per_token_adv": True, "aggregation": "sequence_mean", "level": "sequence"},
]


def _pg_kwargs(case):
    kw = {
        "clip_epsilon": case.get("eps_low", 0.2),
        "clip_epsilon_high": case.get("eps_high"),
        "importance_sampling": case.get("level", "token"),
        "aggregation": case.get("aggregation", "token_mean"),
        "max_length": case.get("max_length"),
    }
    if "kl" in case:
        kw.update(kl_estimator=case["kl"], kl_coef=case["kl_coef"])
    return kw


def _pg_ref_kwargs(case, ref):
    return {
        "eps_low": case.get("eps_low", 0.2),
        "eps_high": case.get("eps_high"),
        "level": case.get("level", "token"),
        "ref": ref if "kl" in case else None,
        "kl_coef": case.get("kl_coef", 0.0),
        "est": case.get("kl", "k3"),
        "aggregation": case.get("aggregation", "token_mean"),
        "max_length": case.get("max_length"),
    }


@pytest.mark.parametrize("case", PG_CASES, ids=str)
def test_policy_gradient_matches_reference_value_and_grad(rng, case):
    lp, old, ref, adv, mask = pg_data(rng)
    if case.get("per_token_adv"):
        adv = rng.normal(size=lp.shape)
    kw = _pg_kwargs(case)
    ref_kw = _pg_ref_kwargs(case, ref)
    if "kl" in case:
        kw["ref_log_probs"] = ref
    with jax.enable_x64(True):
        f = lambda x: jaxce.policy_gradient_loss(x, old, adv, mask, **kw)
        np.testing.assert_allclose(
            f(lp), pg_ref(lp, old, adv, mask, **ref_kw), rtol=1e-12, atol=1e-14
        )
        # gradient against a central finite difference of the float64 reference
        g = np.asarray(jax.grad(lambda x: jnp.sum(f(x)))(lp))
        h = 1e-6
        num = np.zeros_like(lp)
        for idx in np.ndindex(lp.shape):
            e = np.zeros_like(lp)
            e[idx] = h
            num[idx] = (
                np.sum(pg_ref(lp + e, old, adv, mask, **ref_kw))
                - np.sum(pg_ref(lp - e, old, adv, mask, **ref_kw))
            ) / (2 * h)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)
        # float32 agrees
    got32 = jaxce.policy_gradient_loss(
        *(np.asarray(a, np.float32) for a in (lp, old, adv)),
        mask,
        **{k: (np.asarray(v, np.float32) if k == "ref_log_probs" else v) for k, v in kw.items()},
    )
    assert got32.dtype == jnp.float32
    np.testing.assert_allclose(got32, pg_ref(lp, old, adv, mask, **ref_kw), rtol=2e-5, atol=2e-6)


def test_policy_gradient_check_grads(rng):
    lp, old, ref, adv, mask = pg_data(rng, b=2, t=3, spread=0.1)
    check_grads_2(
        lambda x, a, r: jnp.stack(
            [
                jaxce.policy_gradient_loss(
                    x, old, a, mask, importance_sampling=lv, ref_log_probs=r, kl_coef=0.1
                )
                for lv in ("token", "sequence")
            ]
        ),
        (lp, adv, ref),
    )


def test_policy_gradient_reinforce_at_ratio_one(rng):
    lp, _, _, adv, mask = pg_data(rng)
    lp32, adv32 = lp.astype(np.float32), adv.astype(np.float32)
    count = mask.sum()
    lengths = mask.sum(-1, keepdims=True)
    weights = {
        "token_mean": np.full(lp.shape, 1.0 / count),
        "sequence_mean": np.ones(lp.shape) / lengths / lp.shape[0],
        "sequence_sum": np.full(lp.shape, 1.0 / (lp.shape[0] * 7)),
    }
    cases = [(a, lv, e) for a in weights for lv in ("token", "sequence") for e in (0.2, 0.0, None)]

    @jax.jit
    def grads(x):
        return [
            jax.grad(
                lambda x, a=a, lv=lv, e=e: jaxce.policy_gradient_loss(
                    x,
                    x,
                    adv32,
                    mask,
                    clip_epsilon=e,
                    importance_sampling=lv,
                    aggregation=a,
                    max_length=7,
                )  # fmt: skip
            )(x)
            for a, lv, e in cases
        ]

    for (aggregation, _, _), g in zip(cases, grads(lp32), strict=True):
        want = np.where(mask, -adv[:, None] * weights[aggregation], 0.0).astype(np.float32)
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=0)
    # token level, token mean: bit-exact -A / count
    g = jax.grad(lambda x: jaxce.policy_gradient_loss(x, x, adv32, mask))(lp32)
    want = np.where(mask, -adv32[:, None] / np.float32(count), np.float32(0))
    np.testing.assert_array_equal(g, want)


def test_policy_gradient_clip_sides_for_negative_advantages():
    """-min(rA, clip(r)A): for A < 0 the gradient vanishes below 1 - eps, not above 1 + eps."""
    old = jnp.zeros((1, 4))
    lp = jnp.log(jnp.array([[0.5, 0.9, 1.1, 1.5]]))  # ratios
    for sign in (1.0, -1.0):
        adv = jnp.array([sign])
        g = jax.grad(
            lambda x, a=adv: jaxce.policy_gradient_loss(x, old, a, aggregation="none").sum()
        )(lp)
        r = np.exp(np.asarray(lp))[0]
        if sign > 0:  # clipped above 1.2 only
            np.testing.assert_allclose(g[0], [-0.5, -0.9, -1.1, 0.0], rtol=1e-6)
        else:  # clipped below 0.8 only
            np.testing.assert_allclose(g[0], [0.0, 0.9, 1.1, 1.5], rtol=1e-6)
        loss = jaxce.policy_gradient_loss(lp, old, adv, aggregation="none")[0]
        np.testing.assert_allclose(
            loss, -np.minimum(r * sign, np.clip(r, 0.8, 1.2) * sign), rtol=1e-6
        )


@pytest.mark.parametrize(
    ("aggregation", "level"),
    [
        ("token_mean", "token"),
        ("sequence_mean", "sequence"),
        ("sequence_sum", "token"),
        ("none", "sequence"),
    ],
)
def test_policy_gradient_packed_equals_padded(rng, level, aggregation):
    b, t, s = 6, 4, 3
    lp = -rng.uniform(0.1, 3.0, size=(b, t))
    old = lp + 0.3 * rng.normal(size=(b, t))
    ref = lp + 0.3 * rng.normal(size=(b, t))
    adv = rng.normal(size=b)
    lengths = np.array([4, 1, 3, 2, 4, 2])
    mask = np.arange(t)[None] < lengths[:, None]
    kw = dict(
        importance_sampling=level,
        aggregation=aggregation,
        max_length=t,
        ref_log_probs=ref,
        kl_coef=0.05,
    )
    padded = jaxce.policy_gradient_loss(lp, old, adv, mask, **kw)
    packed_lp, ids, where = pack(lp, mask, 7, s)
    packed_old = pack(old, mask, 7, s)[0]
    packed_ref = pack(ref, mask, 7, s)[0]
    packed_adv = np.zeros((ids.shape[0], s))
    for i, (r, j) in enumerate(where):
        packed_adv[r, j] = adv[i]
    kw["ref_log_probs"] = packed_ref
    f = lambda x: jaxce.policy_gradient_loss(
        x, packed_old, packed_adv, segment_ids=ids, num_segments=s, **kw
    )
    packed = f(packed_lp)
    if aggregation == "none":
        np.testing.assert_allclose(
            pack(np.asarray(padded), mask, 7, s)[0], packed, rtol=1e-6, atol=1e-7
        )
    else:
        np.testing.assert_allclose(packed, padded, rtol=1e-6)
        g_pad = jax.grad(
            lambda x: jaxce.policy_gradient_loss(x, old, adv, mask, **{**kw, "ref_log_probs": ref})
        )(lp)
        g_pack = jax.grad(f)(packed_lp)
        np.testing.assert_allclose(
            pack(np.asarray(g_pad), mask, 7, s)[0], g_pack, rtol=1e-5, atol=1e-7
        )
    # per-token advantages in the packed layout equal per-segment ones
    per_token = np.take_along_axis(packed_adv, np.maximum(ids - 1, 0), axis=-1)
    np.testing.assert_allclose(
        jaxce.policy_gradient_loss(
            packed_lp, packed_old, per_token, segment_ids=ids, num_segments=s, **kw
        ),
        packed,
        rtol=1e-6,
        atol=1e-7,
    )


def test_policy_gradient_sum_and_weight_is_exact_over_micro_batches(rng):
    lp, old, ref, adv, mask = pg_data(rng, b=6, t=5)
    kw = dict(ref_log_probs=ref, kl_coef=0.1)
    full = jaxce.policy_gradient_loss(lp, old, adv, mask, **kw)
    parts = [
        jaxce.policy_gradient_loss(
            lp[i : i + 2],
            old[i : i + 2],
            adv[i : i + 2],
            mask[i : i + 2],
            aggregation="sum_and_weight",
            ref_log_probs=ref[i : i + 2],
            kl_coef=0.1,
        )
        for i in (0, 2, 4)
    ]
    total, weight = (sum(p[k] for p in parts) for k in (0, 1))
    assert float(weight) == mask.sum()
    np.testing.assert_allclose(jaxce.weighted_mean(total, weight), full, rtol=1e-6)
    # the averaged per-micro-batch token means differ (the normaliser drift it avoids)
    naive = np.mean([float(jaxce.weighted_mean(*p)) for p in parts])
    assert abs(naive - float(full)) > 1e-4


def test_policy_gradient_sum_and_weight_psum_under_shard_map():
    words = run_host_devices_script("sharded_policy_check.py", 2)
    assert words[-1] == "OK", words


def test_policy_gradient_nan_masked_empty_transforms(rng):
    lp, old, ref, adv, mask = pg_data(rng)
    lp_nan = np.where(mask, lp, np.nan)
    old_inf = np.where(mask, old, np.inf)
    f = lambda x, o, a, m: jaxce.policy_gradient_loss(
        x, o, a, m, ref_log_probs=np.where(mask, ref, np.nan), kl_coef=0.1
    )
    out = f(lp_nan, old_inf, adv, mask)
    np.testing.assert_allclose(out, f(lp, old, adv, mask), rtol=1e-6)
    g = jax.grad(f)(lp_nan, old_inf, adv, mask)
    assert np.isfinite(g).all()
    kept_nan = lp.copy()
    kept_nan[0, 0] = np.nan
    assert np.isnan(f(kept_nan, old, adv, mask))
    nan_adv = adv.copy()
    nan_adv[1] = np.nan
    per_tok = jaxce.policy_gradient_loss(lp, old, nan_adv, mask, aggregation="none")
    assert np.isnan(per_tok[1][mask[1]]).all() and np.isfinite(np.delete(per_tok, 1, 0)).all()
    for agg in ("token_mean", "sequence_mean", "sequence_sum"):
        e = jaxce.policy_gradient_loss(
            jnp.zeros((0, 5)), jnp.zeros((0, 5)), jnp.zeros((0,)), aggregation=agg, max_length=5
        )
        assert e == 0.0
    assert jaxce.policy_gradient_loss(jnp.zeros((2, 0)), jnp.zeros((2, 0)), jnp.ones(2)) == 0.0
    lp32, old32, adv32 = (a.astype(np.float32) for a in (lp, old, adv))
    for agg in ("none", "sequence_mean"):
        g = lambda x, o, a, m, ag=agg: jaxce.policy_gradient_loss(x, o, a, m, aggregation=ag)
        eager = g(lp32, old32, adv32, mask)
        np.testing.assert_allclose(jax.jit(g)(lp32, old32, adv32, mask), eager, rtol=1e-6)
    # vmap over groups equals a loop
    groups = lambda x: jaxce.policy_gradient_loss(
        x, old32[:2], adv32[:2], mask[:2], aggregation="sequence_mean"
    )
    stacked = np.stack([lp32[:2], lp32[2:]])
    np.testing.assert_allclose(
        jax.vmap(groups)(stacked), [groups(stacked[0]), groups(stacked[1])], rtol=1e-6
    )
    bf = jaxce.policy_gradient_loss(
        jnp.asarray(lp, jnp.bfloat16), jnp.asarray(old, jnp.bfloat16), adv32, mask
    )
    assert bf.dtype == jnp.float32
    g = jax.grad(lambda x: jaxce.policy_gradient_loss(x, old32, adv32, mask))(
        jnp.asarray(lp, jnp.bfloat16)
    )
    assert g.dtype == jnp.bfloat16


def test_policy_gradient_traced_bad_hyperparameters_give_nan(rng):
    lp, old, ref, adv, mask = pg_data(rng)
    for name in ("clip_epsilon", "clip_epsilon_high", "kl_coef"):
        out = jax.jit(
            lambda v, n=name: jaxce.policy_gradient_loss(
                lp, old, adv, mask, ref_log_probs=ref, **{"kl_coef": 0.1, n: v}
            )
        )(-0.1)
        assert np.isnan(out), name


def test_policy_gradient_bad_input(rng):
    lp, old, ref, adv, mask = pg_data(rng)
    call = jaxce.policy_gradient_loss
    with pytest.raises(ValueError, match="advantages"):
        call(lp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="advantages"):
        call(lp, old, adv[:, None, None], mask)
    # TRL's (B, 1) broadcasts, as does a scalar
    np.testing.assert_allclose(call(lp, old, adv[:, None], mask), call(lp, old, adv, mask))
    np.testing.assert_allclose(call(lp, old, 1.5, mask), call(lp, old, np.full(4, 1.5), mask))
    with pytest.raises(ValueError, match="old_log_probs"):
        call(lp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="ref_log_probs"):
        call(lp, old, adv, mask, ref_log_probs=ref[:, :2], kl_coef=0.1)
    with pytest.raises(ValueError, match="where"):
        call(lp, old, adv, mask[:, :2])
    with pytest.raises(ValueError, match="max_length"):
        call(lp, old, adv, mask, aggregation="sequence_sum")
    with pytest.raises(ValueError, match="max_length"):
        call(lp, old, adv, mask, aggregation="sequence_sum", max_length=0)
    with pytest.raises(ValueError, match="aggregation"):
        call(lp, old, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="importance_sampling"):
        call(lp, old, adv, mask, importance_sampling="seq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_estimator"):
        call(lp, old, adv, mask, kl_estimator="k5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ref_log_probs"):
        call(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_epsilon_high"):
        call(lp, old, adv, mask, clip_epsilon=None, clip_epsilon_high=0.3)
    for name in ("clip_epsilon", "clip_epsilon_high", "kl_coef"):
        with pytest.raises(ValueError, match=name):
            call(lp, old, adv, mask, ref_log_probs=ref, **{name: -0.5})
    with pytest.raises(ValueError, match="advantages"):
        call(lp, old, adv, segment_ids=mask.astype(np.int32), num_segments=2)
    with pytest.raises(TypeError, match="advantages"):
        call(lp, old, np.ones(4, np.int32), mask)

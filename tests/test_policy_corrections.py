"""Safe ratios, the new surrogates and the rollout corrections of the policy losses, against
float64 NumPy references written from the formulas (API.md, "Policy optimisation: safe, and
every surrogate that trainers use"); the trainers' own formulas are in
``test_policy_trainers.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads_2, run_host_devices_script
from test_policy import pack, pg_data

import jaxce

pgl = jaxce.policy_gradient_loss
LOSS_TYPES = ("clip", "cispo", "sapo")
LEVELS = ("token", "sequence", "sequence_token")


def stale_batch():
    """Two sequences with a log-ratio of +-100 in their first token, and a KL log-ratio of
    +-100 in their second (float32)."""
    lp = np.array([[-1.0, -0.5, -2.0, -0.7], [-0.3, -1.2, -0.4, -0.9]], np.float32)
    old = lp + np.array([[-100.0, 0.1, -0.15, 0.0], [100.0, 0.0, 0.1, -0.1]], np.float32)
    ref = lp + np.array([[0.2, 100.0, -0.1, 0.1], [0.1, -100.0, 0.3, 0.0]], np.float32)
    return lp, old, ref


# ----------------------------------------------------------------------------- safe ratios


def test_log_ratio_100_is_finite_with_zero_gradients_where_clamped():
    """Every loss type and level with A > 0 and A < 0, the KL term (k3, importance weighted,
    k3+): finite loss and gradient, exactly 0 where the clamp is active."""
    lp, old, ref = stale_batch()
    cases = [(lt, lvl, s) for lt in LOSS_TYPES for lvl in LEVELS for s in (1.0, -1.0)]

    def all_cases(x):
        out = []
        for lt, lvl, sign in cases:
            adv = jnp.array([sign, -sign])
            f = lambda x, lt=lt, lvl=lvl, adv=adv: pgl(
                x, old, adv, loss_type=lt, importance_sampling=lvl, aggregation="none"
            )
            kl = lambda x, lt=lt, lvl=lvl, adv=adv: pgl(
                x, old, adv, loss_type=lt, importance_sampling=lvl, ref_log_probs=ref,
                kl_coef=0.1, kl_importance_weighted=True,
            )  # fmt: skip
            per_token, vjp = jax.vjp(f, x)
            # the KL term does not depend on the advantages' signs: once per loss type and level
            kl_value, kl_grad = jax.value_and_grad(kl)(x) if sign > 0 else (0.0, jnp.zeros(()))
            out.append((per_token, vjp(jnp.ones_like(per_token))[0], kl_value, kl_grad))
        unclamped = jax.value_and_grad(
            lambda x: pgl(x, old, jnp.array([1.0, -1.0]), max_log_ratio=None)
        )(x)
        k3_plus = jax.grad(
            lambda x: pgl(x, x, jnp.zeros(2), ref_log_probs=ref, kl_coef=1.0, kl_estimator="k3+")
        )(x)
        return out, unclamped, k3_plus

    out, unclamped, k3_plus = jax.jit(all_cases)(lp)
    for (lt, lvl, _), (per_token, grad, kl_value, kl_grad) in zip(cases, out, strict=True):
        what = f"{lt}/{lvl}"
        for x in (per_token, grad, kl_value, kl_grad):
            assert np.all(np.isfinite(x)), what
        if lt == "cispo":  # the clipped weight is a constant: the REINFORCE term keeps its grad
            continue
        if lvl == "token":
            np.testing.assert_array_equal(grad[:, 0], 0.0, err_msg=what)
            assert np.all(grad[:, 1:] != 0), what
        else:  # both sequences' mean log-ratios (+-25) are clamped: no gradient at all
            np.testing.assert_array_equal(grad, 0.0, err_msg=what)
    # the formula without the clamp overflows (what the default fixes)
    assert not (np.isfinite(unclamped[0]) and np.all(np.isfinite(unclamped[1])))
    np.testing.assert_array_equal(k3_plus[:, 1], 0.0)  # KL's log-ratio clamped
    assert np.all(k3_plus[:, [0, 2]] != 0)


def test_clamp_value_and_dual_clip_bound():
    lp, old, _ = stale_batch()
    per_token = pgl(lp, old, np.array([-1.0, -2.0]), aggregation="none", clip_epsilon=None)
    np.testing.assert_allclose(per_token[0, 0], np.exp(np.float32(20.0)), rtol=1e-6)
    dual = pgl(lp, old, np.array([-1.0, -2.0]), aggregation="none", dual_clip=3.0)
    np.testing.assert_array_equal(dual[0, 0], 3.0)  # min(-c A, l)
    capped = pgl(lp, old, np.array([-1.0, -2.0]), aggregation="none", ratio_cap=2.5)
    np.testing.assert_array_equal(capped[0, 0], 2.5)  # TRL's delta: min(r, delta) |A|
    with jax.enable_x64(True):
        sub = pgl(lp, old - 5.0, 1.0, max_log_ratio=3.0, clip_epsilon=None, aggregation="none")
        np.testing.assert_allclose(sub[0, 1:], -np.exp(3.0), rtol=1e-12)


# ----------------------------------------------------------------------------- surrogates


def test_every_option_has_the_reinforce_gradient_at_ratio_one(rng):
    lp, _, ref, adv, mask = pg_data(rng)
    w = rng.uniform(0.0, 2.0, size=lp.shape)
    variants = [
        {"loss_type": "cispo"},
        {"loss_type": "sapo", "sapo_temperatures": (0.7, 1.6)},
        {"importance_sampling": "sequence_token"},
        {"importance_sampling": "sequence"},
        {"dual_clip": 2.0, "ratio_cap": 1.5},
    ]
    with jax.enable_x64(True):
        grads = jax.jit(
            lambda x: [
                jax.grad(lambda y, v=v: pgl(y, y, adv, mask, token_weights=w, **v))(x)
                for v in variants
            ]
        )(lp)
    n = mask.sum()
    for v, g in zip(variants, grads, strict=True):
        if v.get("importance_sampling") == "sequence":  # the mean's gradient, spread out
            want = -adv[:, None] * (w * mask).sum(1, keepdims=True) / mask.sum(1, keepdims=True)
            want = np.where(mask, want / n, 0.0)
        else:
            want = np.where(mask, -adv[:, None] * w / n, 0.0)
        np.testing.assert_allclose(g, want, rtol=1e-13, atol=1e-16, err_msg=str(v))


def pg_option_ref(
    lp, old, adv, mask, *, loss_type, level, dual=None, cap=None, w=None,
    taus=(1.0, 1.05), eps=(0.2, 0.2), ref=None, kl_coef=0.0, weighted=False,
):  # fmt: skip
    """The per-token loss of API.md's formulas in float64 NumPy (padded layout)."""
    adv = np.broadcast_to(adv[:, None], lp.shape)
    log_ratio = np.where(mask, lp - old, 0.0)
    if level == "token":
        r = np.exp(np.clip(log_ratio, -20, 20))
    else:
        mean = log_ratio.sum(1, keepdims=True) / np.maximum(mask.sum(1, keepdims=True), 1)
        r = np.broadcast_to(np.exp(np.clip(mean, -20, 20)), lp.shape)
    if loss_type == "cispo":
        loss = -np.minimum(r, 1 + eps[1]) * adv * lp
    elif loss_type == "sapo":
        tau = np.where(adv > 0, taus[0], taus[1])
        loss = -4 / tau / (1 + np.exp(-tau * (r - 1))) * adv
    else:
        unclipped = r if cap is None else np.minimum(r, cap)
        loss = -np.minimum(unclipped * adv, np.clip(r, 1 - eps[0], 1 + eps[1]) * adv)
        if dual is not None:
            loss = np.where(adv < 0, np.minimum(-dual * adv, loss), loss)
    if w is not None:
        loss = loss * w
    if ref is not None:
        d = np.clip(ref - lp, -20, 20)
        kl = np.expm1(d) - d
        loss = loss + kl_coef * (kl * r if weighted else kl)
    return np.where(mask, loss, 0.0)


OPTION_CASES = [
    {"loss_type": "clip", "level": "token", "dual": 1.4, "cap": 1.3, "weighted": True},
    {"loss_type": "clip", "level": "sequence_token", "dual": 1.4},
    {"loss_type": "cispo", "level": "token", "eps": (0.2, 0.1)},
    {"loss_type": "sapo", "level": "sequence", "taus": (0.8, 1.7), "weighted": True},
]


def test_options_match_the_formulas_per_token(rng):
    lp, old, ref, adv, mask = pg_data(rng, spread=0.4)
    w = rng.uniform(0.0, 2.0, size=lp.shape)

    def ours(case):
        return pgl(
            lp, old, adv, mask, loss_type=case["loss_type"],
            importance_sampling=case["level"], dual_clip=case.get("dual"),
            ratio_cap=case.get("cap"), sapo_temperatures=case.get("taus", (1.0, 1.05)),
            clip_epsilon=case.get("eps", (0.2,))[0], clip_epsilon_high=case.get("eps", (0, 0.2))[1],
            ref_log_probs=ref, kl_coef=0.3, kl_importance_weighted=case.get("weighted", False),
            token_weights=w, aggregation="none",
        )  # fmt: skip

    with jax.enable_x64(True):
        got = jax.jit(lambda: [ours(c) for c in OPTION_CASES])()
    for case, g in zip(OPTION_CASES, got, strict=True):
        want = pg_option_ref(lp, old, adv, mask, w=w, ref=ref, kl_coef=0.3, **case)
        np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-15, err_msg=str(case))


def test_options_check_grads_order_2(rng):
    """The options whose gradient is their value's derivative (CISPO, GSPO-token and the
    straight-through estimators are not, by design: their gradients are checked against
    the formulas and the trainers above)."""
    lp, old, ref, adv, mask = pg_data(rng, b=3, t=4, spread=0.4)
    w = rng.uniform(0.5, 2.0, size=lp.shape)
    check_grads_2(
        lambda x: pgl(
            x, old, adv, mask, dual_clip=1.3, ratio_cap=1.25, token_weights=w, ref_log_probs=ref,
            kl_coef=0.2, kl_importance_weighted=True, aggregation="sequence_mean",
        )
        + pgl(
            x, old, adv, mask, loss_type="sapo", importance_sampling="sequence",
            ref_log_probs=ref, kl_coef=0.2, kl_estimator="k2", aggregation="sequence_sum",
            max_length=6,
        ),
        (lp,),
    )  # fmt: skip


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sequence_sum"])
def test_return_sum_and_weight_is_exact_over_micro_batches(rng, aggregation):
    lp, old, ref, adv, mask = pg_data(rng, b=6)
    w = rng.uniform(0.0, 2.0, size=lp.shape)
    kw = dict(ref_log_probs=ref, kl_coef=0.1, aggregation=aggregation, max_length=7)
    with jax.enable_x64(True):
        part = jax.jit(lambda *a: pgl(*a[:4], token_weights=a[4], return_sum_and_weight=True,
                                      **{**kw, "ref_log_probs": a[5]}))  # fmt: skip
        full = pgl(lp, old, adv, mask, token_weights=w, **kw)
        parts = [part(*(x[i : i + 3] for x in (lp, old, adv, mask, w, ref))) for i in (0, 3)]
        total, weight = (sum(p[k] for p in parts) for k in (0, 1))
        np.testing.assert_allclose(jaxce.weighted_mean(total, weight), full, rtol=1e-13)
        want_weight = {"token_mean": mask.sum(), "sequence_mean": 6, "sequence_sum": 6 * 7}
        assert float(weight) == want_weight[aggregation]
    pair = pgl(lp, old, adv, mask, aggregation="sum_and_weight", return_sum_and_weight=True)
    np.testing.assert_allclose(pair, pgl(lp, old, adv, mask, aggregation="sum_and_weight"))


def test_packed_layout_equals_padded_with_the_new_options(rng):
    lp, old, ref, adv, mask = pg_data(rng, b=5, t=4)
    sampling = old + 0.5 * rng.normal(size=lp.shape)
    entropy = rng.uniform(0, 3, size=lp.shape)
    packed = [pack(x, mask, 10, 3) for x in (lp, old, ref, sampling, entropy)]
    (plp, ids, where), (pold, _, _), (pref, _, _), (psam, _, _), (pent, _, _) = packed
    rows = 1 + max(r for r, _ in where)
    padv = np.zeros((rows, 3))
    for i, (r, s) in enumerate(where):
        padv[r, s] = adv[i]
    kw = dict(importance_sampling="sequence_token", dual_clip=2.0, ref_log_probs=None)

    def padded():
        tw = jaxce.rollout_importance_weights(old, sampling, mask, bounds=(0.1, 5.0))
        tw = tw * jaxce.off_policy_sequence_mask(lp, sampling, adv, mask, threshold=0.05)
        return tw, pgl(lp, old, adv, mask, token_weights=tw, aggregation="sequence_mean", **kw)

    def packed_loss():
        seg = dict(segment_ids=ids, num_segments=3)
        tw = jaxce.rollout_importance_weights(pold, psam, bounds=(0.1, 5.0), **seg)
        tw = tw * jaxce.off_policy_sequence_mask(plp, psam, padv, threshold=0.05, **seg)
        loss = pgl(plp, pold, padv, token_weights=tw, aggregation="sequence_mean", **kw, **seg)
        return tw, loss

    with jax.enable_x64(True):
        (tw, loss), (ptw, ploss) = padded(), packed_loss()
    np.testing.assert_allclose(ploss, loss, rtol=1e-12)
    np.testing.assert_allclose(np.sort(np.asarray(ptw)[ids > 0]), np.sort(np.asarray(tw)[mask]))
    assert np.any(np.asarray(tw)[mask] == 0) and np.any(np.asarray(tw)[mask] > 0)


def test_policy_options_bad_input(rng):
    lp, old, ref, adv, mask = pg_data(rng)
    for kw, name in (
        ({"loss_type": "vespo"}, "loss_type"),
        ({"importance_sampling": "sequence_mean"}, "importance_sampling"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"dual_clip": 2.0, "loss_type": "sapo"}, "dual_clip"),
        ({"ratio_cap": 1.1}, "ratio_cap"),  # not above 1 + eps_high = 1.2
        ({"ratio_cap": 3.0, "loss_type": "cispo"}, "ratio_cap"),
        ({"max_log_ratio": 0.0}, "max_log_ratio"),
        ({"sapo_temperatures": (1.0, -1.0), "loss_type": "sapo"}, "sapo_temperatures"),
        ({"sapo_temperatures": (1.0,)}, "sapo_temperatures"),
        ({"token_weights": -np.ones(4)}, "token_weights"),
        ({"token_weights": np.ones(3)}, "token_weights"),
        ({"aggregation": "none", "return_sum_and_weight": True}, "return_sum_and_weight"),
        ({"kl_estimator": "k2+"}, "kl_estimator"),
    ):
        with pytest.raises(ValueError, match=name):
            pgl(lp, old, adv, mask, **kw)
    for name, value in (("dual_clip", 0.5), ("max_log_ratio", -1.0), ("ratio_cap", 1.1)):
        out = jax.jit(lambda v, n=name: pgl(lp, old, adv, mask, **{n: v}))(value)
        assert np.isnan(out), name
    traced_w = jax.jit(lambda w: pgl(lp, old, adv, mask, token_weights=w))(-np.ones(4))
    assert np.isnan(traced_w)
    nan_w = np.ones(4)
    nan_w[1] = np.nan
    per_token = pgl(lp, old, adv, mask, token_weights=nan_w, aggregation="none")
    assert np.isnan(per_token[1][mask[1]]).all() and np.isfinite(np.delete(per_token, 1, 0)).all()
    with pytest.raises(ValueError, match="estimator"):
        jaxce.sampled_kl_divergence(lp, ref, estimator="k2+")


def test_kl_plus_estimators_value_and_gradient(rng):
    lp, _, ref, _, _ = pg_data(rng)
    with jax.enable_x64(True):
        for est, value in (("k1+", "k1"), ("k3+", "k3")):
            f = lambda x, e=est: jaxce.sampled_kl_divergence(x, ref, estimator=e)
            np.testing.assert_array_equal(
                f(lp), jaxce.sampled_kl_divergence(lp, ref, estimator=value)
            )
            g = jax.grad(lambda x, f=f: jnp.sum(f(x)))(lp)
            np.testing.assert_allclose(g, lp - ref, rtol=1e-14)  # k2's gradient
        assert np.all(np.asarray(jaxce.sampled_kl_divergence(lp, lp, estimator="k3+")) == 0)


# ----------------------------------------------------------------------------- corrections


def rollout_ref(old, rollout, mask, level, mode, lo, hi):
    diff = np.where(mask, old - rollout, 0.0)
    log_rho = diff if level == "token" else np.broadcast_to(diff.sum(-1, keepdims=True), diff.shape)
    rho = np.exp(log_rho)
    lo_, hi_ = (0.0 if lo is None else lo), (np.inf if hi is None else hi)
    w = (
        np.clip(rho, lo_, hi_)
        if mode == "truncate"
        else np.where((rho >= lo_) & (rho <= hi_), rho, 0)
    )
    return np.where(mask, w, 0.0)


ROLLOUT_CASES = [
    ("token", "truncate", (0.5, 2.0)),
    ("token", "mask", (None, 1.5)),
    ("sequence", "truncate", (None, 3.0)),
    ("sequence", "mask", (0.3, None)),
    ("sequence", "mask", (None, 3.0)),
]


def test_rollout_importance_weights_reference_overflow_nan_grad(rng):
    lp, old, _, _, mask = pg_data(rng)
    rollout = old + 0.6 * rng.normal(size=old.shape)
    rollout[0, 0] = old[0, 0] - 1e4  # a sequence log-ratio of 1e4
    rollout[1, 0] = old[1, 0] + 1e4
    with jax.enable_x64(True):
        run = jax.jit(
            lambda o, r: [
                jaxce.rollout_importance_weights(o, r, mask, level=lv, mode=m, bounds=b)
                for lv, m, b in ROLLOUT_CASES
            ]
        )
        got = run(old, rollout)
        grads = jax.grad(lambda o: sum(jnp.sum(x) for x in run(o, rollout)))(old)
    for (lv, m, (lo, hi)), g in zip(ROLLOUT_CASES, got, strict=True):
        want = rollout_ref(old, rollout, mask, lv, m, lo, hi)
        if hi is not None:
            np.testing.assert_allclose(g, want, rtol=1e-13, err_msg=f"{lv}/{m}")
            assert np.all(np.isfinite(g))
        else:  # hi=None: e^1e4 is inf, as the formula; the other sequences match
            np.testing.assert_allclose(g[1:], want[1:], rtol=1e-13, err_msg=f"{lv}/{m}")
        assert np.all(np.asarray(g)[~mask] == 0)
    np.testing.assert_array_equal(grads, 0.0)
    np.testing.assert_array_equal(got[2][0][mask[0]], 3.0)  # 1e4 truncated to hi
    np.testing.assert_array_equal(got[4][0], 0.0)  # 1e4 masked
    nan = rollout.copy()
    nan[2, 0] = np.nan
    for lv in ("token", "sequence"):
        w = np.asarray(jaxce.rollout_importance_weights(old, nan, mask, level=lv))
        rest = w[2, 1:][mask[2, 1:]]
        assert (
            np.isnan(w[2, 0]) and (np.isnan(rest) if lv == "sequence" else np.isfinite(rest)).all()
        )
        assert np.isfinite(np.delete(w, 2, 0)).all()
    masked_nan = np.where(mask, rollout, np.nan)
    assert np.isfinite(jaxce.rollout_importance_weights(old[1:], masked_nan[1:], mask[1:])).all()
    for bounds, name in (((2.0, 1.0), "bounds"), ((-1.0, 3.0), "bounds"), ((None,), "bounds")):
        with pytest.raises(ValueError, match=name):
            jaxce.rollout_importance_weights(old, rollout, mask, bounds=bounds)
    with pytest.raises(ValueError, match="level"):
        jaxce.rollout_importance_weights(old, rollout, level="tok")
    with pytest.raises(ValueError, match="mode"):
        jaxce.rollout_importance_weights(old, rollout, mode="clip")
    with pytest.raises(ValueError, match="rollout_log_probs"):
        jaxce.rollout_importance_weights(old, rollout[:, :2])
    empty = jaxce.rollout_importance_weights(np.zeros((0, 3)), np.zeros((0, 3)))
    assert empty.shape == (0, 3)
    halves = jaxce.rollout_importance_weights(
        jnp.asarray(old, jnp.bfloat16), jnp.asarray(rollout, jnp.bfloat16)
    )
    assert halves.dtype == jnp.float32


def test_off_policy_sequence_mask_reference(rng):
    lp, _, _, adv, mask = pg_data(rng, b=6)
    adv[:3] = -np.abs(adv[:3])
    rollout = (
        lp + np.array([0.5, -0.5, 0.0, 0.5, 0.0, -0.5])[:, None] + 0.01 * rng.normal(size=lp.shape)
    )
    mean = np.where(mask, rollout - lp, 0).sum(1) / mask.sum(1)
    want = ((adv >= 0) | (mean <= 0.1))[:, None] & mask
    with jax.enable_x64(True):
        got = jaxce.off_policy_sequence_mask(lp, rollout, adv, mask, threshold=0.1)
        np.testing.assert_array_equal(got, want)
        traced = jax.jit(
            lambda t: jaxce.off_policy_sequence_mask(lp, rollout, adv, mask, threshold=t)
        )(0.1)
        np.testing.assert_array_equal(traced, want)
        per_token = np.broadcast_to(adv[:, None], lp.shape)
        np.testing.assert_array_equal(
            jaxce.off_policy_sequence_mask(lp, rollout, per_token, mask, threshold=0.1), want
        )
    assert not want[0].any() and want[1].any()
    vm = jax.vmap(lambda a, b, c, m: jaxce.off_policy_sequence_mask(a, b, c, m, threshold=0.1))
    np.testing.assert_array_equal(
        vm(*(x.reshape(2, 3, *x.shape[1:]) for x in (lp, rollout, adv, mask))),
        want.reshape(2, 3, -1),
    )
    with pytest.raises(ValueError, match="advantages"):
        jaxce.off_policy_sequence_mask(lp, rollout, adv[:2], mask, threshold=0.1)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        jaxce.off_policy_sequence_mask(lp, rollout[:, :2], adv, mask, threshold=0.1)
    assert jaxce.off_policy_sequence_mask(
        np.zeros((0, 4)), np.zeros((0, 4)), np.zeros(0), threshold=0.1
    ).shape == (0, 4)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.37, 1.0])
def test_top_entropy_mask_matches_numpy_quantile(rng, fraction):
    entropy = np.round(rng.uniform(0, 3, size=(4, 7)), 1)  # ties
    mask = rng.uniform(size=entropy.shape) > 0.3
    level = np.quantile(entropy[mask], 1 - fraction)
    want = mask & (entropy >= level)
    np.testing.assert_array_equal(jaxce.top_entropy_mask(entropy, mask, fraction=fraction), want)
    traced = jax.jit(lambda f: jaxce.top_entropy_mask(entropy, mask, fraction=f))(fraction)
    np.testing.assert_array_equal(traced, want)
    if fraction == 0.2:
        assert 0 < want.sum() < mask.sum()
        f32 = jaxce.top_entropy_mask(entropy.astype(np.float32), mask, fraction=fraction)
        np.testing.assert_array_equal(f32, want)


def test_top_entropy_mask_edges():
    h = np.array([[0.5, 2.0, np.nan, 1.0], [3.0, 0.1, 0.2, 0.3]])
    keep = np.array([[True, True, False, True], [True, True, True, True]])
    assert np.asarray(jaxce.top_entropy_mask(h, keep, fraction=0.5)).sum() == 4  # NaN dropped
    assert not np.asarray(jaxce.top_entropy_mask(h, fraction=0.5)).any()  # NaN kept: all False
    assert not np.asarray(jaxce.top_entropy_mask(h, np.zeros_like(keep), fraction=0.5)).any()
    assert jaxce.top_entropy_mask(np.zeros((0, 3)), fraction=0.2).shape == (0, 3)
    per_row = jax.vmap(lambda e, m: jaxce.top_entropy_mask(e, m, fraction=0.25))(
        np.nan_to_num(h), keep
    )  # each row its own quantile
    np.testing.assert_array_equal(
        per_row, [[False, True, False, False], [True, False, False, False]]
    )
    g = jax.grad(lambda e: jnp.sum(jnp.where(jaxce.top_entropy_mask(e, fraction=0.5), e, 0.0)))
    np.testing.assert_array_equal(g(np.nan_to_num(h)), np.asarray(
        jaxce.top_entropy_mask(np.nan_to_num(h), fraction=0.5), float))  # fmt: skip
    assert not jax.jit(lambda f: jaxce.top_entropy_mask(h, keep, fraction=f))(1.5).any()
    with pytest.raises(ValueError, match="fraction"):
        jaxce.top_entropy_mask(h, fraction=1.5)
    with pytest.raises(ValueError, match="where"):
        jaxce.top_entropy_mask(h, keep[:, :2], fraction=0.5)
    with pytest.raises(TypeError, match="entropy"):
        jaxce.top_entropy_mask(np.ones(3, np.int32), fraction=0.5)


@pytest.mark.slow  # a subprocess on 4 host devices: seconds of start-up and compilation
def test_corrections_on_meshes_and_inside_shard_map():
    """top_entropy_mask's global quantile (jit on Explicit and Auto meshes, ``axis_name``
    inside shard_map), the other corrections and the loss with them, on 4 host devices."""
    words = run_host_devices_script("sharded_policy_corrections_check.py", 4)
    assert words[-1] == "OK", words

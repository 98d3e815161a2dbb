"""Parity with TRL's trainers: their loss formulas transcribed into float64 NumPy.

Transcribed (in our own code, NumPy instead of torch, same structure and normalisers) from the
public ``huggingface/trl`` repository at commit f2cd57710ae345ea6428ae95363267fcf38a3dc8:
``trl/trainer/dpo_trainer.py`` (``DPOTrainer`` loss types), ``trl/experimental/cpo/
cpo_trainer.py`` (``cpo_loss``: SimPO and the label-smoothed sigmoid), ``trl/experimental/orpo/
orpo_trainer.py`` (``odds_ratio_loss`` and its ``log1mexp``) and ``trl/trainer/grpo_trainer.py``
(``_compute_loss``: token/sequence importance sampling, two-sided clip, k3 KL, the loss types
``grpo``, ``bnpo``, ``dr_grpo`` and ``dapo``). jaxce is checked against them in value and in
gradient (float64 central differences of the transcriptions), and the exact invariants hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxce

# ----------------------------------------------------------------------------- TRL, in NumPy


def logsigmoid(x):
    return np.where(x < 0, x - np.log1p(np.exp(x)), -np.log1p(np.exp(-x)))


def sigmoid(x):
    return np.exp(logsigmoid(x))


def masked_sum(per_token, mask):
    return (per_token * mask).sum(axis=1)


def trl_dpo(policy, ref, masks, loss_type, beta, label_smoothing=0.0):
    """``DPOTrainer``'s loss per pair (reverse-KL f-divergence), from per-token log-probs.

    ``policy``/``ref``: ``(chosen (B, T), rejected (B, T))`` per-token log-probs; ``masks`` the
    completion masks. As TRL: sequence log-probs are masked sums over the completion.
    """
    (pc_tok, pr_tok), (rc_tok, rr_tok), (mc, mr) = policy, ref, masks
    chosen_logps, rejected_logps = masked_sum(pc_tok, mc), masked_sum(pr_tok, mr)
    ref_chosen_logps, ref_rejected_logps = masked_sum(rc_tok, mc), masked_sum(rr_tok, mr)
    chosen_scores = chosen_logps - ref_chosen_logps
    rejected_scores = rejected_logps - ref_rejected_logps
    delta_score = chosen_scores - rejected_scores
    eps = label_smoothing
    if loss_type == "sigmoid":  # with TRL's label-smoothed form (its CPO "sigmoid", older DPO)
        return -logsigmoid(beta * delta_score) * (1 - eps) - logsigmoid(-beta * delta_score) * eps
    if loss_type == "hinge":
        return np.maximum(1 - beta * delta_score, 0.0)
    if loss_type == "ipo":
        chosen_avg = chosen_scores / np.maximum(mc.sum(1), 1.0)
        rejected_avg = rejected_scores / np.maximum(mr.sum(1), 1.0)
        return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        qw, log_qw = sigmoid(beta * delta_score), logsigmoid(beta * delta_score)
        ql, log_ql = sigmoid(-beta * delta_score), logsigmoid(-beta * delta_score)
        return qw * (log_qw - np.log1p(-eps)) + ql * (log_ql - np.log(eps))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_scores, beta * rejected_scores
        return -logsigmoid(cr) - 0.5 * logsigmoid(-cr) - 0.5 * logsigmoid(-rr)
    if loss_type == "robust":
        clean = -(1 - eps) * logsigmoid(beta * delta_score)
        flipped = -eps * logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "sppo_hard":
        return (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sigmoid(beta * chosen_scores)) + sigmoid(beta * rejected_scores)
    if loss_type == "apo_down":
        return sigmoid(beta * chosen_scores) + (1 - sigmoid(beta * delta_score))
    raise AssertionError(loss_type)


def trl_simpo(chosen_avg, rejected_avg, beta, simpo_gamma, label_smoothing):
    """``CPOTrainer.cpo_loss(loss_type="simpo")`` on average log-probs (alpha = 0)."""
    logits = (chosen_avg - rejected_avg) - simpo_gamma / beta
    return (
        -logsigmoid(beta * logits) * (1 - label_smoothing)
        - logsigmoid(-beta * logits) * label_smoothing
    )


def trl_log1mexp(x):
    return np.where(x < -0.6931471805599453, np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def trl_orpo_term(chosen_avg, rejected_avg, beta):
    """The odds-ratio part of ``ORPOTrainer``'s loss: ``-mean(beta * logsigmoid(log_odds))``."""
    log_odds = (chosen_avg - rejected_avg) - (trl_log1mexp(chosen_avg) - trl_log1mexp(rejected_avg))
    return -np.mean(beta * logsigmoid(log_odds))


def trl_grpo(
    per_token_logps,
    old_per_token_logps,
    ref_per_token_logps,
    advantages,
    completion_mask,
    *,
    loss_type,
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    importance_sampling_level="token",
    max_completion_length=None,
    num_items_in_batch=None,
    num_processes=1,
):
    """``GRPOTrainer._compute_loss`` (training mode, one gradient-accumulation step)."""
    mask = completion_mask.astype(np.float64)
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)
        log_importance_weights = log_importance_weights[:, None]
    coef_1 = np.exp(log_importance_weights)
    if beta != 0.0:
        d = ref_per_token_logps - per_token_logps
        per_token_kl = np.exp(d) - d - 1
    coef_2 = np.clip(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -np.minimum(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / np.maximum(mask.sum(-1), 1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / max(mask.sum(), 1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_completion_length)
    if loss_type == "dapo":
        normalizer = max(num_items_in_batch, 1.0) / num_processes
        return (per_token_loss * mask).sum() / normalizer
    raise AssertionError(loss_type)


def central_difference(f, args, index, h=1e-6):
    """d sum(f(*args)) / d args[index], elementwise, by float64 central differences."""
    x = np.asarray(args[index], np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        up = list(args)
        down = list(args)
        up[index], down[index] = x + e, x - e
        grad[i] = (np.sum(f(*up)) - np.sum(f(*down))) / (2 * h)
    return grad


# ----------------------------------------------------------------------------- inputs

B, T = 4, 6


def completions(rng, spread=0.4):
    """Per-token log-probs of chosen/rejected completions under the policy and a reference,
    and completion masks of different lengths."""
    out = []
    for _ in range(2):
        policy = np.log(rng.uniform(0.05, 0.95, size=(B, T)))
        ref = policy + spread * rng.normal(size=(B, T))
        lengths = rng.integers(1, T + 1, size=B)
        mask = np.arange(T)[None] < lengths[:, None]
        out.append((policy, np.minimum(ref, -1e-3), mask))
    (pc, rc, mc), (pr, rr, mr) = out
    return pc, pr, rc, rr, mc, mr


def grpo_batch(rng, spread=0.3):
    lp = np.log(rng.uniform(0.05, 0.95, size=(B, T)))
    old = lp + spread * rng.normal(size=(B, T))
    ref = lp + spread * rng.normal(size=(B, T))
    rewards = rng.normal(size=B)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    lengths = np.array([T, 2, 5, 1])
    mask = np.arange(T)[None] < lengths[:, None]
    return lp, old, ref, adv, mask


# ----------------------------------------------------------------------------- DPO family

DPO_CASES = [
    ("sigmoid", 0.0),
    ("sigmoid", 0.2),  # cDPO
    ("robust", 0.2),
    ("hinge", 0.0),
    ("ipo", 0.0),
    ("exo_pair", 0.1),
    ("nca_pair", 0.0),
    ("sppo_hard", 0.0),
    ("apo_zero", 0.0),
    ("apo_down", 0.0),
]


@pytest.mark.parametrize(("loss_type", "eps"), DPO_CASES)
def test_dpo_matches_trl(rng, loss_type, eps):
    pc, pr, rc, rr, mc, mr = completions(rng)
    beta = 0.2
    reduction = "mean" if loss_type == "ipo" else "sum"

    def ours(pc, pr, rc, rr):
        seq = lambda x, m: jaxce.sequence_reduce(x, m, reduction=reduction)
        return jaxce.dpo_loss(
            seq(pc, mc), seq(pr, mr), seq(rc, mc), seq(rr, mr),
            beta=beta, loss_type=loss_type, label_smoothing=eps,
        )  # fmt: skip

    def theirs(pc, pr, rc, rr):
        return trl_dpo((pc, pr), (rc, rr), (mc, mr), loss_type, beta, eps)

    args = (pc, pr, rc, rr)
    with jax.enable_x64(True):
        np.testing.assert_allclose(ours(*args), theirs(*args), rtol=1e-12, atol=1e-14)
        grads = jax.grad(lambda *a: jnp.sum(ours(*a)), argnums=(0, 1, 2, 3))(*args)
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g, central_difference(theirs, args, i), rtol=1e-6, atol=1e-8)


def test_dpo_equals_log_2_at_the_reference_as_trl(rng):
    pc, pr, _, _, mc, mr = completions(rng)
    want = trl_dpo((pc, pr), (pc, pr), (mc, mr), "sigmoid", 0.1)
    np.testing.assert_array_equal(want, np.log(2.0))  # TRL's value, in float64
    seq = lambda x, m: jaxce.sequence_reduce(x.astype(np.float32), m)
    got = jaxce.dpo_loss(seq(pc, mc), seq(pr, mr), seq(pc, mc), seq(pr, mr))
    np.testing.assert_array_equal(got, np.float32(np.log(2.0)))


def test_simpo_and_orpo_match_trl(rng):
    pc, pr, _, _, mc, mr = completions(rng)
    avg = lambda x, m: masked_sum(x, m) / m.sum(1)
    c, r = avg(pc, mc), avg(pr, mr)
    for beta, gamma, eps in ((2.0, 0.5, 0.0), (2.5, 1.2, 0.1)):
        theirs = lambda c, r, b=beta, g=gamma, e=eps: trl_simpo(c, r, b, g, e)
        with jax.enable_x64(True):
            ours = lambda c, r, b=beta, g=gamma, e=eps: jaxce.simpo_loss(
                c, r, beta=b, gamma=g, label_smoothing=e
            )
            np.testing.assert_allclose(ours(c, r), theirs(c, r), rtol=1e-12)
            g = jax.grad(lambda c, r, f=ours: jnp.sum(f(c, r)), argnums=(0, 1))(c, r)
        for i in (0, 1):
            np.testing.assert_allclose(g[i], central_difference(theirs, (c, r), i), rtol=1e-6)
    # ORPO, including averages near 0 and below -ln 2 (both branches of TRL's log1mexp)
    c = np.concatenate([c, [-1e-3, -0.69, -0.7]])
    r = np.concatenate([r, [-2.0, -0.01, -5.0]])
    theirs = lambda c, r: trl_orpo_term(c, r, 0.1)
    with jax.enable_x64(True):
        ours = lambda c, r: jaxce.orpo_loss(c, r, beta=0.1, reduction="mean")
        np.testing.assert_allclose(ours(c, r), theirs(c, r), rtol=1e-12)
        g = jax.grad(ours, argnums=(0, 1))(c, r)
    for i in (0, 1):
        np.testing.assert_allclose(g[i], central_difference(theirs, (c, r), i, h=1e-7), rtol=1e-5)


# ----------------------------------------------------------------------------- GRPO family

GRPO_CASES = [
    ("grpo", "token", 0.0, 0.2, "sequence_mean"),
    ("grpo", "token", 0.04, 0.28, "sequence_mean"),
    ("grpo", "sequence", 0.04, 4e-4, "sequence_mean"),  # GSPO
    ("bnpo", "token", 0.04, 0.2, "token_mean"),
    ("dr_grpo", "token", 0.04, 0.2, "sequence_sum"),
    ("dapo", "token", 0.0, 0.28, "sum_and_weight"),
]


@pytest.mark.parametrize(("loss_type", "level", "beta", "eps_high", "aggregation"), GRPO_CASES)
def test_policy_gradient_matches_trl_grpo(rng, loss_type, level, beta, eps_high, aggregation):
    lp, old, ref, adv, mask = grpo_batch(rng)
    eps_low = 3e-4 if level == "sequence" else 0.2
    max_len = 8
    kw = dict(
        loss_type=loss_type, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
        importance_sampling_level=level, max_completion_length=max_len,
        num_items_in_batch=float(mask.sum()),
    )  # fmt: skip

    def theirs(lp):
        return trl_grpo(lp, old, ref, adv, mask, **kw)

    def ours(lp):
        out = jaxce.policy_gradient_loss(
            lp, old, adv, mask, clip_epsilon=eps_low, clip_epsilon_high=eps_high,
            importance_sampling=level, ref_log_probs=ref, kl_coef=beta,
            kl_estimator="k3", aggregation=aggregation, max_length=max_len,
        )  # fmt: skip
        return jaxce.weighted_mean(*out) if aggregation == "sum_and_weight" else out

    with jax.enable_x64(True):
        np.testing.assert_allclose(ours(lp), theirs(lp), rtol=1e-12, atol=1e-15)
        g = jax.grad(ours)(lp)
    np.testing.assert_allclose(g, central_difference(theirs, (lp,), 0), rtol=1e-6, atol=1e-9)


def test_dapo_global_normaliser_equals_summed_sum_and_weight(rng):
    """TRL's DAPO divides each process's micro-batch sum by the global token count over the
    number of processes, and averages over processes; jaxce sums ``sum_and_weight`` parts."""
    lp, old, ref, adv, mask = grpo_batch(rng)
    n = float(mask.sum())
    shards = [slice(0, 1), slice(1, 2), slice(2, 4)]  # 3 "processes" with uneven token counts
    trl_total = np.mean(
        [
            trl_grpo(
                lp[s],
                old[s],
                ref[s],
                adv[s],
                mask[s],
                loss_type="dapo",
                beta=0.04,
                num_items_in_batch=n,
                num_processes=len(shards),
            )  # fmt: skip
            for s in shards
        ]
    )
    with jax.enable_x64(True):
        parts = [
            jaxce.policy_gradient_loss(
                lp[s],
                old[s],
                adv[s],
                mask[s],
                ref_log_probs=ref[s],
                kl_coef=0.04,
                aggregation="sum_and_weight",
            )  # fmt: skip
            for s in shards
        ]
        total = sum(p[0] for p in parts)
        weight = sum(p[1] for p in parts)
        np.testing.assert_allclose(jaxce.weighted_mean(total, weight), trl_total, rtol=1e-12)
        full = jaxce.policy_gradient_loss(lp, old, adv, mask, ref_log_probs=ref, kl_coef=0.04)
        np.testing.assert_allclose(full, trl_total, rtol=1e-12)


def test_k3_matches_trl_and_is_zero_at_the_reference(rng):
    lp, _, ref, _, _ = grpo_batch(rng)
    d = ref - lp
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            jaxce.sampled_kl_divergence(lp, ref), np.exp(d) - d - 1, rtol=1e-12, atol=1e-15
        )
        assert np.all(np.asarray(jaxce.sampled_kl_divergence(lp, lp)) == 0.0)


def test_grpo_gradient_at_ratio_one_is_reinforce_as_trl(rng):
    """TRL's first step (old = current, detached) against -A grad log p, per aggregation."""
    lp, _, _, adv, mask = grpo_batch(rng)
    lengths = mask.sum(1, keepdims=True)
    for loss_type, aggregation, weight in (
        ("grpo", "sequence_mean", 1.0 / (lengths * B)),
        ("bnpo", "token_mean", 1.0 / mask.sum()),
        ("dr_grpo", "sequence_sum", 1.0 / (B * 8)),
    ):
        reinforce = np.where(mask, -adv[:, None] * weight, 0.0)
        trl = lambda x, lt=loss_type: trl_grpo(
            x, lp, None, adv, mask, loss_type=lt, max_completion_length=8
        )
        num = central_difference(trl, (lp,), 0)
        np.testing.assert_allclose(num, reinforce, rtol=1e-6, atol=1e-9)  # TRL's own
        with jax.enable_x64(True):
            g = jax.grad(
                lambda x, a=aggregation: jaxce.policy_gradient_loss(
                    x, x, adv, mask, aggregation=a, max_length=8
                )
            )(lp)
        np.testing.assert_allclose(g, reinforce, rtol=1e-14, atol=1e-16)


# ------------------------------------------- DPO: the other loss types, f-divergences, lists


def trl_dpo_sequences(
    logps,
    loss_type,
    beta,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    bco_delta=0.0,
):
    """``DPOTrainer._compute_loss``'s per-pair loss from sequence log-probs ``(B,)`` each
    (``ld_alpha=None``, no WPO weighting); ``bco_delta`` is the running reward mean of TRL's
    ``bco_pair`` before its DPO refactor (0 in the refactored trainer). The f-divergence
    scores without TRL's clamp of the alpha-divergence exponent at 80 (jaxce has none)."""
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = logps
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if f_divergence_type == "reverse_kl":
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f_divergence_type == "forward_kl":
        chosen_scores, rejected_scores = -np.exp(-chosen_logratios), -np.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores, rejected_scores = (
            logsigmoid(chosen_logratios),
            logsigmoid(rejected_logratios),
        )
    else:
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
        else:
            coef = 1.0 / (f_alpha_divergence_coef - 1.0)
            chosen_scores = np.exp((f_alpha_divergence_coef - 1.0) * chosen_logratios) * coef
            rejected_scores = np.exp((f_alpha_divergence_coef - 1.0) * rejected_logratios) * coef
    delta_score = chosen_scores - rejected_scores
    eps = label_smoothing

    def smoothed(d):
        return -logsigmoid(beta * d) * (1 - eps) - logsigmoid(-beta * d) * eps

    if loss_type == "bco_pair":
        chosen_rewards, rejected_rewards = beta * chosen_scores, beta * rejected_scores
        return -logsigmoid(chosen_rewards - bco_delta) - logsigmoid(-(rejected_rewards - bco_delta))
    if loss_type == "aot":
        logratios = chosen_logps - rejected_logps
        ref_logratios = ref_chosen_logps - ref_rejected_logps
        return smoothed(np.sort(logratios, axis=0) - np.sort(ref_logratios, axis=0))
    if loss_type == "aot_unpaired":
        return smoothed(np.sort(chosen_logratios, axis=0) - np.sort(rejected_logratios, axis=0))
    if loss_type == "discopop":
        logits = delta_score * beta
        modulation = sigmoid(logits / discopop_tau)
        return -logsigmoid(logits) * (1 - modulation) + np.exp(-logits) * modulation
    if loss_type == "sigmoid":
        return smoothed(delta_score)
    if loss_type == "hinge":
        return np.maximum(1 - beta * delta_score, 0.0)
    if loss_type == "exo_pair":
        qw, log_qw = sigmoid(beta * delta_score), logsigmoid(beta * delta_score)
        ql, log_ql = sigmoid(-beta * delta_score), logsigmoid(-beta * delta_score)
        return qw * (log_qw - np.log1p(-eps)) + ql * (log_ql - np.log(eps))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_scores, beta * rejected_scores
        return -logsigmoid(cr) - 0.5 * logsigmoid(-cr) - 0.5 * logsigmoid(-rr)
    if loss_type == "robust":
        clean = -(1 - eps) * logsigmoid(beta * delta_score)
        flipped = -eps * logsigmoid(-beta * delta_score)
        return (clean - flipped) / (1 - 2 * eps)
    if loss_type == "sppo_hard":
        return (chosen_scores - 0.5 / beta) ** 2 + (rejected_scores + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return (1 - sigmoid(beta * chosen_logratios)) + sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return sigmoid(beta * chosen_logratios) + (1 - sigmoid(beta * delta_score))
    raise AssertionError(loss_type)


def trl_dpo_weighted(logps, loss_types, loss_weights, **kw):
    """TRL's loop over a list of loss types: ``loss += per_sequence_loss.mean() * weight``."""
    return sum(
        w * trl_dpo_sequences(logps, t, **kw).mean()
        for t, w in zip(loss_types, loss_weights, strict=True)
    )


# every type but ipo (which takes the reverse KL only), in one tuple: one-hot loss_weights
# (traced) pick one type, so every type shares one compile per f-divergence
ALL_TYPES = (
    "sigmoid", "robust", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop",
)  # fmt: skip
F_DIVERGENCE_CASES = [
    ("reverse_kl", 0.5),
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 1.7),
    ("alpha_divergence", 1.0 + 1e-7),  # TRL's limit: the reverse KL
]
BCO_DELTA, DPO_EPS, DPO_BETA, DPO_TAU = 0.03, 0.1, 0.3, 0.2


def sequence_pairs(rng, n=5):
    pc, pr = -rng.uniform(1, 6, size=n), -rng.uniform(1, 6, size=n)
    return pc, pr, pc + rng.normal(size=n), pr + rng.normal(size=n)


def _ours_all_types(f_divergence, f_alpha):
    def loss(pc, pr, rc, rr, weights):
        return jaxce.dpo_loss(
            pc, pr, rc, rr, beta=DPO_BETA, loss_type=ALL_TYPES, loss_weights=weights,
            label_smoothing=DPO_EPS, f_divergence=f_divergence, f_alpha=f_alpha,
            discopop_tau=DPO_TAU, bco_running_mean=BCO_DELTA,
        )  # fmt: skip

    return loss


@pytest.mark.parametrize(("f_divergence", "f_alpha"), F_DIVERGENCE_CASES)
def test_dpo_every_type_and_f_divergence_matches_trl(rng, f_divergence, f_alpha):
    args = sequence_pairs(rng)
    ours = _ours_all_types(f_divergence, f_alpha)
    kw = dict(
        beta=DPO_BETA, label_smoothing=DPO_EPS, f_divergence_type=f_divergence,
        f_alpha_divergence_coef=f_alpha, discopop_tau=DPO_TAU, bco_delta=BCO_DELTA,
    )  # fmt: skip
    with jax.enable_x64(True):
        value = jax.jit(ours)
        grad = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a)), argnums=(0, 1, 2, 3)))
        for k, loss_type in enumerate(ALL_TYPES):
            onehot = np.eye(len(ALL_TYPES))[k]

            def theirs(*a, t=loss_type):
                return trl_dpo_sequences(a, t, **kw)

            np.testing.assert_allclose(
                value(*args, onehot), theirs(*args), rtol=1e-12, atol=1e-14, err_msg=loss_type
            )
            got = grad(*args, onehot)
            for i in range(4):
                np.testing.assert_allclose(
                    got[i], central_difference(theirs, args, i), rtol=1e-6, atol=1e-8,
                    err_msg=f"{loss_type} d/d args[{i}]",
                )  # fmt: skip


def test_dpo_weighted_list_matches_trl(rng):
    """MPO-style weighted lists, TRL's ``sum_k w_k mean(loss_k)``, as ``reduction='mean'``
    and as ``sum_and_weight`` parts summed over micro-batches."""
    args = sequence_pairs(rng, n=6)
    types, weights = ("sigmoid", "bco_pair", "sppo_hard"), (0.8, 0.2, 1.0)
    want = trl_dpo_weighted(args, types, weights, beta=0.2)
    with jax.enable_x64(True):
        f = lambda *a, r="mean": jaxce.dpo_loss(
            *a, beta=0.2, loss_type=types, loss_weights=weights, reduction=r
        )
        np.testing.assert_allclose(f(*args), want, rtol=1e-12)
        parts = [f(*(a[s] for a in args), r="sum_and_weight") for s in (slice(0, 2), slice(2, 6))]
        total, count = (sum(p[j] for p in parts) for j in (0, 1))
        np.testing.assert_allclose(jaxce.weighted_mean(total, count), want, rtol=1e-12)
        # no loss_weights: all 1, as TRL's default
        np.testing.assert_allclose(
            jaxce.dpo_loss(*args, beta=0.2, loss_type=types, reduction="mean"),
            trl_dpo_weighted(args, types, (1.0, 1.0, 1.0), beta=0.2),
            rtol=1e-12,
        )


# ----------------------------------------------------------------------------- KTO, rewards


def trl_kto(policy, ref, labels, kl_policy, kl_ref, *, beta, desirable_weight,
            undesirable_weight, loss_type="kto"):  # fmt: skip
    """``KTOTrainer``'s loss: ``nanmean`` over the concatenated chosen and rejected losses,
    with the reference point ``kl`` the clamped mean of the mismatched pairs' log-ratios."""
    if loss_type == "kto":
        kl = max((kl_policy - kl_ref).mean(), 0.0)
    else:
        kl = 0.0
    chosen_logratios = policy[labels] - ref[labels]
    rejected_logratios = policy[~labels] - ref[~labels]
    if loss_type == "kto":
        chosen_losses = 1 - sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - sigmoid(beta * chosen_logratios)
        rejected_losses = sigmoid(beta * rejected_logratios)
    losses = np.concatenate(
        [desirable_weight * chosen_losses, undesirable_weight * rejected_losses]
    )
    return np.nanmean(losses)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(rng, loss_type):
    n = 7
    policy = -rng.uniform(2, 8, size=n)
    ref = policy + rng.normal(size=n)
    labels = np.array([True, False, True, True, False, False, True])
    kl_policy = -rng.uniform(2, 8, size=n)
    kl_ref = kl_policy - 0.5 + rng.normal(size=n) * 0.3  # a positive mean KL (not clamped)
    kw = dict(beta=0.4, desirable_weight=1.3, undesirable_weight=0.7)
    theirs = lambda p: trl_kto(p, ref, labels, kl_policy, kl_ref, loss_type=loss_type, **kw)
    with jax.enable_x64(True):
        kl = jnp.maximum(jnp.mean(kl_policy - kl_ref), 0.0)
        assert kl > 0
        ours = lambda p: jaxce.kto_loss(
            p, ref, labels, kl=kl, loss_type=loss_type, reduction="mean", **kw
        )
        np.testing.assert_allclose(ours(policy), theirs(policy), rtol=1e-12)
        g = jax.grad(ours)(policy)
    np.testing.assert_allclose(g, central_difference(theirs, (policy,), 0), rtol=1e-6, atol=1e-9)
    # a clamped reference point (negative mean KL): TRL's 0, the caller's jnp.maximum
    low = kl_ref + 1.0
    with jax.enable_x64(True):
        kl = jnp.maximum(jnp.mean(kl_policy - low), 0.0)
        np.testing.assert_allclose(
            jaxce.kto_loss(policy, ref, labels, kl=kl, loss_type=loss_type, reduction="mean", **kw),
            trl_kto(policy, ref, labels, kl_policy, low, loss_type=loss_type, **kw),
            rtol=1e-12,
        )


def trl_reward(rewards_chosen, rewards_rejected, margin=None, center_rewards_coefficient=None):
    """``RewardTrainer.compute_loss``."""
    if margin is not None:
        loss = -logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    else:
        loss = -logsigmoid(rewards_chosen - rewards_rejected).mean()
    if center_rewards_coefficient is not None:
        loss += center_rewards_coefficient * np.mean((rewards_chosen + rewards_rejected) ** 2)
    return loss


def test_bradley_terry_matches_trl_reward_trainer(rng):
    rc, rr, m = rng.normal(size=6) * 2, rng.normal(size=6) * 2, rng.uniform(0, 1, size=6)
    for margin, coef in ((None, None), (m, None), (m, 0.01)):
        theirs = lambda a, b, m=margin, c=coef: trl_reward(a, b, m, c)
        with jax.enable_x64(True):
            ours = lambda a, b, m=margin, c=coef: jaxce.bradley_terry_loss(
                a, b, margin=m, center_coef=0.0 if c is None else c, reduction="mean"
            )
            np.testing.assert_allclose(ours(rc, rr), theirs(rc, rr), rtol=1e-12)
            g = jax.grad(ours, argnums=(0, 1))(rc, rr)
        for i in (0, 1):
            np.testing.assert_allclose(
                g[i], central_difference(theirs, (rc, rr), i), rtol=1e-6, atol=1e-9
            )

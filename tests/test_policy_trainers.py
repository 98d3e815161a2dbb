"""Parity of the policy-optimisation options with the trainers that define them.

TRL's ``GRPOTrainer._compute_loss`` and verl's ``compute_policy_loss_vanilla`` (dual clip),
``compute_policy_loss_gspo`` (GSPO-token) and ``kl_penalty`` (the straight-through ``"+"``
estimators) are transcribed here into float64 PyTorch from their formulas (our own code, the
same structure, detaches and normalisers), so that PyTorch's autograd gives the gradients
the trainers take. Transcribed from the public repositories huggingface/trl at commit
f2cd57710ae345ea6428ae95363267fcf38a3dc8 (``trl/trainer/grpo_trainer.py``: the vLLM
importance-sampling block of ``_generate_and_score_completions``, ``get_off_policy_mask``,
``get_high_entropy_mask`` and ``_compute_loss``) and volcengine/verl
(``verl/trainer/ppo/core_algos.py``).

Every TRL option with a jaxce counterpart is crossed once: the loss types (grpo, bnpo,
dr_grpo, dapo, cispo, sapo), ``delta``, ``vllm_importance_sampling_mode`` (token/sequence x
truncate/mask, with and without ``clip_min``), ``off_policy_mask_threshold``,
``top_entropy_quantile``, ``use_bias_correction_kl`` and the sequence importance-sampling
level; the jaxce side composes ``rollout_importance_weights``, ``off_policy_sequence_mask``
and ``top_entropy_mask`` into ``token_weights``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxce

B, T, MAX_LEN = 5, 6, 8

# ----------------------------------------------------------------------------- TRL, in torch


def trl_vllm_importance_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """The ``vllm_importance_sampling_ratio`` TRL multiplies into the policy term."""
    diff = (old - sampling) * mask
    log_ratio = diff.sum(-1, keepdim=True) if mode.startswith("sequence") else diff
    ratio = torch.exp(log_ratio)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def trl_off_policy_mask(advantages, per_token_logps, sampling, mask, threshold):
    kl = sampling - per_token_logps.detach()
    mean = (kl * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean <= threshold)).to(mask.dtype)


def trl_high_entropy_mask(entropies, mask, threshold):
    kept = entropies[mask.bool()]
    if kept.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    level = torch.quantile(kept, threshold)
    return ((entropies * mask) >= level) & mask.bool()


def trl_compute_loss(
    per_token_logps,
    old,
    ref,
    advantages,
    mask,
    *,
    loss_type="grpo",
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    delta=None,
    importance_sampling_level="token",
    sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05,
    use_bias_correction_kl=False,
    importance_sampling_ratio=None,
    off_policy_mask_threshold=None,
    sampling_logps=None,
    entropies=None,
    top_entropy_quantile=1.0,
    num_items_in_batch=None,
):
    """``GRPOTrainer._compute_loss`` for one process and one accumulation step."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    entropy_mask = None
    if top_entropy_quantile < 1.0:
        entropy_mask = trl_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)
    if off_policy_mask_threshold is not None:
        sampling = old if sampling_logps is None else sampling_logps
        off_policy_mask = trl_off_policy_mask(
            advantages, per_token_logps, sampling, mask, off_policy_mask_threshold
        )
    log_ratio = per_token_logps - old
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)
    if beta != 0.0:
        d = ref - per_token_logps
        per_token_kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped * advantages * per_token_logps
    elif loss_type == "sapo":
        pos, neg = (
            torch.tensor(v, dtype=advantages.dtype)
            for v in (sapo_temperature_pos, sapo_temperature_neg)
        )
        temperatures = torch.where(advantages > 0, pos, neg)  # in float64 (scalars: float32)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ("grpo", "sapo"):
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * MAX_LEN)
    assert loss_type in ("cispo", "dapo")
    return (per_token_loss * mask).sum() / max(num_items_in_batch, 1.0)


# ----------------------------------------------------------------------------- verl, in torch


def verl_dual_clip_losses(old, log_prob, advantages, clip_low, clip_high, clip_ratio_c):
    """``compute_policy_loss_vanilla``'s per-token ``pg_losses`` (before aggregation)."""
    negative_approx_kl = torch.clamp(log_prob - old, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped1 = torch.maximum(losses1, losses2)
    clipped2 = torch.min(-advantages * clip_ratio_c, clipped1)
    return torch.where(advantages < 0, clipped2, clipped1)


def verl_gspo_token_losses(old, log_prob, advantages, mask, clip_low, clip_high):
    """``compute_policy_loss_gspo``'s per-token ``pg_losses``."""
    lengths = mask.sum(-1).clamp(min=1)
    seq = ((log_prob - old) * mask).sum(-1) / lengths
    log_ratio = log_prob - log_prob.detach() + seq.detach().unsqueeze(-1)
    ratio = torch.exp(torch.clamp(log_ratio, max=10.0))
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.maximum(losses1, losses2)


def verl_kl_penalty(logprob, ref_logprob, kind):
    """``kl_penalty`` for k1/k3 and their straight-through ``+`` forms."""
    if kind.startswith("k1"):
        forward = logprob - ref_logprob
    else:
        kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        forward = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if not kind.endswith("+"):
        return forward
    backward = 0.5 * (logprob - ref_logprob).square()
    return backward - backward.detach() + forward.detach()


# ----------------------------------------------------------------------------- helpers


def batch(seed, spread=0.3):
    rng = np.random.default_rng(seed)
    lp = np.log(rng.uniform(0.05, 0.95, size=(B, T)))
    old = lp + spread * rng.normal(size=(B, T))
    ref = lp + spread * rng.normal(size=(B, T))
    sampling = old + 0.25 * rng.normal(size=(B, T))
    rewards = rng.normal(size=B)
    adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
    mask = np.arange(T)[None] < np.array([T, 2, 5, 1, 4])[:, None]
    entropy = rng.uniform(0.0, 3.0, size=(B, T))
    return lp, old, ref, sampling, adv, mask, entropy


def torch_value_and_grad(f, x):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    value = f(xt)
    (grad,) = torch.autograd.grad(value.sum(), xt)
    return value.detach().numpy(), grad.numpy()


def t(x):
    return torch.tensor(np.asarray(x, np.float64))


# ----------------------------------------------------------------------------- TRL parity

# (TRL's options, jaxce's aggregation and options that differ from the defaults)
TRL_CASES = {
    "grpo": ({"loss_type": "grpo"}, "sequence_mean", {}),
    "bnpo-kl": ({"loss_type": "bnpo", "beta": 0.04}, "token_mean", {}),
    "dr_grpo": ({"loss_type": "dr_grpo", "beta": 0.04}, "sequence_sum", {}),
    "dapo-clip-higher": ({"loss_type": "dapo", "epsilon_high": 0.28}, "dapo", {}),
    "cispo": (
        {"loss_type": "cispo", "epsilon_high": 5.0},
        "dapo",
        {"loss_type": "cispo", "clip_epsilon_high": 4.0},
    ),
    "sapo": (
        {"loss_type": "sapo", "sapo_temperature_pos": 0.9, "sapo_temperature_neg": 1.3},
        "sequence_mean",
        {"loss_type": "sapo", "sapo_temperatures": (0.9, 1.3)},
    ),
    "delta": ({"loss_type": "grpo", "delta": 1.25}, "sequence_mean", {"ratio_cap": 1.25}),
    "gspo-bias-corrected-kl": (
        {
            "loss_type": "grpo",
            "importance_sampling_level": "sequence",
            "beta": 0.05,
            "use_bias_correction_kl": True,
            "epsilon_low": 0.05,
            "epsilon_high": 0.05,
        },
        "sequence_mean",
        {"importance_sampling": "sequence", "kl_importance_weighted": True},
    ),
    "token-kl-bias-corrected": (
        {"loss_type": "bnpo", "beta": 0.05, "use_bias_correction_kl": True},
        "token_mean",
        {"kl_importance_weighted": True},
    ),
}

IS_MODES = [
    ("token_truncate", None, 2.0),
    ("token_mask", 0.5, 1.5),
    ("sequence_truncate", 0.2, 3.0),
    ("sequence_mask", None, 3.0),  # TRL's default
]


def jaxce_loss(lp, old, ref, adv, mask, aggregation, options, token_weights=None):
    trl, agg, ours = options
    kw = {
        "clip_epsilon": trl.get("epsilon_low", 0.2),
        "clip_epsilon_high": trl.get("epsilon_high", 0.2),
        "ref_log_probs": ref,
        "kl_coef": trl.get("beta", 0.0),
        **ours,
    }
    if ours.get("loss_type") == "cispo":
        kw["clip_epsilon_high"] = ours["clip_epsilon_high"]
    if agg == "dapo":
        return jaxce.weighted_mean(
            *jaxce.policy_gradient_loss(
                lp, old, adv, mask, token_weights=token_weights, return_sum_and_weight=True, **kw
            )
        )
    return jaxce.policy_gradient_loss(
        lp, old, adv, mask, aggregation=agg, max_length=MAX_LEN, token_weights=token_weights, **kw
    )


def assert_matches_trl(case, lp, old, ref, adv, mask, trl_extra, token_weights):
    trl, _, _ = case
    num_items = float(mask.sum())

    def theirs(x):
        return trl_compute_loss(
            x, t(old), t(ref), t(adv), t(mask), num_items_in_batch=num_items, **trl, **trl_extra
        )

    want, want_grad = torch_value_and_grad(theirs, lp)
    with jax.enable_x64(True):
        f = lambda x: jaxce_loss(x, old, ref, adv, mask, None, case, token_weights)
        got, got_grad = jax.value_and_grad(f)(jnp.asarray(lp))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("name", list(TRL_CASES))
def test_loss_types_match_trl(name):
    lp, old, ref, _, adv, mask, _ = batch(1)
    case = TRL_CASES[name]
    assert_matches_trl(case, lp, old, ref, adv, mask, {}, None)
    if name == "delta":  # the cap is active somewhere: its tokens have a zero gradient
        r = np.exp(lp - old)
        assert np.any(mask & (r > 1.25) & (adv[:, None] < 0))


@pytest.mark.parametrize(("mode", "clip_min", "clip_max"), IS_MODES)
def test_vllm_importance_sampling_matches_trl(mode, clip_min, clip_max):
    lp, old, ref, sampling, adv, mask, _ = batch(2)
    sampling = old + 2.5 * (sampling - old)  # a mismatch that the bounds act on
    sampling[1] -= 0.8  # sequence 1 (2 tokens): above every upper bound
    ratio = trl_vllm_importance_ratio(t(old), t(sampling), t(mask), mode, clip_min, clip_max)
    level, kind = mode.split("_")
    with jax.enable_x64(True):
        weights = jaxce.rollout_importance_weights(
            old, sampling, mask, level=level, mode=kind, bounds=(clip_min, clip_max)
        )
    want = np.broadcast_to(ratio.numpy(), (B, T)) * mask
    np.testing.assert_allclose(weights, want, rtol=1e-13, atol=0)
    if kind == "mask":
        assert np.any(np.asarray(weights)[mask] == 0) and np.any(np.asarray(weights)[mask] > 0)
    extra = {"importance_sampling_ratio": ratio}
    assert_matches_trl(TRL_CASES["bnpo-kl"], lp, old, ref, adv, mask, extra, weights)


def test_off_policy_mask_and_top_entropy_match_trl():
    lp, old, ref, sampling, adv, mask, entropy = batch(3)
    sampling = sampling + np.where(np.arange(B) % 2, 0.3, -0.3)[:, None]  # both sides of 0.1
    with jax.enable_x64(True):
        opm = jaxce.off_policy_sequence_mask(lp, sampling, adv, mask, threshold=0.1)
    want = trl_off_policy_mask(t(adv)[:, None], t(lp), t(sampling), t(mask), 0.1).numpy()
    np.testing.assert_array_equal(opm, (want * mask).astype(bool))
    assert np.any(~np.asarray(opm)[mask]) and np.any(np.asarray(opm)[mask])
    for quantile in (0.2, 0.5, 1.0, 0.0):
        got = jaxce.top_entropy_mask(entropy, mask, fraction=quantile)
        want = trl_high_entropy_mask(t(entropy), t(mask), 1 - quantile).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"fraction={quantile}")
    extra = {
        "off_policy_mask_threshold": 0.1,
        "sampling_logps": t(sampling),
        "entropies": t(entropy),
        "top_entropy_quantile": 0.4,
    }
    weights = opm & jaxce.top_entropy_mask(entropy, mask, fraction=0.4)
    for name in ("grpo", "cispo"):
        assert_matches_trl(TRL_CASES[name], lp, old, ref, adv, mask, extra, weights)


# ----------------------------------------------------------------------------- verl parity


def test_dual_clip_matches_verl_including_log_ratio_100():
    lp, old, _, _, adv, mask, _ = batch(4, spread=0.8)
    old[0, 0], old[1, 1] = lp[0, 0] - 100.0, lp[1, 1] + 100.0  # stale tokens, both signs
    adv_tok = np.broadcast_to(adv[:, None], (B, T)).copy()
    adv_tok[0, 0], adv_tok[1, 1] = -1.0, 1.5
    old[2, 1], adv_tok[2, 1] = lp[2, 1] - 1.5, -0.7  # r = 4.5 > c = 3: the dual clip acts

    def theirs(x):
        return verl_dual_clip_losses(t(old), x, t(adv_tok), 0.2, 0.28, 3.0) * t(mask)

    want, want_grad = torch_value_and_grad(theirs, lp)
    with jax.enable_x64(True):
        f = lambda x: jaxce.policy_gradient_loss(
            x, old, adv_tok, mask, clip_epsilon_high=0.28, dual_clip=3.0, aggregation="none"
        )
        got, vjp = jax.vjp(f, jnp.asarray(lp))
        (got_grad,) = vjp(jnp.ones_like(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(got[0, 0], 3.0)  # the dual clip: -c A
    assert got_grad[0, 0] == 0.0 and got_grad[1, 1] == 0.0
    assert got[2, 1] == -3.0 * adv_tok[2, 1] and got_grad[2, 1] == 0.0


def test_gspo_token_matches_verl():
    lp, old, _, _, adv, mask, _ = batch(5, spread=0.05)

    def theirs(x):
        return verl_gspo_token_losses(t(old), x, t(adv)[:, None], t(mask), 3e-4, 4e-4) * t(mask)

    want, want_grad = torch_value_and_grad(theirs, lp)
    with jax.enable_x64(True):
        f = lambda x: jaxce.policy_gradient_loss(
            x, old, adv, mask, clip_epsilon=3e-4, clip_epsilon_high=4e-4,
            importance_sampling="sequence_token", aggregation="none",
        )  # fmt: skip
        got, vjp = jax.vjp(f, jnp.asarray(lp))
        (got_grad,) = vjp(jnp.ones_like(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    assert np.any(got_grad[mask] == 0) and np.any(got_grad[mask] != 0)  # clipped and not


@pytest.mark.parametrize("kind", ["k1+", "k3+", "k3"])
def test_kl_estimators_match_verl(kind):
    lp, _, ref, _, _, _, _ = batch(6, spread=0.7)
    ref[0, :2] = lp[0, :2] + np.array([2.0, -3.0])
    assert np.all(np.expm1(ref - lp) - (ref - lp) < 10)  # below verl's clamp of k3's value
    want, want_grad = torch_value_and_grad(lambda x: verl_kl_penalty(x, t(ref), kind), lp)
    with jax.enable_x64(True):
        f = lambda x: jaxce.sampled_kl_divergence(x, ref, estimator=kind)
        got, vjp = jax.vjp(f, jnp.asarray(lp))
        (got_grad,) = vjp(jnp.ones_like(got))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15)
        # the same estimator as policy_gradient_loss's KL term (zero advantages)
        pg = jax.grad(
            lambda x: jaxce.policy_gradient_loss(
                x, x, np.zeros(B), ref_log_probs=ref, kl_coef=1.0, kl_estimator=kind,
                aggregation="sum_and_weight",
            )[0]
        )(jnp.asarray(lp))  # fmt: skip
    np.testing.assert_allclose(pg, want_grad, rtol=1e-12, atol=1e-15)

"""Tests for ``examples/grpo_tiny_lm.py``: its pieces, and short GRPO and DPO runs."""

import json
import math
import re

import numpy as np
import pytest
from helpers import load_example as load_helper_example

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("optax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# A model and run small enough for seconds (most of it compilation); at this learning rate the
# reward still rises step after step (0.02 -> 0.23 in 8 steps for seed 0).
SMALL = (
    "--pretrain-steps 20 --steps 8 --batch-size 4 --group-size 8 --prompt-len 8 "
    "--completion-len 12 --dim 16 --layers 1 --lr 1e-2 --no-progress"
)
SUMMARY = re.compile(
    r"(?P<name>\w+): backend=\w+ steps=(?P<steps>\d+) "
    r"reward (?P<start>\d\.\d{3}) -> (?P<end>\d\.\d{3}) "
    r"kl (?P<kl0>\d+\.\d{4}) -> (?P<kl1>\d+\.\d{4}) "
    r"entropy (?P<h0>\d\.\d{3}) -> (?P<h1>\d\.\d{3}) "
    r"\(\d+x\d+ completions/step, target '.'\) time=\d+\.\ds"
)


def load_example():
    return load_helper_example("grpo_tiny_lm")


def test_group_advantages_are_normalised_within_each_group():
    example = load_example()
    rewards = jnp.array([0.0, 0.5, 1.0, 0.5, 0.25, 0.25, 0.25, 0.25])
    advantages = np.asarray(example.group_advantages(rewards, 4)).reshape(2, 4)
    first = np.array([0.0, 0.5, 1.0, 0.5])
    np.testing.assert_allclose(
        advantages[0], (first - first.mean()) / (first.std() + 1e-4), rtol=1e-6
    )
    np.testing.assert_array_equal(advantages[1], 0.0)  # equal rewards: nothing to learn


def test_reward_is_the_fraction_of_the_target_character():
    example = load_example()
    completions = jnp.array([[3, 3, 1, 3], [0, 1, 2, 4]])
    np.testing.assert_allclose(example.rewards_for(completions, 3), [0.75, 0.0])


def test_only_the_completion_is_scored():
    example = load_example()
    tokens = jnp.arange(10).reshape(1, 10) + 5
    labels = np.asarray(example.completion_labels(tokens, 4))
    np.testing.assert_array_equal(labels[0, :3], example.IGNORE)  # labels of prompt characters
    np.testing.assert_array_equal(labels[0, 3:], np.arange(9, 15))  # the 6 sampled characters


@pytest.mark.slow  # compiles the sampler and the fused log-probs: seconds on a loaded CPU
def test_sampling_keeps_the_prompt_and_the_log_probs_are_those_of_the_sampler():
    example = load_example()
    model = example.CharLM(12, 10, 8, 1, rngs=nnx.Rngs(0))
    prompts = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    key = jax.random.key(0)
    tokens, rollout_lp = example.sample_completions(model, prompts, key, 0.7, completion_len=6)
    assert tokens.shape == (2, 10) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens[:, :4], prompts)
    assert np.all((np.asarray(tokens) >= 0) & (np.asarray(tokens) < 12))
    again, _ = example.sample_completions(model, prompts, key, 0.7, completion_len=6)
    np.testing.assert_array_equal(tokens, again)  # the key decides the sample
    labels = example.completion_labels(tokens, 4)
    log_probs, entropy = example.token_log_probs(model, tokens, labels, 0.7)
    # The same numbers from materialised logits at the sampling temperature.
    logits = np.asarray(model(tokens[:, :-1]) @ model.kernel(), np.float64) / 0.7
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    kept = np.asarray(labels) != example.IGNORE
    want = np.take_along_axis(log_softmax, np.where(kept, labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(log_probs, np.where(kept, want, 0.0), atol=1e-5)
    want_entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)
    np.testing.assert_allclose(entropy, np.where(kept, want_entropy, 0.0), atol=1e-5)
    # Without engine noise the sampler reports the trainer's log-probabilities; with it, they
    # differ (the mismatch that the rollout importance weights correct).
    np.testing.assert_allclose(rollout_lp, np.where(kept, want, 0.0), atol=1e-5)
    _, noisy = example.sample_completions(model, prompts, key, 0.7, 6, 0.3)
    gap = np.abs(np.asarray(noisy) - np.asarray(rollout_lp))[kept]
    assert gap.max() > 1e-3 and np.all(np.asarray(noisy)[~kept] == 0)


def test_dpo_pairs_take_each_groups_best_and_worst():
    example = load_example()
    rewards = jnp.array([0.1, 0.4, 0.2, 0.3, 0.3, 0.3])
    best, worst, differ = example.preference_pairs(rewards, 3)
    np.testing.assert_array_equal(best, [1, 3])
    np.testing.assert_array_equal(differ, [True, False])
    np.testing.assert_array_equal(worst[:1], [0])


def run(tmp_path, capsys, options: str) -> tuple[dict, re.Match]:
    metrics = load_example().main([*options.split(), "--out", str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = SUMMARY.fullmatch(line)
    assert match, line
    name = f"{metrics['method']}_tiny_lm"
    assert match["name"] == name and int(match["steps"]) == metrics["steps"]
    assert float(match["start"]) == pytest.approx(metrics["first_reward"], abs=5e-4)
    assert float(match["end"]) == pytest.approx(metrics["last_reward"], abs=5e-4)
    history = metrics["history"]
    assert all(len(values) == metrics["steps"] for values in history.values())
    assert all(0.0 <= r <= 1.0 for r in history["reward"])
    assert all(math.isfinite(v) for v in history["loss"] + history["kl"])
    assert all(kl >= 0.0 for kl in history["kl"])  # k3 is never negative
    assert history["kl"][0] == pytest.approx(0.0, abs=1e-6)  # the first batch: policy = reference
    assert all(0.0 < h <= math.log(metrics["vocab_size"]) for h in history["entropy"])
    png = tmp_path / f"{name}.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["history"]["reward"] == pytest.approx(history["reward"])
    return metrics, match


@pytest.mark.slow
def test_grpo_smoke(tmp_path, capsys):
    metrics, _ = run(tmp_path, capsys, SMALL)
    assert metrics["pretrain_last_loss"] < metrics["pretrain_first_loss"]
    assert metrics["completions_per_step"] == 32
    rewards = metrics["history"]["reward"]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.05, rewards  # GRPO raised it
    # the engine-mismatch correction is at work: it keeps most completions, not all
    assert metrics["engine_noise"] > 0 and 0.5 < metrics["rollout_kept_mean"] <= 1.0


@pytest.mark.slow
def test_dpo_smoke(tmp_path, capsys):
    # Pre-training is the same code as in the GRPO run: left out here to save its compilation.
    metrics, _ = run(tmp_path, capsys, SMALL + " --method dpo --steps 2 --pretrain-steps 0")
    assert metrics["pretrain_first_loss"] is None
    assert metrics["method"] == "dpo"
    # The first update is at the reference: DPO's sigmoid loss is log 2 there.
    assert metrics["history"]["loss"][0] == pytest.approx(math.log(2), abs=1e-5)

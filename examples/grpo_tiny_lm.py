"""Fine-tuning a tiny character LM with GRPO (or online DPO) on fused per-token log-probabilities.

The corpus is the source code of a few modules of Python's own standard library, read from
the running interpreter (no download). A two-layer causal transformer in Flax NNX with a
``Linear`` output head is pre-trained briefly on next-character prediction
(``jaxce.linear_softmax_cross_entropy``). A frozen copy of it becomes the reference policy, and
the model is then fine-tuned with GRPO against a simple verifiable reward: the fraction of the
characters of a sampled completion that are ``--target`` (``e`` by default), a number in
``[0, 1]`` that can be checked without any learned judge.

Each GRPO step takes ``--batch-size`` prompts (windows of the corpus), samples a group of
``--group-size`` completions of each from the current policy, scores them, and turns the
scores into group-normalised advantages ``(r - mean(group)) / (std(group) + 1e-4)``. The
per-token log-probabilities of the sampled characters under the sampling policy (old), the
current policy and the reference, and the policy's entropy, all come from

    jaxce.linear_log_probs(hidden, kernel, labels, temperature=T, return_entropy=True)

on the final hidden states and the ``(D, V)`` output kernel, without materialising the
``(tokens, V)`` logits (here the vocabulary has ~100 characters; the same call scales to
256k-token vocabularies). The loss is

    jaxce.policy_gradient_loss(log_probs, old_log_probs, advantages, completion_mask,
                               ref_log_probs=ref_log_probs, kl_coef=beta, kl_estimator="k3",
                               aggregation="sequence_mean")

the clipped surrogate of PPO with GRPO's per-sequence token mean and Schulman's ``k3``
estimate of ``KL(policy || reference)`` as a penalty, taken ``--updates-per-batch`` times on
each batch of samples (so that the importance ratio and its clipping are at work), with the
safe defaults (log-ratios clamped at +-20 before ``exp``) and a dual clip at 3.

The sampler plays an inference engine whose numerics differ from the trainer's: it draws
from a perturbed copy of the output kernel (``--engine-noise``, relative to the kernel's
spread) and reports its own log-probabilities of what it drew. The trainer corrects the
mismatch as TRL does by default, with

    jaxce.rollout_importance_weights(old_log_probs, rollout_log_probs, completion_mask)

(the sequence's ratio of the trainer's and the engine's probabilities, masked above 3),
passed as ``token_weights``: they scale the policy term only. The
sampling temperature is passed to ``linear_log_probs`` too: the log-probabilities must be those
of the distribution the characters were drawn from.

With ``--method dpo`` the same model is fine-tuned online with DPO instead: of each group, the
completion with the highest reward is preferred over the one with the lowest (groups without a
difference are left out), with sequence log-probabilities from ``jaxce.sequence_reduce`` and
``jaxce.dpo_loss`` against the same frozen reference.

    python examples/grpo_tiny_lm.py
    python examples/grpo_tiny_lm.py --steps 40 --target _ --out /tmp/grpo
    python examples/grpo_tiny_lm.py --method dpo

Prints the pre-training loss, a completion before and after fine-tuning, and, last, the mean
reward of the first and the last fine-tuning step (``reward START -> END``) with the KL to the
reference and the entropy beside them. Writes ``grpo_tiny_lm.png`` (pre-training loss, then
reward, KL and entropy per fine-tuning step) and ``grpo_tiny_lm.json`` into ``--out``
(``dpo_tiny_lm.*`` with ``--method dpo``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _training_support import (
    ALPHABET,
    CharLM,
    ScriptRun,
    command_line,
    count_params,
    encode_chars,
    figure,
    load_stdlib_source,
    random_windows,
)
from flax import nnx

import jaxce

MODULES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py")
IGNORE = -1  # label of the prompt's positions: only the completion is scored


def load_corpus() -> str:
    """Source of ``MODULES`` from the running interpreter's standard library."""
    return load_stdlib_source(MODULES)


# --- pre-training ------------------------------------------------------------------------


def pretrain_loss(model: CharLM, inputs, labels):
    return jaxce.linear_softmax_cross_entropy(
        model(inputs), model.kernel(), labels, reduction="mean"
    )


@nnx.jit
def pretrain_step(model, optimizer, inputs, labels):
    loss, grads = nnx.value_and_grad(pretrain_loss)(model, inputs, labels)
    optimizer.update(model, grads)
    return loss


# --- sampling, reward, advantages --------------------------------------------------------


@nnx.jit(static_argnames="completion_len")
def sample_completions(
    model: CharLM, prompts, key, temperature, completion_len: int, engine_noise=0.0
):
    """``(B, P + completion_len)`` tokens, each prompt followed by characters drawn one at a
    time (a full forward pass per character: no KV cache, which a model this small does not
    need), and the sampler's log-probabilities of them ``(B, P + completion_len - 1)`` (0 on
    the prompt), as an inference engine reports them.

    The "engine" samples from ``softmax(hidden @ kernel' / temperature)`` with a perturbed copy
    of the output kernel, ``kernel' = kernel + engine_noise * std(kernel) * N(0, 1)``: the
    mismatch between an inference engine's numerics (kernels, precision, quantisation) and
    the trainer's, which the rollout importance weights correct (``engine_noise=0``: none).
    """
    batch, prompt_len = prompts.shape
    tokens = jnp.zeros((batch, prompt_len + completion_len), jnp.int32)
    tokens = tokens.at[:, :prompt_len].set(prompts)
    key, engine_key = jax.random.split(key)
    kernel = model.kernel()
    noise = jax.random.normal(engine_key, kernel.shape, kernel.dtype) * jnp.std(kernel)
    engine_kernel = kernel + engine_noise * noise
    rollout_log_probs = jnp.zeros((batch, prompt_len + completion_len - 1), jnp.float32)

    def draw(position, carry):  # the character at position + 1
        tokens, rollout_log_probs, key = carry
        hidden = model(tokens[:, :-1])  # (B, T - 1, D); causal: later positions do not matter
        last = jax.lax.dynamic_index_in_dim(hidden, position, axis=1, keepdims=False)  # (B, D)
        key, subkey = jax.random.split(key)
        logits = (last @ engine_kernel) / temperature
        drawn = jax.random.categorical(subkey, logits)  # (B,)
        drawn_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), drawn[:, None], -1)
        tokens = jax.lax.dynamic_update_slice_in_dim(
            tokens, drawn[:, None].astype(jnp.int32), position + 1, axis=1
        )
        rollout_log_probs = jax.lax.dynamic_update_slice_in_dim(
            rollout_log_probs, drawn_log_prob.astype(jnp.float32), position, axis=1
        )
        return tokens, rollout_log_probs, key

    start, stop = prompt_len - 1, prompt_len + completion_len - 1
    tokens, rollout_log_probs, _ = jax.lax.fori_loop(
        start, stop, draw, (tokens, rollout_log_probs, key)
    )
    return tokens, rollout_log_probs


def completion_labels(tokens, prompt_len: int):
    """Next-character labels of ``tokens[:, :-1]``: the completion's characters, ``IGNORE`` on
    the prompt (the model is not scored on the text it was given)."""
    labels = tokens[:, 1:]
    on_completion = jnp.arange(labels.shape[-1]) >= prompt_len - 1
    return jnp.where(on_completion, labels, IGNORE)


def rewards_for(completions, target: int):
    """The verifiable reward: the fraction of the completion's characters equal to ``target``."""
    return jnp.mean(completions == target, axis=-1, dtype=jnp.float32)


def group_advantages(rewards, group_size: int):
    """GRPO's advantages: each reward minus its group's mean, over the group's standard deviation.

    ``rewards`` holds the groups one after the other; a group whose rewards are all equal gets
    advantages of zero (nothing to learn from it).
    """
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(axis=-1, keepdims=True)
    std = groups.std(axis=-1, keepdims=True)
    return ((groups - mean) / (std + 1e-4)).reshape(rewards.shape)


def token_log_probs(model: CharLM, tokens, labels, temperature):
    """Per-token log-probabilities of ``labels`` and the entropy of the next-character
    distribution, ``(B, T - 1)`` each, ``0`` where the label is ``IGNORE``."""
    return jaxce.linear_log_probs(
        model(tokens[:, :-1]),  # (B, T - 1, D)
        model.kernel(),  # (D, V): no (B * T, V) logits are materialised
        labels,
        temperature=temperature,
        ignore_index=IGNORE,
        return_entropy=True,
    )


@nnx.jit(static_argnames=("prompt_len", "completion_len", "group_size", "target"))
def rollout(
    model,
    reference,
    prompts,
    key,
    temperature,
    engine_noise,
    *,
    prompt_len,
    completion_len,
    group_size,
    target,
):
    """Samples ``group_size`` completions of each prompt and scores them.

    Returns the tokens, the labels, the rewards and advantages ``(B * group_size,)``, the
    log-probabilities of the sampled characters under the sampling policy as the trainer
    computes them (old) and under the frozen reference, and the rollout importance weights
    that correct the engine's mismatch (TRL's default: a sequence-level ratio of the
    trainer's and the engine's probabilities, masked where it exceeds 3).
    """
    prompts = jnp.repeat(prompts, group_size, axis=0)  # the groups one after the other
    tokens, rollout_log_probs = sample_completions(
        model, prompts, key, temperature, completion_len, engine_noise
    )
    labels = completion_labels(tokens, prompt_len)
    rewards = rewards_for(tokens[:, prompt_len:], target)
    advantages = group_advantages(rewards, group_size)
    old_log_probs, _ = token_log_probs(model, tokens, labels, temperature)
    ref_log_probs, _ = token_log_probs(reference, tokens, labels, temperature)
    weights = jaxce.rollout_importance_weights(
        old_log_probs, rollout_log_probs, labels != IGNORE, level="sequence", mode="mask",
        bounds=(None, 3.0),
    )  # fmt: skip
    return tokens, labels, rewards, advantages, old_log_probs, ref_log_probs, weights


# --- GRPO --------------------------------------------------------------------------------


def masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def grpo_loss(model, batch, temperature, kl_coef, clip_epsilon):
    tokens, labels, _, advantages, old_log_probs, ref_log_probs, rollout_weights = batch
    log_probs, entropy = token_log_probs(model, tokens, labels, temperature)
    on_completion = labels != IGNORE
    loss = jaxce.policy_gradient_loss(
        log_probs,  # (B, T - 1), differentiated
        old_log_probs,  # the sampling policy's: a constant
        advantages,  # (B,): one per completion
        on_completion,
        clip_epsilon=clip_epsilon,
        dual_clip=3.0,  # bounds what a stale negative sample can do (verl's clip_ratio_c)
        token_weights=rollout_weights,  # the engine-mismatch correction, policy term only
        ref_log_probs=ref_log_probs,
        kl_coef=kl_coef,
        kl_estimator="k3",
        aggregation="sequence_mean",  # GRPO: each completion's token mean, then their mean
    )  # log-ratios are clamped at +-20 before exp (max_log_ratio, the default): always finite
    kl = jaxce.sampled_kl_divergence(log_probs, ref_log_probs, estimator="k3")
    return loss, {
        "kl": masked_mean(kl, on_completion),
        "entropy": masked_mean(entropy, on_completion),
    }


@nnx.jit(static_argnames="clip_epsilon")  # static: None (no clipping) is a different loss
def grpo_update(model, optimizer, batch, temperature, kl_coef, clip_epsilon):
    grad_fn = nnx.value_and_grad(grpo_loss, has_aux=True)
    (loss, aux), grads = grad_fn(model, batch, temperature, kl_coef, clip_epsilon)
    optimizer.update(model, grads)
    return loss, aux


# --- online DPO --------------------------------------------------------------------------


def preference_pairs(rewards, group_size: int):
    """Indices of each group's best and worst completion, and whether their rewards differ."""
    groups = rewards.reshape(-1, group_size)
    offsets = jnp.arange(groups.shape[0]) * group_size
    best = jnp.argmax(groups, axis=-1) + offsets
    worst = jnp.argmin(groups, axis=-1) + offsets
    return best, worst, groups.max(axis=-1) > groups.min(axis=-1)


def online_dpo_loss(model, batch, temperature, beta, group_size):
    tokens, labels, rewards, _, _, ref_log_probs, _ = batch
    log_probs, entropy = token_log_probs(model, tokens, labels, temperature)
    on_completion = labels != IGNORE
    sums = jaxce.sequence_reduce(log_probs, on_completion)  # (B,): log-prob of each completion
    ref_sums = jaxce.sequence_reduce(ref_log_probs, on_completion)
    chosen, rejected, differ = preference_pairs(rewards, group_size)
    per_pair = jaxce.dpo_loss(
        sums[chosen], sums[rejected], ref_sums[chosen], ref_sums[rejected], beta=beta
    )
    loss = jnp.sum(jnp.where(differ, per_pair, 0.0)) / jnp.maximum(jnp.sum(differ), 1)
    kl = jaxce.sampled_kl_divergence(log_probs, ref_log_probs, estimator="k3")
    return loss, {
        "kl": masked_mean(kl, on_completion),
        "entropy": masked_mean(entropy, on_completion),
    }


@nnx.jit(static_argnames="group_size")
def dpo_update(model, optimizer, batch, temperature, beta, group_size: int):
    grad_fn = nnx.value_and_grad(online_dpo_loss, has_aux=True)
    (loss, aux), grads = grad_fn(model, batch, temperature, beta, group_size)
    optimizer.update(model, grads)
    return loss, aux


# --- the run -----------------------------------------------------------------------------


def decode(ids) -> str:
    return "".join(ALPHABET[i] for i in np.asarray(ids).tolist())


def save_figure(path, pretrain_losses, history, target: str, method: str) -> None:
    with figure(path, 1, 4, figsize=(13, 3)) as (_, axes):
        ax_pre, ax_reward, ax_kl, ax_entropy = axes
        ax_pre.plot(np.arange(1, len(pretrain_losses) + 1), pretrain_losses, color="C7")
        ax_pre.set(xlabel="pre-training step", ylabel="nats/char", title="pre-training loss")
        steps = np.arange(1, len(history["reward"]) + 1)
        panels = (
            (ax_reward, "reward", "C0", f"mean reward (fraction of {target!r})"),
            (ax_kl, "kl", "C3", "KL(policy || reference), k3, nats/char"),
            (ax_entropy, "entropy", "C2", "entropy (nats/char)"),
        )
        for ax, name, color, title in panels:
            values = np.asarray(history[name])
            ax.plot(steps, values, color=color, alpha=0.35)
            k = max(1, len(values) // 10)
            if len(values) >= k > 1:  # a moving average over a tenth of the run
                smooth = np.convolve(values, np.ones(k) / k, mode="valid")
                ax.plot(steps[k - 1 :], smooth, color=color)
            ax.set(xlabel=f"{method.upper()} step", title=title)


def pretrain(args, run, data, vocab: int, seq_len: int, rng) -> tuple[CharLM, list[float]]:
    """The character LM pre-trained on next-character prediction (``args.pretrain_steps``
    steps of ``args.pretrain_lr`` with warm-up and cosine decay), and its losses."""
    model = CharLM(vocab, seq_len, args.dim, args.layers, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.pretrain_lr, max(1, args.pretrain_steps // 10), max(args.pretrain_steps, 2)
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    pretrain_losses = []
    for _ in run.progress("pre-training", args.pretrain_steps):
        inputs, labels = random_windows(rng, data, 32, seq_len)
        pretrain_losses.append(float(pretrain_step(model, optimizer, inputs, labels)))
    if pretrain_losses:
        print(f"pre-training loss {pretrain_losses[0]:.3f} -> {pretrain_losses[-1]:.3f} nats/char")
    return model, pretrain_losses


def parse_args(argv=None):
    parser = command_line(__doc__, steps=60, batch_size=8, lr=3e-4)
    parser.add_argument(
        "--method",
        choices=("grpo", "dpo"),
        default="grpo",
        metavar="METHOD",
        help="the fine-tuning loss: grpo or dpo",
    )
    parser.add_argument("--pretrain-steps", type=int, default=400, help="pre-training steps")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="pre-training peak lr")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt characters")
    parser.add_argument("--completion-len", type=int, default=24, help="sampled characters")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--target", default="e", help="the character that the reward counts")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument(
        "--kl-coef", type=float, default=0.2, help="weight of the k3 KL penalty (GRPO)"
    )
    parser.add_argument("--clip-epsilon", type=float, default=0.2, help="PPO clip range (GRPO)")
    parser.add_argument(
        "--beta", type=float, default=1.0, help="DPO's beta (larger: nearer the reference)"
    )
    parser.add_argument(
        "--engine-noise",
        type=float,
        default=0.05,
        help="the sampler's kernel perturbation (inference-engine mismatch; 0: none)",
    )
    parser.add_argument(
        "--updates-per-batch", type=int, default=2, help="optimizer steps on each batch of samples"
    )
    args = parser.parse_args(argv)
    if len(args.target) != 1 or args.target not in ALPHABET:
        parser.error(f"--target must be one character of the alphabet, got {args.target!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = ScriptRun(f"{args.method}_tiny_lm", args)
    data, vocab = encode_chars(load_corpus())
    seq_len = args.prompt_len + args.completion_len
    rng = np.random.default_rng(args.seed)

    model, pretrain_losses = pretrain(args, run, data, vocab, seq_len, rng)

    reference = nnx.clone(model)  # frozen: never given to an optimizer
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    target = ALPHABET.index(args.target)
    shapes = dict(
        prompt_len=args.prompt_len,
        completion_len=args.completion_len,
        group_size=args.group_size,
        target=target,
    )
    key = jax.random.key(args.seed)
    # One prompt, shown with a completion before and after fine-tuning (in a batch of the
    # training shape, so that rollout is not compiled twice).
    shown, _ = random_windows(np.random.default_rng(args.seed + 1), data, 1, args.prompt_len)
    shown = np.repeat(shown, args.batch_size, axis=0)

    def show(title, key):
        tokens = rollout(
            model, reference, shown, key, args.temperature, args.engine_noise, **shapes
        )[0]
        prompt, completion = tokens[0, : args.prompt_len], tokens[0, args.prompt_len :]
        print(f"{title}: {decode(prompt)!r} + {decode(completion)!r}")

    show("before", jax.random.key(args.seed + 1))
    history = {"reward": [], "kl": [], "entropy": [], "loss": [], "rollout_kept": []}
    progress = run.progress(args.method.upper())
    for step in progress:
        prompts, _ = random_windows(rng, data, args.batch_size, args.prompt_len)
        key, sample_key = jax.random.split(key)
        batch = rollout(
            model, reference, prompts, sample_key, args.temperature, args.engine_noise, **shapes
        )
        losses, kls, entropies = [], [], []
        for _ in range(args.updates_per_batch):
            if args.method == "grpo":
                loss, aux = grpo_update(
                    model, optimizer, batch, args.temperature, args.kl_coef, args.clip_epsilon
                )
            else:
                loss, aux = dpo_update(
                    model, optimizer, batch, args.temperature, args.beta, args.group_size
                )
            losses.append(float(loss))
            kls.append(float(aux["kl"]))
            entropies.append(float(aux["entropy"]))
        # The loss, KL and entropy of the policy that drew this batch (before its updates).
        history["reward"].append(float(jnp.mean(batch[2])))
        history["kl"].append(kls[0])
        history["entropy"].append(entropies[0])
        history["loss"].append(losses[0])
        # The share of completions the rollout correction keeps (weight > 0).
        history["rollout_kept"].append(float(jnp.mean(jnp.any(batch[6] > 0, axis=-1))))
        if run.is_log_step(step):
            recent = slice(-args.log_every, None)
            progress.set_postfix(
                reward=f"{np.mean(history['reward'][recent]):.3f}",
                kl=f"{history['kl'][-1]:.4f}",
                entropy=f"{history['entropy'][-1]:.3f}",
            )
    progress.close()
    show("after ", jax.random.key(args.seed + 1))

    save_figure(run.figure_path, pretrain_losses, history, args.target, args.method)
    tail = max(1, args.steps // 10)
    metrics = {
        "method": args.method,
        "target": args.target,
        "pretrain_steps": args.pretrain_steps,
        "vocab_size": vocab,
        "params": count_params(model),
        "completions_per_step": args.batch_size * args.group_size,
        "pretrain_first_loss": pretrain_losses[0] if pretrain_losses else None,
        "pretrain_last_loss": pretrain_losses[-1] if pretrain_losses else None,
        "first_reward": history["reward"][0],
        "last_reward": history["reward"][-1],
        "last_reward_mean": float(np.mean(history["reward"][-tail:])),
        "first_kl": history["kl"][0],
        "last_kl": history["kl"][-1],
        "first_entropy": history["entropy"][0],
        "last_entropy": history["entropy"][-1],
        "first_loss": history["loss"][0],
        "last_loss": history["loss"][-1],
        "engine_noise": args.engine_noise,
        "rollout_kept_mean": float(np.mean(history["rollout_kept"])),
        "history": history,
    }
    return run.report(
        metrics,
        f"reward {metrics['first_reward']:.3f} -> {metrics['last_reward']:.3f} "
        f"kl {metrics['first_kl']:.4f} -> {metrics['last_kl']:.4f} "
        f"entropy {metrics['first_entropy']:.3f} -> {metrics['last_entropy']:.3f} "
        f"({args.batch_size}x{args.group_size} completions/step, target {args.target!r})",
    )


if __name__ == "__main__":
    main()

"""Offline DPO on a tiny character LM, from preference pairs it generates itself.

The tiny character LM of ``grpo_tiny_lm.py`` (a causal transformer in Flax NNX, pre-trained
briefly on the source of a few standard-library modules) samples, once, a group of
completions of each of ``--pairs`` prompts. The preference is a property that can be checked:
more ``--target`` characters (``e`` by default) is better. Of each group the completion with
the most is *chosen* and the one with the fewest *rejected* (groups without a difference are
dropped): an offline preference dataset, like a labelled one, with the frozen reference's
sequence log-probabilities computed once beforehand (TRL's ``precompute_ref_log_probs``).

The model is then trained on mini-batches of these pairs with

    sums = jaxce.sequence_reduce(jaxce.linear_log_probs(hidden, kernel, labels), mask)
    jaxce.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta,
                   loss_type=..., f_divergence=..., reduction="mean")

(per-token log-probabilities from the hidden states without materialising the logits; any of
``dpo_loss``'s types, ``--loss-type sigmoid,bco_pair --loss-weights 0.8,0.2`` for a weighted
list, ``--f-divergence`` for the score). It learns the preference measurably: the preference
accuracy on held-out pairs (the fraction whose implicit reward margin is positive, 0.5 at
the start, where policy and reference agree) rises, and so does the mean reward (fraction of
``--target``) of completions sampled from the policy.

    python examples/dpo_tiny_lm.py
    python examples/dpo_tiny_lm.py --steps 100 --loss-type ipo --beta 0.5
    python examples/dpo_tiny_lm.py --loss-type sigmoid,sppo_hard --loss-weights 1,0.1

Prints the pre-training loss, and last ``accuracy START -> END reward START -> END``; writes
``dpo_tiny_lm.png`` (DPO loss, held-out accuracy and margin per step) and ``dpo_tiny_lm.json``
into ``--out``.
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
    random_windows,
)
from flax import nnx
from grpo_tiny_lm import (
    IGNORE,
    completion_labels,
    load_corpus,
    pretrain,
    rewards_for,
    sample_completions,
)

import jaxce


def sequence_log_probs(model: CharLM, tokens, labels):
    """``(B,)`` log-probability of each completion: per-token log-probs (fused, no logits)
    summed over the completion's characters."""
    log_probs = jaxce.linear_log_probs(
        model(tokens[:, :-1]), model.kernel(), labels, ignore_index=IGNORE
    )
    return jaxce.sequence_reduce(log_probs, labels != IGNORE)


@nnx.jit(static_argnames=("prompt_len", "completion_len", "group_size", "target"))
def make_pairs(model, prompts, key, *, prompt_len, completion_len, group_size, target):
    """Preference pairs from ``group_size`` samples of each prompt: the tokens of the chosen
    (most ``target``) and rejected (fewest) completions, their rewards, and whether they differ."""
    repeated = jnp.repeat(prompts, group_size, axis=0)
    tokens, _ = sample_completions(model, repeated, key, 1.0, completion_len)
    rewards = rewards_for(tokens[:, prompt_len:], target).reshape(-1, group_size)
    offsets = jnp.arange(rewards.shape[0]) * group_size
    best = jnp.argmax(rewards, axis=-1) + offsets
    worst = jnp.argmin(rewards, axis=-1) + offsets
    differ = rewards.max(axis=-1) > rewards.min(axis=-1)
    return tokens[best], tokens[worst], rewards.max(axis=-1), rewards.min(axis=-1), differ


def dpo_objective(model, batch, options):
    chosen, rejected, ref_chosen, ref_rejected, prompt_len = batch
    pc = sequence_log_probs(model, chosen, completion_labels(chosen, prompt_len))
    pr = sequence_log_probs(model, rejected, completion_labels(rejected, prompt_len))
    loss = jaxce.dpo_loss(pc, pr, ref_chosen, ref_rejected, **options, reduction="mean")
    margin = (pc - ref_chosen) - (pr - ref_rejected)
    return loss, margin


def make_update(options):
    @nnx.jit(static_argnames="prompt_len")
    def update(model, optimizer, chosen, rejected, ref_chosen, ref_rejected, prompt_len):
        batch = (chosen, rejected, ref_chosen, ref_rejected, prompt_len)
        grad_fn = nnx.value_and_grad(dpo_objective, has_aux=True)
        (loss, _), grads = grad_fn(model, batch, options)
        optimizer.update(model, grads)
        return loss

    @nnx.jit(static_argnames="prompt_len")
    def margins(model, chosen, rejected, ref_chosen, ref_rejected, prompt_len):
        return dpo_objective(
            model, (chosen, rejected, ref_chosen, ref_rejected, prompt_len), options
        )[1]

    return update, margins


def save_figure(path, history) -> None:
    with figure(path, 1, 3, figsize=(11, 3)) as (_, axes):
        steps = np.arange(1, len(history["loss"]) + 1)
        axes[0].plot(steps, history["loss"], color="C0")
        axes[0].set(xlabel="DPO step", title="DPO loss (train batch)")
        axes[1].plot(history["eval_step"], history["accuracy"], color="C2", marker="o")
        axes[1].axhline(0.5, color="C7", lw=0.8)
        axes[1].set(xlabel="DPO step", title="held-out preference accuracy")
        axes[2].plot(history["eval_step"], history["margin"], color="C3", marker="o")
        axes[2].set(xlabel="DPO step", title="held-out mean log-ratio margin (nats)")


def parse_args(argv=None):
    parser = command_line(__doc__, steps=60, batch_size=16, lr=1e-3)
    parser.add_argument("--pretrain-steps", type=int, default=300, help="pre-training steps")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="pre-training peak lr")
    parser.add_argument("--pairs", type=int, default=256, help="prompts sampled for pairs")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt characters")
    parser.add_argument("--completion-len", type=int, default=24, help="sampled characters")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--target", default="e", help="the character the preference counts")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    parser.add_argument("--loss-type", default="sigmoid", help="a dpo_loss type, or a,b,...")
    parser.add_argument("--loss-weights", default=None, help="weights of a list: 0.8,0.2")
    parser.add_argument("--f-divergence", default="reverse_kl", help="dpo_loss's f_divergence")
    parser.add_argument("--eval-every", type=int, default=10, help="held-out evaluation period")
    args = parser.parse_args(argv)
    if len(args.target) != 1 or args.target not in ALPHABET:
        parser.error(f"--target must be one character of the alphabet, got {args.target!r}")
    return args


def dpo_options(args) -> dict:
    types = tuple(args.loss_type.split(","))
    options = {"beta": args.beta, "loss_type": types[0] if len(types) == 1 else types}
    if args.loss_weights is not None:
        options["loss_weights"] = tuple(float(w) for w in args.loss_weights.split(","))
    if args.f_divergence != "reverse_kl":
        options["f_divergence"] = args.f_divergence
    if "exo_pair" in types:
        options["label_smoothing"] = 1e-3  # EXO's recommended value; it needs one
    return options


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = ScriptRun("dpo_tiny_lm", args)
    options = dpo_options(args)
    update, margins = make_update(options)
    data, vocab = encode_chars(load_corpus())
    seq_len = args.prompt_len + args.completion_len
    rng = np.random.default_rng(args.seed)

    model, pretrain_losses = pretrain(args, run, data, vocab, seq_len, rng)
    reference = nnx.clone(model)  # frozen: never given to an optimizer

    # --- the offline dataset: pairs sampled once from the reference, and its log-probs
    shapes = dict(
        prompt_len=args.prompt_len,
        completion_len=args.completion_len,
        group_size=args.group_size,
        target=ALPHABET.index(args.target),
    )
    prompts, _ = random_windows(rng, data, args.pairs, args.prompt_len)
    chosen, rejected, r_best, r_worst, differ = (
        np.asarray(x) for x in make_pairs(reference, prompts, jax.random.key(args.seed), **shapes)
    )
    chosen, rejected = chosen[differ], rejected[differ]

    def ref_labels(t):
        return completion_labels(t, args.prompt_len)

    ref_chosen = np.asarray(sequence_log_probs(reference, chosen, ref_labels(chosen)))
    ref_rejected = np.asarray(sequence_log_probs(reference, rejected, ref_labels(rejected)))
    n = len(chosen)
    held = max(1, n // 5)  # the last fifth is held out
    order = rng.permutation(n)
    train, test = order[held:], order[:held]
    print(
        f"{n} pairs ({held} held out): chosen reward {r_best[differ].mean():.3f}, "
        f"rejected {r_worst[differ].mean():.3f}"
    )
    test_batch = (chosen[test], rejected[test], ref_chosen[test], ref_rejected[test])

    def evaluate():
        m = np.asarray(margins(model, *test_batch, args.prompt_len))
        return float(np.mean(m > 0) + 0.5 * np.mean(m == 0)), float(np.mean(m))  # ties: half

    def sampled_reward(key):
        shown, _ = random_windows(np.random.default_rng(args.seed + 1), data, 64, args.prompt_len)
        tokens, _ = sample_completions(model, jnp.asarray(shown), key, 1.0, args.completion_len)
        return float(jnp.mean(rewards_for(tokens[:, args.prompt_len :], shapes["target"])))

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    reward_before = sampled_reward(jax.random.key(args.seed + 2))
    history = {"loss": [], "eval_step": [0], "accuracy": [], "margin": []}
    accuracy, margin = evaluate()
    history["accuracy"].append(accuracy)
    history["margin"].append(margin)
    progress = run.progress("DPO")
    for step in progress:
        idx = rng.choice(train, size=min(args.batch_size, len(train)), replace=False)
        loss = update(
            model,
            optimizer,
            chosen[idx],
            rejected[idx],
            ref_chosen[idx],
            ref_rejected[idx],
            args.prompt_len,
        )
        history["loss"].append(float(loss))
        if step % args.eval_every == 0 or step == args.steps:
            accuracy, margin = evaluate()
            history["eval_step"].append(step)
            history["accuracy"].append(accuracy)
            history["margin"].append(margin)
            progress.set_postfix(loss=f"{float(loss):.4f}", accuracy=f"{accuracy:.3f}")
    progress.close()
    reward_after = sampled_reward(jax.random.key(args.seed + 2))
    save_figure(run.figure_path, history)
    metrics = {
        "options": {k: v for k, v in options.items()},
        "target": args.target,
        "params": count_params(model),
        "vocab_size": vocab,
        "pairs": n,
        "held_out": held,
        "pretrain_last_loss": pretrain_losses[-1] if pretrain_losses else None,
        "first_loss": history["loss"][0],
        "last_loss": history["loss"][-1],
        "first_accuracy": history["accuracy"][0],
        "last_accuracy": history["accuracy"][-1],
        "first_margin": history["margin"][0],
        "last_margin": history["margin"][-1],
        "reward_before": reward_before,
        "reward_after": reward_after,
        "history": history,
    }
    return run.report(
        metrics,
        f"accuracy {metrics['first_accuracy']:.3f} -> {metrics['last_accuracy']:.3f} "
        f"reward {reward_before:.3f} -> {reward_after:.3f} "
        f"({n} pairs, loss_type {args.loss_type}, target {args.target!r})",
    )


if __name__ == "__main__":
    main()

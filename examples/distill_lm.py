"""Distilling a tiny character LM into a smaller one with the fused distillation loss.

The corpus is the source code of a few modules of Python's own standard library, read from
the running interpreter (no download). A teacher (a two-layer causal transformer in Flax NNX
with a ``Linear`` output head) is trained briefly on next-character prediction with
``jaxce.linear_softmax_cross_entropy``. A smaller student (one layer, half the width, its own
head) is then trained only to match the teacher's softened next-character distribution with

    jaxce.linear_softmax_kl_divergence(student_hidden, student_kernel,
                                       teacher_hidden, teacher_kernel, temperature=T)

which is ``T**2 * KL(softmax(teacher_logits / T) || softmax(student_logits / T))`` computed from
the hidden states and the two ``(D, V)`` output kernels, without materialising either
``(tokens, vocab)`` logit array (here the vocabulary is only ~100 characters; the same call
scales to 256k-token vocabularies). The teacher is frozen (``jax.lax.stop_gradient``). For
comparison, the same student is also trained from the labels alone for the same number of
steps.

    python examples/distill_lm.py
    python examples/distill_lm.py --steps 300 --out /tmp/distill

Reports validation cross-entropy (nats per character, on held-out text) of the teacher, the
distilled student and the student trained on labels, and the distilled student's KL to the
teacher. Writes ``distill_lm.png`` (curves) and ``distill_lm.json`` into ``--out``.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from _training_support import (
    CharLM,
    ScriptRun,
    command_line,
    count_params,
    encode_chars,
    figure,
    load_stdlib_source,
    next_token_windows,
    random_windows,
)
from flax import nnx

import jaxce

MODULES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py")


def load_corpus() -> str:
    """Source of ``MODULES`` from the running interpreter's standard library."""
    return load_stdlib_source(MODULES)


def label_loss(model: CharLM, inputs, labels):
    return jaxce.linear_softmax_cross_entropy(
        model(inputs), model.kernel(), labels, reduction="mean"
    )


def distill_loss(student: CharLM, teacher: CharLM, inputs, temperature: float):
    # The frozen teacher: its hidden states and kernel are constants for the student's update.
    teacher_hidden = jax.lax.stop_gradient(teacher(inputs))  # (B, T, D_t)
    teacher_kernel = jax.lax.stop_gradient(teacher.kernel())  # (D_t, V)
    return jaxce.linear_softmax_kl_divergence(
        student(inputs),  # (B, T, D)
        student.kernel(),  # (D, V)
        teacher_hidden,
        teacher_kernel,
        temperature=temperature,
        reduction="mean",
    )


@nnx.jit
def label_step(model, optimizer, inputs, labels):
    loss, grads = nnx.value_and_grad(label_loss)(model, inputs, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit(static_argnames="temperature")
def distill_step(student, optimizer, teacher, inputs, temperature: float):
    loss, grads = nnx.value_and_grad(distill_loss)(student, teacher, inputs, temperature)
    optimizer.update(student, grads)
    return loss


@nnx.jit
def evaluate(model, teacher, inputs, labels):
    """Mean cross-entropy per character, and the mean KL(teacher || model) at T = 1."""
    hidden = model(inputs)
    ce = jaxce.linear_softmax_cross_entropy(hidden, model.kernel(), labels, reduction="mean")
    kl = jaxce.linear_softmax_kl_divergence(
        hidden, model.kernel(), teacher(inputs), teacher.kernel(), reduction="mean"
    )
    return ce, kl


def optimizer_for(model: CharLM, lr: float, steps: int) -> nnx.Optimizer:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), max(steps, 2))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def save_plot(path, curves: dict, evals: dict, eval_steps) -> None:
    with figure(path, figsize=(9, 3.2)) as (_, (ax_train, ax_val)):
        for i, (label, losses) in enumerate(curves.items()):
            k = max(1, len(losses) // 25)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax_train.plot(np.arange(k, len(losses) + 1), smooth, color=f"C{i}", label=label)
        ax_train.set(xlabel="step", ylabel="training loss (nats/char)", title="training")
        ax_train.legend(fontsize=8)
        for i, (label, values) in enumerate(evals.items()):
            style = "--" if label.startswith("teacher") else "-"
            ax_val.plot(
                eval_steps[: len(values)], values, style, marker=".", color=f"C{i}", label=label
            )
        ax_val.set(xlabel="student step", ylabel="cross-entropy (nats/char)", title="validation")
        ax_val.set_yscale("log")
        ax_val.legend(fontsize=8)


def parse_args(argv=None):
    parser = command_line(__doc__, steps=150, batch_size=16, lr=3e-3, eval_every=25)
    parser.add_argument(
        "--teacher-steps", type=int, default=None, help="teacher training steps (default 2 x steps)"
    )
    parser.add_argument("--seq-len", type=int, default=48, help="characters per window")
    parser.add_argument("--teacher-dim", type=int, default=64, help="teacher width (2 layers)")
    parser.add_argument("--student-dim", type=int, default=32, help="student width (1 layer)")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="distillation temperature (> 0)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = ScriptRun("distill_lm", args)
    data, vocab = encode_chars(load_corpus())
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val_x, val_y = next_token_windows(val_data, args.seq_len, max_windows=48)

    teacher = CharLM(vocab, args.seq_len, args.teacher_dim, 2, rngs=nnx.Rngs(args.seed))
    teacher_steps = 2 * args.steps if args.teacher_steps is None else args.teacher_steps
    opt = optimizer_for(teacher, args.lr, teacher_steps)
    rng = np.random.default_rng(args.seed)
    teacher_losses = []
    for _ in run.progress("teacher", teacher_steps):
        inputs, labels = random_windows(rng, train_data, args.batch_size, args.seq_len)
        teacher_losses.append(float(label_step(teacher, opt, inputs, labels)))
    teacher_ce = float(evaluate(teacher, teacher, val_x, val_y)[0])

    # Two identical students (same initialisation, same batches): one distilled, one on labels.
    student_seed = args.seed + 1
    distilled = CharLM(vocab, args.seq_len, args.student_dim, 1, rngs=nnx.Rngs(student_seed))
    baseline = CharLM(vocab, args.seq_len, args.student_dim, 1, rngs=nnx.Rngs(student_seed))
    opt_d = optimizer_for(distilled, args.lr, args.steps)
    opt_b = optimizer_for(baseline, args.lr, args.steps)
    rng = np.random.default_rng(student_seed)
    distill_losses, baseline_losses, eval_steps = [], [], []
    val_distilled, val_baseline, val_kl = [], [], []

    def record(step):
        eval_steps.append(step)
        ce, kl = evaluate(distilled, teacher, val_x, val_y)
        val_distilled.append(float(ce))
        val_kl.append(float(kl))
        val_baseline.append(float(evaluate(baseline, teacher, val_x, val_y)[0]))

    record(0)
    progress = run.progress("students")
    for step in progress:
        inputs, labels = random_windows(rng, train_data, args.batch_size, args.seq_len)
        loss = distill_step(distilled, opt_d, teacher, inputs, args.temperature)
        distill_losses.append(float(loss))
        baseline_losses.append(float(label_step(baseline, opt_b, inputs, labels)))
        if run.is_eval_step(step):
            record(step)
        if run.is_log_step(step):
            recent = distill_losses[-args.log_every :]
            progress.set_postfix(loss=f"{np.mean(recent):.3f}", val_kl=f"{val_kl[-1]:.3f}")
    progress.close()

    tail = max(1, args.steps // 10)
    curves = {
        "teacher: cross-entropy on labels": teacher_losses,
        f"distilled student: T² KL at T={args.temperature:g}": distill_losses,
        "student on labels: cross-entropy": baseline_losses,
    }
    evals = {
        "teacher (final)": [teacher_ce] * len(eval_steps),
        "distilled student": val_distilled,
        "student on labels": val_baseline,
    }
    save_plot(run.figure_path, curves, evals, eval_steps)
    metrics = {
        "teacher_steps": teacher_steps,
        "temperature": args.temperature,
        "vocab_size": vocab,
        "teacher_params": count_params(teacher),
        "student_params": count_params(distilled),
        "first_loss": distill_losses[0],
        "last_loss": float(np.mean(distill_losses[-tail:])),
        "teacher_first_loss": teacher_losses[0],
        "teacher_last_loss": float(np.mean(teacher_losses[-tail:])),
        "teacher_val_ce": teacher_ce,
        "distilled_val_ce": val_distilled[-1],
        "baseline_val_ce": val_baseline[-1],
        "initial_val_kl": val_kl[0],
        "distilled_val_kl": val_kl[-1],
    }
    return run.report(
        metrics,
        f"T={args.temperature:g} KL loss {metrics['first_loss']:.3f} -> "
        f"{metrics['last_loss']:.3f}; validation CE teacher {teacher_ce:.3f}, distilled "
        f"{val_distilled[-1]:.3f}, on labels {val_baseline[-1]:.3f} nats/char "
        f"({metrics['teacher_params']} -> {metrics['student_params']} params)",
    )


if __name__ == "__main__":
    main()

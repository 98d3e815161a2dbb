"""Distilling a tiny character LM from a teacher's stored top-k log-probabilities.

Large-vocabulary distillation datasets cannot store the teacher's whole distribution per
token (152k float32 values), so they keep its ``k`` most likely ids and their log-probabilities
(TRL, DistillKit). This script does that for the character LM of ``examples/distill_lm.py``:
a teacher (two layers) is trained on next-character prediction, then run **once** over a
fixed pool of training windows to store, per position, its top-``k`` ids (int32) and
log-probabilities (bfloat16). A smaller student (one layer, half the width) is trained from
that store alone with

    jaxce.linear_sparse_distillation_loss(student_hidden, student_kernel,
                                          teacher_ids, teacher_log_probs, tail="bucket")

the KL divergence over the ``k`` ids plus a tail class holding the rest of each side's mass,
from the student's hidden states and output kernel (no ``(tokens, vocab)`` logits). For
comparison, identical students on the same batches are trained with the full-distribution
distillation ``linear_softmax_kl_divergence`` (which needs the teacher at training time), with
the renormalised top-k loss (``tail="renormalize"``) and on the labels alone.

    python examples/sparse_distill_lm.py
    python examples/sparse_distill_lm.py --k 4 --steps 300 --out /tmp/sparse

Reports validation cross-entropy (nats per character) and the KL to the teacher of every
student, and the bytes stored per token. Writes ``sparse_distill_lm.png`` and
``sparse_distill_lm.json`` into ``--out``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
METHODS = ("sparse bucket", "sparse renormalize", "full KL", "labels")


def label_loss(model: CharLM, inputs, labels):
    return jaxce.linear_softmax_cross_entropy(
        model(inputs), model.kernel(), labels, reduction="mean"
    )


def sparse_loss(model: CharLM, inputs, ids, log_probs, tail: str):
    """The stored top-k entries are all the student sees of the teacher."""
    return jaxce.linear_sparse_distillation_loss(
        model(inputs), model.kernel(), ids, log_probs, tail=tail, reduction="mean"
    )


def full_loss(model: CharLM, teacher: CharLM, inputs):
    teacher_hidden = jax.lax.stop_gradient(teacher(inputs))
    teacher_kernel = jax.lax.stop_gradient(teacher.kernel())
    return jaxce.linear_softmax_kl_divergence(
        model(inputs), model.kernel(), teacher_hidden, teacher_kernel, reduction="mean"
    )


@nnx.jit
def label_step(model, optimizer, inputs, labels):
    loss, grads = nnx.value_and_grad(label_loss)(model, inputs, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit(static_argnames="tail")
def sparse_step(model, optimizer, inputs, ids, log_probs, tail: str):
    loss, grads = nnx.value_and_grad(sparse_loss)(model, inputs, ids, log_probs, tail)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def full_step(model, optimizer, teacher, inputs):
    loss, grads = nnx.value_and_grad(full_loss)(model, teacher, inputs)
    optimizer.update(model, grads)
    return loss


@nnx.jit(static_argnames="k")
def store_top_k(teacher, inputs, k: int):
    """The teacher's top-k ids and log-probabilities per position, as a dataset stores them."""
    logits = teacher(inputs) @ teacher.kernel()  # a ~100-character vocabulary: small
    log_probs, ids = jax.lax.top_k(jax.nn.log_softmax(logits), k)
    return ids.astype(jnp.int32), log_probs.astype(jnp.bfloat16)


@nnx.jit
def evaluate(model, teacher, inputs, labels):
    """Mean cross-entropy per character, and the mean KL(teacher || model)."""
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


def save_plot(path, val_ce: dict, val_kl: dict, eval_steps, teacher_ce: float, k: int) -> None:
    with figure(path, figsize=(9, 3.2)) as (_, (ax_ce, ax_kl)):
        ax_ce.axhline(teacher_ce, color="k", linestyle="--", linewidth=1, label="teacher")
        for i, (label, values) in enumerate(val_ce.items()):
            ax_ce.plot(eval_steps, values, marker=".", color=f"C{i}", label=label)
            if label in val_kl:
                ax_kl.plot(eval_steps, val_kl[label], marker=".", color=f"C{i}", label=label)
        ax_ce.set(xlabel="student step", ylabel="cross-entropy (nats/char)", title="validation")
        ax_kl.set(xlabel="student step", ylabel="KL(teacher || student)",
                  title=f"distance to the teacher (top-{k} stored)")  # fmt: skip
        for ax in (ax_ce, ax_kl):
            ax.set_yscale("log")
            ax.legend(fontsize=8)


def parse_args(argv=None):
    parser = command_line(__doc__, steps=120, batch_size=16, lr=3e-3, eval_every=25)
    parser.add_argument(
        "--teacher-steps", type=int, default=None, help="teacher training steps (default 2 x steps)"
    )
    parser.add_argument("--seq-len", type=int, default=48, help="characters per window")
    parser.add_argument("--teacher-dim", type=int, default=64, help="teacher width (2 layers)")
    parser.add_argument("--student-dim", type=int, default=32, help="student width (1 layer)")
    parser.add_argument("--k", type=int, default=8, help="top-k entries stored per position")
    parser.add_argument("--pool", type=int, default=512, help="training windows in the store")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = ScriptRun("sparse_distill_lm", args)
    data, vocab = encode_chars(load_stdlib_source(MODULES))
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val_x, val_y = next_token_windows(val_data, args.seq_len, max_windows=48)

    teacher = CharLM(vocab, args.seq_len, args.teacher_dim, 2, rngs=nnx.Rngs(args.seed))
    teacher_steps = 2 * args.steps if args.teacher_steps is None else args.teacher_steps
    opt = optimizer_for(teacher, args.lr, teacher_steps)
    rng = np.random.default_rng(args.seed)
    for _ in run.progress("teacher", teacher_steps):
        inputs, labels = random_windows(rng, train_data, args.batch_size, args.seq_len)
        label_step(teacher, opt, inputs, labels)
    teacher_ce = float(evaluate(teacher, teacher, val_x, val_y)[0])

    # The store: a fixed pool of windows and the teacher's top-k on each, computed once.
    pool_x, pool_y = random_windows(rng, train_data, args.pool, args.seq_len)
    pool_ids, pool_lp = store_top_k(teacher, pool_x, args.k)
    stored_mass = float(jnp.mean(jnp.sum(jnp.exp(pool_lp.astype(jnp.float32)), -1)))

    student_seed = args.seed + 1
    students = {
        m: CharLM(vocab, args.seq_len, args.student_dim, 1, rngs=nnx.Rngs(student_seed))
        for m in METHODS
    }
    opts = {m: optimizer_for(s, args.lr, args.steps) for m, s in students.items()}
    rng = np.random.default_rng(student_seed)
    losses = {m: [] for m in METHODS}
    val_ce = {m: [] for m in METHODS}
    val_kl = {m: [] for m in METHODS}
    eval_steps = []

    def record(step):
        eval_steps.append(step)
        for m, s in students.items():
            ce, kl = evaluate(s, teacher, val_x, val_y)
            val_ce[m].append(float(ce))
            val_kl[m].append(float(kl))

    record(0)
    progress = run.progress("students")
    for step in progress:
        batch = rng.integers(0, args.pool, size=args.batch_size)  # the same batch for all
        x, y, ids, lp = pool_x[batch], pool_y[batch], pool_ids[batch], pool_lp[batch]
        for tail in ("bucket", "renormalize"):
            m = f"sparse {tail}"
            losses[m].append(float(sparse_step(students[m], opts[m], x, ids, lp, tail)))
        losses["full KL"].append(float(full_step(students["full KL"], opts["full KL"], teacher, x)))
        losses["labels"].append(float(label_step(students["labels"], opts["labels"], x, y)))
        if run.is_eval_step(step):
            record(step)
        if run.is_log_step(step):
            progress.set_postfix(kl=f"{val_kl['sparse bucket'][-1]:.3f}")
    progress.close()

    save_plot(run.figure_path, val_ce, {m: val_kl[m] for m in METHODS}, eval_steps, teacher_ce,
              args.k)  # fmt: skip
    tail_steps = max(1, args.steps // 10)
    key = {m: m.replace(" ", "_").replace("_KL", "_kl") for m in METHODS}
    metrics = {
        "teacher_steps": teacher_steps,
        "k": args.k,
        "vocab_size": vocab,
        "teacher_params": count_params(teacher),
        "student_params": count_params(students["labels"]),
        "stored_bytes_per_token": args.k * (4 + 2),
        "full_bytes_per_token": vocab * 4,
        "stored_mass": stored_mass,
        "teacher_val_ce": teacher_ce,
        **{f"{key[m]}_val_ce": val_ce[m][-1] for m in METHODS},
        **{f"{key[m]}_val_kl": val_kl[m][-1] for m in METHODS},
        **{f"{key[m]}_initial_val_kl": val_kl[m][0] for m in METHODS},
        **{f"{key[m]}_first_loss": losses[m][0] for m in METHODS},
        **{f"{key[m]}_last_loss": float(np.mean(losses[m][-tail_steps:])) for m in METHODS},
    }
    summary = ", ".join(f"{m} {val_ce[m][-1]:.3f}" for m in METHODS)
    return run.report(
        metrics,
        f"top-{args.k} ({metrics['stored_bytes_per_token']} B/token vs "
        f"{metrics['full_bytes_per_token']}, {stored_mass:.1%} of the teacher's mass): "
        f"validation CE teacher {teacher_ce:.3f}, {summary} nats/char; KL to the teacher "
        f"sparse {val_kl['sparse bucket'][-1]:.3f}, full {val_kl['full KL'][-1]:.3f}",
    )


if __name__ == "__main__":
    main()

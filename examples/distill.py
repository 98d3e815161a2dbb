"""Knowledge distillation on 8x8 digits: a CNN teacher and a much smaller MLP student.

The teacher (a small CNN, ~140k parameters) is trained with
``jaxce.softmax_cross_entropy_with_integer_labels``. The student (a 64-16-10 MLP, ~1.2k
parameters) is then trained on

    alpha * softmax_kl_divergence(student, teacher, temperature=T) + (1 - alpha) * CE(student, y)

where ``jaxce.softmax_kl_divergence`` is ``T**2 * KL(softmax(t / T) || softmax(s / T))``
(Hinton et al., 2015). For comparison the same student is also trained on the hard labels
alone. Uses scikit-learn's bundled ``load_digits`` data (no download).

    python examples/distill.py
    python examples/distill.py --temperature 2 --alpha 0.5 --out /tmp/distill

Writes ``distill.png`` (loss and accuracy curves) and ``distill.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxce


def load_data(seed: int, test_fraction: float = 0.25):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    return train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )


class Teacher(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 64, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


class Student(nnx.Module):
    def __init__(self, hidden: int = 16, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def hard_loss(model, images, labels):
    logits = model(images)
    return jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")


def distill_loss(model, images, labels, teacher_logits, temperature: float, alpha: float):
    logits = model(images)
    soft = jaxce.softmax_kl_divergence(
        logits, teacher_logits, temperature=temperature, reduction="mean"
    )  # T**2 * KL(teacher_T || student_T), averaged over the batch
    hard = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")
    return alpha * soft + (1.0 - alpha) * hard


@nnx.jit
def hard_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(hard_loss)(model, images, labels)
    optimizer.update(model, grads)
    return loss


@nnx.jit(static_argnames=("temperature", "alpha"))
def distill_step(model, optimizer, images, labels, teacher_logits, temperature, alpha):
    loss, grads = nnx.value_and_grad(distill_loss)(
        model, images, labels, teacher_logits, temperature, alpha
    )
    optimizer.update(model, grads)
    return loss


@nnx.jit
def logits_of(model, images):
    return model(images)


def accuracy(model, images, labels) -> float:
    return float(jnp.mean(jnp.argmax(logits_of(model, images), axis=-1) == labels))


def train(name, model, step_fn, data, args, rng, eval_data, per_example=(), static=()):
    """Adam with cosine decay; returns (losses, eval steps, test accuracies).

    ``per_example`` arrays are batched like the data; ``static`` values are passed as they are.
    """
    x, y = data
    schedule = optax.cosine_decay_schedule(args.lr, max(1, args.steps))
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    losses, eval_steps, accs = [], [], []
    order, cursor = rng.permutation(len(x)), 0
    bar = tqdm(range(1, args.steps + 1), desc=name, disable=args.no_progress)
    for step in bar:
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(x)), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        batch_extra = tuple(e[idx] for e in per_example)
        losses.append(float(step_fn(model, optimizer, x[idx], y[idx], *batch_extra, *static)))
        if step % args.eval_every == 0 or step == args.steps:
            eval_steps.append(step)
            accs.append(accuracy(model, *eval_data))
        if step % 10 == 0 or step == args.steps:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}" if accs else "-")
    bar.close()
    return losses, eval_steps, accs


def save_plot(path, runs) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    for i, (label, (losses, eval_steps, accs)) in enumerate(runs.items()):
        k = max(1, len(losses) // 40)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax_loss.plot(np.arange(k, len(losses) + 1), smooth, color=f"C{i}", label=label)
        ax_acc.plot(eval_steps, np.asarray(accs) * 100, marker=".", color=f"C{i}", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training loss (smoothed)")
    ax_loss.set_yscale("log")
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (%)", title="test accuracy")
    ax_acc.set_ylim(80, 100.5)
    ax_acc.legend(frameon=False, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400, help="training steps for each model")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term")
    p.add_argument("--student-hidden", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(f"backend: {jax.default_backend()}")
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = load_data(args.seed)
    test = (jnp.asarray(x_test), jnp.asarray(y_test))
    keys = nnx.Rngs(args.seed)

    teacher = Teacher(rngs=nnx.Rngs(keys()))
    runs = {
        "teacher (CE)": train(
            "teacher",
            teacher,
            hard_step,
            (x_train, y_train),
            args,
            np.random.default_rng([args.seed, 0]),
            test,
        )
    }
    teacher_logits = np.asarray(logits_of(teacher, x_train))  # fixed soft targets

    student_key = keys()  # both students start from the same weights
    student = Student(args.student_hidden, rngs=nnx.Rngs(student_key))
    runs[f"student (KD, T={args.temperature:g})"] = train(
        "student (KD)",
        student,
        distill_step,
        (x_train, y_train),
        args,
        np.random.default_rng([args.seed, 1]),
        test,
        per_example=(teacher_logits,),
        static=(args.temperature, args.alpha),
    )
    baseline = Student(args.student_hidden, rngs=nnx.Rngs(student_key))
    runs["student (CE only)"] = train(
        "student (CE)",
        baseline,
        hard_step,
        (x_train, y_train),
        args,
        np.random.default_rng([args.seed, 1]),
        test,
    )
    elapsed = time.perf_counter() - start

    (t_losses, _, t_acc), (s_losses, _, s_acc), (_, _, b_acc) = runs.values()
    tail = max(1, args.steps // 10)
    metrics = {
        "backend": jax.default_backend(),
        "steps": args.steps,
        "seed": args.seed,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "teacher_params": sum(p.size for p in jax.tree.leaves(nnx.state(teacher, nnx.Param))),
        "student_params": sum(p.size for p in jax.tree.leaves(nnx.state(student, nnx.Param))),
        "first_loss": s_losses[0],  # the distilled student's
        "last_loss": float(np.mean(s_losses[-tail:])),
        "teacher_first_loss": t_losses[0],
        "teacher_last_loss": float(np.mean(t_losses[-tail:])),
        "teacher_accuracy": t_acc[-1],
        "student_accuracy": s_acc[-1],
        "baseline_student_accuracy": b_acc[-1],
        "seconds": elapsed,
    }
    plot_path = os.path.join(args.out, "distill.png")
    save_plot(plot_path, runs)
    metrics["plot"] = plot_path
    with open(os.path.join(args.out, "distill.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(
        f"distill: backend={metrics['backend']} steps={args.steps} "
        f"teacher_acc={t_acc[-1]:.2%} ({metrics['teacher_params']} params) "
        f"student_acc={s_acc[-1]:.2%} ({metrics['student_params']} params; "
        f"CE-only student {b_acc[-1]:.2%}) time={elapsed:.1f}s"
    )
    return metrics


if __name__ == "__main__":
    main()

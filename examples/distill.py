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

import functools

import jax.numpy as jnp
import numpy as np
import optax
from _training_support import (
    MetricHistory,
    ScriptRun,
    command_line,
    count_params,
    figure,
    load_digits_split,
    shuffled_batches,
)
from flax import nnx

import jaxce


class Teacher(nnx.Module):
    """The digits demo's CNN: two 3x3 convolutions, a 2x2 average pool, two dense layers."""

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
    """A 64-``hidden``-10 MLP on the flattened image."""

    def __init__(self, hidden: int = 16, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def hard_loss(model, images, labels):
    logits = model(images)
    loss = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")
    return loss, logits


def distill_loss(model, images, labels, teacher_logits, temperature, alpha):
    logits = model(images)
    soft = jaxce.softmax_kl_divergence(
        logits, teacher_logits, temperature=temperature, reduction="mean"
    )  # T**2 * KL(teacher_T || student_T), averaged over the batch
    hard = jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")
    return alpha * soft + (1.0 - alpha) * hard, logits


@nnx.jit
def hard_step(model, optimizer, metrics, images, labels):
    (loss, logits), grads = nnx.value_and_grad(hard_loss, has_aux=True)(model, images, labels)
    optimizer.update(model, grads)
    metrics.update(loss=loss, logits=logits, labels=labels)


@nnx.jit
def distill_step(model, optimizer, metrics, images, labels, teacher_logits, temperature, alpha):
    # temperature and alpha are traced, not static: other values do not recompile the step.
    grad_fn = nnx.value_and_grad(distill_loss, has_aux=True)
    (loss, logits), grads = grad_fn(model, images, labels, teacher_logits, temperature, alpha)
    optimizer.update(model, grads)
    metrics.update(loss=loss, logits=logits, labels=labels)


@nnx.jit
def predict_logits(model, images):
    return model(images)


@nnx.jit
def eval_step(model, metrics, images, labels):
    metrics.update(logits=model(images), labels=labels)


def train(run, model, train_step, train_arrays, test_data, rng, description):
    """Adam with cosine decay over ``--steps``; returns the training and test histories.

    ``train_arrays`` (images, labels, then any per-example targets) are batched together and
    passed to ``train_step(model, optimizer, metrics, *batch)``.
    """
    args = run.args
    schedule = optax.cosine_decay_schedule(args.lr, max(1, args.steps))
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    train_metrics = nnx.MultiMetric(
        loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy()
    )
    test_metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy())
    train_history, test_history = MetricHistory(), MetricHistory()
    batches = shuffled_batches(rng, len(train_arrays[0]), args.batch_size)
    progress = run.progress(description)
    for step in progress:
        batch = next(batches)
        train_step(model, optimizer, train_metrics, *(array[batch] for array in train_arrays))
        if run.is_eval_step(step):
            eval_step(model, test_metrics, *test_data)
            test_history.record(step, test_metrics)
        if run.is_log_step(step):
            logged = train_history.record(step, train_metrics)
            progress.set_postfix(logged | test_history.latest("test_"))
    progress.close()
    return train_history, test_history


def save_figure(path, runs: dict[str, tuple[MetricHistory, MetricHistory]]) -> None:
    with figure(path, figsize=(8, 3.4)) as (fig, (ax_loss, ax_accuracy)):
        for color, (label, (train, test)) in enumerate(runs.items()):
            ax_loss.plot(train.steps, train["loss"], color=f"C{color}", label=label)
            test_accuracy = np.asarray(test["accuracy"]) * 100
            ax_accuracy.plot(test.steps, test_accuracy, marker=".", color=f"C{color}")
        ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
        ax_loss.set_yscale("log")
        ax_accuracy.set(xlabel="step", ylabel="held-out accuracy (%)", title="test accuracy")
        ax_accuracy.set_ylim(80, 100.5)
        fig.legend(loc="outside lower center", ncol=len(runs), frameon=False)


def main(argv=None) -> dict:
    parser = command_line(__doc__, steps=400, batch_size=128, lr=1e-2, eval_every=25)
    parser.add_argument("--temperature", type=float, default=2.0, help="T of the KL term")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term")
    parser.add_argument("--student-hidden", type=int, default=16, help="student's hidden units")
    args = parser.parse_args(argv)
    run = ScriptRun("distill", args)
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    test_data = (jnp.asarray(x_test), jnp.asarray(y_test))
    keys = nnx.Rngs(args.seed)

    teacher = Teacher(rngs=nnx.Rngs(keys()))
    teacher_rng = np.random.default_rng([args.seed, 0])
    runs = {
        "teacher (CE)": train(
            run, teacher, hard_step, (x_train, y_train), test_data, teacher_rng, "teacher"
        )
    }
    teacher_logits = np.asarray(predict_logits(teacher, x_train))  # fixed soft targets

    student_key = keys()  # both students start from the same weights and see the same batches
    student = Student(args.student_hidden, rngs=nnx.Rngs(student_key))
    kd_step = functools.partial(distill_step, temperature=args.temperature, alpha=args.alpha)
    runs[f"student (KD, T={args.temperature:g})"] = train(
        run,
        student,
        kd_step,
        (x_train, y_train, teacher_logits),
        test_data,
        np.random.default_rng([args.seed, 1]),
        "student (KD)",
    )
    baseline = Student(args.student_hidden, rngs=nnx.Rngs(student_key))
    runs["student (CE only)"] = train(
        run,
        baseline,
        hard_step,
        (x_train, y_train),
        test_data,
        np.random.default_rng([args.seed, 1]),
        "student (CE)",
    )

    save_figure(run.figure_path, runs)
    (teacher_train, teacher_test), (student_train, student_test), (_, baseline_test) = runs.values()
    metrics = {
        "temperature": args.temperature,
        "alpha": args.alpha,
        "teacher_params": count_params(teacher),
        "student_params": count_params(student),
        "first_loss": student_train.first("loss"),  # the distilled student's
        "last_loss": student_train.last("loss"),
        "teacher_first_loss": teacher_train.first("loss"),
        "teacher_last_loss": teacher_train.last("loss"),
        "teacher_accuracy": teacher_test.last("accuracy"),
        "student_accuracy": student_test.last("accuracy"),
        "baseline_student_accuracy": baseline_test.last("accuracy"),
    }
    return run.report(
        metrics,
        f"teacher_acc={metrics['teacher_accuracy']:.2%} ({metrics['teacher_params']} params) "
        f"student_acc={metrics['student_accuracy']:.2%} ({metrics['student_params']} params; "
        f"CE-only student {metrics['baseline_student_accuracy']:.2%})",
    )


if __name__ == "__main__":
    main()

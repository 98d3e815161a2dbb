"""Classify 8x8 handwritten digits with a small Flax NNX CNN and jaxce's cross-entropy.

Trains on scikit-learn's bundled ``load_digits`` data set (1,797 images, no download), holds
out a stratified test split, and uses
``jaxce.softmax_cross_entropy_with_integer_labels`` with label smoothing as the loss.

    python examples/classify_digits.py                 # default run: ~20 s on a laptop CPU
    python examples/classify_digits.py --steps 200 --seed 1 --out /tmp/digits

Writes ``classify_digits.png`` (loss and accuracy curves) and ``classify_digits.json``
(final metrics) into ``--out`` and ends with a one-line summary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _training_support import (
    MetricHistory,
    ScriptRun,
    command_line,
    figure,
    load_digits_split,
    shuffled_batches,
)
from flax import nnx

import jaxce

NUM_CLASSES = 10


class CNN(nnx.Module):
    """Two 3x3 convolutions, a 2x2 average pool and a two-layer classifier head."""

    def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(4 * 4 * 64, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.conv1(x))  # (N, 8, 8, 32)
        x = nnx.relu(self.conv2(x))  # (N, 8, 8, 64)
        x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # (N, 4, 4, 64)
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        return self.fc2(x)  # (N, classes) logits


def loss_fn(model: CNN, images, labels, label_smoothing):
    logits = model(images)
    loss = jaxce.softmax_cross_entropy_with_integer_labels(
        logits, labels, label_smoothing=label_smoothing, reduction="mean"
    )
    return loss, logits


@nnx.jit
def train_step(model, optimizer, metrics, images, labels, label_smoothing):
    # label_smoothing is traced, not static: another value does not recompile the step.
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, images, labels, label_smoothing)
    optimizer.update(model, grads)
    metrics.update(loss=loss, logits=logits, labels=labels)


@nnx.jit
def eval_step(model, metrics, images, labels):
    metrics.update(logits=model(images), labels=labels)


def random_shift(rng: np.random.Generator, images: np.ndarray, max_shift: int = 1):
    """Shift each image by up to ``max_shift`` pixels in each direction (zero fill)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def save_figure(path: str, train: MetricHistory, test: MetricHistory) -> None:
    with figure(path) as (_, (ax_loss, ax_accuracy)):
        ax_loss.plot(train.steps, train["loss"], color="C0")
        ax_loss.set(xlabel="step", ylabel="training loss", title="cross-entropy (label smoothing)")
        train_accuracy = np.asarray(train["accuracy"]) * 100
        test_accuracy = np.asarray(test["accuracy"]) * 100
        ax_accuracy.plot(train.steps, train_accuracy, color="C0", lw=0.8, label="training batches")
        ax_accuracy.plot(test.steps, test_accuracy, marker=".", color="C1", label="held out")
        ax_accuracy.axhline(97, color="grey", lw=0.6, ls="--", label="97%")
        ax_accuracy.set(xlabel="step", ylabel="accuracy (%)", title="accuracy")
        ax_accuracy.set_ylim(max(0, test_accuracy.min() - 2), 100.5)
        ax_accuracy.legend(frameon=False, loc="lower right")


def main(argv=None) -> dict:
    parser = command_line(__doc__, steps=500, batch_size=128, lr=3e-3, eval_every=50)
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="target smoothing ε")
    args = parser.parse_args(argv)
    run = ScriptRun("classify_digits", args)

    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    rng = np.random.default_rng(args.seed)

    model = CNN(rngs=nnx.Rngs(args.seed))
    warmup = min(50, max(1, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1))
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)
    train_metrics = nnx.MultiMetric(
        loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy()
    )
    test_metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy())
    train_history, test_history = MetricHistory(), MetricHistory()

    batches = shuffled_batches(rng, len(x_train), args.batch_size)
    progress = run.progress()
    for step in progress:
        batch = next(batches)
        images = random_shift(rng, x_train[batch])
        train_step(model, optimizer, train_metrics, images, y_train[batch], args.label_smoothing)
        if run.is_eval_step(step):
            eval_step(model, test_metrics, x_test, y_test)
            test_history.record(step, test_metrics)
        if run.is_log_step(step):
            logged = train_history.record(step, train_metrics)
            progress.set_postfix(logged | test_history.latest("test_"))
    progress.close()

    save_figure(run.figure_path, train_history, test_history)
    metrics = {
        "first_loss": train_history.first("loss"),
        "last_loss": train_history.last("loss"),
        "test_accuracy": test_history.last("accuracy"),
        "num_train": len(x_train),
        "num_test": len(x_test),
    }
    return run.report(
        metrics,
        f"loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f} "
        f"test_acc={metrics['test_accuracy']:.2%} ({metrics['num_test']} held out)",
    )


if __name__ == "__main__":
    main()

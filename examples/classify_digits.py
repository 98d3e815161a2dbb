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

NUM_CLASSES = 10


def load_data(seed: int, test_fraction: float = 0.25):
    """Digits as float32 ``(N, 8, 8, 1)`` images in [0, 1] and int32 labels, split by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return x_train, y_train, x_test, y_test


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


def loss_fn(model: CNN, images, labels, label_smoothing: float):
    logits = model(images)
    loss = jaxce.softmax_cross_entropy_with_integer_labels(
        logits, labels, label_smoothing=label_smoothing, reduction="mean"
    )
    return loss, logits


@nnx.jit(static_argnames="label_smoothing")
def train_step(model, optimizer, images, labels, label_smoothing: float):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(model, images, labels, label_smoothing)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def accuracy(model, images, labels):
    return jnp.mean(jnp.argmax(model(images), axis=-1) == labels)


def random_shift(rng: np.random.Generator, images: np.ndarray, max_shift: int = 1):
    """Shift each image by up to ``max_shift`` pixels in each direction (zero fill)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def save_plot(path: str, loss_steps, losses, eval_steps, accuracies) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    ax_loss.plot(loss_steps, losses, lw=0.6, alpha=0.4, color="C0", label="batch")
    k = max(1, len(losses) // 50)
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax_loss.plot(loss_steps[k - 1 :], smooth, color="C0", label=f"mean of {k}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="cross-entropy (label smoothing)")
    ax_loss.legend(frameon=False)
    ax_acc.plot(eval_steps, np.asarray(accuracies) * 100, marker=".", color="C1")
    ax_acc.axhline(97, color="grey", lw=0.6, ls="--")
    ax_acc.set(xlabel="step", ylabel="held-out accuracy (%)", title="test accuracy")
    ax_acc.set_ylim(max(0, min(np.asarray(accuracies) * 100) - 2), 100.5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500, help="training steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="seeds the split, init and batches")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay)")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(f"backend: {jax.default_backend()}")
    start = time.perf_counter()

    x_train, y_train, x_test, y_test = load_data(args.seed)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    rng = np.random.default_rng(args.seed)

    model = CNN(rngs=nnx.Rngs(args.seed))
    warmup = min(50, max(1, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1))
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

    losses, eval_steps, accuracies = [], [], []
    order, cursor = rng.permutation(len(x_train)), 0
    bar = tqdm(range(1, args.steps + 1), desc="classify_digits", disable=args.no_progress)
    for step in bar:
        if cursor + args.batch_size > len(order):  # new epoch
            order, cursor = rng.permutation(len(x_train)), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        images = random_shift(rng, x_train[idx])
        loss = train_step(model, optimizer, images, y_train[idx], args.label_smoothing)
        losses.append(float(loss))
        if step % args.eval_every == 0 or step == args.steps:
            eval_steps.append(step)
            accuracies.append(float(accuracy(model, x_test, y_test)))
        if step % 10 == 0 or step == args.steps:
            bar.set_postfix(
                loss=f"{losses[-1]:.3f}", acc=f"{accuracies[-1]:.3f}" if accuracies else "-"
            )
    bar.close()
    elapsed = time.perf_counter() - start

    tail = max(1, len(losses) // 10)
    metrics = {
        "backend": jax.default_backend(),
        "steps": args.steps,
        "seed": args.seed,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-tail:])),
        "test_accuracy": accuracies[-1],
        "num_train": len(x_train),
        "num_test": len(x_test),
        "seconds": elapsed,
    }
    plot_path = os.path.join(args.out, "classify_digits.png")
    save_plot(plot_path, np.arange(1, len(losses) + 1), losses, eval_steps, accuracies)
    metrics["plot"] = plot_path
    with open(os.path.join(args.out, "classify_digits.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(
        f"classify_digits: backend={metrics['backend']} steps={args.steps} "
        f"loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f} "
        f"test_acc={metrics['test_accuracy']:.2%} ({metrics['num_test']} held out) "
        f"time={elapsed:.1f}s"
    )
    return metrics


if __name__ == "__main__":
    main()

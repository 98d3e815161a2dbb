"""Per-pixel segmentation of generated shapes with a small Flax NNX conv net.

Each image (24x24, one channel, noisy) holds one to three non-overlapping shapes (square, disc,
triangle) of random size and brightness, so the class must come from the outline, not the
intensity. The loss is ``jaxce.softmax_cross_entropy_with_integer_labels`` on logits in
PyTorch's ``(N, C, H, W)`` layout (``axis=1`` names the class axis), with

* ``ignore_index=255`` for the one-pixel band of background around every shape (unlabelled,
  as in Pascal VOC's boundary band), and
* ``class_weights`` from the training pixel frequencies, so the rare shape pixels are not
  drowned out by the background.

    python examples/segment_shapes.py
    python examples/segment_shapes.py --steps 100 --out /tmp/shapes

Reports per-class IoU on a held-out set of images, writes ``segment_shapes.png`` (input,
target, prediction) and ``segment_shapes.json`` into ``--out``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _training_support import MetricHistory, ScriptRun, command_line, figure
from flax import nnx

import jaxce

CLASSES = ("background", "square", "disc", "triangle")
IGNORE = 255
SIZE = 24


def make_shapes(rng: np.random.Generator, n: int, size: int = SIZE):
    """``n`` noisy images ``(n, size, size, 1)`` float32 and labels ``(n, size, size)`` int32.

    Labels are 0 (background), 1 (square), 2 (disc), 3 (triangle), and ``IGNORE`` for the
    background pixels that touch a shape (8-neighbourhood).
    """
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, size, size), np.int32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):  # up to three shapes; skipped if it would overlap
            kind = int(rng.integers(1, 4))
            r = rng.uniform(3.5, 6.5)
            cy, cx = rng.uniform(r, size - 1 - r, size=2)
            dy, dx = yy - cy, xx - cx
            if kind == 1:  # axis-aligned square of half-side 0.85 r
                mask = (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
            elif kind == 2:  # disc of radius r
                mask = dy**2 + dx**2 <= r**2
            else:  # upward triangle: apex at the top, base at the bottom
                mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
            box = np.ix_(np.abs(yy[:, 0] - cy) <= r + 2, np.abs(xx[0] - cx) <= r + 2)
            if np.any(labels[i][box]):
                continue
            images[i][mask] = rng.uniform(0.4, 1.0)
            labels[i][mask] = kind
    objects = np.pad(labels > 0, ((0, 0), (1, 1), (1, 1)))
    near = np.zeros_like(labels, bool)
    for oy in range(3):
        for ox in range(3):
            near |= objects[:, oy : oy + size, ox : ox + size]
    labels[(labels == 0) & near] = IGNORE
    images += rng.normal(0.0, 0.1, images.shape).astype(np.float32)
    return images[..., None], labels


class SegNet(nnx.Module):
    """Stacked dilated 3x3 convolutions (receptive field 31 px) and a 1x1 classifier."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 24, *, rngs: nnx.Rngs):
        self.convs = nnx.List(
            [
                nnx.Conv(1 if i == 0 else width, width, (3, 3), kernel_dilation=d, rngs=rngs)
                for i, d in enumerate((1, 2, 4, 8))
            ]
        )
        self.head = nnx.Conv(width, num_classes, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = nnx.relu(conv(x))
        logits = self.head(x)  # (N, H, W, C): Flax is channels-last
        return jnp.moveaxis(logits, -1, 1)  # (N, C, H, W): the class axis is 1


def loss_fn(model: SegNet, images, labels, class_weights):
    logits = model(images)  # (N, C, H, W)
    loss = jaxce.softmax_cross_entropy_with_integer_labels(
        logits,
        labels,  # (N, H, W), IGNORE on unlabelled pixels
        axis=1,
        ignore_index=IGNORE,
        class_weights=class_weights,
        reduction="mean",  # sum(w[y] * loss) / sum(w[y]) over labelled pixels
    )
    return loss, logits


def update_metrics(metrics, logits, labels, **values):
    """Pixel accuracy (over labelled pixels) and any ``values`` such as the batch loss."""
    metrics.update(
        logits=jnp.moveaxis(logits, 1, -1),  # nnx.metrics.Accuracy wants the classes last
        labels=labels,
        mask={"accuracy": labels != IGNORE},
        **values,
    )


@nnx.jit
def train_step(model, optimizer, metrics, images, labels, class_weights):
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    (loss, logits), grads = grad_fn(model, images, labels, class_weights)
    optimizer.update(model, grads)
    update_metrics(metrics, logits, labels, loss=loss)


@nnx.jit
def eval_step(model, metrics, images, labels):
    logits = model(images)
    update_metrics(metrics, logits, labels)
    return jnp.argmax(logits, axis=1)  # (N, H, W) predicted classes


def per_class_iou(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Intersection over union of each class over the labelled pixels (NaN for an absent class)."""
    labelled = labels != IGNORE
    predicted, target = pred[labelled], labels[labelled]
    ious = []
    for c in range(num_classes):
        intersection = np.sum((predicted == c) & (target == c))
        union = np.sum((predicted == c) | (target == c))
        ious.append(intersection / union if union else np.nan)
    return np.asarray(ious)


def save_figure(path: str, images, labels, pred, num: int = 6) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    colors = ["#202020", "#1f77b4", "#ff7f0e", "#2ca02c", "#b0b0b0"]  # classes, then ignore
    cmap = ListedColormap(colors)
    shown_labels = np.where(labels == IGNORE, len(CLASSES), labels)
    with figure(path, 3, num, figsize=(1.4 * num, 4.6), dpi=80) as (fig, axes):
        for j in range(num):
            axes[0, j].imshow(images[j, ..., 0], cmap="gray", vmin=-0.2, vmax=1.2)
            axes[1, j].imshow(shown_labels[j], cmap=cmap, vmin=0, vmax=len(colors) - 1)
            axes[2, j].imshow(pred[j], cmap=cmap, vmin=0, vmax=len(colors) - 1)
        for ax, name in zip(axes[:, 0], ("input", "target", "prediction"), strict=True):
            ax.set_ylabel(name)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors]
        fig.legend(
            handles, [*CLASSES, "ignored"], loc="outside lower center", ncol=5, frameon=False
        )


def main(argv=None) -> dict:
    parser = command_line(__doc__, steps=400, batch_size=32, lr=3e-3)
    parser.add_argument("--num-test", type=int, default=128, help="held-out images")
    args = parser.parse_args(argv)
    run = ScriptRun("segment_shapes", args)
    rng = np.random.default_rng(args.seed)
    test_images, test_labels = make_shapes(np.random.default_rng([args.seed, 1]), args.num_test)

    # Class weights from pixel frequencies (unlabelled pixels left out): w_c ∝ 1/sqrt(freq_c),
    # normalised so that the background weighs 1.
    _, sample = make_shapes(np.random.default_rng([args.seed, 2]), 256)
    counts = np.bincount(sample[sample != IGNORE], minlength=len(CLASSES)).astype(np.float64)
    freq = counts / counts.sum()
    class_weights = jnp.asarray(np.sqrt(freq[0] / freq), jnp.float32)

    model = SegNet(rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(30, max(1, args.steps // 10)), max(args.steps, 31)
    )
    optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
    train_metrics = nnx.MultiMetric(
        loss=nnx.metrics.Average("loss"), accuracy=nnx.metrics.Accuracy()
    )
    test_metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy())
    train_history = MetricHistory()

    progress = run.progress()
    for step in progress:
        images, labels = make_shapes(rng, args.batch_size)
        train_step(model, optimizer, train_metrics, images, labels, class_weights)
        if run.is_log_step(step):
            progress.set_postfix(train_history.record(step, train_metrics))
    progress.close()

    pred = np.asarray(eval_step(model, test_metrics, test_images, test_labels))
    ious = per_class_iou(pred, test_labels, len(CLASSES))
    save_figure(run.figure_path, test_images, test_labels, pred)
    metrics = {
        "first_loss": train_history.first("loss"),
        "last_loss": train_history.last("loss"),
        "class_weights": {c: float(w) for c, w in zip(CLASSES, class_weights, strict=True)},
        "iou": {c: float(v) for c, v in zip(CLASSES, ious, strict=True)},
        "mean_iou": float(np.nanmean(ious)),
        "pixel_accuracy": float(test_metrics.compute()["accuracy"]),
        "ignored_fraction": float(np.mean(test_labels == IGNORE)),
    }
    print("IoU: " + ", ".join(f"{c} {v:.3f}" for c, v in metrics["iou"].items()))
    return run.report(
        metrics,
        f"loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f} "
        f"mIoU={metrics['mean_iou']:.3f} pixel_acc={metrics['pixel_accuracy']:.2%}",
    )


if __name__ == "__main__":
    main()

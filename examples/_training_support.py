"""What the training scripts in ``examples/`` share: command line, metrics, figures and report.

Each script keeps its data, model, loss and train step in its own file; this module holds only
the plumbing around them, so that a script reads top to bottom as "build, train, evaluate":

* :func:`command_line`: the options every script takes (``--steps``, ``--batch-size``, ``--seed``,
  ``--lr``, ``--log-every``, ``--out``, ``--no-progress``), each with a help text and its
  default shown by ``--help``;
* :class:`MetricHistory`: the values of an ``nnx.MultiMetric`` at each step where it was
  computed (and then reset);
* :class:`ScriptRun`: the output folder, the clock, the progress bar and the report at the end
  (``<name>.json`` and a one-line summary);
* :func:`figure`: a matplotlib figure (no display needed) saved to a PNG on leaving the block;
* the 8x8 digits data and the shuffled mini-batches that two of the scripts train on;
* for the character language models: the text corpus and its encoding, a pre-norm transformer
  block, a causal transformer with its own output head (:class:`CharLM`), random training
  windows and the held-out next-character windows.

The scripts import it as a sibling module: ``python examples/<script>.py`` puts ``examples/`` on
``sys.path`` (the tests' loader does the same).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import string
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default after its help, and the script's docstring as written."""


def command_line(
    description: str,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    log_every: int = 10,
    eval_every: int | None = None,
) -> argparse.ArgumentParser:
    """A parser with the options every script takes; the script adds its own to it.

    ``--eval-every`` is added when ``eval_every`` is given (scripts that evaluate only at the
    end have none).
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="examples per step")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the data, the initial weights and the batches"
    )
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    parser.add_argument(
        "--log-every",
        type=int,
        default=log_every,
        help="steps over which the training metrics are averaged before they are logged",
    )
    if eval_every is not None:
        parser.add_argument(
            "--eval-every", type=int, default=eval_every, help="steps between held-out evaluations"
        )
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG and the JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


class MetricHistory:
    """The values of an ``nnx.MultiMetric`` at each step where :meth:`record` computed them."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {}

    def record(self, step: int, metrics: nnx.MultiMetric) -> dict[str, float]:
        """Computes ``metrics``, stores the values under ``step``, resets ``metrics``."""
        computed = {name: float(value) for name, value in metrics.compute().items()}
        metrics.reset()
        self.steps.append(step)
        for name, value in computed.items():
            self.values.setdefault(name, []).append(value)
        return computed

    def __getitem__(self, name: str) -> list[float]:
        return self.values[name]

    def latest(self, prefix: str = "") -> dict[str, float]:
        """The last recorded value of each metric (none before the first record), names prefixed."""
        return {prefix + name: values[-1] for name, values in self.values.items()}

    def first(self, name: str) -> float:
        return self.values[name][0]

    def last(self, name: str) -> float:
        return self.values[name][-1]


class ScriptRun:
    """One run of a script: its output folder, its clock, its progress bar and its report."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        os.makedirs(args.out, exist_ok=True)
        self.figure_path = os.path.join(args.out, f"{name}.png")
        self.backend = jax.default_backend()
        print(f"backend: {self.backend}")
        self.started = time.perf_counter()

    def progress(self, description: str | None = None, steps: int | None = None) -> tqdm:
        """A progress bar over the steps ``1 .. steps`` (default ``args.steps``)."""
        steps = self.args.steps if steps is None else steps
        return tqdm(
            range(1, steps + 1), desc=description or self.name, disable=self.args.no_progress
        )

    def is_log_step(self, step: int) -> bool:
        """Whether the training metrics are logged after ``step`` (1-based).

        They are after the first step (alone, so that the first value is the initial loss),
        every ``--log-every``-th and the last.
        """
        return step == 1 or step % self.args.log_every == 0 or step == self.args.steps

    def is_eval_step(self, step: int) -> bool:
        """Whether the model is evaluated after ``step``: every ``--eval-every``-th and the last."""
        return step % self.args.eval_every == 0 or step == self.args.steps

    def report(self, metrics: dict, summary: str) -> dict:
        """Writes ``<name>.json`` and prints ``<name>: backend=... steps=... <summary> time=...``.

        Returns ``metrics`` with the backend, steps, seed, seconds so far and figure path added.
        """
        seconds = time.perf_counter() - self.started
        report = {
            "backend": self.backend,
            "steps": self.args.steps,
            "seed": self.args.seed,
            **metrics,
            "seconds": seconds,
            "plot": self.figure_path,
        }
        with open(os.path.join(self.args.out, f"{self.name}.json"), "w") as file:
            json.dump(report, file, indent=2)
        print(
            f"{self.name}: backend={self.backend} steps={self.args.steps} {summary} "
            f"time={seconds:.1f}s"
        )
        return report


@contextlib.contextmanager
def figure(path: str, nrows: int = 1, ncols: int = 2, *, figsize=(8, 3), dpi: int = 90):
    """``(figure, axes)`` of ``plt.subplots``, laid out and saved to ``path`` after the block."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, dpi=dpi, layout="constrained")
    try:
        yield fig, axes
        fig.savefig(path)
    finally:
        plt.close(fig)


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` entries) of ``model``."""
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def load_digits_split(seed: int, test_fraction: float = 0.25):
    """scikit-learn's 8x8 digits, split by class: ``x_train, y_train, x_test, y_test``.

    Images are float32 ``(N, 8, 8, 1)`` in [0, 1], labels int32 ``(N,)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    return x_train, y_train, x_test, y_test


def shuffled_batches(
    rng: np.random.Generator, num_examples: int, batch_size: int
) -> Iterator[np.ndarray]:
    """Endless index batches: a new permutation whenever the current one has no full batch left."""
    order, cursor = rng.permutation(num_examples), 0
    while True:
        if cursor + batch_size > num_examples:
            order, cursor = rng.permutation(num_examples), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


# Characters of the text examples: newline, letters, digits, punctuation, space.
ALPHABET = "\n" + string.printable[:-5]


def load_stdlib_source(modules: tuple[str, ...]) -> str:
    """The source of ``modules`` from the running interpreter's standard library (no download)."""
    root = os.path.dirname(os.__file__)
    texts = []
    for name in modules:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    if not texts:
        raise FileNotFoundError(f"none of {modules} found under {root}")
    return "\n\n".join(texts).replace("\t", "    ")


def encode_chars(text: str, unknown: str = "?") -> tuple[np.ndarray, int]:
    """Character ids (anything outside ``ALPHABET`` becomes ``unknown``) and the vocabulary size."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    unk = index[unknown]
    return np.array([index.get(c, unk) for c in text], np.int32), len(ALPHABET)


class TransformerBlock(nnx.Module):
    """Pre-norm causal self-attention and a 4x GELU MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class CharLM(nnx.Module):
    """Pre-norm causal transformer; ``__call__`` returns hidden states, ``kernel`` the head's.

    The output head is an ``nnx.Linear`` without bias, so the logits are ``hidden @ kernel()``
    with the kernel ``(D, V)``: the layout of jaxce's fused losses, which take the hidden states
    and the kernel instead of the logits.
    """

    def __init__(
        self, vocab: int, seq_len: int, dim: int, layers: int, heads: int = 4, *, rngs: nnx.Rngs
    ):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Embed(seq_len, dim, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):  # (B, T) int -> (B, T, D)
        x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))[None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def kernel(self):  # (D, V): the head's logits are hidden @ kernel
        return self.head.kernel[...]


def random_windows(rng: np.random.Generator, data: np.ndarray, batch: int, seq_len: int):
    """``batch`` windows of ``data`` at random starts: ``(inputs, labels)``, shifted by one."""
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    windows = data[starts[:, None] + np.arange(seq_len + 1)[None, :]]
    return windows[:, :-1], windows[:, 1:]


def next_token_windows(data: np.ndarray, seq_len: int, max_windows: int):
    """Consecutive ``(inputs, labels)`` windows of ``data``, labels shifted by one token."""
    n = min(max_windows, (len(data) - 1) // seq_len)
    inputs = data[: n * seq_len].reshape(n, seq_len)
    labels = data[1 : n * seq_len + 1].reshape(n, seq_len)
    return inputs, labels

"""A tiny character-level transformer language model trained with the fused linear loss.

The corpus is the source code of a few modules of Python's own standard library, read from
the running interpreter (no download). The model is a two-layer causal transformer in Flax
NNX with tied input/output embeddings; the loss is
``jaxce.linear_softmax_cross_entropy(hidden, embedding.T, labels, ...)``, which computes the
cross-entropy of ``hidden @ embedding.T`` without materialising the ``(tokens, vocab)`` logits.
Training windows have random lengths and are right-padded; the padded positions carry the
label ``-1`` and are excluded with ``ignore_index=-1``. ``z_loss`` keeps the log-normaliser
near zero (PaLM).

    python examples/tiny_lm.py
    python examples/tiny_lm.py --steps 100 --out /tmp/lm

Reports validation perplexity (``exp`` of the mean cross-entropy per character, on held-out
text) and prints a sampled continuation. Writes ``tiny_lm.png`` (loss curve) and
``tiny_lm.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxce

MODULES = (
    "textwrap.py",
    "string.py",
    "bisect.py",
    "heapq.py",
    "fnmatch.py",
    "shlex.py",
    "colorsys.py",
    "keyword.py",
    "queue.py",
    "sched.py",
    "glob.py",
    "contextlib.py",
)
PAD = 0  # token id used for padding; never a target
IGNORE = -1  # label of padded positions
ALPHABET = "\n" + string.printable[:-5]  # newline, letters, digits, punctuation, space
UNKNOWN = "?"


def load_corpus() -> str:
    """Source of ``MODULES`` from the running interpreter's standard library."""
    root = os.path.dirname(os.__file__)
    texts = []
    for name in MODULES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    if not texts:
        raise FileNotFoundError(f"none of {MODULES} found under {root}")
    return "\n\n".join(texts).replace("\t", "    ")


class Tokenizer:
    """Characters to ids: 0 is padding, 1.. are ``ALPHABET``; anything else maps to ``?``."""

    def __init__(self):
        self.chars = ALPHABET
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        unk = self.index[UNKNOWN]
        return np.array([self.index.get(c, unk) for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] if i > 0 else "" for i in np.asarray(ids).tolist())


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))


class TinyLM(nnx.Module):
    """Pre-norm causal transformer; ``__call__`` returns the final hidden states, not logits."""

    def __init__(self, vocab: int, seq_len: int, dim: int, heads: int, layers: int, *, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Embed(seq_len, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, tokens):  # (B, T) int -> (B, T, D)
        positions = jnp.arange(tokens.shape[-1])
        x = self.embed(tokens) + self.pos(positions)[None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def head_weight(self):  # tied output head: (D, V)
        return self.embed.embedding[...].T


def loss_fn(model: TinyLM, inputs, labels, z_loss: float):
    hidden = model(inputs)  # (B, T, D)
    return jaxce.linear_softmax_cross_entropy(
        hidden,
        model.head_weight(),  # (D, V): no (B * T, V) logits are materialised
        labels,  # (B, T), IGNORE where padded
        ignore_index=IGNORE,
        z_loss=z_loss,
        reduction="mean",
    )


@nnx.jit(static_argnames="z_loss")
def train_step(model, optimizer, inputs, labels, z_loss: float):
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, labels, z_loss)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model, inputs, labels):
    """Summed cross-entropy (no z-loss) and the number of scored characters."""
    total = jaxce.linear_softmax_cross_entropy(
        model(inputs), model.head_weight(), labels, ignore_index=IGNORE, reduction="sum"
    )
    return total, jnp.sum(labels != IGNORE)


@nnx.jit
def next_logits(model, tokens, position):
    hidden = model(tokens)[0, position]  # (D,)
    return hidden @ model.head_weight()  # one position: the (V,) logits are small


def sample_batch(rng, data: np.ndarray, batch: int, seq_len: int):
    """Random windows of random length (``seq_len // 4`` to ``seq_len``), right-padded."""
    starts = rng.integers(0, len(data) - seq_len - 1, size=batch)
    lengths = rng.integers(seq_len // 4, seq_len + 1, size=batch)
    windows = data[starts[:, None] + np.arange(seq_len + 1)[None, :]]  # (B, T + 1)
    valid = np.arange(seq_len)[None, :] < lengths[:, None]  # (B, T)
    inputs = np.where(valid, windows[:, :-1], PAD)
    labels = np.where(valid, windows[:, 1:], IGNORE)
    return inputs.astype(np.int32), labels.astype(np.int32)


def validation_windows(data: np.ndarray, seq_len: int, max_windows: int = 64):
    n = min(max_windows, (len(data) - 1) // seq_len)
    x = data[: n * seq_len].reshape(n, seq_len)
    y = data[1 : n * seq_len + 1].reshape(n, seq_len)
    return x, y


def generate(model, tok: Tokenizer, prompt: str, length: int, seq_len: int, key, temperature):
    """Sample ``length`` characters (greedy when ``temperature == 0``)."""
    ids = list(tok.encode(prompt)[-seq_len:])
    for _ in range(length):
        context = ids[-seq_len:]
        buf = np.full((1, seq_len), PAD, np.int32)
        buf[0, : len(context)] = context
        logits = next_logits(model, buf, len(context) - 1)
        if temperature == 0:
            nxt = int(jnp.argmax(logits))
        else:
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits[1:] / temperature)) + 1  # never PAD
        ids.append(nxt)
    return tok.decode(ids)


def save_plot(path, losses, eval_steps, val_ppl) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    k = max(1, len(losses) // 50)
    ax_loss.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, color="C0")
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax_loss.plot(np.arange(k, len(losses) + 1), smooth, color="C0")
    ax_loss.set(xlabel="step", ylabel="loss (nats/char, incl. z-loss)", title="training loss")
    ax_ppl.plot(eval_steps, val_ppl, marker=".", color="C1")
    ax_ppl.set(xlabel="step", ylabel="perplexity", title="validation perplexity")
    ax_ppl.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500, help="training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--z-loss", type=float, default=1e-4)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--generate", type=int, default=160, help="characters to sample")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling; 0 is greedy")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    print(f"backend: {jax.default_backend()}")
    start = time.perf_counter()
    tok = Tokenizer()
    data = tok.encode(load_corpus())
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val_x, val_y = validation_windows(val_data, args.seq_len)
    rng = np.random.default_rng(args.seed)

    rngs = nnx.Rngs(args.seed)
    model = TinyLM(tok.vocab_size, args.seq_len, args.dim, args.heads, args.layers, rngs=rngs)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(50, max(1, args.steps // 10)), max(args.steps, 51)
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def val_perplexity() -> float:
        total, count = eval_loss(model, val_x, val_y)
        return float(np.exp(float(total) / float(count)))

    losses, eval_steps, val_ppl = [], [0], [val_perplexity()]
    bar = tqdm(range(1, args.steps + 1), desc="tiny_lm", disable=args.no_progress)
    for step in bar:
        inputs, labels = sample_batch(rng, train_data, args.batch_size, args.seq_len)
        losses.append(float(train_step(model, optimizer, inputs, labels, args.z_loss)))
        if step % args.eval_every == 0 or step == args.steps:
            eval_steps.append(step)
            val_ppl.append(val_perplexity())
        if step % 10 == 0 or step == args.steps:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val_ppl=f"{val_ppl[-1]:.2f}")
    bar.close()

    text = generate(
        model,
        tok,
        args.prompt,
        args.generate,
        args.seq_len,
        jax.random.key(args.seed),
        args.temperature,
    )
    elapsed = time.perf_counter() - start
    print("--- sample " + "-" * 50 + "\n" + text + "\n" + "-" * 61)

    tail = max(1, len(losses) // 10)
    metrics = {
        "backend": jax.default_backend(),
        "steps": args.steps,
        "seed": args.seed,
        "corpus_chars": len(data),
        "vocab_size": tok.vocab_size,
        "params": sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))),
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-tail:])),
        "initial_val_perplexity": val_ppl[0],
        "val_perplexity": val_ppl[-1],
        "sample": text,
        "seconds": elapsed,
    }
    plot_path = os.path.join(args.out, "tiny_lm.png")
    save_plot(plot_path, losses, eval_steps, val_ppl)
    metrics["plot"] = plot_path
    with open(os.path.join(args.out, "tiny_lm.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(
        f"tiny_lm: backend={metrics['backend']} steps={args.steps} "
        f"loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f} "
        f"val_ppl {val_ppl[0]:.1f} -> {val_ppl[-1]:.2f} ({metrics['params']} params, "
        f"vocab {tok.vocab_size}) time={elapsed:.1f}s"
    )
    return metrics


if __name__ == "__main__":
    main()

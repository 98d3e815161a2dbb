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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _training_support import (
    ALPHABET,
    MetricHistory,
    ScriptRun,
    TransformerBlock,
    command_line,
    count_params,
    figure,
    load_stdlib_source,
    next_token_windows,
)
from flax import nnx

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
UNKNOWN = "?"


def load_corpus() -> str:
    """Source of ``MODULES`` from the running interpreter's standard library."""
    return load_stdlib_source(MODULES)


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


class TinyLM(nnx.Module):
    """Pre-norm causal transformer; ``__call__`` returns the final hidden states, not logits."""

    def __init__(self, vocab: int, seq_len: int, dim: int, heads: int, layers: int, *, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Embed(seq_len, dim, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(dim, heads, rngs=rngs) for _ in range(layers)])
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


def loss_fn(model: TinyLM, inputs, labels, z_loss):
    hidden = model(inputs)  # (B, T, D)
    return jaxce.linear_softmax_cross_entropy(
        hidden,
        model.head_weight(),  # (D, V): no (B * T, V) logits are materialised
        labels,  # (B, T), IGNORE where padded
        ignore_index=IGNORE,
        z_loss=z_loss,
        reduction="mean",
    )


@nnx.jit
def train_step(model, optimizer, metrics, inputs, labels, z_loss):
    # No aux output: the fused loss never forms the logits. z_loss is traced, not static.
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, labels, z_loss)
    optimizer.update(model, grads)
    metrics.update(loss=loss)


@nnx.jit
def eval_step(model, metrics, inputs, labels):
    """Adds the cross-entropy (no z-loss) of every scored character to ``metrics``."""
    per_char = jaxce.linear_softmax_cross_entropy(
        model(inputs), model.head_weight(), labels, ignore_index=IGNORE
    )  # (B, T), 0 where ignored
    metrics.update(loss=per_char, mask=labels != IGNORE)


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


def generate(model, tokenizer, prompt: str, length: int, seq_len: int, key, temperature):
    """Sample ``length`` characters (greedy when ``temperature == 0``)."""
    ids = list(tokenizer.encode(prompt)[-seq_len:])
    for _ in range(length):
        context = ids[-seq_len:]
        window = np.full((1, seq_len), PAD, np.int32)
        window[0, : len(context)] = context
        logits = next_logits(model, window, len(context) - 1)
        if temperature == 0:
            next_id = int(jnp.argmax(logits))
        else:
            key, sample_key = jax.random.split(key)
            next_id = int(jax.random.categorical(sample_key, logits[1:] / temperature)) + 1
        ids.append(next_id)  # never PAD: the categorical skips id 0
    return tokenizer.decode(ids)


def save_figure(path, train: MetricHistory, validation: MetricHistory) -> None:
    with figure(path) as (_, (ax_loss, ax_perplexity)):
        ax_loss.plot(train.steps, train["loss"], color="C0")
        ax_loss.set(xlabel="step", ylabel="loss (nats/char, incl. z-loss)", title="training loss")
        perplexity = np.exp(validation["loss"])
        ax_perplexity.plot(validation.steps, perplexity, marker=".", color="C1")
        ax_perplexity.set(xlabel="step", ylabel="perplexity", title="validation perplexity")
        ax_perplexity.set_yscale("log")


def main(argv=None) -> dict:
    parser = command_line(__doc__, steps=500, batch_size=32, lr=3e-3, eval_every=100)
    parser.add_argument("--seq-len", type=int, default=64, help="context length in characters")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--z-loss", type=float, default=1e-4, help="weight of the z-loss")
    parser.add_argument("--prompt", default="def ", help="start of the sampled text")
    parser.add_argument("--generate", type=int, default=160, help="characters to sample")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling; 0 is greedy")
    args = parser.parse_args(argv)
    run = ScriptRun("tiny_lm", args)
    tokenizer = Tokenizer()
    data = tokenizer.encode(load_corpus())
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    val_x, val_y = next_token_windows(val_data, args.seq_len, max_windows=64)
    rng = np.random.default_rng(args.seed)

    rngs = nnx.Rngs(args.seed)
    vocab_size = tokenizer.vocab_size
    model = TinyLM(vocab_size, args.seq_len, args.dim, args.heads, args.layers, rngs=rngs)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(50, max(1, args.steps // 10)), max(args.steps, 51)
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    train_metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
    val_metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
    train_history, val_history = MetricHistory(), MetricHistory()

    eval_step(model, val_metrics, val_x, val_y)
    val_history.record(0, val_metrics)  # the untrained model's perplexity
    progress = run.progress()
    for step in progress:
        inputs, labels = sample_batch(rng, train_data, args.batch_size, args.seq_len)
        train_step(model, optimizer, train_metrics, inputs, labels, args.z_loss)
        if run.is_eval_step(step):
            eval_step(model, val_metrics, val_x, val_y)
            val_history.record(step, val_metrics)
        if run.is_log_step(step):
            logged = train_history.record(step, train_metrics)
            progress.set_postfix(logged | {"val_ppl": np.exp(val_history.last("loss"))})
    progress.close()

    key = jax.random.key(args.seed)
    text = generate(
        model, tokenizer, args.prompt, args.generate, args.seq_len, key, args.temperature
    )
    print("--- sample " + "-" * 50 + "\n" + text + "\n" + "-" * 61)

    save_figure(run.figure_path, train_history, val_history)
    metrics = {
        "corpus_chars": len(data),
        "vocab_size": vocab_size,
        "params": count_params(model),
        "first_loss": train_history.first("loss"),
        "last_loss": train_history.last("loss"),
        "initial_val_perplexity": float(np.exp(val_history.first("loss"))),
        "val_perplexity": float(np.exp(val_history.last("loss"))),
        "sample": text,
    }
    return run.report(
        metrics,
        f"loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f} "
        f"val_ppl {metrics['initial_val_perplexity']:.1f} -> {metrics['val_perplexity']:.2f} "
        f"({metrics['params']} params, vocab {vocab_size})",
    )


if __name__ == "__main__":
    main()

"""The tiny character language model trained on a (data, model) mesh of 8 CPU devices, with its
output head sharded over the vocabulary.

JAX can split one CPU into several devices (``--xla_force_host_platform_device_count``); this
script does so itself, before JAX starts, unless ``XLA_FLAGS`` already sets a device count. It
builds a ``("data", "model")`` mesh (2 x 4 by default), creates the model under
``jax.set_mesh`` so that every parameter lands with the sharding of its
``nnx.with_partitioning`` annotation, and trains it with plain ``nnx.jit``: no ``shard_map``,
no collective written by hand.

* the batch is split over ``"data"`` (on the default mesh, each group of 4 devices sees half
  of it);
* the output head's ``(D, V)`` kernel is split over ``"model"`` along the vocabulary
  (``nnx.with_partitioning(init, (None, "model"))``), everything else is replicated;
* the loss is ``jaxce.linear_softmax_cross_entropy(hidden, kernel, labels)``: on an Explicit
  mesh (``--axis-type explicit``, ``jax.make_mesh``'s default) it sees the kernel's sharding
  and runs vocab-parallel by itself; on an Auto mesh (``--axis-type auto``) the call says
  ``vocab_axis="model"``. Either way no device holds the whole head or its gradient, nor any
  ``(tokens, V)`` logits.

    python examples/distributed_lm.py
    python examples/distributed_lm.py --axis-type auto --steps 100 --mesh 4,2

Reports the training loss and validation perplexity before and after, and the sharding of the
head's gradient (the kernel's own: ``P(None, 'model')``). Writes ``distributed_lm.png`` (loss
curve) and ``distributed_lm.json`` into ``--out``.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX starts: the number of CPU devices is fixed when its backend is created.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _training_support import (  # noqa: E402
    MetricHistory,
    ScriptRun,
    TransformerBlock,
    command_line,
    count_params,
    encode_chars,
    figure,
    load_stdlib_source,
    next_token_windows,
    random_windows,
)
from flax import nnx  # noqa: E402
from jax import numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxce  # noqa: E402

MODULES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "shlex.py")
BATCH = P("data", None)  # (B, T) tokens and labels: rows over "data"
HEAD = (None, "model")  # the head's (D, V) kernel: columns (the vocabulary) over "model"


class ShardedCharLM(nnx.Module):
    """Causal transformer whose ``(D, V)`` output head is sharded over the vocabulary.

    ``__call__`` returns the final hidden states; the logits would be ``hidden @ head_kernel()``,
    which the fused loss computes block by block on each device's vocabulary shard.
    """

    def __init__(self, vocab: int, seq_len: int, dim: int, layers: int, heads: int, *, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.pos = nnx.Embed(seq_len, dim, rngs=rngs)
        self.blocks = nnx.List([TransformerBlock(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        head_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), HEAD)
        self.head = nnx.Linear(dim, vocab, use_bias=False, kernel_init=head_init, rngs=rngs)

    def __call__(self, tokens):  # (B, T) int -> (B, T, D)
        x = self.embed(tokens, out_sharding=embedding_sharding(tokens))
        x = x + self.pos(jnp.arange(tokens.shape[-1]))[None]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def head_kernel(self):  # (D, V), sharded P(None, "model")
        return self.head.kernel[...]


def embedding_sharding(tokens):
    """Where the embeddings of ``tokens`` go: with the tokens, the feature axis whole.

    On an Explicit mesh JAX asks for it (a table lookup with sharded ids has no single obvious
    output sharding); on an Auto mesh the partitioner chooses (``None``).
    """
    sharding = jax.typeof(tokens).sharding
    if not sharding.mesh.axis_names or AxisType.Explicit not in sharding.mesh.axis_types:
        return None
    return P(*sharding.spec, None)


def loss_fn(model: ShardedCharLM, inputs, labels, vocab_keywords: dict):
    return jaxce.linear_softmax_cross_entropy(
        model(inputs),  # (B, T, D), rows over "data"
        model.head_kernel(),  # (D, V), columns over "model": vocab-parallel
        labels,
        reduction="mean",
        **vocab_keywords,  # {} on an Explicit mesh, {"vocab_axis": "model"} on an Auto one
    )


@nnx.jit(static_argnums=5)
def train_step(model, optimizer, metrics, inputs, labels, vocab_keywords):
    loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, labels, dict(vocab_keywords))
    optimizer.update(model, grads)
    metrics.update(loss=loss)


@nnx.jit(static_argnums=3)
def eval_loss(model, inputs, labels, vocab_keywords):
    return loss_fn(model, inputs, labels, dict(vocab_keywords))


@nnx.jit(static_argnums=3)
def head_gradient(model, inputs, labels, vocab_keywords):
    """The loss's gradient w.r.t. the head's kernel (to show where it lives)."""
    grads = nnx.grad(loss_fn)(model, inputs, labels, dict(vocab_keywords))
    return grads["head"]["kernel"][...]


def make_mesh(shape: tuple[int, int], axis_type: str) -> jax.sharding.Mesh:
    needed = shape[0] * shape[1]
    if len(jax.devices()) < needed:
        raise SystemExit(
            f"a {shape[0]} x {shape[1]} mesh needs {needed} devices, JAX has "
            f"{len(jax.devices())} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})"
        )
    kind = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}[axis_type]
    return jax.make_mesh(shape, ("data", "model"), axis_types=(kind, kind))


def save_figure(path, train: MetricHistory, val_steps, val_losses) -> None:
    with figure(path) as (_, (ax_loss, ax_perplexity)):
        ax_loss.plot(train.steps, train["loss"], color="C0")
        ax_loss.set(xlabel="step", ylabel="loss (nats/char)", title="training loss")
        ax_perplexity.plot(val_steps, np.exp(val_losses), marker=".", color="C1")
        ax_perplexity.set(xlabel="step", ylabel="perplexity", title="validation perplexity")
        ax_perplexity.set_yscale("log")


def main(argv=None) -> dict:
    parser = command_line(__doc__, steps=300, batch_size=32, lr=3e-3, eval_every=100)
    parser.add_argument(
        "--axis-type",
        choices=("explicit", "auto"),
        default="explicit",
        help="mesh axis type: explicit (vocab-parallel from the kernel's sharding) or auto "
        '(vocab_axis="model")',
    )
    parser.add_argument(
        "--mesh",
        default="2,4",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        help="DATA,MODEL: devices over the batch and over the vocabulary",
    )
    parser.add_argument("--seq-len", type=int, default=64, help="context length in characters")
    parser.add_argument("--dim", type=int, default=64, help="model width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    args = parser.parse_args(argv)
    run = ScriptRun("distributed_lm", args)
    mesh = make_mesh(args.mesh, args.axis_type)
    vocab_keywords = () if args.axis_type == "explicit" else (("vocab_axis", "model"),)
    data, vocab = encode_chars(load_stdlib_source(MODULES))  # vocab 96: 24 columns a shard
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    rng = np.random.default_rng(args.seed)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, min(50, max(1, args.steps // 10)), max(args.steps, 51)
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    with jax.set_mesh(mesh):  # parameters, optimizer state and batches are placed on the mesh
        model = ShardedCharLM(
            vocab, args.seq_len, args.dim, args.layers, args.heads, rngs=nnx.Rngs(args.seed)
        )
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
        val_x, val_y = (
            jax.device_put(a, BATCH)
            for a in next_token_windows(val_data, args.seq_len, max_windows=32)
        )
        history, val_steps, val_losses = MetricHistory(), [0], []
        val_losses.append(float(eval_loss(model, val_x, val_y, vocab_keywords)))
        progress = run.progress()
        for step in progress:
            batch = random_windows(rng, train_data, args.batch_size, args.seq_len)
            inputs, labels = (jax.device_put(a, BATCH) for a in batch)
            train_step(model, optimizer, metrics, inputs, labels, vocab_keywords)
            if run.is_eval_step(step):
                val_steps.append(step)
                val_losses.append(float(eval_loss(model, val_x, val_y, vocab_keywords)))
            if run.is_log_step(step):
                logged = history.record(step, metrics)
                progress.set_postfix(logged | {"val_ppl": np.exp(val_losses[-1])})
        progress.close()
        grad = head_gradient(model, val_x, val_y, vocab_keywords)
        kernel = model.head_kernel()

    save_figure(run.figure_path, history, val_steps, val_losses)
    shard_shapes = sorted({tuple(s.data.shape) for s in grad.addressable_shards})
    report = {
        "axis_type": args.axis_type,
        "mesh": dict(mesh.shape),
        "vocab_size": vocab,
        "params": count_params(model),
        "first_loss": history.first("loss"),
        "last_loss": history.last("loss"),
        "initial_val_perplexity": float(np.exp(val_losses[0])),
        "val_perplexity": float(np.exp(val_losses[-1])),
        "head_sharding": str(kernel.sharding.spec),
        "head_grad_sharding": str(grad.sharding.spec),
        "head_grad_shard_shapes": [list(s) for s in shard_shapes],
    }
    return run.report(
        report,
        f"mesh {report['mesh']} ({args.axis_type}) loss {report['first_loss']:.3f} -> "
        f"{report['last_loss']:.3f} val_ppl {report['initial_val_perplexity']:.1f} -> "
        f"{report['val_perplexity']:.2f} head grad {report['head_grad_sharding']} "
        f"(shards {shard_shapes})",
    )


if __name__ == "__main__":
    main()

"""Fused distillation losses for large vocabularies: KL and Jensen-Shannon from hidden states.

A student ``hidden @ weight + bias`` and a teacher ``target_hidden @ target_weight +
target_bias`` share a vocabulary of ``V`` classes; neither ``(tokens, V)`` logit array is ever
materialised. Each loss is one statistic of the two heads on the shared vocabulary-streaming
engine (``_stream``: ``KLDivergence``, one pass; ``JSDivergence``, two passes, since the
mixture needs both normalisers), which streams blocks of vocabulary columns with online
per-token statistics in float32, combines them over ``axis_name`` and recomputes each block's
two logit tiles in its backward pass. Both divergences are summed termwise (never as the
difference of two log-normalisers): exactly 0 for a student equal to its teacher, never
negative. Weights, masks and reductions are the shared ``_reduce`` mechanism on the per-token
result.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _api, _checks, _reduce, _stream, _vocab, _vocab_parallel
from jaxce._checks import POSITIVE, UNIT_INTERVAL, Reduction

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Loss: TypeAlias = Array | tuple[Array, Array]

# The backward keeps about four (tokens x chunk) float32 tiles alive (two logit tiles and
# their gradients, twice the fused cross-entropy's), so each gets a quarter of the shared
# tile budget.
_TILES_ALIVE = 4


class _Config(NamedTuple):
    chunk: int  # columns per tile (<= local vocabulary)
    limit: int  # global number of real classes; columns at or past it are padding
    axis_name: str | None  # mesh axis the vocabulary is sharded over
    vma_off: bool = False  # inside shard_map(check_vma=False): cotangents come as shares


class _Operands(NamedTuple):
    x: Array  # (N, D) student hidden states
    w: Array  # (D, V) student kernel (local shard under axis_name)
    b: Array | None
    xt: Array  # (N, D_t) teacher hidden states
    wt: Array  # (D_t, V) teacher kernel
    bt: Array | None


def _divergence(prep: _Prepared, stat: _stream.Stat, inv_t: Array, param) -> Array:
    """Per-token ``stat`` of the student (head 0) and the teacher (head 1), both tempered."""
    cfg, ops = prep.cfg, prep.ops
    spec = _stream.Spec(
        stats=(stat,),
        chunk=cfg.chunk,
        limit=cfg.limit,
        axis_name=cfg.axis_name,
        shared_cotangents=cfg.vma_off,
        temperature_grad=True,
        same_temperature=True,
    )
    heads = (
        _stream.Head(ops.x, ops.w, ops.b, inv_t),
        _stream.Head(ops.xt, ops.wt, ops.bt, inv_t),
    )
    (value,) = _stream.stream(spec, heads, None, None, prep.offset, (param,))  # type: ignore[misc]
    return value


# --------------------------------------------------------------------------------------------
# Public functions: validation, bookkeeping, one core call, the shared reductions.


class _Prepared(NamedTuple):
    cfg: _Config
    ops: _Operands
    offset: Array
    batch: tuple[int, ...]
    weights: _reduce.ExampleWeights
    acc: jnp.dtype


def _prepare(
    hidden,
    weight,
    target_hidden,
    target_weight,
    bias,
    target_bias,
    sample_weights,
    reduction,
    chunk_size,
    axis_name,
    vocab_size,
) -> _Prepared:
    hidden, weight = _vocab.hidden_and_kernel(hidden, "hidden", weight, "weight")
    target_hidden, target_weight = _vocab.hidden_and_kernel(
        target_hidden, "target_hidden", target_weight, "target_weight"
    )
    batch = hidden.shape[:-1]
    if target_hidden.shape[:-1] != batch:
        raise ValueError(
            f"`target_hidden` has shape {target_hidden.shape} and `hidden` has shape "
            f"{hidden.shape}: their leading (token) axes must be equal."
        )
    local_vocab = weight.shape[1]
    if target_weight.shape[1] != local_vocab:
        raise ValueError(
            f"`target_weight` has shape {target_weight.shape} and `weight` has shape "
            f"{weight.shape}: both need the same number of vocabulary columns."
        )
    bias = _vocab.per_column(bias, "bias", local_vocab)
    target_bias = _vocab.per_column(target_bias, "target_bias", local_vocab)
    _checks.reduction(reduction)
    offset, vocab_size = _vocab.shards(axis_name, local_vocab, vocab_size)
    tokens = int(np.prod(batch, dtype=np.int64))
    chunk_size = _vocab.chunk_size(chunk_size)
    if chunk_size is None:
        chunk = _vocab.auto_chunk(_TILES_ALIVE * max(1, tokens), local_vocab)
    else:
        chunk = min(chunk_size, local_vocab)

    acc = _reduce.compute_dtype(
        hidden.dtype, weight.dtype, target_hidden.dtype, target_weight.dtype
    )
    weights = _reduce.example_weights(batch, acc, sample_weights=sample_weights)

    x = hidden.reshape(tokens, hidden.shape[-1])
    xt = target_hidden.reshape(tokens, target_hidden.shape[-1])
    if sample_weights is not None:
        # Dropped tokens get zero hidden states: their loss is discarded anyway, and a NaN in
        # them would otherwise reach dW through 0 * NaN.
        kept = (weights.weight != 0).reshape(tokens, 1)
        x = jnp.where(kept, x, jnp.zeros((), x.dtype))
        xt = jnp.where(kept, xt, jnp.zeros((), xt.dtype))
    if axis_name is not None:
        # The hidden states are replicated over the vocabulary axis; marked device-varying,
        # their cotangents (partial sums per shard) are summed over it by the transpose.
        x = _vocab.make_varying(x, (axis_name,))
        xt = _vocab.make_varying(xt, (axis_name,))
    cfg = _Config(chunk, vocab_size, axis_name, _vocab.vma_unchecked(axis_name))
    ops = _Operands(x, weight, bias, xt, target_weight, target_bias)
    return _Prepared(cfg, ops, offset, batch, weights, acc)


def _operands(h, w, ht, wt, b, bt, sample_weights, scalars):
    """The operands of a distillation loss by role, for ``_vocab_parallel.fused``."""
    return {
        "hiddens": {"hidden": h, "target_hidden": ht},
        "kernels": {"weight": w, "target_weight": wt},
        "columns": {"bias": b, "target_bias": bt},
        "tokens": {"sample_weights": sample_weights},
        "shared": scalars,
    }


@_api.public(
    static=("reduction", "chunk_size", "axis_name", "vocab_axis", "mesh", "vocab_size"),
    domains={"temperature": POSITIVE},
    reverse_mode_only="jaxce.softmax_kl_divergence(hidden @ weight + bias, ...)",
)
def linear_softmax_kl_divergence(
    hidden: ArrayLike,
    weight: ArrayLike,
    target_hidden: ArrayLike,
    target_weight: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    target_bias: ArrayLike | None = None,
    temperature: float = 1.0,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
) -> Loss:
    r"""Distillation KL from hidden states, without materialising either ``(tokens, V)`` logits.

    The student's logits are :math:`s = h W + b`, the teacher's :math:`t = h_t W_t + b_t`
    (``D`` and ``D_t`` may differ; the vocabulary is shared). With :math:`a = s / T`,
    :math:`c = t / T`, :math:`p = \operatorname{softmax}(a)`, :math:`q = \operatorname{softmax}(c)`:

    .. math::
      \ell = T^2\, KL(q \,\|\, p) = T^2 \Big( G + L_a - L_c \Big), \qquad
      L_a = \log \sum_v e^{a_v}, \quad L_c = \log \sum_v e^{c_v}, \quad
      G = \sum_v q_v (c_v - a_v)

    times ``sample_weights``. This is
    ``softmax_kl_divergence(hidden @ weight + bias, target_hidden @ target_weight +
    target_bias, temperature=T)``, equal in value and in the gradients with respect to all six
    arrays (the teacher gets gradients too: pass ``jax.lax.stop_gradient(target_hidden)`` etc.
    or differentiate the student's arguments only for a frozen teacher).

    All three statistics come from one pass over blocks of ``chunk_size`` vocabulary columns,
    online: per token a running maximum :math:`m` and sum :math:`S = \sum e^{c_v - m}` for each
    side and :math:`U = \sum e^{c_v - m_c} (c_v - a_v)`; when a block raises :math:`m_c` to
    :math:`m_c'`, :math:`S_c` and :math:`U` are rescaled by :math:`e^{m_c - m_c'}`. At the end
    :math:`L = m + \log S` and :math:`G = U / S_c`. The backward pass recomputes each block's
    two logit tiles and uses :math:`\partial \ell / \partial s_v = T (p_v - q_v)` and
    :math:`\partial \ell / \partial t_v = T q_v (c_v - a_v - G)` (times the token's
    cotangent); it writes that block of ``dweight``/``dtarget_weight`` (one GEMM over all
    tokens) and accumulates both ``dhidden`` in float32. Memory beyond inputs and outputs is a
    few ``(tokens, chunk_size)`` float32 tiles plus the float32 ``dhidden`` accumulators,
    forward and backward.

    **Numerics.** :math:`G + L_a - L_c` is taken as :math:`G - \operatorname{log1p}(\sum_v
    p_v \operatorname{expm1}(c_v - a_v))`, exactly 0 for equal heads. Far from identity (that
    sum outside :math:`[-1/2, 1]`: a hidden value of ``1e30`` or the largest float in either
    head, where :math:`G` and :math:`L_a - L_c` are huge and cancel) a fourth running
    statistic, :math:`E_q[(c - m_c) - (a - m_a)]` against both running maxima, gives the
    divergence with no cancellation, and the teacher's gradient is :math:`T q_v (\log q_v -
    \log p_v - KL)`. One caveat of XLA:CPU, not of this loss: a temperature that is not a
    power of two scales the logits with a product that XLA may round differently in two
    fusions, which for logits beyond about ``1e7`` shifts ``exp(z - max)`` visibly (at
    ``1e28``, to 0 or inf; ``jax.nn.logsumexp(x / 3)`` does the same there).

    Half-precision operands stay half precision in the matmuls, with float32 accumulation
    (``preferred_element_type``); the statistics are float32 and the logits' gradients are cast
    to the operand dtype just before the backward matmuls. The loss is float32 for
    half-precision inputs, and every gradient has its input's dtype.

    **Differentiation.** Reverse mode only: ``jax.grad``, ``jax.value_and_grad``, ``jax.vjp``,
    to first order, under ``jax.jit``, ``jax.vmap`` and ``jax.checkpoint``, and inside
    ``shard_map``; also with respect to a traced ``temperature``. ``jax.jvp`` (and so second
    order) raises a ``TypeError`` naming this function (under an outer ``jax.jit``, JAX's own
    "can't apply forward-mode autodiff (jvp) to a custom_vjp function"): use
    :func:`softmax_kl_divergence` on the materialised logits for those.

    **On a mesh under plain** ``jax.jit`` (global arrays, no ``shard_map``). Data parallel:
    hidden states and per-token arrays sharded over any batch axes of a mesh of either axis
    type, kernels replicated; the result and every gradient equal the unsharded call, the
    gradients keep their inputs' shardings and per-token outputs keep the tokens' sharding,
    with no collective for them. Vocabulary parallel, never gathering a kernel whole: on an
    **Explicit** mesh (``jax.make_mesh``'s default, with ``jax.set_mesh``) automatically,
    when ``weight`` (or ``target_weight``) is sharded over its columns (``P(None,
    "model")``: both kernels and both biases sharded alike) or over ``D``
    only (``P("model", None)``, FSDP: re-laid out over the vocabulary by
    ``jax.sharding.reshard``, an all-to-all); on an **Auto** mesh by opting in with
    ``vocab_axis="model"`` (the context mesh, or ``mesh=``), padding a vocabulary that does
    not divide the shard count. Each device then streams its vocabulary shard (as with
    ``axis_name`` below), the tokens staying on their batch axes; the gradients of the
    kernels come back sharded over the vocabulary (on an Explicit mesh, with the kernels'
    own sharding). The dispatch is ``jaxce._vocab_parallel.fused``, shared by every fused
    loss::

        mesh = jax.make_mesh((2, 4), ("data", "model"))     # Explicit axes
        with jax.set_mesh(mesh):
            hidden = jax.device_put(hidden, P("data", None))
            weight = jax.device_put(weight, P(None, "model"))  # vocab-parallel over "model"
            ...                                            # then call the loss under jax.jit

    **Vocab-parallel.** With ``axis_name``, call it inside ``jax.shard_map`` with ``weight``,
    ``target_weight`` (and the biases) sharded over the vocabulary along that mesh axis and the
    hidden states replicated over it. The shards' statistics are combined with one ``pmax`` and
    a few ``psum`` of ``(tokens,)`` vectors; the result equals the unsharded one. The kernels'
    gradients stay local; the hidden states' gradients are partial sums per shard, which
    ``shard_map`` sums over the axis (the one ``(tokens, D)`` all-reduce of a vocab-parallel
    head, as in Megatron). Pad both
    kernels with columns up to a multiple of the shard count and pass the true vocabulary as
    ``vocab_size``: padded columns are excluded from both softmaxes. Tokens over ``data`` and
    the vocabulary over ``model``::

        mesh = jax.make_mesh((2, 4), ("data", "model"))
        P = jax.sharding.PartitionSpec

        @functools.partial(
            jax.shard_map, mesh=mesh, out_specs=P(),
            in_specs=(P("data", None), P(None, "model"), P("data", None), P(None, "model")))
        def loss(h, w, ht, wt):  # per device: (N/2, D), (D, V/4), (N/2, D_t), (D_t, V/4)
            total, count = jaxce.linear_softmax_kl_divergence(
                h, w, ht, wt, axis_name="model", reduction="sum_and_weight")
            return jaxce.weighted_mean(jax.lax.psum(total, "data"), jax.lax.psum(count, "data"))

    Args:
      hidden: ``(..., D)`` student hidden states (one row per token).
      weight: ``(D, V)`` student output kernel (``embedding.T`` for tied embeddings); under
        ``axis_name`` the local ``(D, V / shards)`` shard.
      target_hidden: ``(..., D_t)`` teacher hidden states, the same leading shape as ``hidden``.
      target_weight: ``(D_t, V)`` teacher output kernel (local shard under ``axis_name``).
      bias: optional ``(V,)`` student bias.
      target_bias: optional ``(V,)`` teacher bias.
      temperature: :math:`T > 0` (a traced value outside the domain gives NaN).
      sample_weights: weights broadcastable to ``hidden.shape[:-1]``; a zero weight drops its
        token (loss 0, gradient 0, not counted by the mean); a boolean array is a token mask.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean; 0 if every token is
        dropped) or ``"sum_and_weight"`` (numerator and denominator of the mean).
      chunk_size: vocabulary columns per block. ``None`` picks about ``2**20 / tokens`` (a
        4 MiB float32 tile), a multiple of 128, at least 256 and at most ``V``; blocks need not
        divide ``V`` (the last one is shifted to overlap the previous one).
      axis_name: mesh axis over which both kernels are vocabulary-sharded, or ``None``.
      vocab_axis: mesh axis (or tuple of axes) to shard the vocabulary over under plain
        ``jax.jit`` (global arrays, no ``shard_map`` of yours); needed on a mesh of Auto
        axes only: on an Explicit mesh the axis is read from the kernel's sharding, and
        ``vocab_axis`` overrides it. Mutually exclusive with ``axis_name`` (``ValueError``).
      mesh: the mesh that has ``vocab_axis``; ``None`` takes the context mesh
        (``jax.set_mesh``/``jax.sharding.use_mesh``). Only with ``vocab_axis``.
      vocab_size: number of real classes when the kernels carry padding columns at the end
        (global count under ``axis_name``); ``None``: every column is a class.

    Returns:
      Per-token losses of shape ``hidden.shape[:-1]`` (``reduction="none"``), a scalar, or
      the pair for ``"sum_and_weight"``; float32 for half-precision inputs, else the inputs'
      dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> k = jax.random.split(jax.random.key(0), 4)
      >>> hidden, target_hidden = jax.random.normal(k[0], (8, 16)), jax.random.normal(k[1], (8, 32))
      >>> weight = jax.random.normal(k[2], (16, 1000)) / 4
      >>> target_weight = jax.random.normal(k[3], (32, 1000)) / 4
      >>> fused = jaxce.linear_softmax_kl_divergence(
      ...     hidden, weight, target_hidden, target_weight, temperature=2.0, reduction="mean",
      ...     chunk_size=256)
      >>> dense = jaxce.softmax_kl_divergence(
      ...     hidden @ weight, target_hidden @ target_weight, temperature=2.0, reduction="mean")
      >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
      True
      >>> grad = jax.grad(jaxce.linear_softmax_kl_divergence, argnums=1)(
      ...     hidden, weight, target_hidden, target_weight, reduction="mean")
      >>> grad.shape
      (16, 1000)

    References:
      Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015;
      Wijmans et al., *Cut Your Losses in Large-Vocabulary Language Models*, 2024;
      Milakov and Gimelshein, *Online normalizer calculation for softmax*, 2018.
    """
    _checks.reduction(reduction)
    return _vocab_parallel.fused(
        functools.partial(_kl, chunk_size=chunk_size),
        **_operands(hidden, weight, target_hidden, target_weight, bias, target_bias,
                    sample_weights, {"temperature": temperature}),
        reduction=reduction, axis_name=axis_name, vocab_axis=vocab_axis, mesh=mesh,
        vocab_size=vocab_size,
    )  # fmt: skip


def _kl(
    hidden, weight, target_hidden, target_weight, bias, target_bias, sample_weights,
    temperature, *, reduction, chunk_size, axis_name, vocab_size,
):  # fmt: skip
    """The KL loss on one device's arrays (the vocabulary shard under ``axis_name``)."""
    prep = _prepare(
        hidden,
        weight,
        target_hidden,
        target_weight,
        bias,
        target_bias,
        sample_weights,
        reduction,
        chunk_size,
        axis_name,
        vocab_size,
    )
    t = _checks.nan_outside_domain(temperature, "temperature", prep.acc, POSITIVE)
    kl = _divergence(prep, _stream.KLDivergence(), 1 / t, None)
    return _reduce.weigh_and_reduce(jnp.square(t) * kl.reshape(prep.batch), prep.weights, reduction)


@_api.public(
    static=("reduction", "chunk_size", "axis_name", "vocab_axis", "mesh", "vocab_size"),
    domains={"temperature": POSITIVE, "beta": UNIT_INTERVAL},
    reverse_mode_only="jaxce.js_divergence(student_logits / T, teacher_logits / T, ...)",
)
def linear_js_divergence(
    hidden: ArrayLike,
    weight: ArrayLike,
    target_hidden: ArrayLike,
    target_weight: ArrayLike,
    *,
    beta: float = 0.5,
    bias: ArrayLike | None = None,
    target_bias: ArrayLike | None = None,
    temperature: float = 1.0,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
) -> Loss:
    r"""Generalised Jensen-Shannon divergence from hidden states, without materialising logits.

    With student logits :math:`s = h W + b`, teacher logits :math:`t = h_t W_t + b_t`,
    :math:`P = \operatorname{softmax}(s / T)` (the student), :math:`Q =
    \operatorname{softmax}(t / T)` (the teacher) and :math:`M = \beta P + (1 - \beta) Q`:

    .. math::
      JS_\beta = \beta\, KL(P \,\|\, M) + (1 - \beta)\, KL(Q \,\|\, M)
        = \sum_v \beta P_v (\log P_v - \log M_v) + (1 - \beta) Q_v (\log Q_v - \log M_v),

      \log P_v = a_v - L_a, \quad \log Q_v = c_v - L_c, \quad
      \log M_v = \operatorname{logaddexp}(\log\beta + \log P_v, \log(1 - \beta) + \log Q_v)

    times ``sample_weights``, with :math:`a = s / T`, :math:`c = t / T` and :math:`L` their
    log-sum-exps. This is ``js_divergence(student_logits / T, teacher_logits / T, beta=beta)``,
    equal in value and in the gradients with respect to all six arrays (the teacher gets
    gradients unless the caller stops them). No :math:`T^2` factor: at :math:`\beta = 1/2` it
    is symmetric and at most :math:`\log 2`; at :math:`\beta \in \{0, 1\}` it is 0.

    The mixture needs both normalisers, so the forward makes two passes over blocks of
    ``chunk_size`` vocabulary columns: the first keeps the online log-sum-exps :math:`L_a,
    L_c` (running maximum and rescaled sum per token), the second sums the two terms above
    into :math:`J_P` and :math:`J_Q` (:math:`JS_\beta = J_P + J_Q`). The backward recomputes the
    tiles and uses :math:`\partial JS / \partial a_v = \beta P_v (\log P_v - \log M_v) - P_v
    J_P` and :math:`\partial JS / \partial c_v = (1 - \beta) Q_v (\log Q_v - \log M_v) - Q_v
    J_Q`. With :math:`d = \log Q_v - \log P_v` taken as :math:`(c_v - a_v) - (L_c - L_a)`
    (0 for equal heads) near identity and as :math:`(c_v - L_c) - (a_v - L_a)` far from it (a
    hidden value of ``1e30`` or the largest float: see the KL's "Numerics"), the loss and its
    gradients stay finite wherever the divergence is. Memory, precision and sharding are as in
    :func:`linear_softmax_kl_divergence`.

    **Differentiation.** Reverse mode only (``jax.grad``, ``jax.value_and_grad``,
    ``jax.vjp``), to first order, under ``jax.jit``, ``jax.vmap``, ``jax.checkpoint`` and
    inside ``shard_map``, also with respect to traced ``beta`` and ``temperature``;
    ``jax.jvp`` raises a ``TypeError`` naming this function (JAX's own message under an outer
    ``jax.jit``): use :func:`js_divergence` on the materialised logits for forward mode.

    Args:
      hidden: ``(..., D)`` student hidden states (the :math:`P` side).
      weight: ``(D, V)`` student output kernel; local shard under ``axis_name``.
      target_hidden: ``(..., D_t)`` teacher hidden states (the :math:`Q` side).
      target_weight: ``(D_t, V)`` teacher output kernel; local shard under ``axis_name``.
      beta: mixing weight :math:`\beta \in [0, 1]` (a traced value outside gives NaN).
      bias: optional ``(V,)`` student bias.
      target_bias: optional ``(V,)`` teacher bias.
      temperature: :math:`T > 0`, dividing both logits.
      sample_weights: weights broadcastable to ``hidden.shape[:-1]``; zero drops a token;
        a boolean array is a token mask.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.
      chunk_size: vocabulary columns per block, or ``None`` for automatic.
      axis_name: mesh axis over which both kernels are vocabulary-sharded, or ``None``.
      vocab_axis: mesh axis (or tuple of axes) to shard the vocabulary over under plain
        ``jax.jit`` (global arrays, no ``shard_map`` of yours); needed on a mesh of Auto
        axes only: on an Explicit mesh the axis is read from the kernel's sharding, and
        ``vocab_axis`` overrides it. Mutually exclusive with ``axis_name`` (``ValueError``).
      mesh: the mesh that has ``vocab_axis``; ``None`` takes the context mesh
        (``jax.set_mesh``/``jax.sharding.use_mesh``). Only with ``vocab_axis``.
      vocab_size: number of real classes when the kernels carry padding columns.

    Returns:
      Per-token divergences of shape ``hidden.shape[:-1]``, a scalar, or the pair for
      ``"sum_and_weight"``; float32 for half-precision inputs, else the inputs' dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> k = jax.random.split(jax.random.key(0), 4)
      >>> hidden, target_hidden = jax.random.normal(k[0], (8, 16)), jax.random.normal(k[1], (8, 32))
      >>> weight = jax.random.normal(k[2], (16, 1000)) / 4
      >>> target_weight = jax.random.normal(k[3], (32, 1000)) / 4
      >>> fused = jaxce.linear_js_divergence(
      ...     hidden, weight, target_hidden, target_weight, beta=0.3, chunk_size=256)
      >>> dense = jaxce.js_divergence(hidden @ weight, target_hidden @ target_weight, beta=0.3)
      >>> bool(jnp.allclose(fused, dense, rtol=1e-5, atol=1e-6))
      True
      >>> bool(jnp.all(fused <= jnp.log(2.0)))
      True

    References:
      Lin, *Divergence Measures Based on the Shannon Entropy*, 1991; Agarwal et al.,
      *On-Policy Distillation of Language Models* (generalised JSD), 2024; Hsu et al.,
      *Liger Kernel* (fused linear JSD), 2024.
    """
    _checks.reduction(reduction)
    return _vocab_parallel.fused(
        functools.partial(_js, chunk_size=chunk_size),
        **_operands(hidden, weight, target_hidden, target_weight, bias, target_bias,
                    sample_weights, {"temperature": temperature, "beta": beta}),
        reduction=reduction, axis_name=axis_name, vocab_axis=vocab_axis, mesh=mesh,
        vocab_size=vocab_size,
    )  # fmt: skip


def _js(
    hidden, weight, target_hidden, target_weight, bias, target_bias, sample_weights,
    temperature, beta, *, reduction, chunk_size, axis_name, vocab_size,
):  # fmt: skip
    """The JS loss on one device's arrays (the vocabulary shard under ``axis_name``)."""
    prep = _prepare(
        hidden,
        weight,
        target_hidden,
        target_weight,
        bias,
        target_bias,
        sample_weights,
        reduction,
        chunk_size,
        axis_name,
        vocab_size,
    )
    t = _checks.nan_outside_domain(temperature, "temperature", prep.acc, POSITIVE)
    b = _checks.nan_outside_domain(beta, "beta", prep.acc, UNIT_INTERVAL)
    js = _divergence(prep, _stream.JSDivergence(), 1 / t, b)
    return _reduce.weigh_and_reduce(js.reshape(prep.batch), prep.weights, reduction)

"""Fused linear + softmax cross-entropy for large vocabularies (never materialises the logits).

Design (see ``linear_softmax_cross_entropy``):

* One differentiable core, ``_stats``, returns per-token sufficient statistics in float32:
  ``lse`` (log-normaliser), ``z_y`` (the label's logit) and ``S`` (the sum of the logits, only
  when label smoothing needs it). It is a ``jax.custom_vjp`` whose forward is a ``lax.scan``
  over vocabulary chunks with an online log-sum-exp, and whose backward recomputes each
  chunk's logits, writes that chunk's ``dW`` block (one GEMM over all tokens, so no
  cross-chunk accumulation) into its place and accumulates ``dX`` in float32.
* Everything else (smoothing, z-loss, ignore_index, weights, reductions, NaN on bad labels)
  is plain JAX on ``(N,)`` vectors plus the shared ``_reduce`` mechanism, so its derivatives
  are automatic and any cotangent of the statistics is honoured.
* Vocab-parallel (``axis_name``): each device computes the statistics of its vocabulary shard
  and they are combined with ``psum`` (the log-sum-exp shifted by a constant ``pmax``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _checks, _reduce, _vocab

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike


class _Config(NamedTuple):
    chunk: int  # columns per tile (<= local vocabulary)
    softcap: float | None  # s in s * tanh(z / s)
    limit: int  # global number of real classes; columns at or past it are padding
    want_sum: bool  # compute S = sum of the (capped) logits over real classes


def _tile(cfg: _Config, x, w, b, i, offset):
    """Logits of chunk ``i``: ``(z (N, C) in the accumulation dtype, wc, cols, valid, start)``."""
    acc = _reduce.compute_dtype(x.dtype, w.dtype)
    wc, bc, cols, fresh, start = _vocab.column_block(w, b, i, cfg.chunk)
    z = jnp.dot(x, wc, preferred_element_type=acc)
    if bc is not None:
        z = z + bc.astype(acc)[None, :]
    if cfg.softcap is not None:
        z = cfg.softcap * jnp.tanh(z / cfg.softcap)
    valid = fresh & (offset + cols < cfg.limit)
    return z, wc, cols, valid[None, :], start


def _stats_fwd_impl(cfg: _Config, x, w, b, y, offset):
    n = x.shape[0]
    acc = _reduce.compute_dtype(x.dtype, w.dtype)
    zero = jnp.zeros((), acc)

    def body(carry, i):
        m, s, zy, total = carry
        z, _, cols, valid, _ = _tile(cfg, x, w, b, i, offset)
        zm = jnp.where(valid, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(zm, axis=1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, zero)
        s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(zm - shift[:, None]), axis=1)
        hit = valid & (cols[None, :] == y[:, None])
        zy = zy + jnp.sum(jnp.where(hit, z, zero), axis=1)
        if cfg.want_sum:
            total = total + jnp.sum(jnp.where(valid, z, zero), axis=1)
        return (m_new, s, zy, total), None

    init = (
        jnp.full((n,), -jnp.inf, acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n,), acc),
    )
    init = _vocab.varying_like(init, x, w, b, y, offset)
    (m, s, zy, total), _ = lax.scan(
        body, init, jnp.arange(_vocab.num_chunks(w.shape[1], cfg.chunk))
    )
    shift = jnp.where(jnp.isfinite(m), m, zero)
    lse = shift + jnp.log(s)  # -inf for a row with no real class (an all-padding shard)
    return lse, zy, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(cfg: _Config, x, w, b, y, offset):
    """Per-token ``(lse, z_y, S)`` of ``z = cap(x @ w + b)`` over the real columns.

    ``y`` are local column ids (``-1``: the label is not in this shard, ``z_y = 0``) and
    ``offset`` is the global id of local column 0 (a traced scalar under ``shard_map``).
    """
    return _stats_fwd_impl(cfg, x, w, b, y, offset)


def _stats_fwd(cfg, x, w, b, y, offset):
    lse, zy, total = _stats_fwd_impl(cfg, x, w, b, y, offset)
    return (lse, zy, total), (x, w, b, y, offset, lse)


def _stats_bwd(cfg, res, cotangents):
    x, w, b, y, offset, lse = res
    g_lse, g_zy, g_sum = cotangents
    acc = _reduce.compute_dtype(x.dtype, w.dtype)
    operand = jnp.result_type(x.dtype, w.dtype)
    zero = jnp.zeros((), acc)

    def body(carry, i):
        dx, dw, db = carry
        z, wc, cols, valid, start = _tile(cfg, x, w, b, i, offset)
        p = jnp.where(valid, jnp.exp(z - lse[:, None]), zero)
        dz = g_lse[:, None] * p
        hit = valid & (cols[None, :] == y[:, None])
        dz = dz + jnp.where(hit, g_zy[:, None], zero)
        if cfg.want_sum:
            dz = dz + jnp.where(valid, g_sum[:, None], zero)
        if cfg.softcap is not None:
            t = z / cfg.softcap
            dz = dz * (1 - t * t)
        dzc = dz.astype(operand)
        dx = dx + jnp.dot(dzc, wc.T, preferred_element_type=acc)
        dwc = jnp.dot(x.T, dzc, preferred_element_type=acc)
        dw = lax.dynamic_update_slice_in_dim(dw, dwc.astype(dw.dtype), start, axis=1)
        if db is not None:
            dbc = jnp.sum(dz, axis=0).astype(db.dtype)
            db = lax.dynamic_update_slice_in_dim(db, dbc, start, axis=0)
        return (dx, dw, db), None

    init = (
        jnp.zeros(x.shape, acc),
        jnp.zeros(w.shape, w.dtype),
        None if b is None else jnp.zeros(b.shape, b.dtype),
    )
    init = _vocab.varying_like(init, x, w, b, y, offset, lse, g_lse, g_zy, g_sum)
    # Reverse order: the shifted last tile writes zeros over the columns it shares with the
    # previous tile, which then overwrites them with their true gradient.
    (dx, dw, db), _ = lax.scan(
        body, init, jnp.arange(_vocab.num_chunks(w.shape[1], cfg.chunk)), reverse=True
    )
    # Inside shard_map a cotangent may vary over mesh axes its primal does not (dW sums over the
    # token shards of a data axis): sum it over those axes, as the transpose of pcast would.
    dx, dw, db = (
        None if ct is None else _vocab.sum_over_extra_axes(ct, ref)
        for ct, ref in ((dx, x), (dw, w), (db, b))
    )
    return dx.astype(x.dtype), dw, db, None, None


_stats.defvjp(_stats_fwd, _stats_bwd)


def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_size: int | None = None,
):
    r"""Softmax cross-entropy of ``hidden @ weight + bias`` without materialising the logits.

    For a token with hidden state :math:`h`, label :math:`y`, :math:`V` classes, smoothing
    :math:`\varepsilon`, z-loss :math:`\lambda_z` and optional soft cap :math:`s`:

    .. math::
      z = \operatorname{cap}_s(h W + b), \quad \operatorname{cap}_s(u) = s \tanh(u / s),
      \qquad L = \operatorname{logsumexp}_c z_c,

      \ell = (1 - \varepsilon)(L - z_y) + \varepsilon \Big(L - \frac{1}{V}\sum_c z_c\Big)
             + \lambda_z L^2

    times ``sample_weights``; this equals
    ``softmax_cross_entropy_with_integer_labels(cap(hidden @ weight + bias), labels, ...)``
    in value and in its gradients with respect to ``hidden``, ``weight`` and ``bias``.

    The vocabulary is processed in chunks of ``chunk_size`` columns: the forward pass keeps an
    online log-sum-exp per token, the backward pass recomputes each chunk's logits, writes that
    chunk's block of ``dweight`` and accumulates ``dhidden`` in float32. Memory beyond inputs
    and outputs is one ``(tokens, chunk_size)`` float32 tile and a few of its elementwise
    temporaries, plus ``O(tokens * D)`` for the float32 ``dhidden`` accumulator, forward and
    backward: the ``(tokens, V)`` logits never exist. The backward costs one more matmul than
    the materialised loss (the recomputed logits).

    Half-precision ``hidden``/``weight`` stay half precision as matmul operands, with float32
    accumulation (``preferred_element_type``); the log-sum-exp and the logits' gradient are
    float32 and the latter is cast to the operand dtype just before the two backward matmuls.
    The loss is float32 for half-precision inputs.

    **Differentiation.** Reverse mode (``jax.grad``, ``jax.value_and_grad``, ``jax.vjp``) to
    first order, under ``jax.jit``, ``jax.vmap`` and ``jax.checkpoint``, and inside
    ``shard_map``. Forward mode (``jax.jvp``) and second order are *not* supported (the core is
    a ``jax.custom_vjp``; JAX raises if asked): differentiate
    :func:`softmax_cross_entropy_with_integer_labels` of the materialised logits for those.

    **Vocab-parallel.** With ``axis_name``, call it inside ``jax.shard_map`` with ``weight``
    (and ``bias``) sharded over the vocabulary along that mesh axis and ``hidden``/``labels``
    replicated over it; ``labels`` are global vocabulary ids. Each device handles its shard
    and the per-token statistics are combined with one ``pmax`` and three ``psum`` of
    ``(tokens,)`` vectors; the result equals the unsharded one. ``dweight`` stays local;
    ``dhidden`` is summed over the axis by ``shard_map``. ``shard_map`` needs the vocabulary
    to divide evenly: pad ``weight`` (and ``bias``) with columns up to a multiple of the shard
    count and pass the true number of classes as ``vocab_size``; padded columns are excluded
    from the softmax and from smoothing. A ``(data, model)`` mesh, tokens over ``data`` and
    vocabulary over ``model`` (inputs placed with their shardings)::

        mesh = jax.make_mesh((2, 4), ("data", "model"))
        P = jax.sharding.PartitionSpec

        @functools.partial(
            jax.shard_map, mesh=mesh,
            in_specs=(P("data", None), P(None, "model"), P("data")), out_specs=P())
        def loss(hidden, weight, labels):         # per device: (N/2, D), (D, V/4), (N/2,)
            total, count = jaxce.linear_softmax_cross_entropy(
                hidden, weight, labels, axis_name="model", reduction="sum_and_weight")
            return jaxce.weighted_mean(jax.lax.psum(total, "data"),
                                       jax.lax.psum(count, "data"))

        put = lambda x, *spec: jax.device_put(x, jax.NamedSharding(mesh, P(*spec)))
        value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
            put(hidden, "data", None), put(weight, None, "model"), put(labels, "data"))

    Args:
      hidden: ``(..., D)`` float array (one row per token; any leading axes).
      weight: ``(D, V)`` float array (a Flax ``Dense`` kernel; tied embeddings pass
        ``embedding.T``, whose gradient flows back through the transpose). Under
        ``axis_name``: the local ``(D, V / shards)`` shard.
      labels: integer array of shape ``hidden.shape[:-1]``, class ids in ``[0, V)``.
      bias: optional ``(V,)`` (local shard under ``axis_name``).
      ignore_index: label value whose tokens are dropped (loss 0, gradient 0, weight 0).
      label_smoothing: :math:`\varepsilon`; uniform mass :math:`\varepsilon / V`.
      z_loss: :math:`\lambda_z`, on the log-sum-exp of the (capped) logits.
      logit_softcap: :math:`s` (Gemma 2), or ``None`` for no cap.
      sample_weights: weights broadcastable to ``labels.shape``.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean; 0 if every token is
        dropped) or ``"sum_and_weight"`` (numerator and denominator of the mean).
      chunk_size: vocabulary columns per tile. ``None`` picks about ``2**22 / tokens`` (a
        16 MiB float32 tile), rounded down to a multiple of 128, at least 256 and at most
        ``V``. A chunk that does not divide ``V`` is fine: the last tile is shifted to overlap
        the previous one (tiles are never shrunk and ``weight`` is never padded or copied).
      axis_name: mesh axis over which ``weight`` is vocabulary-sharded (inside
        ``shard_map``), or ``None``.
      vocab_size: number of real classes when ``weight`` carries padding columns at the end
        (global count under ``axis_name``); ``None`` means all ``V`` columns are classes.

    Returns:
      Per-token losses of shape ``labels.shape`` (``reduction="none"``), a scalar, or the pair
      for ``"sum_and_weight"``; float32 for half-precision inputs, else the inputs' dtype. A
      label outside ``[0, V)`` that is not ``ignore_index`` gives NaN for its token (and an
      error under ``jax.experimental.checkify``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> kh, kw, ky = jax.random.split(jax.random.key(0), 3)
      >>> hidden = jax.random.normal(kh, (8, 16))
      >>> weight = jax.random.normal(kw, (16, 1000)) / 4
      >>> labels = jax.random.randint(ky, (8,), 0, 1000)
      >>> fused = jaxce.linear_softmax_cross_entropy(
      ...     hidden, weight, labels, reduction="mean", chunk_size=256)
      >>> dense = jaxce.softmax_cross_entropy_with_integer_labels(
      ...     hidden @ weight, labels, reduction="mean")
      >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
      True
      >>> grad = jax.grad(jaxce.linear_softmax_cross_entropy, argnums=1)(
      ...     hidden, weight, labels, reduction="mean", chunk_size=256)
      >>> grad.shape
      (16, 1000)

    References:
      Wijmans et al., *Cut Your Losses in Large-Vocabulary Language Models* (Cut
      Cross-Entropy), 2024; Hsu et al., *Liger Kernel: Efficient Triton Kernels for LLM
      Training*, 2024; Shoeybi et al., *Megatron-LM* (vocab-parallel cross-entropy), 2019.
    """
    hidden = _checks.as_floating(hidden, "hidden")
    weight = _checks.as_floating(weight, "weight")
    if hidden.ndim < 1:
        raise ValueError(f"`hidden` must have shape (..., D), got a scalar {hidden.shape}.")
    if weight.ndim != 2:
        raise ValueError(f"`weight` has shape {weight.shape} but must be 2-D (D, V).")
    d_model, local_vocab = weight.shape
    if hidden.shape[-1] != d_model:
        raise ValueError(
            f"`hidden` has shape {hidden.shape} and `weight` has shape {weight.shape}: the last "
            f"axis of `hidden` must equal the first axis of `weight` ({d_model})."
        )
    if local_vocab == 0:
        raise ValueError(f"`weight` has shape {weight.shape}: it needs at least one class.")
    labels = _checks.as_integer(labels, "labels")
    batch = hidden.shape[:-1]
    _checks.same_shape(labels, "labels", batch, f"`hidden` {hidden.shape} without its last axis")
    if bias is not None:
        bias = _checks.as_floating(bias, "bias")
        _checks.same_shape(bias, "bias", (local_vocab,), "one entry per column of `weight`")
    if logit_softcap is not None:
        if isinstance(logit_softcap, jax.core.Tracer) or jnp.ndim(logit_softcap) != 0:
            raise TypeError("`logit_softcap` must be a Python float or None.")
        logit_softcap = float(logit_softcap)
        if not logit_softcap > 0:
            raise ValueError(f"`logit_softcap` must be positive, got {logit_softcap}.")
    _checks.reduction(reduction)

    if axis_name is None:
        shards, offset = 1, jnp.zeros((), jnp.int32)
    else:
        shards = lax.axis_size(axis_name)
        offset = (lax.axis_index(axis_name) * local_vocab).astype(jnp.int32)
    full_vocab = local_vocab * shards
    if vocab_size is None:
        vocab_size = full_vocab
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= full_vocab:
        raise ValueError(
            f"`vocab_size` must be an int in [1, {full_vocab}] (the columns of `weight`"
            f"{' over all shards' if shards > 1 else ''}), got {vocab_size!r}."
        )
    if chunk_size is None:
        chunk = _vocab.auto_chunk(max(1, labels.size), local_vocab)
    else:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
        chunk = min(chunk_size, local_vocab)

    acc = _reduce.compute_dtype(hidden.dtype, weight.dtype)
    weights, safe = _reduce.integer_label_weights(
        labels, vocab_size, acc, ignore_index=ignore_index, sample_weights=sample_weights
    )
    want_sum = not _checks.is_zero(label_smoothing)
    cfg = _Config(chunk=chunk, softcap=logit_softcap, limit=vocab_size, want_sum=want_sum)

    x = hidden.reshape(-1, d_model)
    y = safe.reshape(-1).astype(jnp.int32) - offset
    y = jnp.where((y >= 0) & (y < local_vocab), y, -1)
    if axis_name is not None:
        # hidden is replicated over the vocabulary axis; mark it device-varying so that its
        # cotangent (a partial sum per shard) is summed over the axis by the transpose.
        x = _vocab.make_varying(x, (axis_name,))
    lse, zy, total = _stats(cfg, x, weight, bias, y, offset)
    if axis_name is not None:
        # logsumexp over shards. The shift is a constant (pmax has no derivative rule, so it
        # sees no tangent); psum, unlike all_gather, gives a result replicated over the axis.
        peak = lax.pmax(lax.stop_gradient(lse), axis_name)
        lse = peak + jnp.log(lax.psum(jnp.exp(lse - peak), axis_name))
        zy = lax.psum(zy, axis_name)
        total = lax.psum(total, axis_name)
    lse, zy, total = (t.reshape(batch) for t in (lse, zy, total))

    loss = lse - zy
    if want_sum:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - total / vocab_size)
    if not _checks.is_zero(z_loss):
        loss = loss + z_loss * jnp.square(lse)
    return _reduce.weigh_and_reduce(loss, weights, reduction)

"""Fused per-token log-probabilities and entropy from hidden states (post-training).

The label's log-probability ``z_y - lse`` and the entropy ``H`` of ``softmax(z)`` for the
logits ``z = cap(h @ W + b) / T`` are three statistics of one head on the shared
vocabulary-streaming engine (``_stream``): the log-normaliser, the label logit and the
entropy, one forward pass over vocabulary blocks and one recompute backward.
"""

from __future__ import annotations

import functools
from typing import TypeAlias

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _reduce, _stream, _vocab, _vocab_parallel
from jaxce._checks import POSITIVE

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike


@_api.public(
    static=(
        "logit_softcap",
        "ignore_index",
        "vocab_size",
        "chunk_size",
        "axis_name",
        "vocab_axis",
        "mesh",
        "return_entropy",
    ),
    domains={"temperature": POSITIVE, "chunk_size": POSITIVE},
    reverse_mode_only=(
        "-jaxce.softmax_cross_entropy_with_integer_labels(logits, labels) and "
        "jaxce.entropy(logits) of logits = hidden @ weight + bias"
    ),
)
def linear_log_probs(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Per-token log-probabilities of the labels (and the entropy) without the logits.

    For a token with hidden state :math:`h`, label :math:`y`, temperature :math:`T` and
    optional soft cap :math:`s`, over :math:`V` classes:

    .. math::
      z = \operatorname{cap}(h W + b) / T, \qquad
      \operatorname{cap}(u) = s \tanh(u / s), \qquad
      L = \log \sum_{v=1}^{V} e^{z_v}, \qquad p_v = e^{z_v - L},

      \log p_y = z_y - L, \qquad H = -\sum_v p_v \log p_v = \sum_v p_v (L - z_v)

    (the soft cap first, then the sampling temperature, as a sampler applies them). This is
    ``-softmax_cross_entropy_with_integer_labels(z, labels)`` and ``entropy(z)`` of the
    materialised logits, in value and in the gradients with respect to ``hidden``, ``weight``
    and ``bias``: the policy's log-probabilities of sampled tokens for DPO, PPO/GRPO and
    KL-regularised RL, and its entropy for an entropy bonus or regulariser.

    One pass over blocks of ``chunk_size`` vocabulary columns keeps per token the running
    maximum :math:`m`, :math:`S = \sum_v e^{z_v - m}`, the label's logit and
    :math:`U = \sum_v e^{z_v - m} (m - z_v)` (rescaled when :math:`m` rises); then
    :math:`L = m + \log S` and :math:`H = \log S + U / S`, a sum of two non-negative terms
    (no cancellation for a peaked distribution). The backward pass recomputes each block's
    logits and uses

    .. math::
      \frac{\partial}{\partial z_v} = g_{\log p} (\mathbb{1}[v = y] - p_v)
        + g_H\, p_v \big((L - z_v) - H\big)

    for the cotangents :math:`g_{\log p}, g_H` of the two outputs, times :math:`1 / T` and the
    cap's slope :math:`1 - (\operatorname{cap}(u)/s)^2`; it writes that block of ``dweight``
    (one matmul over all tokens) and accumulates ``dhidden`` in float32. Without
    ``return_entropy``, or when the entropy's cotangent is a symbolic zero (the entropy is not
    used by the differentiated function), the entropy term is not computed. Memory beyond the
    inputs and outputs is a few ``(tokens, chunk_size)`` float32 tiles plus the float32
    ``dhidden`` accumulator.

    Half-precision ``hidden``/``weight`` stay half precision as matmul operands with float32
    accumulation; the outputs are float32 for half-precision inputs, else the inputs' dtype.

    **Differentiation.** Reverse mode, exact for both outputs: ``jax.grad``,
    ``jax.value_and_grad``, ``jax.vjp``, under ``jax.jit``, ``jax.vmap``, ``jax.checkpoint``
    and inside ``shard_map``, to first order. ``temperature`` is not differentiated (its
    cotangent is zero). Forward mode (``jax.jvp``, ``jax.jacfwd``) raises a ``TypeError``
    naming this function and the materialised alternative (under an outer ``jax.jit``, JAX's
    own message about forward-mode autodiff of a ``custom_vjp``): use
    :func:`softmax_cross_entropy_with_integer_labels` and :func:`entropy` of the materialised
    logits for those.

    **On a mesh under plain** ``jax.jit`` (global arrays, no ``shard_map``). Data parallel:
    hidden states and per-token arrays sharded over any batch axes of a mesh of either axis
    type, kernels replicated; the result and every gradient equal the unsharded call, the
    gradients keep their inputs' shardings and per-token outputs keep the tokens' sharding,
    with no collective for them. Vocabulary parallel, never gathering a kernel whole: on an
    **Explicit** mesh (``jax.make_mesh``'s default, with ``jax.set_mesh``) automatically,
    when ``weight`` is sharded over its columns (``P(None, "model")``: ``bias`` sharded
    alike) or over ``D`` only (``P("model", None)``, FSDP: re-laid out over the vocabulary
    by ``jax.sharding.reshard``, an all-to-all); on an **Auto** mesh by opting in with
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

    **Vocab-parallel.** With ``axis_name``, as for :func:`linear_softmax_cross_entropy`: call
    it inside ``jax.shard_map`` with ``weight`` (and ``bias``) sharded over the vocabulary
    along that mesh axis, ``hidden``, ``labels`` and ``temperature`` replicated over it and
    ``labels`` global vocabulary ids; the per-token statistics are combined with ``pmax`` and
    ``psum`` of ``(tokens,)`` vectors and the result equals the unsharded one. Pad ``weight``
    (and ``bias``) with columns up to a multiple of the shard count and pass the true number
    of classes as ``vocab_size``: padded columns are excluded from the softmax.

    Args:
      hidden: ``(..., D)`` float hidden states (one row per token).
      weight: ``(D, V)`` float output kernel (``embedding.T`` for tied embeddings); under
        ``axis_name`` the local ``(D, V / shards)`` shard.
      labels: integer array of shape ``hidden.shape[:-1]``: the sampled tokens, ids in
        ``[0, V)`` (global under ``axis_name``).
      bias: optional ``(V,)`` bias (local shard under ``axis_name``).
      temperature: :math:`T > 0`, a float or an array broadcastable to ``labels.shape`` (e.g.
        ``(batch, 1)`` for one sampling temperature per sequence). A concrete value outside
        the domain raises ``ValueError``; a traced one gives NaN for the affected tokens.
      logit_softcap: :math:`s > 0` (Gemma 2), or ``None`` for no cap.
      ignore_index: label value whose tokens give ``0.0`` for both outputs and no gradient,
        whatever their hidden state holds (NaN included).
      vocab_size: number of real classes when ``weight`` carries padding columns at the end
        (global count under ``axis_name``); ``None`` means all ``V`` columns are classes.
      chunk_size: vocabulary columns per block; ``None`` picks about ``2**22 / tokens`` (a
        16 MiB float32 tile), a multiple of 128, at least 256 and at most ``V``. Blocks need
        not divide ``V``.
      axis_name: mesh axis over which ``weight`` is vocabulary-sharded, or ``None``.
      vocab_axis: mesh axis (or tuple of axes) to shard the vocabulary over under plain
        ``jax.jit`` (global arrays, no ``shard_map`` of yours); needed on a mesh of Auto
        axes only: on an Explicit mesh the axis is read from the kernel's sharding, and
        ``vocab_axis`` overrides it. Mutually exclusive with ``axis_name`` (``ValueError``).
      mesh: the mesh that has ``vocab_axis``; ``None`` takes the context mesh
        (``jax.set_mesh``/``jax.sharding.use_mesh``). Only with ``vocab_axis``.
      return_entropy: also return the per-token entropy.

    Returns:
      ``log_probs`` of shape ``labels.shape`` (at most 0), or with ``return_entropy`` the
      pair ``(log_probs, entropy)`` of that shape (``entropy`` in ``[0, log V]``); float32
      for half-precision inputs, else the inputs' dtype. A label outside ``[0, V)`` that is
      not ``ignore_index`` gives NaN for its token's outputs (and an error under
      ``jax.experimental.checkify``), as does NaN in the token's hidden state.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> kh, kw, ky = jax.random.split(jax.random.key(0), 3)
      >>> hidden = jax.random.normal(kh, (2, 4, 16))
      >>> weight = jax.random.normal(kw, (16, 1000)) / 4
      >>> labels = jax.random.randint(ky, (2, 4), 0, 1000)
      >>> log_probs, entropy = jaxce.linear_log_probs(
      ...     hidden, weight, labels, temperature=0.7, return_entropy=True, chunk_size=256)
      >>> logits = hidden @ weight / 0.7
      >>> dense = jnp.take_along_axis(
      ...     jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
      >>> bool(jnp.allclose(log_probs, dense, atol=1e-5))
      True
      >>> bool(jnp.allclose(entropy, jaxce.entropy(logits), atol=1e-5))
      True
      >>> def objective(weight):  # sequence log-likelihood plus an entropy bonus
      ...     lp, h = jaxce.linear_log_probs(hidden, weight, labels, return_entropy=True)
      ...     return lp.sum() + 0.01 * h.mean()
      >>> jax.grad(objective)(weight).shape
      (16, 1000)

    References:
      Wijmans et al., *Cut Your Losses in Large-Vocabulary Language Models*, 2024; Schulman
      et al., *Proximal Policy Optimization Algorithms*, 2017; Rafailov et al., *Direct
      Preference Optimization*, 2023.
    """
    return _vocab_parallel.fused(
        functools.partial(
            _log_probs, logit_softcap=logit_softcap, ignore_index=ignore_index,
            chunk_size=chunk_size, return_entropy=return_entropy,
        ),
        hiddens={"hidden": hidden},
        kernels={"weight": weight},
        columns={"bias": bias},
        tokens={"labels": labels, "temperature": temperature},
        axis_name=axis_name,
        vocab_axis=vocab_axis,
        mesh=mesh,
        vocab_size=vocab_size,
    )  # fmt: skip


def _log_probs(
    hidden, weight, labels, bias, temperature, *, logit_softcap, ignore_index, vocab_size,
    chunk_size, axis_name, return_entropy,
):  # fmt: skip
    """The outputs on one device's arrays (the vocabulary shard under ``axis_name``)."""
    hidden, weight, labels, bias, batch = _vocab.labelled_inputs(hidden, weight, labels, bias)
    d_model, local_vocab = weight.shape
    softcap = _vocab.logit_softcap(logit_softcap)
    chunk_size = _vocab.chunk_size(chunk_size)
    offset, vocab_size = _vocab.shards(axis_name, local_vocab, vocab_size)
    acc = _reduce.compute_dtype(hidden.dtype, weight.dtype)
    num_tokens = labels.size

    t = _checks.nan_outside_domain(temperature, "temperature", acc, POSITIVE)
    if t.ndim:
        what = "one temperature per token, or broadcastable to `labels`"
        t = _checks.broadcastable(t, "temperature", batch, what).reshape(num_tokens)
    inv_t = jax.lax.stop_gradient(1 / t)

    weights, safe = _reduce.integer_label_weights(
        labels, vocab_size, acc, ignore_index=ignore_index
    )
    keep = weights.keep.reshape(num_tokens)
    x = hidden.reshape(num_tokens, d_model)
    # Ignored tokens are computed on zero hidden states: their outputs are replaced by 0 below
    # and a NaN in them reaches neither the outputs nor the gradients.
    x = jnp.where(keep[:, None], x, jnp.zeros((), x.dtype))
    y = _vocab.local_labels(safe, offset, local_vocab)
    if axis_name is not None:
        # hidden is replicated over the vocabulary axis; marked device-varying, its cotangent
        # (a partial sum per shard) is summed over the axis by the transpose.
        x = _vocab.make_varying(x, (axis_name,))

    chunk = _vocab.auto_chunk(max(1, num_tokens), local_vocab) if chunk_size is None else chunk_size
    stats: tuple[_stream.Stat, ...] = (_stream.LogNormaliser(), _stream.LabelLogit())
    if return_entropy:
        stats = (*stats, _stream.Entropy())
    spec = _stream.Spec(
        stats=stats,
        chunk=min(chunk, local_vocab),
        limit=vocab_size,
        axis_name=axis_name,
        softcap=softcap,
        shared_cotangents=_vocab.vma_unchecked(axis_name),
    )
    head = _stream.Head(x, weight, bias, inv_t)
    out: tuple[Array, ...] = _stream.stream(spec, (head,), None, y, offset, (None,) * len(stats))  # type: ignore[assignment]
    lse, label_logit = out[0], out[1]

    zero = jnp.zeros((), acc)
    nan = jnp.full((), jnp.nan, acc)
    assert weights.invalid is not None
    invalid = weights.invalid.reshape(num_tokens)

    def per_token(value: Array) -> Array:
        value = jnp.where(keep, value, zero)
        return jnp.where(invalid, nan, value).reshape(batch)

    log_probs = per_token(label_logit - lse)
    if not return_entropy:
        return log_probs
    return log_probs, per_token(out[2])

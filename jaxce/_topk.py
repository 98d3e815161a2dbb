"""Top-k losses: distillation from a teacher's stored top-k log-probabilities, and the
log-probabilities of a sampler's top-k-truncated distribution.

A teacher's full distribution over a large vocabulary cannot be stored per token, so
distillation datasets keep its ``k`` most likely ids and their log-probabilities. The
student's log-probabilities over the **full** vocabulary, gathered at those ids, are compared
with them over ``k + 1`` classes (the ids plus one tail class holding each side's remaining
mass) or over the ``k`` ids renormalised. The materialised loss takes the student's logits;
the fused one takes its hidden states and output kernel and gathers the ids' logits on the
vocabulary-streaming engine (``_stream.GatheredLogits``), never forming the ``(tokens, V)``
logits. Both apply the same formula to the ``(tokens, k)`` log-probabilities.

A sampler that draws from the ``k`` largest logits (top-k sampling) draws from the truncated,
renormalised distribution; ``truncated_log_probs`` gives the log-probability of a label under
it (``-inf`` outside the top k) and its entropy. Its fused form is
``linear_log_probs(..., top_k=k)``.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _logits, _numerics, _reduce, _stream, _vocab, _vocab_parallel
from jaxce._checks import POSITIVE, Reduction

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Loss: TypeAlias = Array | tuple[Array, Array]
Tail: TypeAlias = Literal["bucket", "renormalize"]

TAILS = ("bucket", "renormalize")


# ------------------------------------------------------------------------ the shared formula


def _tail(value) -> Tail:
    if value not in TAILS:
        raise ValueError(f"`tail` must be one of {TAILS}, got {value!r}.")
    return value  # type: ignore[return-value]


def _teacher(teacher_ids, teacher_log_probs, batch: tuple[int, ...], where: str):
    """Checked ``(ids, log_probs)`` of shape ``batch + (k,)``, ``k >= 1``."""
    ids = _checks.as_integer(teacher_ids, "teacher_ids")
    log_probs = _checks.as_floating(teacher_log_probs, "teacher_log_probs")
    if ids.ndim != len(batch) + 1 or ids.shape[:-1] != batch:
        raise ValueError(
            f"`teacher_ids` has shape {ids.shape} but must have shape {batch} + (k,): "
            f"{where} plus one axis of the teacher's k ids."
        )
    if ids.shape[-1] == 0:
        raise ValueError(f"`teacher_ids` has shape {ids.shape}: it needs at least one id (k >= 1).")
    _checks.same_shape(log_probs, "teacher_log_probs", ids.shape, "the shape of `teacher_ids`")
    return ids, log_probs


def _bad_ids(ids: Array, live: Array, num_classes: int, class_ok: Array | None) -> Array:
    """Per token: a live entry whose id is outside ``[0, V)`` (or names a masked class)."""
    in_range = (ids >= 0) & (ids < num_classes)
    if class_ok is not None:
        in_range = in_range & class_ok
    bad = jnp.any(live & ~in_range, axis=-1)
    if bad.size:
        flat = bad.reshape(bad.size)
        _checks.value_check(
            ~jnp.any(flat),
            f"invalid teacher id at flat token {{pos}}: ids must lie in [0, {num_classes}) and "
            "name a class `where` leaves in (entries with log-probability -inf are not read).",
            pos=jnp.argmax(flat),
        )
    return bad


def _sparse_kl(s: Array, t: Array, live: Array, tail: str, slack: float) -> Array:
    r"""``KL(teacher || student)`` over the last axis of the ``(..., k)`` log-probabilities.

    ``s``: the student's full-vocabulary log-probabilities at the ids; ``t``: the teacher's;
    ``live``: entries that take part (``t != -inf``). ``slack``: how far the teacher's
    top-k mass may exceed 1 from rounding (its tail is then empty), beyond which the tail is
    NaN. Exactly 0 where ``t == s`` on every live entry or within the rounding bound of the
    terms, never negative (values only: the derivatives stay the formula's).
    """
    same = jnp.all(jnp.where(live, t == s, True), axis=-1)
    zero = jnp.zeros((), s.dtype)
    if tail == "renormalize":
        s = s - _numerics.log_sum_exp(s, live)[..., None]
        t = t - _numerics.log_sum_exp(t, live)[..., None]
    else:
        top_s = jnp.minimum(_numerics.log_sum_exp(s, live), zero)
        top_t = _numerics.log_sum_exp(t, live)
        top_t = jnp.where((top_t > 0) & (top_t <= slack), zero, top_t)
        # log(1 - sum exp) of each side: the tail class's log-mass (NaN past the slack).
        s = jnp.concatenate([s, _log1mexp(top_s)[..., None]], axis=-1)
        t = jnp.concatenate([t, _log1mexp(top_t)[..., None]], axis=-1)
        live = jnp.concatenate([live, jnp.ones_like(live[..., :1])], axis=-1)  # laid out like live
    t = jnp.where(live, t, -jnp.inf)
    q = jnp.exp(t)
    on = _numerics.support(q, live)
    kl = _numerics.weighted_log_ratio(q, t, s, on)
    # Within its rounding error (log-probabilities computed another way, say) the divergence
    # is 0; the tail's log1mexp can double a term's error, hence twice the usual bound.
    eps = float(jnp.finfo(kl.dtype).eps)
    kl = _numerics.zero_within(kl, _numerics.rounding_bound(q, t, s, on, 2 * eps))
    return _numerics.divergence_floor(kl, same)


def _log1mexp(x: Array) -> Array:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends; NaN for ``x > 0``.

    ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below ``-log 2`` (Maechler); ``-inf``, with
    a zero derivative, at ``x = 0``.
    """
    near = x > -math.log(2)
    safe_far = jnp.where(near, -jnp.ones((), x.dtype), x)
    return jnp.where(
        near, _numerics.log_one_minus_exp(jnp.where(near, x, 0)), jnp.log1p(-jnp.exp(safe_far))
    )


def _slack(k: int, *dtypes) -> float:
    """Rounding of ``k`` stored log-probabilities: ``k * eps`` of the coarsest dtype."""
    return k * max(float(jnp.finfo(d).eps) for d in dtypes)


# ------------------------------------------------------------------------ materialised losses


@_api.public(static=("tail", "reduction"), domains={"temperature": POSITIVE})
def sparse_distillation_loss(
    logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_log_probs: ArrayLike,
    *,
    temperature: float | ArrayLike = 1.0,
    tail: Tail = "bucket",
    where: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Distillation from a teacher's stored top-k log-probabilities (sparse KL).

    With student logits :math:`z` over :math:`V` classes, temperature :math:`T`, the
    teacher's ids :math:`i_1, \dots, i_k` and log-probabilities :math:`t_j` (used as given,
    not tempered), and the student's full-vocabulary log-probabilities at the ids
    :math:`s_j = \log\operatorname{softmax}(z / T)_{i_j}`:

    .. math::
      \ell = T^2 \Big( \sum_{j=1}^{k} e^{t_j} (t_j - s_j)
        + e^{t_\ast} (t_\ast - s_\ast) \Big), \qquad
      t_\ast = \operatorname{log1mexp}\big(\operatorname{logsumexp}_j t_j\big), \quad
      s_\ast = \operatorname{log1mexp}\big(\operatorname{logsumexp}_j s_j\big)

    for ``tail="bucket"``: the KL divergence of the teacher from the student over ``k + 1``
    classes, the ids plus one tail class holding each side's remaining mass
    (:math:`\operatorname{log1mexp}(x) = \log(1 - e^x)`, computed stably). For
    ``tail="renormalize"`` both sides are renormalised over the ids,
    :math:`t'_j = t_j - \operatorname{logsumexp} t`, :math:`s'_j = s_j -
    \operatorname{logsumexp} s`, and :math:`\ell = T^2 \sum_j e^{t'_j} (t'_j - s'_j)`
    (the teacher's entries need not then be normalised: its top-k logits work too). The
    :math:`T^2` keeps gradient magnitudes comparable across temperatures, as in
    :func:`softmax_kl_divergence`, which this equals (bucket) when ``k = V`` and the entries
    are the teacher's full log-softmax.

    The gradient with respect to the logits is :math:`T (p_v - q'_v)` with :math:`q'` the
    teacher's entries at the ids and, for the bucket, its tail mass spread over the other
    classes in proportion to the student's own probabilities.

    Never negative and exactly 0 for a row whose live entries are the student's own
    log-probabilities at the ids (e.g. its top k from ``jax.nn.log_softmax(logits / T)``):
    a value within the sum's rounding error, :math:`4 \epsilon \sum_c e^{t_c} (1 + |t_c| +
    |s_c|)` over the classes, is returned as 0, as is a negative one, in value only (the
    gradient and Hessian stay the formula's).

    Entries whose teacher log-probability is ``-inf`` take no part (padding for a teacher
    that stored fewer than ``k`` ids; their ids are not read). The ids of a row should be
    distinct. A teacher mass above 1 beyond rounding (``k * eps`` of the coarser of the
    teacher's dtype and the compute dtype) makes the bucket's tail, and so the loss, NaN; within
    it the tail is empty. The student's tail is ``log1mexp`` of its top-k mass: below the
    compute dtype's resolution of that mass (about ``eps * max|z / T|``) it rounds to 0, and a
    teacher that keeps tail mass there gives a large loss.

    Args:
      logits: ``(..., V)`` student logits, classes on the last axis.
      teacher_ids: ``(..., k)`` integer ids in ``[0, V)``.
      teacher_log_probs: ``(..., k)`` the teacher's log-probabilities at the ids (``<= 0``;
        ``-inf`` for padding).
      temperature: :math:`T > 0`, dividing the student's logits only.
      tail: ``"bucket"`` or ``"renormalize"``.
      where: a class mask of ``logits``'s shape (classes out of the student's softmax; an id
        naming one is invalid) or a per-token mask of the batch shape (``False``: the token
        is dropped).
      sample_weights: weights broadcastable to the batch shape; zero drops a token.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-token losses of the batch shape, or a scalar (a pair for ``"sum_and_weight"``);
      float32 for half-precision inputs. A live id outside ``[0, V)`` (or masked by
      ``where``) gives NaN for its token (and an error under ``jax.experimental.checkify``);
      NaN in a token's logits or live teacher entries gives NaN.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> student = jax.random.normal(jax.random.key(0), (4, 100))
      >>> teacher = jax.nn.log_softmax(2 * jax.random.normal(jax.random.key(1), (4, 100)))
      >>> top, ids = jax.lax.top_k(teacher, 8)  # what a distillation dataset stores
      >>> loss = jaxce.sparse_distillation_loss(student, ids, top, temperature=2.0)
      >>> loss.shape
      (4,)
      >>> own, own_ids = jax.lax.top_k(jax.nn.log_softmax(student / 2.0), 8)
      >>> jaxce.sparse_distillation_loss(student, own_ids, own, temperature=2.0)
      Array([0., 0., 0., 0.], dtype=float32)

    References:
      Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015;
      Peng et al., *Pre-training Distillation for Large Language Models*, 2024 (top-k
      logits); Maechler, *Accurately Computing log(1 - exp(-|a|))*, 2012.
    """
    tail = _tail(tail)
    lg = _logits.prepare(logits, -1, where, "logits")
    batch = lg.batch_shape
    ids, t = _teacher(teacher_ids, teacher_log_probs, batch, "`logits` without its class axis")
    acc = _reduce.compute_dtype(lg.dtype, t.dtype)
    weights = _reduce.example_weights(batch, acc, keep=lg.keep, sample_weights=sample_weights)
    lg = lg.neutralised(lg.keep)
    temp, bad_t = _checks.hyperparameter(temperature, "temperature", acc, POSITIVE)

    stored = t.dtype
    t = t.astype(acc)
    live = t != -jnp.inf
    num_classes = lg.num_classes
    in_range = (ids >= 0) & (ids < num_classes)
    safe = jnp.where(in_range & live, ids, 0)
    k = ids.shape[-1]

    def at_ids(x: Array) -> Array:
        return _reduce.gather_along_classes(x, safe)

    class_ok = None if lg.class_mask is None else at_ids(lg.class_mask)
    bad = _bad_ids(ids, live, num_classes, class_ok)
    s = at_ids(_logits.log_softmax(lg.values.astype(acc), lg.class_mask, temp))
    kl = _sparse_kl(s, t, live, tail, _slack(k, acc, stored))
    weights = weights.with_invalid(bad | bad_t)
    return _reduce.weigh_and_reduce(jnp.square(temp) * kl, weights, reduction)


@_api.public(static=("top_k", "ignore_index", "return_entropy"), domains={"temperature": POSITIVE})
def truncated_log_probs(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    top_k: int,
    temperature: float | ArrayLike = 1.0,
    ignore_index: int | None = None,
    return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    r"""Log-probabilities of labels under the top-k-truncated distribution a sampler drew from.

    With logits :math:`z / T` (classes on the last axis) and :math:`K` the ids of the
    ``top_k`` largest (ties at the k-th logit keep the smaller ids, as ``jax.lax.top_k``):

    .. math::
      \log \tilde p_y = \begin{cases} z_y / T - \log \sum_{v \in K} e^{z_v / T} & y \in K \\
        -\infty & y \notin K \end{cases}, \qquad
      \tilde H = -\sum_{v \in K} \tilde p_v \log \tilde p_v

    the log-probability of the sampled token under the distribution a top-k sampler draws
    from (the correct behaviour log-probability for importance ratios against such a
    sampler), and with ``return_entropy`` its entropy. Gradients are exact: they reach the
    top-k logits only (the selection itself is piecewise constant); a label outside the top k
    gives ``-inf`` with a zero gradient. ``top_k = V`` is the untruncated
    ``log_softmax(z / T)[y]``. The fused form, from hidden states without the ``(tokens, V)``
    logits, is ``linear_log_probs(..., top_k=k)``.

    Args:
      logits: ``(..., V)`` logits.
      labels: integer array of the batch shape (``logits`` without its last axis), ids in
        ``[0, V)``.
      top_k: the sampler's ``k``, an int in ``[1, V]``.
      temperature: :math:`T > 0`, a float or an array broadcastable to the batch shape (it
        does not change which ids are kept).
      ignore_index: a label value whose tokens give ``0.0`` and no gradient.
      return_entropy: also return the truncated distribution's entropy.

    Returns:
      ``log_probs`` of the batch shape (``<= 0`` or ``-inf``), or the pair ``(log_probs,
      entropy)`` (``entropy`` in ``[0, log k]``); float32 for half-precision inputs. A label
      outside ``[0, V)`` that is not ``ignore_index`` gives NaN (and a ``checkify`` error), as
      does a NaN anywhere in the token's logits.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[2.0, 1.0, 0.0, 1.0]])
      >>> lp = jaxce.truncated_log_probs(logits, jnp.array([3]), top_k=2)  # keeps ids 0, 1
      >>> lp
      Array([-inf], dtype=float32)
      >>> lp, h = jaxce.truncated_log_probs(logits, jnp.array([1]), top_k=2, return_entropy=True)
      >>> round(float(lp[0]), 4), round(float(h[0]), 4)
      (-1.3133, 0.5822)
    """
    lg = _logits.prepare(logits, -1, None, "logits")
    num_classes = lg.num_classes
    if not _checks.is_int(top_k) or not 1 <= top_k <= num_classes:
        raise ValueError(
            f"`top_k` must be an int in [1, {num_classes}] (the classes of `logits`), "
            f"got {top_k!r}."
        )
    lg, safe, weights = _logits.integer_targets(lg, labels, ignore_index=ignore_index)
    acc = lg.dtype
    temp, bad_t = _checks.hyperparameter(temperature, "temperature", acc, POSITIVE)
    if temp.ndim:
        temp = _checks.broadcastable(temp, "temperature", lg.batch_shape, "the batch shape")
    z = lg.values / temp[..., None] if temp.ndim else lg.values / temp
    (top_ids,) = _reduce.top_k_positions(z, int(top_k))
    values = _reduce.gather_along_classes(z, top_ids)
    # A NaN logit anywhere in the row (selected or not) makes the row NaN.
    values = jnp.where(jnp.any(jnp.isnan(z), axis=-1, keepdims=True), jnp.nan, values)
    label_logit = _reduce.take_class(z, safe)
    log_p, entropy = _numerics.truncated_log_prob(values, top_ids, label_logit, safe)
    weights = weights.with_invalid(bad_t)

    def per_token(value: Array) -> Array:
        value = jnp.where(weights.keep, value, jnp.zeros((), acc))
        if weights.invalid is not None:
            value = jnp.where(weights.invalid, jnp.full((), jnp.nan, acc), value)
        return value

    if not return_entropy:
        return per_token(log_p)
    return per_token(log_p), per_token(entropy)


# ------------------------------------------------------------------------ the fused loss


@_api.public(
    static=("tail", "reduction", "chunk_size", "axis_name", "vocab_axis", "mesh", "vocab_size"),
    domains={"temperature": POSITIVE, "chunk_size": POSITIVE},
    reverse_mode_only="jaxce.sparse_distillation_loss(hidden @ weight + bias, ...)",
)
def linear_sparse_distillation_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_log_probs: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: float | ArrayLike = 1.0,
    tail: Tail = "bucket",
    sample_weights: ArrayLike | None = None,
    where: ArrayLike | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
) -> Loss:
    r"""Sparse (top-k) distillation from hidden states, without the ``(tokens, V)`` logits.

    :func:`sparse_distillation_loss` of the student logits ``hidden @ weight + bias``, equal
    in value and in the gradients with respect to ``hidden``, ``weight`` and ``bias``: the
    student's full-vocabulary log-probabilities at the teacher's ids,
    :math:`s_j = z_{i_j} / T - \log \sum_v e^{z_v / T}`, against the teacher's stored
    log-probabilities :math:`t_j`, with a tail bucket or renormalised, times :math:`T^2`.

    The vocabulary-streaming engine walks over blocks of ``chunk_size`` columns once, keeping
    per token the online log-sum-exp and the ``k`` logits at the ids that fall in each block
    (a gather from the block's tile); the formula then runs on ``(tokens, k)`` arrays. The
    backward pass recomputes each block's logits, adds the log-normaliser's term
    :math:`g_L\, p_v` and scatters the ids' cotangents into the block, and writes that block of
    ``dweight`` (one matmul over all tokens). Memory beyond inputs and outputs is a few
    ``(tokens, chunk_size)`` float32 tiles, the ``(tokens, k)`` statistics and the float32
    ``dhidden`` accumulator, forward and backward.

    **Differentiation.** Reverse mode (``jax.grad``, ``jax.value_and_grad``, ``jax.vjp``),
    first order, under ``jax.jit``, ``jax.vmap``, ``jax.checkpoint`` and inside
    ``shard_map``, also with respect to a traced ``temperature`` and ``teacher_log_probs``;
    ``jax.jvp`` raises a ``TypeError`` naming this function (JAX's own message under an outer
    ``jax.jit``): use :func:`sparse_distillation_loss` on the materialised logits for it.

    **Vocab-parallel.** With ``axis_name``, call it inside ``jax.shard_map`` with ``weight``
    (and ``bias``) sharded over the vocabulary along that mesh axis, everything else
    replicated over it and ``teacher_ids`` global vocabulary ids: each shard gathers the ids
    it holds, and one ``psum`` of the ``(tokens, k)`` logits plus the log-normaliser's
    ``pmax``/``psum`` combine them; the result equals the unsharded one. Pad ``weight`` to a
    multiple of the shard count and pass the true vocabulary as ``vocab_size``.

    **On a mesh under plain** ``jax.jit`` (global arrays, no ``shard_map``): as every fused
    loss (``jaxce._vocab_parallel.fused``, see :func:`linear_log_probs`): data parallel over
    the hidden states' batch axes (the teacher's ``(..., k)`` arrays sharded like them),
    vocabulary parallel automatically on an Explicit mesh with ``weight`` sharded over its
    columns, and on an Auto mesh with ``vocab_axis=``.

    Args:
      hidden: ``(..., D)`` student hidden states.
      weight: ``(D, V)`` student output kernel; local shard under ``axis_name``.
      teacher_ids: ``(..., k)`` integer global ids in ``[0, vocab_size)``.
      teacher_log_probs: ``(..., k)`` the teacher's log-probabilities (``-inf``: padding).
      bias: optional ``(V,)`` bias (local shard under ``axis_name``).
      temperature: :math:`T > 0`, dividing the student's logits.
      tail: ``"bucket"`` or ``"renormalize"``, as in :func:`sparse_distillation_loss`.
      sample_weights: weights broadcastable to ``hidden.shape[:-1]``; zero drops a token.
      where: boolean token mask of shape ``hidden.shape[:-1]`` (``False`` drops the token).
      reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.
      chunk_size: vocabulary columns per block, or ``None`` (about ``2**22 / tokens``).
      axis_name: mesh axis over which ``weight`` is vocabulary-sharded, or ``None``.
      vocab_axis: mesh axis to shard the vocabulary over under plain ``jax.jit`` (Auto
        meshes; on an Explicit mesh it is read from ``weight``'s sharding); exclusive with
        ``axis_name``.
      mesh: the mesh that has ``vocab_axis`` (``None``: the context mesh).
      vocab_size: number of real classes when ``weight`` carries padding columns.

    Returns:
      Per-token losses of shape ``hidden.shape[:-1]``, a scalar, or the pair for
      ``"sum_and_weight"``; float32 for half-precision inputs, else the inputs' dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> k = jax.random.split(jax.random.key(0), 3)
      >>> hidden = jax.random.normal(k[0], (6, 16))
      >>> weight = jax.random.normal(k[1], (16, 1000)) / 4
      >>> teacher = jax.nn.log_softmax(jax.random.normal(k[2], (6, 1000)))
      >>> top, ids = jax.lax.top_k(teacher, 20)
      >>> fused = jaxce.linear_sparse_distillation_loss(
      ...     hidden, weight, ids, top, temperature=2.0, chunk_size=256)
      >>> dense = jaxce.sparse_distillation_loss(hidden @ weight, ids, top, temperature=2.0)
      >>> bool(jnp.allclose(fused, dense, rtol=1e-5))
      True
    """
    return _vocab_parallel.fused(  # type: ignore[return-value]
        functools.partial(_sparse_body, tail=_tail(tail), chunk_size=chunk_size),
        hiddens={
            "hidden": hidden,
            "teacher_ids": teacher_ids,
            "teacher_log_probs": teacher_log_probs,
        },
        kernels={"weight": weight},
        columns={"bias": bias},
        tokens={"sample_weights": sample_weights, "where": where},
        shared={"temperature": temperature},
        reduction=reduction,
        axis_name=axis_name,
        vocab_axis=vocab_axis,
        mesh=mesh,
        vocab_size=vocab_size,
    )


def _sparse_body(
    hidden, teacher_ids, teacher_log_probs, weight, bias, sample_weights, where, temperature, *,
    tail, chunk_size, axis_name, vocab_size, reduction,
):  # fmt: skip
    """The loss on one device's arrays (the vocabulary shard under ``axis_name``)."""
    hidden, weight = _vocab.hidden_and_kernel(hidden, "hidden", weight, "weight")
    batch = hidden.shape[:-1]
    ids, t = _teacher(teacher_ids, teacher_log_probs, batch, "`hidden` without its last axis")
    local_vocab = weight.shape[1]
    bias = _vocab.per_column(bias, "bias", local_vocab)
    _checks.reduction(reduction)
    chunk_size = _vocab.chunk_size(chunk_size)
    offset, vocab_size = _vocab.shards(axis_name, local_vocab, vocab_size)
    acc = _reduce.compute_dtype(hidden.dtype, weight.dtype, t.dtype)
    tokens, k = math.prod(batch), ids.shape[-1]

    keep = None
    if where is not None:
        keep = _checks.as_mask(where, "where")
        keep = _checks.broadcastable(keep, "where", batch, "a token mask: `hidden` without D")
    weights = _reduce.example_weights(batch, acc, keep=keep, sample_weights=sample_weights)
    temp = _checks.nan_outside_domain(temperature, "temperature", acc, POSITIVE)

    stored = t.dtype
    t = t.astype(acc)
    live = t != -jnp.inf
    bad = _bad_ids(ids, live, vocab_size, None)
    in_range = (ids >= 0) & (ids < vocab_size)
    gids = jnp.where(in_range & live, ids, -1).astype(jnp.int32).reshape(tokens, k)

    x = hidden.reshape(tokens, hidden.shape[-1])
    if where is not None or sample_weights is not None:
        # Dropped tokens get zero hidden states: their loss is discarded, and a NaN in them
        # would otherwise reach dW through 0 * NaN.
        kept = (weights.weight != 0).reshape(tokens, 1)
        x = jnp.where(kept, x, jnp.zeros((), x.dtype))
    if axis_name is not None:
        # Replicated over the vocabulary axis; marked device-varying, its cotangent (a partial
        # sum per shard) is summed over the axis by the transpose.
        x = _vocab.make_varying(x, (axis_name,))
    chunk = _vocab.auto_chunk(max(1, tokens), local_vocab) if chunk_size is None else chunk_size
    spec = _stream.Spec(
        stats=(_stream.LogNormaliser(), _stream.GatheredLogits(width=k)),
        chunk=min(chunk, local_vocab),
        limit=vocab_size,
        axis_name=axis_name,
        temperature_grad=True,
        shared_cotangents=_vocab.vma_unchecked(axis_name),
    )
    head = _stream.Head(x, weight, bias, 1 / temp)
    out = _stream.stream(spec, (head,), None, None, offset, (None, gids))
    lse, at_ids = out[0], out[1]  # type: ignore[index]
    s = (at_ids - lse[:, None]).reshape(ids.shape)
    kl = _sparse_kl(s, t, live, tail, _slack(k, acc, stored))
    weights = weights.with_invalid(bad)
    return _reduce.weigh_and_reduce(jnp.square(temp) * kl, weights, reduction)

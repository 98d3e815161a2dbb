"""Fused linear + softmax cross-entropy for large vocabularies (never materialises the logits).

Two differentiable paths, both built on the per-token sufficient
statistics of the logits ``z = cap(x @ w + b)``: the log-normaliser ``lse``, the label's logit
``z_y`` and the (class-weighted) logit sum ``S = sum_c u_c z_c`` (only for label smoothing).
Every loss term is a per-token combination ``alpha lse + beta z_y + gamma S + zeta lse**2``.

* ``_stats`` (the *recompute* path) returns the statistics themselves, so any cotangent of
  them is honoured (``reduction="none"``, a differentiated ``aux.lse``). They are statistics
  of the shared vocabulary-streaming engine (``_stream``: ``LogNormaliser``, ``LabelLogit``,
  ``ColumnSum``, ``Argmax``): a ``lax.scan`` over vocabulary chunks with an online
  log-sum-exp, the vocab-parallel combine, and a backward that recomputes each chunk's
  logits, writes that chunk's ``dW`` block in place and accumulates ``dX``: four
  ``(N, D, V)`` matmuls in all.
* ``_total`` (the *gradient-in-forward* path, a ``jax.custom_vjp``) returns the scalar
  ``sum_i`` of the combination
  for known per-token coefficients (a scalar reduction). Plain evaluation runs the cheap
  statistics scan; its forward rule, which JAX runs only when a gradient is taken, walks over
  token tiles against the whole (local) vocabulary, so each tile's softmax is exact at once and
  ``dX``, ``dW``, ``db`` come out of the same pass: three matmuls, like the materialised loss.
  The backward scales them by the incoming cotangent; the coefficients' own gradients are the
  statistics, so ``sample_weights``, ``class_weights`` and traced hyperparameters are
  differentiated by ordinary autodiff outside the core.

Vocab-parallel (``axis_name``): each device computes the statistics of its vocabulary shard
and they are combined with ``pmax``/``psum`` (by the engine; inside the token-tile scan for
``_total``). The argmax is combined only when ``return_aux`` asks for it, never differentiated.
``_total`` shares the engine's cap and, for a differentiated ``aux.lse``, its backward.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, TypeAlias, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxce import _api, _checks, _reduce, _stream, _vocab, _vocab_parallel
from jaxce._checks import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, Reduction

Array: TypeAlias = jax.Array
Loss: TypeAlias = Array | tuple[Array, Array]  # the pair for reduction="sum_and_weight"
ArrayLike: TypeAlias = jax.typing.ArrayLike

# Smallest automatic token tile for which the gradient-in-forward path is taken.
_FAST_MIN_ROWS = 512


class LinearCrossEntropyAux(NamedTuple):
    """Per-token auxiliary outputs of ``linear_softmax_cross_entropy(..., return_aux=True)``.

    Attributes:
      lse: float32 log-normaliser of the (capped) logits, differentiable.
      z_loss: the z-loss term ``z_loss * lse**2`` the loss includes, before weighting and
        reduction (0 for ignored tokens), differentiable.
      argmax: int32 id of the largest (capped) logit over the real vocabulary, ties to the
        smallest id (global under ``axis_name``); not differentiable.
    """

    lse: Array
    z_loss: Array
    argmax: Array


class _Config(NamedTuple):
    chunk: int  # vocabulary columns per tile of the statistics scan
    rows: int  # tokens per tile of the gradient-in-forward scan
    softcap: float | None  # s in s * tanh(z / s)
    limit: int  # global number of real classes; columns at or past it are padding
    want_sum: bool  # compute S = sum_c u_c z_c over real classes (label smoothing)
    want_argmax: bool
    axis_name: str | None  # vocab-parallel mesh axis (only ``_total`` combines inside)
    vma_off: bool = False  # inside shard_map(check_vma=False): cotangents come as shares


# --------------------------------------------------------------------------- statistics


def _cap(cfg: _Config, z: Array) -> Array:
    return _stream.cap(cfg.softcap, z)


def _cap_slope(cfg: _Config, z: Array) -> Array | float:
    """D cap(u) / du at capped value ``z``: ``1 - (z / s)**2``."""
    return _stream.cap_slope(cfg.softcap, z)


def _spec(cfg: _Config, stats: tuple[_stream.Stat, ...] | None = None) -> _stream.Spec:
    """The engine's spec of the statistics ``(lse, z_y[, S][, argmax])`` (or ``stats``)."""
    if stats is None:
        stats = (_stream.LogNormaliser(), _stream.LabelLogit())
        if cfg.want_sum:
            stats = (*stats, _stream.ColumnSum())
        if cfg.want_argmax:
            stats = (*stats, _stream.Argmax())
    return _stream.Spec(
        stats=stats, chunk=cfg.chunk, limit=cfg.limit, axis_name=cfg.axis_name,
        softcap=cfg.softcap, shared_cotangents=cfg.vma_off,
    )  # fmt: skip


def _statistics(cfg: _Config, outputs, n: int, acc):
    """``(lse, z_y, S, argmax)`` from the engine's outputs (zeros for those not asked for)."""
    lse, zy = outputs[0], outputs[1]
    rest = list(outputs[2:])
    # Unused zeros, but device-varying like the statistics (custom_vjp output types).
    total = rest.pop(0) if cfg.want_sum else _vocab.varying_like(jnp.zeros((n,), acc), lse)
    best = rest.pop(0) if cfg.want_argmax else _vocab.varying_like(jnp.zeros((n,), jnp.int32), lse)
    return lse, zy, total, best


def _stats(cfg: _Config, x, w, b, u, y, offset):
    """Global per-token ``(lse, z_y, S, argmax)`` of ``z = cap(x @ w + b)`` over the real
    columns (the recompute path: any cotangent of them is honoured).

    ``y`` are local column ids (``-1``: the label is not in this shard), ``offset`` is the
    global id of local column 0 (a traced scalar under ``shard_map``) and ``u`` the optional
    per-column weights of ``S``.
    """
    spec = _spec(cfg)
    u = u if cfg.want_sum else None
    params = (None,) * len(spec.stats)
    outputs = _stream.stream(spec, (_stream.Head(x, w, b),), u, y, offset, params)
    return _statistics(cfg, outputs, x.shape[0], _reduce.compute_dtype(x.dtype, w.dtype))


def _local_cotangents(dx, dw, db, du, x, w, b, u):
    """Cast to the primals' dtypes; inside ``shard_map`` a cotangent may vary over mesh axes
    its primal does not (dW sums over the token shards of a data axis): sum it over those,
    as the transpose of ``pcast`` would.
    """
    out = []
    for ct, ref in ((dx, x), (dw, w), (db, b), (du, u)):
        if ct is None or ref is None:
            out.append(None)
        else:
            out.append(_vocab.sum_over_extra_axes(ct, ref).astype(ref.dtype))
    return tuple(out)


# --------------------------------------------------------------- gradient in the forward pass


class _Coef(NamedTuple):
    """Per-token coefficients: token loss = alpha lse + beta z_y + gamma S + zeta lse**2."""

    alpha: Array
    beta: Array
    gamma: Array | None
    zeta: Array | None


def _combination(coef: _Coef, keep, lse, zy, total):
    t = coef.alpha * lse + coef.beta * zy
    if coef.gamma is not None:
        t = t + coef.gamma * total
    if coef.zeta is not None:
        t = t + coef.zeta * jnp.square(lse)
    # A select, not a product: a dropped token's NaN (or infinite) statistics must not leak.
    return jnp.where(keep, t, jnp.zeros((), t.dtype))


def _total_plain(cfg: _Config, x, w, b, u, y, offset, keep, coef: _Coef):
    spec = _spec(cfg)
    u = u if cfg.want_sum else None
    params = (None,) * len(spec.stats)
    outputs, _ = _stream.forward(spec, (_stream.Head(x, w, b),), u, y, offset, params)
    acc = _reduce.compute_dtype(x.dtype, w.dtype)
    lse, zy, total, best = _statistics(cfg, outputs, x.shape[0], acc)
    return jnp.sum(_combination(coef, keep, lse, zy, total)), lse, best


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _total(cfg: _Config, x, w, b, u, y, offset, keep, coef: _Coef):
    """``(sum_i keep_i * token_loss_i, global lse, global argmax)`` for known coefficients."""
    return _total_plain(cfg, x, w, b, u, y, offset, keep, coef)


def _add_product(total: Array, a: Array, b: Array, acc) -> Array:
    """``total + a @ b`` for a ``(D, V)`` accumulator, a block of columns at a time.

    One ``(D, V)`` product per token tile would be a second dW-sized buffer, written and then
    read again to add it; column blocks are updated in place in the loop carry instead. Half
    precision operands take the single product: XLA:CPU cannot run a bfloat16 x bfloat16 ->
    float32 dot on a dynamic slice (``Unsupported element type for DotThunk``).
    """
    if a.dtype != acc or b.dtype != acc:
        return total + jnp.dot(a, b, preferred_element_type=acc)
    vocab = total.shape[1]
    block = _vocab.product_columns(total.shape[0], vocab)
    count, rest = divmod(vocab, block)

    def step(j, total):
        start = j * block
        part = jnp.dot(
            a, lax.dynamic_slice_in_dim(b, start, block, axis=1), preferred_element_type=acc
        )
        current = lax.dynamic_slice_in_dim(total, start, block, axis=1)
        return lax.dynamic_update_slice_in_dim(total, current + part, start, axis=1)

    total = lax.fori_loop(0, count, step, total)
    if rest:
        tail = jnp.dot(a, b[:, count * block :], preferred_element_type=acc)
        total = total.at[:, count * block :].add(tail)
    return total


def _row_block(a: Array, start, rows: int):
    return lax.dynamic_slice_in_dim(a, start, rows, axis=0)


def _grads_in_forward(cfg: _Config, x, w, b, u, y, offset, keep, coef: _Coef, need_x, need_w):
    """Token-tiled scan: the loss, the statistics and the gradients in one pass.

    Each tile holds ``rows`` tokens against the whole local vocabulary, so its log-sum-exp is
    final (after one ``pmax``/``psum`` under ``axis_name``) before any gradient is formed.
    """
    n, _ = x.shape
    vocab = w.shape[1]
    rows = cfg.rows
    axis = cfg.axis_name
    acc = _reduce.compute_dtype(x.dtype, w.dtype)
    operand = jnp.result_type(x.dtype, w.dtype)
    zero = jnp.zeros((), acc)
    shards = 1 if axis is None else lax.axis_size(axis)
    # Without padding columns every column is real: no mask to build or apply.
    padded = cfg.limit < vocab * shards
    valid = (offset + lax.iota(jnp.int32, vocab) < cfg.limit)[None, :] if padded else None

    def on_real(a, fill):
        """``a`` on the real columns, ``fill`` on the padding ones."""
        return a if valid is None else jnp.where(valid, a, fill)

    ucol = None if u is None else u.astype(acc)[None, :]
    alpha, beta = coef.alpha, coef.beta
    gamma = jnp.zeros((n,), acc) if coef.gamma is None else coef.gamma
    zeta = jnp.zeros((n,), acc) if coef.zeta is None else coef.zeta

    def body(carry, i):
        total_loss, stats, dx, dw, db, du = carry
        start = jnp.minimum(i * rows, n - rows)
        fresh = start + lax.iota(jnp.int32, rows) >= i * rows
        xt, yt = _row_block(x, start, rows), _row_block(y, start, rows)
        kt = _row_block(keep, start, rows) & fresh
        at, bt, gt, zt = (_row_block(c, start, rows) for c in (alpha, beta, gamma, zeta))
        z = jnp.dot(xt, w, preferred_element_type=acc)
        if b is not None:
            z = z + b.astype(acc)[None, :]
        z = _cap(cfg, z)
        zm = on_real(z, -jnp.inf)
        # The shift cancels in the log-sum-exp: a constant to any outer derivative (and pmax
        # has no derivative rule).
        m_local = lax.stop_gradient(jnp.max(zm, axis=1))
        m = m_local if axis is None else lax.pmax(m_local, axis)
        shift = jnp.where(jnp.isfinite(m), m, zero)
        s = jnp.sum(jnp.exp(zm - shift[:, None]), axis=1)
        # The label's logit by a gather (a label owned by another shard, or none, is -1).
        owned = yt >= 0
        label = jnp.maximum(yt, 0)
        zy_local = jnp.take_along_axis(z, label[:, None], axis=1)[:, 0]
        zy = jnp.where(owned, zy_local, zero)
        tot = jnp.zeros((rows,), acc)
        if cfg.want_sum:
            zu = z if ucol is None else z * ucol
            tot = jnp.sum(on_real(zu, zero), axis=1)
        if axis is not None:
            s, zy, tot = (lax.psum(t, axis) for t in (s, zy, tot))
        lse = shift + jnp.log(s)
        if cfg.want_argmax:
            arg = offset + jnp.argmax(zm, axis=1).astype(jnp.int32)
            if axis is not None:
                arg = lax.pmin(jnp.where(m_local == m, arg, jnp.iinfo(jnp.int32).max), axis)
        else:
            arg = jnp.zeros((rows,), jnp.int32)
        t = jnp.where(kt, at * lse + bt * zy + gt * tot + zt * jnp.square(lse), zero)
        total_loss = total_loss + jnp.sum(t)
        stats = tuple(
            lax.dynamic_update_slice_in_dim(full, part, start, axis=0)
            for full, part in zip(stats, (lse, zy, tot, arg), strict=True)
        )
        # d t / d z = (alpha + 2 zeta lse) p + beta onehot(y) + gamma u, on the real columns,
        # times the cap's slope. p is recomputed from z rather than kept from the sum above,
        # so that z's buffer can become dz's: one tile-sized array alive, not two.
        g_lse = jnp.where(kt, at + 2 * zt * lse, zero)
        dz = g_lse[:, None] * jnp.exp(zm - lse[:, None])
        if cfg.want_sum:
            gk = jnp.where(kt, gt, zero)
            dz = dz + on_real(gk[:, None] * (1.0 if ucol is None else ucol), zero)
            if du is not None:
                du = du + jnp.dot(gk, on_real(z, zero), preferred_element_type=acc)
        # Dropped tokens take no part: selects, not products, keep a NaN in their hidden
        # state out of the gradient (0 * NaN is NaN), as the materialised loss's select does.
        dz = jnp.where(kt[:, None], dz * _cap_slope(cfg, z), zero)
        # beta onehot(y): one entry per token, scattered rather than compared over the tile.
        label_term = jnp.where(kt & owned, bt * _cap_slope(cfg, zy_local), zero)
        dz = dz.at[jnp.arange(rows), label].add(label_term)
        dzc = dz.astype(operand)
        if dx is not None:
            dxt = jnp.dot(dzc, w.T, preferred_element_type=acc)
            dx = lax.dynamic_update_slice_in_dim(dx, dxt, start, axis=0)
        if dw is not None:
            xk = jnp.where(kt[:, None], xt, jnp.zeros((), xt.dtype))
            dw = _add_product(dw, xk.T, dzc, acc)
        if db is not None:
            db = db + jnp.sum(dz, axis=0)
        return (total_loss, stats, dx, dw, db, du), None

    local_init = (
        jnp.zeros(x.shape, acc) if need_x else None,
        jnp.zeros(w.shape, acc) if need_w else None,
        None if b is None else jnp.zeros(b.shape, acc),
        None if u is None or not cfg.want_sum else jnp.zeros(u.shape, acc),
    )
    local_init = _vocab.varying_like(local_init, x, w, b, u, y, offset, keep, *coef)
    # The loss and the statistics are combined over the vocabulary axis in the body, so
    # they vary over every mesh axis of the inputs but that one.
    axes = _vocab.varying_axes(x, w, b, u, y, offset, keep, *coef) - {axis}
    combined_init = _vocab.varying_over(
        (
            jnp.zeros((), acc),
            (
                jnp.zeros((n,), acc),
                jnp.zeros((n,), acc),
                jnp.zeros((n,), acc),
                jnp.zeros((n,), jnp.int32),
            ),
        ),
        axes,
    )
    init = (*combined_init, *local_init)
    # Reverse order: the shifted last tile (fresh rows only) goes first and the tile before
    # it overwrites the rows they share with its own values.
    (total_loss, stats, dx, dw, db, du), _ = lax.scan(
        body, init, jnp.arange(_vocab.num_chunks(n, rows)), reverse=True
    )
    return total_loss, stats, (dx, dw, db, du)


def _total_fwd(cfg, x, w, b, u, y, offset, keep, coef):
    values = jax.custom_derivatives.custom_vjp_primal_tree_values
    xv, wv, bv, uv, yv, ov, kv, cv = values((x, w, b, u, y, offset, keep, coef))
    total_loss, (lse, zy, tot, arg), grads = _grads_in_forward(
        cfg, xv, wv, bv, uv, yv, ov, kv, cv, need_x=x.perturbed, need_w=w.perturbed
    )
    stats = (lse, zy, tot)
    return (total_loss, lse, arg), (grads, stats, (xv, wv, bv, uv, yv, ov, kv, cv))


def _scale(g, ct):
    return None if ct is None else (g * ct).astype(ct.dtype)


def _total_bwd(cfg, res, cotangents):
    (dx, dw, db, du), (lse, zy, tot), (x, w, b, u, y, offset, keep, coef) = res
    g_total, g_lse, _ = cotangents
    acc = _reduce.compute_dtype(x.dtype, w.dtype)
    if type(g_total) is SymbolicZero:
        g_total = jnp.zeros((), acc)
    share = g_total
    if cfg.vma_off:
        # check_vma=False: the cotangents of the combined outputs are per-device shares; the
        # gradients of the shards need their sum (psum's transpose), the coefficients'
        # (replicated, summed back by the caller's transposes) keep the share.
        g_total = lax.psum(g_total, cfg.axis_name)
        if type(g_lse) is not SymbolicZero:
            g_lse = lax.psum(g_lse, cfg.axis_name)
    dx, dw, db, du = (_scale(g_total, ct) for ct in (dx, dw, db, du))
    if type(g_lse) is not SymbolicZero:
        # A differentiated aux.lse: its per-token cotangent is only known now, so pay the
        # recompute path's pass for it.
        spec = _spec(cfg, (_stream.LogNormaliser(),))
        head = _stream.Head(x, w, b)
        d_head, _, _ = _stream.gradients(
            spec, (head,), None, y, offset, (None,), ((),), (lse,), (g_lse,), localize=False
        )
        extra = (d_head[0].x, d_head[0].w, d_head[0].b, None)
        dx, dw, db, du = (
            e if a is None else (a if e is None else a + e)
            for a, e in zip((dx, dw, db, du), extra, strict=True)
        )
    dx, dw, db, du = _local_cotangents(dx, dw, db, du, x, w, b, u)
    dx = jnp.zeros(x.shape, x.dtype) if dx is None else dx
    dw = jnp.zeros(w.shape, w.dtype) if dw is None else dw
    kept = lambda v: share * jnp.where(keep, v, jnp.zeros((), v.dtype))  # noqa: E731
    d_coef = _Coef(
        alpha=kept(lse),
        beta=kept(zy),
        gamma=None if coef.gamma is None else kept(tot),
        zeta=None if coef.zeta is None else kept(jnp.square(lse)),
    )
    # A coefficient replicated over a mesh axis the statistics vary over (ones, when nothing
    # is weighted) gets the sum of its per-device cotangents, as the transpose of pcast would.
    d_coef = _Coef(
        *(  # type: ignore[arg-type]
            None if c is None else _vocab.sum_over_extra_axes(c.astype(r.dtype), r)
            for c, r in zip(d_coef, coef, strict=True)
        )
    )
    return dx, dw, db, du, None, None, None, d_coef


_total.defvjp(_total_fwd, _total_bwd, symbolic_zeros=True)


# ------------------------------------------------------------------------ argument handling


def _hyperparameter(value, name: str, dtype, domain: _checks.Domain):
    """``value`` in ``dtype`` (NaN where a traced one leaves ``domain``), or ``None`` when off."""
    if _checks.is_off(value):
        return None
    return _checks.nan_outside_domain(value, name, dtype, domain)


@overload
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
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[False] = False,
) -> Array: ...


@overload
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
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[False] = False,
) -> tuple[Array, Array]: ...


@overload
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
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[True],
) -> tuple[Array, LinearCrossEntropyAux]: ...


@overload
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
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
    return_aux: Literal[True],
) -> tuple[tuple[Array, Array], LinearCrossEntropyAux]: ...


@overload
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
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_size: int | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, Array] | tuple[Array | tuple[Array, Array], LinearCrossEntropyAux]: ...


@_api.public(
    static=(
        "ignore_index",
        "logit_softcap",
        "reduction",
        "chunk_size",
        "axis_name",
        "vocab_axis",
        "mesh",
        "vocab_size",
        "return_aux",
    ),
    optional=("label_smoothing", "z_loss"),
    domains={"label_smoothing": UNIT_INTERVAL, "z_loss": NON_NEGATIVE, "chunk_size": POSITIVE},
    reverse_mode_only=(
        "jaxce.softmax_cross_entropy_with_integer_labels(hidden @ weight + bias, labels, ...)"
    ),
)
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
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
    chunk_size: int | None = None,
    axis_name: str | None = None,
    vocab_axis: str | None = None,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    vocab_size: int | None = None,
    return_aux: bool = False,
) -> Array | tuple[Array, Array] | tuple[Array | tuple[Array, Array], LinearCrossEntropyAux]:
    r"""Softmax cross-entropy of ``hidden @ weight + bias`` without materialising the logits.

    For a token with hidden state :math:`h`, label :math:`y`, :math:`V` classes, class weights
    :math:`c` (ones if not given), smoothing :math:`\varepsilon`, z-loss :math:`\lambda_z` and
    optional soft cap :math:`s`:

    .. math::
      z = \operatorname{cap}_s(h W + b), \quad \operatorname{cap}_s(u) = s \tanh(u / s),
      \qquad L = \operatorname{logsumexp}_k z_k,

      \ell = (1 - \varepsilon)\, c_y (L - z_y)
             + \frac{\varepsilon}{V} \sum_k c_k (L - z_k) + \lambda_z L^2

    times ``sample_weights``; the mean divides by :math:`\sum_i s_i c_{y_i}` over kept tokens
    (PyTorch's ``F.linear_cross_entropy(weight=...)``; 0 if that is 0). This equals
    ``softmax_cross_entropy_with_integer_labels(cap(hidden @ weight + bias), labels, ...)``
    in value and in its gradients with respect to ``hidden``, ``weight``, ``bias``,
    ``class_weights`` and ``sample_weights``.

    **Two paths, one result.** ``reduction="none"`` (per-token cotangents unknown) takes the
    *recompute* path: a forward scan over chunks of ``chunk_size`` vocabulary columns with an
    online log-sum-exp, and a backward scan that recomputes each chunk's logits, writes that
    chunk's block of ``dweight`` and accumulates ``dhidden`` in float32 (four matmuls).
    Scalar reductions (``"sum"``, ``"mean"``, ``"sum_and_weight"``) take the
    *gradient-in-forward* path when differentiated: one scan over token tiles, each against
    the whole (local) vocabulary, computes the loss and ``dhidden``, ``dweight``, ``dbias``
    together (three matmuls, like the materialised loss), and the backward only scales them
    by the incoming cotangent. A token tile has about ``2**24`` elements (at least 128
    tokens), or ``chunk_size * tokens`` elements when ``chunk_size`` is given; each tile's
    ``dweight`` is added into the accumulator a block of columns at a time, in place. With
    ``chunk_size=None`` this path is taken when a tile holds at least 512 tokens or all of
    them (e.g. ``V <= 32768``); past that, re-reading the weight and the ``dweight``
    accumulator for every small tile costs as much as the matmul it saves (measured equal at
    ``V=65536``), and the recompute path, which needs less memory, runs instead. Vocabulary
    parallel (``axis_name``, or a vocabulary-sharded kernel on a mesh) the automatic token
    tile has the vocabulary tile's ``2**22`` elements, since a device there holds only its
    shard's share of the logits the materialised loss would. Plain
    evaluation (no gradient) runs the cheap forward scan either way. Memory beyond inputs and
    outputs: one tile and a few of its elementwise temporaries, plus the float32 ``dhidden``
    (recompute) or the float32 ``dweight`` accumulator (gradient in forward); the
    ``(tokens, V)`` logits never exist. Measured on a 2-core CPU at ``N=4096, D=1024,
    V=32768`` float32 (``benchmarks/README.md``): see there for time and memory against the
    materialised loss.

    Half-precision ``hidden``/``weight`` stay half precision as matmul operands, with float32
    accumulation (``preferred_element_type``); the log-sum-exp and the logits' gradient are
    float32, the latter cast to the operand dtype just before the gradient matmuls. The loss
    is float32 for half-precision inputs.

    **Transformations.** Supported: ``jax.grad``, ``jax.value_and_grad``, ``jax.vjp`` (with
    respect to ``hidden``, ``weight``, ``bias``, ``class_weights``, ``sample_weights`` and
    traced ``label_smoothing``/``z_loss``), ``jax.jit``, ``jax.vmap``, ``jax.checkpoint``,
    ``shard_map``, and second order in reverse mode (grad of grad, Hessian-vector products,
    ``jax.hessian``), which differentiates through the first-order rules and so holds their
    per-tile residuals (use it at small sizes). Not supported: forward mode (``jax.jvp``,
    ``jax.jacfwd``, evaluating ``jax.linearize``'s linear function). Called directly, ``jax.jvp``
    and ``jax.jacfwd`` raise a ``TypeError`` that names this function and the alternative,
    :func:`softmax_cross_entropy_with_integer_labels` of the materialised logits; through
    ``jax.jit`` (or ``jax.linearize``) JAX raises its own ``TypeError`` about forward-mode
    autodiff of a ``custom_vjp``.

    **On a mesh under plain** ``jax.jit`` (global arrays, no ``shard_map``). Data parallel:
    hidden states and per-token arrays sharded over any batch axes of a mesh of either axis
    type, kernels replicated; the result and every gradient equal the unsharded call, the
    gradients keep their inputs' shardings and per-token outputs keep the tokens' sharding,
    with no collective for them. Vocabulary parallel, never gathering a kernel whole: on an
    **Explicit** mesh (``jax.make_mesh``'s default, with ``jax.set_mesh``) automatically,
    when ``weight`` is sharded over its columns (``P(None, "model")``: ``bias`` and
    ``class_weights`` sharded alike) or over ``D``
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

    **Vocab-parallel.** With ``axis_name``, call it inside ``jax.shard_map`` with ``weight``
    (and ``bias``, ``class_weights``) sharded over the vocabulary along that mesh axis and
    ``hidden``/``labels`` replicated over it; ``labels`` are global vocabulary ids. Each
    device handles its shard and the per-token statistics are combined with ``pmax`` and
    ``psum`` of ``(tokens,)`` vectors; the result equals the unsharded one. ``dweight`` stays
    local; ``dhidden`` is summed over the axis by ``shard_map``. ``shard_map`` needs the
    vocabulary to divide evenly: pad ``weight`` (and ``bias``, ``class_weights``) with columns
    up to a multiple of the shard count and pass the true number of classes as
    ``vocab_size``; padded columns are excluded from the softmax, smoothing and ``argmax``.
    A ``(data, model)`` mesh, tokens over ``data`` and vocabulary over ``model``::

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

    **Several hosts** (a TPU pod slice, a GPU cluster, CPU hosts): the same code. Call
    ``jax.distributed.initialize()`` first in every process (on CPU, with
    ``jax.config.update("jax_cpu_collectives_implementation", "gloo")``), build the mesh from
    all of ``jax.devices()`` (``jax.make_mesh`` does), and place each process's part of the
    global arrays with ``jax.make_array_from_process_local_data`` (or
    ``jax.make_array_from_callback``) instead of ``jax.device_put``.

    Args:
      hidden: ``(..., D)`` float array (one row per token; any leading axes).
      weight: ``(D, V)`` float array (a Flax ``Dense`` kernel; tied embeddings pass
        ``embedding.T``, whose gradient flows back through the transpose). Under
        ``axis_name``: the local ``(D, V / shards)`` shard.
      labels: integer array of shape ``hidden.shape[:-1]``, class ids in ``[0, V)``.
      bias: optional ``(V,)`` (local shard under ``axis_name``).
      ignore_index: label value whose tokens are dropped (loss 0, gradient 0, weight 0).
      label_smoothing: :math:`\varepsilon \in [0, 1]`; uniform mass :math:`\varepsilon / V`.
        A concrete value outside raises ``ValueError``; a traced one makes the loss and its
        gradients NaN (and fails a ``checkify`` check).
      z_loss: :math:`\lambda_z \ge 0`, on the log-sum-exp of the (capped) logits; carries the
        sample weight, not the class weight. Outside its domain as ``label_smoothing``.
      logit_softcap: :math:`s > 0` (Gemma 2), or ``None`` for no cap.
      class_weights: optional ``(V,)`` float weight per column of ``weight`` (PyTorch's
        ``weight``; local shard under ``axis_name``; entries of padding columns are unused).
      sample_weights: float or boolean weights broadcastable to ``labels.shape`` (a boolean
        mask keeps the tokens where it is ``True``).
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean; 0 if every token is
        dropped) or ``"sum_and_weight"`` (numerator and denominator of the mean).
      chunk_size: vocabulary columns per tile (the tile has ``chunk_size * tokens``
        elements). ``None`` picks about ``2**22 / tokens`` (a 16 MiB float32 tile), rounded
        down to a multiple of 128, at least 256 and at most ``V``. A chunk that does not
        divide ``V`` is fine: the last tile is shifted to overlap the previous one (tiles are
        never shrunk and ``weight`` is never padded or copied).
      axis_name: mesh axis over which ``weight`` is vocabulary-sharded (inside
        ``shard_map``), or ``None``.
      vocab_axis: mesh axis (or tuple of axes) to shard the vocabulary over under plain
        ``jax.jit`` (global arrays, no ``shard_map`` of yours); needed on a mesh of Auto
        axes only: on an Explicit mesh the axis is read from the kernel's sharding, and
        ``vocab_axis`` overrides it. Mutually exclusive with ``axis_name`` (``ValueError``).
      mesh: the mesh that has ``vocab_axis``; ``None`` takes the context mesh
        (``jax.set_mesh``/``jax.sharding.use_mesh``). Only with ``vocab_axis``.
      vocab_size: number of real classes when ``weight`` carries padding columns at the end
        (global count under ``axis_name``); ``None`` means all ``V`` columns are classes.
      return_aux: also return per-token :class:`LinearCrossEntropyAux` (``lse``, ``z_loss``,
        ``argmax``), computed in the same pass; differentiating ``lse`` or ``z_loss`` costs
        one recompute pass in the backward.

    Returns:
      Per-token losses of shape ``labels.shape`` (``reduction="none"``), a scalar, or the pair
      for ``"sum_and_weight"``; float32 for half-precision inputs, else the inputs' dtype. A
      label outside ``[0, V)`` that is not ``ignore_index`` gives NaN for its token (and an
      error under ``jax.experimental.checkify``), as does NaN in the token's hidden state.
      With ``return_aux``, the pair ``(loss, aux)``, every field of ``aux`` of shape
      ``labels.shape``.

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
      >>> loss, aux = jaxce.linear_softmax_cross_entropy(
      ...     hidden, weight, labels, z_loss=1e-4, return_aux=True)
      >>> bool(jnp.all(aux.argmax == jnp.argmax(hidden @ weight, axis=-1)))
      True
      >>> bool(jnp.allclose(aux.lse, jax.nn.logsumexp(hidden @ weight, axis=-1)))
      True

    References:
      Wijmans et al., *Cut Your Losses in Large-Vocabulary Language Models* (Cut
      Cross-Entropy), 2024; Hsu et al., *Liger Kernel: Efficient Triton Kernels for LLM
      Training*, 2024; Shoeybi et al., *Megatron-LM* (vocab-parallel cross-entropy), 2019.
    """
    _checks.reduction(reduction)
    return _vocab_parallel.fused(
        functools.partial(
            _cross_entropy, ignore_index=ignore_index, logit_softcap=logit_softcap,
            chunk_size=chunk_size, return_aux=return_aux,
        ),
        hiddens={"hidden": hidden},
        kernels={"weight": weight},
        columns={"bias": bias, "class_weights": class_weights},
        tokens={"labels": labels, "sample_weights": sample_weights},
        shared={"label_smoothing": label_smoothing, "z_loss": z_loss},
        reduction=reduction,
        has_aux=bool(return_aux),
        axis_name=axis_name,
        vocab_axis=vocab_axis,
        mesh=mesh,
        vocab_size=vocab_size,
    )  # fmt: skip


def _cross_entropy(
    hidden, weight, labels, bias, class_weights, sample_weights, label_smoothing, z_loss, *,
    ignore_index, logit_softcap, reduction, chunk_size, axis_name, vocab_size, return_aux,
):  # fmt: skip
    """The loss on one device's arrays (the vocabulary shard under ``axis_name``)."""
    hidden, weight, labels, bias, batch = _vocab.labelled_inputs(hidden, weight, labels, bias)
    d_model, local_vocab = weight.shape
    class_weights = _vocab.per_column(class_weights, "class_weights", local_vocab)
    logit_softcap = _vocab.logit_softcap(logit_softcap)
    _checks.reduction(reduction)
    acc = _reduce.compute_dtype(hidden.dtype, weight.dtype)
    eps = _hyperparameter(label_smoothing, "label_smoothing", acc, UNIT_INTERVAL)
    lam = _hyperparameter(z_loss, "z_loss", acc, NON_NEGATIVE)
    chunk_size = _vocab.chunk_size(chunk_size)
    offset, vocab_size = _vocab.shards(axis_name, local_vocab, vocab_size)
    num_tokens = labels.size
    if chunk_size is None:
        chunk = _vocab.auto_chunk(max(1, num_tokens), local_vocab)
    else:
        chunk = min(chunk_size, local_vocab)
    # Vocab-parallel, a device holds 1/shards of the logits: the automatic token tile of the
    # gradient-in-forward path is then the vocabulary tile's size (2**22 elements, not 2**24),
    # so that the fused loss stays well below the materialised one on the same mesh.
    sized = chunk_size is not None or axis_name is not None
    rows = _vocab.auto_rows(num_tokens, local_vocab, chunk if sized else None)

    if sample_weights is not None:
        sample_weights = jnp.asarray(sample_weights)
        if sample_weights.dtype == jnp.bool_:
            sample_weights = sample_weights.astype(acc)
    token_weights, safe = _reduce.integer_label_weights(
        labels, vocab_size, acc, ignore_index=ignore_index, sample_weights=sample_weights
    )
    want_sum = eps is not None
    cfg = _Config(
        chunk=chunk,
        rows=rows,
        softcap=logit_softcap,
        limit=vocab_size,
        want_sum=want_sum,
        want_argmax=bool(return_aux),
        axis_name=axis_name,
        vma_off=_vocab.vma_unchecked(axis_name),
    )

    x = hidden.reshape(num_tokens, d_model)
    y = _vocab.local_labels(safe, offset, local_vocab)
    owned = y >= 0
    if axis_name is not None:
        # hidden is replicated over the vocabulary axis; mark it device-varying so that its
        # cotangent (a partial sum per shard) is summed over the axis by the transpose.
        x = _vocab.make_varying(x, (axis_name,))

    # Per-token pieces of the formula: c_y, sum_k c_k (global under axis_name).
    label_weight, weight_sum = None, None
    if class_weights is not None:
        picked = jnp.where(owned, class_weights[jnp.maximum(y, 0)], 0).astype(acc)
        real = offset + lax.iota(jnp.int32, local_vocab) < vocab_size
        weight_sum = jnp.sum(jnp.where(real, class_weights, 0)).astype(acc)
        if axis_name is not None:
            picked, weight_sum = lax.psum(picked, axis_name), lax.psum(weight_sum, axis_name)
        label_weight = picked
    token_weights = _reduce.ExampleWeights(
        keep=token_weights.keep,
        weight=token_weights.weight,
        denominator=token_weights.denominator
        if label_weight is None
        else token_weights.weight * label_weight.reshape(batch),
        invalid=token_weights.invalid,
    )
    alpha, beta, gamma = _coefficients(eps, label_weight, weight_sum, vocab_size, num_tokens, acc)

    # The gradient-in-forward path re-reads the whole weight and the dW accumulator once per
    # token tile; with small tiles (a large vocabulary) that costs more than the matmul it
    # saves (measured on CPU, benchmarks/README.md), so the automatic choice wants few tiles.
    few_tiles = rows >= _FAST_MIN_ROWS or rows == num_tokens
    scalar = reduction != "none" and num_tokens > 0
    # On an Auto mesh in context the partitioner splits the tokens; the fast path's token
    # tiles would make it all-gather them (and return dhidden replicated), so the per-token
    # path runs and is reduced (still O(chunk), and no collective beyond the sum's).
    if axis_name is None and _vocab.auto_partitioned():
        scalar = False
    if scalar and (chunk_size is not None or few_tiles):
        return _fused_scalar(
            cfg, x, weight, bias, class_weights, y, offset, token_weights, alpha, beta, gamma, lam,
            reduction, batch, return_aux,
        )  # fmt: skip

    lse, zy, total, best = _stats(cfg, x, weight, bias, class_weights, y, offset)
    raw = alpha * lse + beta * zy
    if gamma is not None:
        raw = raw + gamma * total
    if lam is not None:
        raw = raw + lam * jnp.square(lse)
    loss = _reduce.weigh_and_reduce(raw.reshape(batch), token_weights, reduction)
    if not return_aux:
        return loss
    return loss, _aux(lse, best, lam, token_weights, batch)


def _coefficients(eps, label_weight, weight_sum, vocab_size, n, acc):
    """Unweighted ``(alpha, beta, gamma)`` of ``alpha L + beta z_y + gamma S`` per token."""
    cy = jnp.ones((n,), acc) if label_weight is None else label_weight
    if eps is None:
        return cy, -cy, None
    mass = vocab_size if weight_sum is None else weight_sum  # sum_k c_k
    alpha = (1 - eps) * cy + eps * mass / vocab_size
    return alpha, -(1 - eps) * cy, jnp.full((n,), -eps / vocab_size, acc)


def _aux(lse, best, lam, token_weights, batch) -> LinearCrossEntropyAux:
    lse = lse.reshape(batch)
    if lam is None:
        zterm = jnp.zeros(batch, lse.dtype)
    else:
        zterm = jnp.where(token_weights.keep, lam * jnp.square(lse), jnp.zeros((), lse.dtype))
    return LinearCrossEntropyAux(lse=lse, z_loss=zterm, argmax=best.reshape(batch))


def _fused_scalar(
    cfg, x, w, b, u, y, offset, token_weights, alpha, beta, gamma, lam, reduction, batch,
    return_aux,
):  # fmt: skip
    """A scalar reduction through the gradient-in-forward core."""
    flat = lambda a: a.reshape(-1)  # noqa: E731
    # Tokens that count: kept, nonzero weight, valid label (a bad label poisons below).
    bad = flat(token_weights.invalid) if token_weights.invalid is not None else None
    keep = flat(token_weights.keep) & (flat(token_weights.weight) != 0)
    if bad is not None:
        keep = keep & ~bad
    weight = flat(token_weights.weight)
    coef = _Coef(
        alpha=weight * alpha,
        beta=weight * beta,
        gamma=None if gamma is None else weight * gamma,
        zeta=None if lam is None else weight * lam,
    )
    total, lse, best = _total(cfg, x, w, b, u, y, offset, keep, coef)  # type: ignore[misc]
    nan = jnp.full((), jnp.nan, total.dtype)
    if bad is not None:
        total = total + jnp.where(jnp.any(bad), nan, jnp.zeros((), total.dtype))
    denominator = jnp.sum(token_weights.denominator).astype(total.dtype)
    if reduction == "sum":
        loss = total
    elif reduction == "sum_and_weight":
        loss = (total, denominator)
    else:
        loss = _reduce.weighted_mean(total, denominator)
    if not return_aux:
        return loss
    return loss, _aux(lse, best, lam, token_weights, batch)

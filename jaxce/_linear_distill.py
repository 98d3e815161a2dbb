"""Fused distillation losses for large vocabularies: KL and Jensen-Shannon from hidden states.

A student ``hidden @ weight + bias`` and a teacher ``target_hidden @ target_weight +
target_bias`` share a vocabulary of ``V`` classes; neither ``(tokens, V)`` logit array is ever
materialised. Design:

* One ``jax.custom_vjp`` per loss maps the six arrays (plus the temperature, and ``beta``) to
  the per-token divergence. Its forward walks over blocks of vocabulary columns in a
  ``lax.scan`` (``_vocab.column_block``: the last block shifted, never shrunk) keeping online
  per-token statistics in float32; its backward recomputes each block's two logit tiles,
  writes that block of both ``dweight`` (one GEMM over all tokens each) and accumulates both
  ``dhidden`` in float32.
* KL needs one forward pass: the teacher's and the student's log-normalisers and the
  teacher-weighted logit gap, all online. The Jensen-Shannon divergence needs both normalisers
  before its mixture exists, so its forward makes a second pass.
* Vocab-parallel (``axis_name``): the statistics of each shard are combined with collectives
  on ``(tokens,)`` vectors inside the forward; the backward needs none (the global statistics
  are its residuals), except a ``psum`` of the scalar cotangents of the temperature and beta.
* Weights, masks and reductions are the shared ``_reduce`` mechanism on the per-token result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxce import _api, _checks, _reduce, _vocab
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


class _Operands(NamedTuple):
    x: Array  # (N, D) student hidden states
    w: Array  # (D, V) student kernel (local shard under axis_name)
    b: Array | None
    xt: Array  # (N, D_t) teacher hidden states
    wt: Array  # (D_t, V) teacher kernel
    bt: Array | None


class _Tile(NamedTuple):
    zs: Array  # (N, C) student logits of the block, accumulation dtype, before temperature
    zt: Array  # (N, C) teacher logits
    ws: Array  # (D, C) the student block of columns
    wt: Array  # (D_t, C)
    valid: Array  # (1, C) fresh (not shared with the previous block) and not padding
    start: Array  # first column of the block


def _acc_dtype(ops: _Operands):
    return _reduce.compute_dtype(ops.x.dtype, ops.w.dtype, ops.xt.dtype, ops.wt.dtype)


def _logits(x: Array, w: Array, b: Array | None, acc) -> Array:
    z = jnp.dot(x, w, preferred_element_type=acc)
    return z if b is None else z + b.astype(acc)[None, :]


def _tile(cfg: _Config, ops: _Operands, i, offset) -> _Tile:
    acc = _acc_dtype(ops)
    ws, bs, cols, fresh, start = _vocab.column_block(ops.w, ops.b, i, cfg.chunk)
    wt, bt, _, _, _ = _vocab.column_block(ops.wt, ops.bt, i, cfg.chunk)
    valid = fresh & (offset + cols < cfg.limit)
    return _Tile(
        _logits(ops.x, ws, bs, acc), _logits(ops.xt, wt, bt, acc), ws, wt, valid[None, :], start
    )


def _scan_tiles(cfg: _Config, ops: _Operands, body, init, *, reverse: bool = False):
    steps = jnp.arange(_vocab.num_chunks(ops.w.shape[1], cfg.chunk))
    carry, _ = lax.scan(lambda c, i: (body(c, i), None), init, steps, reverse=reverse)
    return carry


def _rows(ops: _Operands, *refs) -> Array:
    """A fresh ``(N,)`` zero carry, device-varying like everything the scan body reads."""
    rows = jnp.zeros((ops.x.shape[0],), _acc_dtype(ops))
    return _vocab.varying_like(rows, *ops, *refs)


class _Online(NamedTuple):
    """Running log-sum-exp of one side: max ``m`` and ``s = sum exp(z - shift(m))``."""

    m: Array
    s: Array

    @classmethod
    def start(cls, rows: Array) -> _Online:
        # Derived from ``rows`` (not a fresh full) so it keeps their shard_map varying axes.
        return cls(rows - jnp.inf, rows)

    def update(self, z: Array, valid: Array):
        """Adds a tile; returns ``(new state, exp(z - shift) on valid columns, rescale)``."""
        zero = jnp.zeros((), z.dtype)
        z = jnp.where(valid, z, -jnp.inf)
        m = jnp.maximum(self.m, jnp.max(z, axis=1))
        shift = jnp.where(jnp.isfinite(m), m, zero)
        rescale = jnp.exp(self.m - shift)
        e = jnp.exp(z - shift[:, None])
        return _Online(m, self.s * rescale + jnp.sum(e, axis=1)), e, rescale

    def lse(self) -> Array:
        """``-inf`` for a row with no valid column (a shard that is all padding)."""
        shift = jnp.where(jnp.isfinite(self.m), self.m, jnp.zeros((), self.m.dtype))
        return shift + jnp.log(self.s)


def _global_lse(lse: Array, axis_name: str | None) -> Array:
    """Log-sum-exp over vocabulary shards of the per-shard log-normalisers ``lse``."""
    if axis_name is None:
        return lse
    peak = lax.pmax(lse, axis_name)
    peak = jnp.where(jnp.isfinite(peak), peak, jnp.zeros((), peak.dtype))
    return peak + jnp.log(lax.psum(jnp.exp(lse - peak), axis_name))


def _psum(x: Array, axis_name: str | None) -> Array:
    return x if axis_name is None else lax.psum(x, axis_name)


def _no_normaliser(lse_s: Array, lse_t: Array, value: Array) -> Array:
    """NaN where a side has no probability at all (every logit ``-inf``), as in the core."""
    undefined = (lse_s == -jnp.inf) | (lse_t == -jnp.inf)
    return jnp.where(undefined, jnp.full((), jnp.nan, value.dtype), value)


def _xlogy_free(w: Array, log_ratio: Array) -> Array:
    """``w * log_ratio`` with ``0 * anything = 0`` (a NaN weight stays NaN)."""
    return jnp.where(w == 0, jnp.zeros((), w.dtype), w * log_ratio)


# --------------------------------------------------------------------------------------------
# Backward shared by both losses: recompute the tiles, turn the logit gradients into parameter
# gradients.


def _backward(cfg: _Config, ops: _Operands, inv_t, offset, logit_grads: Callable, refs):
    """Cotangents of ``ops`` and ``inv_t`` (and one scalar ``extra``) from per-tile gradients.

    ``logit_grads(a, c, valid) -> (ga, gc, extra)`` gives the gradients with respect to the
    tempered logits ``a = zs / T`` and ``c = zt / T`` of one tile (zero off ``valid``) and a
    scalar contribution to the cotangent of another hyperparameter.
    """
    acc = _acc_dtype(ops)
    op_s = jnp.result_type(ops.x.dtype, ops.w.dtype)
    op_t = jnp.result_type(ops.xt.dtype, ops.wt.dtype)
    scalar = jnp.zeros((), acc)

    def body(carry, i):
        dx, dxt, dw, dwt, db, dbt, d_inv, d_extra = carry
        tile = _tile(cfg, ops, i, offset)
        ga, gc, extra = logit_grads(inv_t * tile.zs, inv_t * tile.zt, tile.valid)
        d_inv = d_inv + jnp.sum(ga * tile.zs) + jnp.sum(gc * tile.zt)
        dzs, dzt = inv_t * ga, inv_t * gc
        dx, dw, db = _block_grads(ops.x, tile.ws, dzs, op_s, acc, dx, dw, db, tile.start)
        dxt, dwt, dbt = _block_grads(ops.xt, tile.wt, dzt, op_t, acc, dxt, dwt, dbt, tile.start)
        return dx, dxt, dw, dwt, db, dbt, d_inv, d_extra + extra

    init = (
        jnp.zeros(ops.x.shape, acc),
        jnp.zeros(ops.xt.shape, acc),
        jnp.zeros(ops.w.shape, ops.w.dtype),
        jnp.zeros(ops.wt.shape, ops.wt.dtype),
        None if ops.b is None else jnp.zeros(ops.b.shape, ops.b.dtype),
        None if ops.bt is None else jnp.zeros(ops.bt.shape, ops.bt.dtype),
        scalar,
        scalar,
    )
    init = _vocab.varying_like(init, *ops, inv_t, offset, *refs)
    # Reverse order: the shifted last block writes zeros over the columns it shares with the
    # previous block, which then overwrites them with their true gradient.
    dx, dxt, dw, dwt, db, dbt, d_inv, d_extra = _scan_tiles(cfg, ops, body, init, reverse=True)

    # Inside shard_map a cotangent may vary over mesh axes its primal does not (dW sums over
    # token shards, the scalars over every shard): sum it there, as the transpose of pcast.
    def total(ct: Array, ref: Array) -> Array:
        return _vocab.sum_over_extra_axes(ct, ref)

    cts = _Operands(
        x=total(dx, ops.x).astype(ops.x.dtype),
        w=total(dw, ops.w),
        b=None if ops.b is None else total(db, ops.b),
        xt=total(dxt, ops.xt).astype(ops.xt.dtype),
        wt=total(dwt, ops.wt),
        bt=None if ops.bt is None else total(dbt, ops.bt),
    )
    return cts, d_inv, d_extra


def _block_grads(x, wc, dz, operand, acc, dx, dw, db, start):
    """Adds one block's contribution: ``dx += dz W_c^T``, writes ``x^T dz`` and ``sum dz``."""
    dzc = dz.astype(operand)
    dx = dx + jnp.dot(dzc, wc.T, preferred_element_type=acc)
    dwc = jnp.dot(x.T, dzc, preferred_element_type=acc)
    dw = lax.dynamic_update_slice_in_dim(dw, dwc.astype(dw.dtype), start, axis=1)
    if db is not None:
        db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, axis=0).astype(db.dtype), start, 0)
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# KL: one pass. With a = zs / T, c = zt / T, q = softmax(c), p = softmax(a):
#   KL(q || p) = gap + lse(a) - lse(c),  gap = sum_v q_v (c_v - a_v),
# and the gradients d/da_v = p_v - q_v, d/dc_v = q_v (c_v - a_v - gap).


def _kl_forward(cfg: _Config, ops: _Operands, inv_t, offset):
    rows = _rows(ops, inv_t, offset)

    def body(carry, i):
        student, teacher, gap_sum = carry
        tile = _tile(cfg, ops, i, offset)
        a, c = inv_t * tile.zs, inv_t * tile.zt
        student, _, _ = student.update(a, tile.valid)
        teacher, e, rescale = teacher.update(c, tile.valid)
        gap_sum = gap_sum * rescale + jnp.sum(_xlogy_free(e, c - a), axis=1)
        return student, teacher, gap_sum

    init = (_Online.start(rows), _Online.start(rows), rows)
    student, teacher, gap_sum = _scan_tiles(cfg, ops, body, init)
    lse_s_local, lse_t_local = student.lse(), teacher.lse()
    gap = gap_sum / teacher.s  # the teacher expectation over this shard's columns
    lse_s = _global_lse(lse_s_local, cfg.axis_name)
    lse_t = _global_lse(lse_t_local, cfg.axis_name)
    if cfg.axis_name is not None:
        share = jnp.exp(lse_t_local - lse_t)  # the teacher mass on this shard
        empty = lse_t_local == -jnp.inf  # an all-padding shard: gap is 0 / 0 there
        gap = lax.psum(jnp.where(empty, jnp.zeros((), gap.dtype), share * gap), cfg.axis_name)
    kl = _no_normaliser(lse_s, lse_t, gap + (lse_s - lse_t))
    return kl, (lse_s, lse_t, gap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kl(cfg: _Config, ops: _Operands, inv_t, offset):
    """Per-token ``KL(softmax(c) || softmax(a))``, ``a = inv_t * zs``, ``c = inv_t * zt``."""
    return _kl_forward(cfg, ops, inv_t, offset)[0]


def _kl_fwd(cfg, ops, inv_t, offset):
    kl, stats = _kl_forward(cfg, ops, inv_t, offset)
    return kl, (ops, inv_t, offset, stats)


def _kl_bwd(cfg, res, g):
    ops, inv_t, offset, (lse_s, lse_t, gap) = res
    zero = jnp.zeros((), lse_s.dtype)

    def logit_grads(a, c, valid):
        p = jnp.where(valid, jnp.exp(a - lse_s[:, None]), zero)
        q = jnp.where(valid, jnp.exp(c - lse_t[:, None]), zero)
        row = g[:, None]
        return row * (p - q), row * _xlogy_free(q, c - a - gap[:, None]), zero

    refs = (lse_s, lse_t, gap, g)
    cts, d_inv, _ = _backward(cfg, ops, inv_t, offset, logit_grads, refs)
    return cts, _vocab.sum_over_extra_axes(d_inv, inv_t), None


_kl.defvjp(_kl_fwd, _kl_bwd)


# --------------------------------------------------------------------------------------------
# Jensen-Shannon: two passes (the mixture needs both normalisers). With P = softmax(a),
# Q = softmax(c), M = beta P + (1 - beta) Q, the per-token sums
#   jp = sum_v beta P_v (log P_v - log M_v),  jq = sum_v (1 - beta) Q_v (log Q_v - log M_v)
# give JS = jp + jq, d/da_v = beta P_v (log P_v - log M_v) - P_v jp (and likewise for c), and
# dJS/dbeta = KL(P || M) - KL(Q || M).


class _Mixture(NamedTuple):
    beta: Array
    log_beta: Array
    log_rest: Array

    @classmethod
    def of(cls, beta: Array) -> _Mixture:
        return cls(beta, jnp.log(beta), jnp.log1p(-beta))

    def terms(self, a, c, valid, lse_s, lse_t):
        """``(P, Q, log P - log M, log Q - log M, beta-weighted terms of jp, of jq)``."""
        lp = jnp.where(valid, a - lse_s[:, None], -jnp.inf)
        lq = jnp.where(valid, c - lse_t[:, None], -jnp.inf)
        lm = jnp.logaddexp(self.log_beta + lp, self.log_rest + lq)
        p, q = jnp.exp(lp), jnp.exp(lq)
        rp, rq = lp - lm, lq - lm  # NaN only where the weight below is 0
        return p, q, rp, rq, _xlogy_free(self.beta * p, rp), _xlogy_free((1 - self.beta) * q, rq)


def _js_forward(cfg: _Config, ops: _Operands, inv_t, beta, offset):
    rows = _rows(ops, inv_t, beta, offset)

    def normalisers(carry, i):
        student, teacher = carry
        tile = _tile(cfg, ops, i, offset)
        student, _, _ = student.update(inv_t * tile.zs, tile.valid)
        teacher, _, _ = teacher.update(inv_t * tile.zt, tile.valid)
        return student, teacher

    student, teacher = _scan_tiles(
        cfg, ops, normalisers, (_Online.start(rows), _Online.start(rows))
    )
    lse_s = _global_lse(student.lse(), cfg.axis_name)
    lse_t = _global_lse(teacher.lse(), cfg.axis_name)
    mixture = _Mixture.of(beta)

    def divergence(carry, i):
        jp, jq = carry
        tile = _tile(cfg, ops, i, offset)
        terms = mixture.terms(inv_t * tile.zs, inv_t * tile.zt, tile.valid, lse_s, lse_t)
        return jp + jnp.sum(terms[4], axis=1), jq + jnp.sum(terms[5], axis=1)

    rows = _rows(ops, inv_t, beta, offset, lse_s, lse_t)
    jp, jq = _scan_tiles(cfg, ops, divergence, (rows, rows))
    jp, jq = _psum(jp, cfg.axis_name), _psum(jq, cfg.axis_name)
    return _no_normaliser(lse_s, lse_t, jp + jq), (lse_s, lse_t, jp, jq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _js(cfg: _Config, ops: _Operands, inv_t, beta, offset):
    """Per-token ``JS_beta(softmax(a), softmax(c))``, ``a = inv_t * zs``, ``c = inv_t * zt``."""
    return _js_forward(cfg, ops, inv_t, beta, offset)[0]


def _js_fwd(cfg, ops, inv_t, beta, offset):
    js, stats = _js_forward(cfg, ops, inv_t, beta, offset)
    return js, (ops, inv_t, beta, offset, stats)


def _js_bwd(cfg, res, g):
    ops, inv_t, beta, offset, (lse_s, lse_t, jp, jq) = res
    mixture = _Mixture.of(beta)

    def logit_grads(a, c, valid):
        p, q, rp, rq, tp, tq = mixture.terms(a, c, valid, lse_s, lse_t)
        row = g[:, None]
        ga = row * (tp - p * jp[:, None])
        gc = row * (tq - q * jq[:, None])
        d_beta = jnp.sum(row * (_xlogy_free(p, rp) - _xlogy_free(q, rq)))
        return ga, gc, d_beta

    refs = (beta, lse_s, lse_t, jp, jq, g)
    cts, d_inv, d_beta = _backward(cfg, ops, inv_t, offset, logit_grads, refs)
    d_inv = _vocab.sum_over_extra_axes(d_inv, inv_t)
    return cts, d_inv, _vocab.sum_over_extra_axes(d_beta, beta), None


_js.defvjp(_js_fwd, _js_bwd)


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
    cfg = _Config(chunk=chunk, limit=vocab_size, axis_name=axis_name)
    ops = _Operands(x, weight, bias, xt, target_weight, target_bias)
    return _Prepared(cfg, ops, offset, batch, weights, acc)


@_api.public(
    static=("reduction", "chunk_size", "axis_name", "vocab_size"),
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
    kl: Array = _kl(prep.cfg, prep.ops, 1 / t, prep.offset)  # type: ignore[assignment]
    return _reduce.weigh_and_reduce(jnp.square(t) * kl.reshape(prep.batch), prep.weights, reduction)


@_api.public(
    static=("reduction", "chunk_size", "axis_name", "vocab_size"),
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
    J_Q`. Memory, precision and sharding are as in :func:`linear_softmax_kl_divergence`.

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
    js: Array = _js(prep.cfg, prep.ops, 1 / t, b, prep.offset)  # type: ignore[assignment]
    return _reduce.weigh_and_reduce(js.reshape(prep.batch), prep.weights, reduction)

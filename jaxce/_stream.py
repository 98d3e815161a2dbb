"""The vocabulary-streaming engine of the fused losses: per-token statistics of logit heads.

A *head* is the logits ``z = cap(x @ w + b) * inv_t`` of ``(N, D)`` hidden states against a
``(D, V)`` kernel (the local shard under ``axis_name``), never materialised: the engine walks
over blocks of ``chunk`` columns with ``lax.scan`` (``_vocab.column_block``: the last block is
shifted, never shrunk or padded), the padding columns past ``limit`` masked out. One or two
heads share the blocks (a student and a teacher).

What a loss asks for is a tuple of *statistics* (``Stat`` subclasses below), each a per-token
quantity with four parts in one place:

* ``update``: its share of one column block, in the first pass (online, next to each head's
  running log-sum-exp) or, for ``second_pass`` statistics, in a second pass that sees the
  heads' global log-normalisers;
* ``finish``: the per-token value from the scan's carry, combined over the vocab-parallel
  mesh axis (``psum``/``pmax``; collectives only for what was asked for);
* ``grads``: the gradient of the statistic with respect to each head's logits on one block,
  from the per-token cotangent (the per-element rule);
* optional residuals for that rule.

``stream`` is the ``jax.custom_vjp`` over all of it: its backward recomputes each block's
logits once, sums the statistics' per-element rules (a statistic with a symbolic-zero
cotangent costs nothing), chains the sum through the temperature and the soft cap, and writes
that block of ``dw``/``db`` (one matmul over all tokens) and accumulates ``dx`` in the
accumulation dtype. A new fused statistic is one new ``Stat`` subclass.

Numerics: every state is kept in the accumulation dtype (float32 for half precision inputs),
the running maximum starts at ``-inf``, and a token with no real column in a shard (an
all-padding shard) contributes nothing when the shards are combined.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxce import _reduce, _vocab

Array: TypeAlias = jax.Array


class Head(NamedTuple):
    """One logit head ``cap(x @ w + b) * inv_t``."""

    x: Array  # (N, D) hidden states
    w: Array  # (D, V) kernel (local shard under axis_name)
    b: Array | None = None  # (V,)
    inv_t: Array | None = None  # () or (N,) inverse temperature, applied after the cap


class Spec(NamedTuple):
    """The static part of a ``stream`` call."""

    stats: tuple[Stat, ...]
    chunk: int  # columns per block (<= the local vocabulary)
    limit: int  # global number of real classes; columns at or past it are padding
    axis_name: str | None = None  # vocab-parallel mesh axis
    softcap: float | None = None  # s in s * tanh(z / s), on every head
    temperature_grad: bool = False  # give ``inv_t`` a cotangent
    same_temperature: bool = False  # two heads whose ``inv_t`` are the same value
    # Inside shard_map(check_vma=False): the outputs' cotangents are per-device shares.
    shared_cotangents: bool = False


# ----------------------------------------------------------------------------- small helpers


def cap(softcap: float | None, z: Array) -> Array:
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def cap_slope(softcap: float | None, capped: Array) -> Array | float:
    """``d cap(u) / du`` at the capped value: ``1 - (capped / s)**2``."""
    if softcap is None:
        return 1.0
    t = capped / softcap
    return 1 - t * t


def acc_dtype(heads) -> Any:
    return _reduce.compute_dtype(*(a.dtype for h in heads for a in (h.x, h.w)))


def finite_or_zero(m: Array) -> Array:
    return jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))


def weighted(w: Array, v: Array) -> Array:
    """``w * v`` with ``0 * anything = 0`` (a NaN weight stays NaN)."""
    return jnp.where(w == 0, jnp.zeros((), w.dtype), w * v)


def _per_row(inv_t: Array) -> Array:
    return inv_t[:, None] if jnp.ndim(inv_t) == 1 else inv_t


def _psum(x, axis_name):
    return x if axis_name is None else lax.psum(x, axis_name)


class Block(NamedTuple):
    """One block of columns of every head."""

    z: tuple[Array, ...]  # (N, C) tempered logits per head, accumulation dtype
    capped: tuple[Array, ...]  # (N, C) the capped logits before the temperature
    w: tuple[Array, ...]  # (D, C) the kernels' column blocks
    cols: Array  # (C,) local column ids
    valid: Array  # (1, C) fresh (not shared with the previous block) and not padding
    start: Array  # first local column of the block
    u: Any  # (C,) block of the per-column weights, or None
    gap: Any  # (N, C) z of head 1 minus z of head 0 (two heads), else None


def block(spec: Spec, heads, u, i, offset) -> Block:
    acc = acc_dtype(heads)
    raw, ws, bs = [], [], []
    cols = fresh = start = None
    for h in heads:
        wc, bc, cols, fresh, start = _vocab.column_block(h.w, h.b, i, spec.chunk)
        ws.append(wc)
        bs.append(bc)
    raw = [jnp.dot(h.x, wc, preferred_element_type=acc) for h, wc in zip(heads, ws, strict=True)]
    zs, caps = [], []
    for h, z, bc in zip(heads, raw, bs, strict=True):
        if bc is not None:
            z = z + bc.astype(acc)[None, :]
        c = cap(spec.softcap, z)
        caps.append(c)
        zs.append(c if h.inv_t is None else c * _per_row(h.inv_t).astype(acc))
    assert cols is not None and fresh is not None and start is not None
    valid = fresh & (offset + cols < spec.limit)
    ub = None if u is None else lax.dynamic_slice_in_dim(u, start, spec.chunk).astype(acc)
    gap = None
    if len(heads) == 2:
        # c - a from the logits before a shared temperature: equal heads give exactly 0 (the
        # difference of the tempered logits may be contracted into an FMA that does not).
        inv_t = heads[0].inv_t
        if spec.same_temperature and inv_t is not None:
            gap = (caps[1] - caps[0]) * _per_row(inv_t).astype(acc)
        else:
            gap = zs[1] - zs[0]
    return Block(tuple(zs), tuple(caps), tuple(ws), cols, valid[None, :], start, ub, gap)


class Online(NamedTuple):
    """Running log-sum-exp of one head: max ``m`` and ``s = sum exp(z - shift(m))``."""

    m: Array
    s: Array

    def lse(self) -> Array:
        """``-inf`` for a row with no real column (a shard that is all padding)."""
        return finite_or_zero(self.m) + jnp.log(self.s)


class Step(NamedTuple):
    """One head's online update over a block."""

    old: Online
    new: Online
    tile_max: Array  # (N,) max over the block's real columns
    shift: Array  # (N,) finite shift of the new state
    rescale: Array  # (N,) exp(old.m - shift): multiplies sums kept against the old shift
    e: Array  # (N, C) exp(z - shift) on the real columns, 0 elsewhere


def online_step(state: Online, z: Array, valid: Array) -> Step:
    zm = jnp.where(valid, z, -jnp.inf)
    tile_max = jnp.max(zm, axis=1)
    m = jnp.maximum(state.m, tile_max)
    shift = finite_or_zero(m)
    rescale = jnp.exp(state.m - shift)
    e = jnp.exp(zm - shift[:, None])
    return Step(
        state, Online(m, state.s * rescale + jnp.sum(e, axis=1)), tile_max, shift, rescale, e
    )


class Fwd(NamedTuple):
    """What a statistic's ``update`` sees of one block."""

    block: Block
    steps: Any  # tuple[Step, ...] per head, first pass only (else None)
    lse: Any  # tuple of global log-normalisers per head, second pass only (else None)
    y: Any  # (N,) local label column ids, -1 where not in this shard
    offset: Array  # global id of local column 0
    param: Any  # the statistic's traced parameter (or None)
    first: Any  # the statistic's first-pass value (second pass only)


class Final(NamedTuple):
    """What a statistic's ``finish`` sees."""

    state: tuple[Online, ...]  # per head, local
    lse_local: tuple[Array, ...]
    lse: tuple[Array, ...]  # global
    axis_name: str | None
    param: Any
    first: Any
    offset: Any = None  # global id of local column 0


class Bwd(NamedTuple):
    """What a statistic's ``grads`` sees of one block in the backward pass."""

    block: Block
    p: Any  # tuple[Array | None, ...]: softmax of each head on the block (0 off the real columns)
    lse: tuple[Array, ...]
    y: Any
    param: Any
    offset: Any = None  # global id of local column 0


# --------------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Stat:
    """A per-token statistic of the heads (see the module docstring). Hashable (static)."""

    second_pass: ClassVar[bool] = False
    differentiable: ClassVar[bool] = True
    uses_p: ClassVar[tuple[int, ...]] = ()  # heads whose softmax ``grads`` reads

    def init(self, rows: Array) -> Any:
        return rows

    def update(self, carry, t: Fwd):  # pragma: no cover - every statistic defines it
        raise NotImplementedError

    def finish(self, carry, f: Final) -> tuple[Array, Any]:
        """``(output, residual)``: the value returned and what ``grads`` needs of it."""
        value = _psum(carry, f.axis_name)
        return value, value

    def grads(self, g: Array, residual, t: Bwd) -> tuple[tuple[Array | None, ...], Any, Any]:
        """``(d output / d z per head (None: zero), d param summed over the block, d u)``."""
        raise NotImplementedError  # pragma: no cover

    def cotangent(self, g):
        """The differentiable part of the output's cotangent (a statistic whose output is a
        tuple with non-differentiable parts picks its array here).
        """
        return g


@dataclasses.dataclass(frozen=True)
class LogNormaliser(Stat):
    """``logsumexp_v z_v`` of a head (over the real columns, all shards)."""

    head: int = 0

    @property
    def uses_p(self):  # type: ignore[override]
        return (self.head,)

    def init(self, rows):
        return ()

    def update(self, carry, t):
        return carry

    def finish(self, carry, f):
        return f.lse[self.head], ()

    def grads(self, g, residual, t):
        return _only(self.head, g[:, None] * t.p[self.head]), None, None


@dataclasses.dataclass(frozen=True)
class LabelLogit(Stat):
    """``z_y`` of head 0 at the label (0 for a label outside this shard)."""

    def update(self, carry, t):
        hit = t.block.valid & (t.block.cols[None, :] == t.y[:, None])
        zero = jnp.zeros((), carry.dtype)
        return carry + jnp.sum(jnp.where(hit, t.block.z[0], zero), axis=1)

    def grads(self, g, residual, t):
        hit = t.block.valid & (t.block.cols[None, :] == t.y[:, None])
        return (jnp.where(hit, g[:, None], jnp.zeros((), g.dtype)),), None, None


@dataclasses.dataclass(frozen=True)
class ColumnSum(Stat):
    """``sum_v u_v z_v`` of head 0 over the real columns (``u`` the per-column weights, or 1)."""

    def update(self, carry, t):
        z = t.block.z[0]
        zu = z if t.block.u is None else z * t.block.u[None, :]
        return carry + jnp.sum(jnp.where(t.block.valid, zu, jnp.zeros((), z.dtype)), axis=1)

    def grads(self, g, residual, t):
        zero = jnp.zeros((), g.dtype)
        u = 1.0 if t.block.u is None else t.block.u[None, :]
        dz = jnp.where(t.block.valid, g[:, None] * u, zero)
        du = None
        if t.block.u is not None:
            du = jnp.dot(g, jnp.where(t.block.valid, t.block.z[0], zero))
        return (dz,), None, du


@dataclasses.dataclass(frozen=True)
class Argmax(Stat):
    """int32 global id of head 0's largest real logit, ties to the smallest id; no gradient."""

    differentiable: ClassVar[bool] = False

    def init(self, rows):
        return rows.astype(jnp.int32)

    def update(self, carry, t):
        step = t.steps[0]  # type: ignore[index]
        zm = jnp.where(t.block.valid, t.block.z[0], -jnp.inf)
        # int32 throughout: under x64 the block's start (from the scan index) is int64.
        arg = (t.offset + t.block.start + jnp.argmax(zm, axis=1)).astype(jnp.int32)
        # Strictly greater: on ties the earlier block, i.e. the smaller id, wins.
        return jnp.where(step.tile_max > step.old.m, arg, carry)

    def finish(self, carry, f):
        if f.axis_name is None:
            return carry, ()
        m = lax.stop_gradient(f.state[0].m)
        top = lax.pmax(m, f.axis_name)
        none = jnp.iinfo(jnp.int32).max
        return lax.pmin(jnp.where(m == top, carry, none), f.axis_name), ()


@dataclasses.dataclass(frozen=True)
class Entropy(Stat):
    """``H = -sum_v p_v log p_v`` of a head's softmax ``p``.

    Kept as ``H = log s + U / s`` with ``U = sum_v e^(z_v - m) (m - z_v)`` against the running
    maximum ``m`` (both terms non-negative, no cancellation between ``lse`` and ``E_p z``);
    when ``m`` rises to ``m'``, ``U' = e^(m - m') (U + (m' - m) s)``.
    ``dH / dz_v = p_v ((lse - z_v) - H)``.
    """

    head: int = 0

    @property
    def uses_p(self):  # type: ignore[override]
        return (self.head,)

    def update(self, carry, t):
        step = t.steps[self.head]  # type: ignore[index]
        z = t.block.z[self.head]
        zero = jnp.zeros((), z.dtype)
        gap = step.shift - finite_or_zero(step.old.m)
        carry = step.rescale * (carry + gap * step.old.s)
        below = jnp.where(t.block.valid, step.shift[:, None] - z, zero)
        return carry + jnp.sum(step.e * below, axis=1)

    def finish(self, carry, f):
        state = f.state[self.head]
        local = jnp.log(state.s) + carry / state.s
        if f.axis_name is None:
            return local, local
        # H = sum over shards of their mass times (lse - lse_shard + H_shard): no cancellation.
        lse_local, lse = f.lse_local[self.head], f.lse[self.head]
        share = jnp.exp(lse_local - lse)
        part = share * ((lse - lse_local) + local)
        empty = lse_local == -jnp.inf
        h = lax.psum(jnp.where(empty, jnp.zeros((), part.dtype), part), f.axis_name)
        return h, h

    def grads(self, g, h, t):
        k = self.head
        z, p = t.block.z[k], t.p[k]
        zero = jnp.zeros((), z.dtype)
        inner = jnp.where(t.block.valid, (t.lse[k][:, None] - z) - h[:, None], zero)
        return _only(k, g[:, None] * p * inner), None, None


def _log_ratio_update(carry, t: Fwd):
    """Online ``sum_v e^(a_v - m_a) expm1(c_v - a_v)`` against the student's (head 0) shift."""
    step = t.steps[0]  # type: ignore[index]
    return step.rescale * carry + jnp.sum(weighted(step.e, jnp.expm1(t.block.gap)), axis=1)


def _log_ratio_finish(carry, f: Final) -> tuple[Array, Array]:
    """``(lse_c - lse_a, near)``: ``log E_p[e^(c - a)] = log1p(E_p[expm1(c - a)])`` on rows
    near identity, where that mean lies in ``[-1/2, 1]``.

    Accurate when ``c`` is close to ``a`` (exactly 0 when they are equal), unlike the
    difference of the two log-normalisers; that difference is taken instead on the other
    (``far``) rows: a logit of ``1e30`` makes ``expm1`` overflow (mean ``inf``) or round to
    ``-1`` (``log1p`` of it ``-inf``) although the ratio is finite. (The halves keep two
    normalisers of opposite sign near the largest float from overflowing.)
    """
    mean = carry / f.state[0].s
    if f.axis_name is not None:
        share = jnp.exp(f.lse_local[0] - f.lse[0])  # the student's mass on this shard
        empty = f.lse_local[0] == -jnp.inf
        mean = lax.psum(jnp.where(empty, jnp.zeros((), mean.dtype), share * mean), f.axis_name)
    near = (mean >= -0.5) & (mean <= 1)
    far = 2 * (f.lse[1] / 2 - f.lse[0] / 2)
    far = jnp.where(jnp.isnan(mean), mean, far)  # a NaN logit stays NaN
    centred = jnp.log1p(jnp.where(near, mean, jnp.zeros((), mean.dtype)))
    return jnp.where(near, centred, far), near


def _log_probs(blk: Block, lse) -> tuple[Array, Array]:
    """``(log P, log Q)`` of the two heads on a block (``-inf`` off the real columns)."""
    a, c = blk.z
    lp = jnp.where(blk.valid, a - lse[0][:, None], -jnp.inf)
    lq = jnp.where(blk.valid, c - lse[1][:, None], -jnp.inf)
    return lp, lq


def _undefined(f: Final, value: Array) -> Array:
    """NaN where a head has no probability at all (every logit ``-inf``)."""
    bad = (f.lse[0] == -jnp.inf) | (f.lse[1] == -jnp.inf)
    return jnp.where(bad, jnp.full((), jnp.nan, value.dtype), value)


def _far_update(far: Array, st_a: Step, st_c: Step, blk: Block) -> Array:
    """The running ``E_q[((c - m_c) - (a - m_a)) / 2]`` against both heads' running maxima.

    Each term is small where the teacher ``q`` has its mass, however large the logits; the
    halves, the per-block ``1 / C`` and keeping a mean (not a sum) keep every intermediate
    below the largest float where the result is.
    """
    zero = jnp.zeros((), far.dtype)
    s_new = st_c.new.s
    safe = jnp.where(s_new == 0, jnp.ones((), s_new.dtype), s_new)
    # the old mean, re-centred on the moved maxima and re-weighted
    moved = (st_c.shift / 2 - finite_or_zero(st_c.old.m) / 2) - (
        st_a.shift / 2 - finite_or_zero(st_a.old.m) / 2
    )
    keep = jnp.where(s_new == 0, zero, st_c.rescale * st_c.old.s / safe)
    old = weighted(keep, far - moved)
    a, c = blk.z
    half = (c / 2 - st_c.shift[:, None] / 2) - (a / 2 - st_a.shift[:, None] / 2)
    cols = a.shape[1]
    fresh = jnp.sum(weighted(st_c.e, half / cols), axis=1)
    return old + jnp.where(s_new == 0, zero, fresh * (cols / safe))


@dataclasses.dataclass(frozen=True)
class KLDivergence(Stat):
    """``KL(q || p)`` of the teacher ``q`` (head 1, logits ``c``) from the student ``p``.

    The student is head 0 (logits ``a``); one pass. Near identity
    ``KL = E_q[c - a] - log E_p[e^(c - a)]``, both terms accumulated termwise online (no
    difference of log-normalisers): exactly 0 for equal heads, clamped at 0 against rounding.
    Far from it (a logit of ``1e30`` in either head: the two terms are huge and cancel) from
    the sum of ``(c - m_c) - (a - m_a)`` against the running maxima, each term small where
    ``q`` has its mass. ``dKL / da_v = p_v - q_v``, ``dKL / dc_v = q_v (log q_v - log p_v -
    KL)``, with ``log q_v - log p_v = c_v - a_v - E_q[c - a]`` near identity.
    """

    uses_p: ClassVar[tuple[int, ...]] = (0, 1)

    def init(self, rows):
        return rows, rows, rows

    def update(self, carry, t):
        gap_sum, ratio_sum, far = carry
        st_a, st_c = t.steps  # type: ignore[misc]
        gap_sum = st_c.rescale * gap_sum + jnp.sum(weighted(st_c.e, t.block.gap), axis=1)
        return gap_sum, _log_ratio_update(ratio_sum, t), _far_update(far, st_a, st_c, t.block)

    def finish(self, carry, f):
        gap_sum, ratio_sum, far = carry
        gap = gap_sum / f.state[1].s  # the teacher's expectation over this shard's columns
        # E_q[(c - lse_c) - (a - lse_a)] over this shard's columns
        far = (2 * far - jnp.log(f.state[1].s)) + jnp.log(f.state[0].s)
        if f.axis_name is not None:
            far = far - (f.lse[1] - f.lse_local[1]) + (f.lse[0] - f.lse_local[0])
            share = jnp.exp(f.lse_local[1] - f.lse[1])
            empty = f.lse_local[1] == -jnp.inf  # an all-padding shard: gap is 0 / 0 there
            zero = jnp.zeros((), gap.dtype)
            gap = lax.psum(jnp.where(empty, zero, share * gap), f.axis_name)
            far = lax.psum(jnp.where(empty, zero, weighted(share, far)), f.axis_name)
        ratio, near = _log_ratio_finish(ratio_sum, f)
        near = near & jnp.isfinite(gap)
        kl = _undefined(f, jnp.maximum(jnp.where(near, gap - ratio, far), 0))
        return kl, (gap, near, kl)

    def grads(self, g, residual, t):
        gap, near, kl = residual
        p, q = t.p
        lp, lq = _log_probs(t.block, t.lse)
        centred = t.block.gap - gap[:, None]
        log_ratio = jnp.where(near[:, None], centred, (lq - lp) - kl[:, None])
        row = g[:, None]
        return (row * (p - q), row * weighted(q, log_ratio)), None, None


@dataclasses.dataclass(frozen=True)
class JSDivergence(Stat):
    """Generalised Jensen-Shannon ``beta KL(P || M) + (1 - beta) KL(Q || M)``.

    ``M = beta P + (1 - beta) Q`` of the student ``P`` (head 0) and the teacher ``Q`` (head
    1); ``beta`` is the traced parameter. The mixture needs the normalisers: a second pass.

    With ``d = log Q - log P = (c - a) - log E_p[e^(c - a)]`` (the first pass), the terms are
    ``log P - log M = -log1p((1 - beta) expm1(d))`` and ``log Q - log M = -log1p(beta
    expm1(-d))``: exactly 0 for equal heads, accurate near them (far from identity, where the
    two terms of ``d`` are huge and cancel, ``d = (c - lse_c) - (a - lse_a)``). With ``J_P``,
    ``J_Q`` the two
    halves, ``dJS / da_v = beta P_v (log P_v - log M_v) - P_v J_P`` (likewise for ``c``) and
    ``dJS / dbeta = KL(P || M) - KL(Q || M)``.
    """

    second_pass: ClassVar[bool] = True
    uses_p: ClassVar[tuple[int, ...]] = (0, 1)

    def init(self, rows):
        return rows, rows

    def update(self, carry, t):
        if t.first is None:  # the first pass: the normalisers' log-ratio
            return carry[0], _log_ratio_update(carry[1], t)
        jp, jq = carry
        _, _, _, _, tp, tq = _js_terms(t.block, t.lse, t.first, t.param)
        return jp + jnp.sum(tp, axis=1), jq + jnp.sum(tq, axis=1)

    def finish(self, carry, f):
        if f.first is None:
            return _log_ratio_finish(carry[1], f), None
        jp, jq = _psum(carry[0], f.axis_name), _psum(carry[1], f.axis_name)
        return _undefined(f, jnp.maximum(jp + jq, 0)), (f.first, jp, jq)

    def grads(self, g, residual, t):
        first, jp, jq = residual
        beta = t.param
        p, q, rp, rq, tp, tq = _js_terms(t.block, t.lse, first, beta)
        row = g[:, None]
        ga = row * (tp - p * jp[:, None])
        gc = row * (tq - q * jq[:, None])
        d_beta = jnp.sum(row * (weighted(p, rp) - weighted(q, rq)))
        return (ga, gc), d_beta, None


def _js_terms(blk: Block, lse, first, beta):
    """``(P, Q, log P - log M, log Q - log M, beta P (..), (1 - beta) Q (..))`` on a block.

    ``first``: the first pass's ``(lse_c - lse_a, near)``.
    """
    ratio, near = first
    lp, lq = _log_probs(blk, lse)
    p, q = jnp.exp(lp), jnp.exp(lq)
    # log Q - log P on the real columns: exactly 0 for equal heads near identity
    d = jnp.where(near[:, None], blk.gap - ratio[:, None], lq - lp)
    zero = jnp.zeros((), p.dtype)
    d = jnp.where(blk.valid, d, zero)
    # |d| is capped at 80 inside expm1: beyond, the term's weight (P or Q) is below e^-80
    rp = -jnp.log1p((1 - beta) * jnp.expm1(jnp.minimum(d, 80.0)))
    rq = -jnp.log1p(beta * jnp.expm1(jnp.minimum(-d, 80.0)))
    return p, q, rp, rq, weighted(beta * p, rp), weighted((1 - beta) * q, rq)


def _block_positions(ids: Array, t) -> tuple[Array, Array]:
    """``(position, hit)`` of global column ``ids (N, k)`` in the block ``t.block``: the
    position in the block (0 where not hit) and whether the id is a fresh real column of it.
    """
    blk = t.block
    width = blk.cols.shape[0]
    pos = (ids - t.offset - blk.start).astype(jnp.int32)
    inside = (pos >= 0) & (pos < width)
    pos = jnp.where(inside, pos, 0)
    return pos, inside & blk.valid[0][pos]


def _gather_block(z: Array, ids: Array, t) -> Array:
    """``z`` of the block at global ``ids (N, k)``, 0 where an id is not in the block."""
    pos, hit = _block_positions(ids, t)
    return jnp.where(hit, jnp.take_along_axis(z, pos, axis=1), jnp.zeros((), z.dtype))


def _scatter_block(g: Array, ids: Array, t) -> Array:
    """The ``(N, C)`` block gradient of gathering at global ``ids``: ``g (N, k)`` added at
    the ids in the block (repeated ids add up), nothing elsewhere.
    """
    pos, hit = _block_positions(ids, t)
    n, width = t.block.z[0].shape
    pos = jnp.where(hit, pos, width)  # out of bounds: dropped
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], pos.shape)
    return jnp.zeros((n, width), g.dtype).at[rows, pos].add(g, mode="drop")


@dataclasses.dataclass(frozen=True)
class GatheredLogits(Stat):
    """Head 0's logits ``z[i, ids[i, j]]`` at ``width`` global ids per token: ``(N, width)``.

    The ids are the traced parameter (``int32 (N, width)``; an id outside ``[0, V)`` gives 0).
    A block gathers the ids that fall in it; the gradient scatters the cotangent back into the
    block (one ``(N, width)`` scatter-add per block, never an ``(N, C, width)`` comparison).
    """

    width: int = 1

    def init(self, rows):
        return rows[:, None] * jnp.zeros((1, self.width), rows.dtype)

    def update(self, carry, t):
        return carry + _gather_block(t.block.z[0], t.param, t)

    def grads(self, g, residual, t):
        return (_scatter_block(g, t.param, t),), None, None


@dataclasses.dataclass(frozen=True)
class TopK(Stat):
    """Head 0's ``k`` largest real logits and their global ids, ``((N, k), (N, k) int32)``.

    Sorted in decreasing order; ties keep the smaller id. Each block merges its logits with
    the running ``k`` (``lax.top_k`` is stable and the running entries, from earlier blocks,
    have the smaller ids); under ``axis_name`` the shards' lists are all-gathered in shard
    order (``(N, shards * k)``) and merged once more. A row with fewer than ``k`` real
    columns in a shard pads its list with ``-inf`` at id ``-1``. A row whose log-normaliser is
    NaN (a NaN logit anywhere) gets NaN values. Only the values are differentiable: the
    gradient scatters their cotangent back to the ids.
    """

    k: int = 1

    def init(self, rows):
        values = rows[:, None] - jnp.full((1, self.k), jnp.inf, rows.dtype)
        return values, _vocab.varying_like(jnp.full(values.shape, -1, jnp.int32), rows)

    def update(self, carry, t):
        values, ids = carry
        blk = t.block
        z = jnp.where(blk.valid, blk.z[0], -jnp.inf)
        cols = jnp.where(blk.valid[0], (t.offset + blk.cols).astype(jnp.int32), -1)
        return _top_k(
            jnp.concatenate([values, z], axis=1),
            jnp.concatenate([ids, jnp.broadcast_to(cols, z.shape)], axis=1),
            self.k,
        )

    def finish(self, carry, f):
        values, ids = carry
        if f.axis_name is not None:
            values, ids = _top_k(
                _gather_shards(values, f.axis_name), _gather_shards(ids, f.axis_name), self.k
            )
        values = jnp.where(jnp.isnan(f.lse[0])[:, None], jnp.nan, values)
        return (values, ids), ids

    def cotangent(self, g):
        return g[0]

    def grads(self, g, ids, t):
        return (_scatter_block(g, ids, t),), None, None


def _gather_shards(x: Array, axis_name: str) -> Array:
    """``(N, k)`` per shard -> ``(N, shards * k)`` in shard order, the same on every shard.

    A ``psum`` of each shard's block placed in its slot (exact: the other slots add zeros)
    rather than ``all_gather``, whose result ``shard_map`` types as still device-varying.
    """
    count, index = lax.axis_size(axis_name), lax.axis_index(axis_name)
    slots = jnp.zeros((count, *x.shape), x.dtype)
    slots = lax.dynamic_update_index_in_dim(slots, x, index, 0)
    slots = lax.psum(slots, axis_name)
    return jnp.moveaxis(slots, 0, 1).reshape(x.shape[0], count * x.shape[1])


def _top_k(values: Array, ids: Array, k: int) -> tuple[Array, Array]:
    if _vocab.auto_partitioned():  # lax.top_k would all-gather the tokens
        _, top, top_ids = _reduce.top_k_positions(values, k, values, ids)
        return top, top_ids
    top, where = lax.top_k(values, k)  # lighter than a sort of three operands
    return top, jnp.take_along_axis(ids, where, axis=1)


def _only(head: int, dz: Array) -> tuple[Array | None, ...]:
    return tuple(dz if k == head else None for k in range(head + 1))


# ------------------------------------------------------------------------------ the engine


def _live_cotangent(stat: Stat, g) -> Array | None:
    """The cotangent a statistic's ``grads`` gets, or ``None`` when it takes no part."""
    if not stat.differentiable or g is None or type(g) is SymbolicZero:
        return None
    g = stat.cotangent(g)
    return None if g is None or type(g) is SymbolicZero else g


def _per_token(x: Array) -> Array:
    """An ``(N, ...)`` boolean reduced to ``(N,)`` with ``any``."""
    return x if x.ndim <= 1 else jnp.any(x, axis=tuple(range(1, x.ndim)))


def _inexact(param) -> bool:
    """A parameter that gets a cotangent (integer parameters, e.g. ids, get none)."""
    return param is not None and jnp.issubdtype(jnp.result_type(param), jnp.inexact)


def _scan(spec: Spec, heads, body, init, *, reverse: bool = False):
    steps = jnp.arange(_vocab.num_chunks(heads[0].w.shape[1], spec.chunk))
    carry, _ = lax.scan(lambda c, i: (body(c, i), None), init, steps, reverse=reverse)
    return carry


def _pass(spec: Spec, heads, u, y, offset, params, first, lse):
    """One scan: the online log-sum-exps (first pass, ``lse is None``) and the statistics'
    updates. Returns ``(states, carries)``.
    """
    acc = acc_dtype(heads)
    n = heads[0].x.shape[0]
    refs = jax.tree.leaves((heads, u, y, offset, params, lse, first))
    rows = _vocab.varying_like(jnp.zeros((n,), acc), *refs)
    todo = [
        k
        for k, s in enumerate(spec.stats)
        if lse is None or (s.second_pass and first[k] is not None)
    ]
    states = tuple(Online(rows - jnp.inf, rows) for _ in heads) if lse is None else ()
    carries = tuple(spec.stats[k].init(rows) for k in todo)

    def body(carry, i):
        states, carries = carry
        blk = block(spec, heads, u, i, offset)
        steps = None
        if lse is None:
            steps = tuple(online_step(s, z, blk.valid) for s, z in zip(states, blk.z, strict=True))
            states = tuple(s.new for s in steps)
        carries = tuple(
            spec.stats[k].update(c, Fwd(blk, steps, lse, y, offset, params[k], first[k]))
            for k, c in zip(todo, carries, strict=True)
        )
        return states, carries

    states, carries = _scan(spec, heads, body, (states, carries))
    return states, dict(zip(todo, carries, strict=True))


def _global_lse(lse: Array, axis_name: str | None) -> Array:
    if axis_name is None:
        return lse
    # The shift is a constant to any outer derivative (pmax has no derivative rule).
    peak = finite_or_zero(lax.pmax(lax.stop_gradient(lse), axis_name))
    return peak + jnp.log(lax.psum(jnp.exp(lse - peak), axis_name))


def forward(spec: Spec, heads, u, y, offset, params):
    """``(outputs, residuals)``: one output and one residual per statistic, plus the heads'
    global log-normalisers as the last residual.
    """
    nones = (None,) * len(spec.stats)
    states, carries = _pass(spec, heads, u, y, offset, params, nones, None)
    lse_local = tuple(s.lse() for s in states)
    lse = tuple(_global_lse(v, spec.axis_name) for v in lse_local)
    outputs, residuals = [], []
    for k, stat in enumerate(spec.stats):
        f = Final(states, lse_local, lse, spec.axis_name, params[k], None, offset)
        out, res = stat.finish(carries[k], f)
        outputs.append(out)
        residuals.append(res)
    if any(s.second_pass for s in spec.stats):
        first = tuple(
            o if s.second_pass else None for o, s in zip(outputs, spec.stats, strict=True)
        )
        _, carries = _pass(spec, heads, u, y, offset, params, first, lse)
        for k in carries:
            f = Final(states, lse_local, lse, spec.axis_name, params[k], first[k], offset)
            outputs[k], residuals[k] = spec.stats[k].finish(carries[k], f)
    return tuple(outputs), (tuple(residuals), lse)


def gradients(
    spec: Spec, heads, u, y, offset, params, residuals, lse, cotangents, *, localize=True
):
    """Cotangents ``(heads, u, params)`` for per-token ``cotangents`` of the statistics
    (``None`` or a ``SymbolicZero``: that statistic takes no part): one scan that recomputes
    each block's logits. ``localize=False`` leaves the cotangents as accumulated (``dx`` in
    the accumulation dtype, possibly device-varying over more mesh axes than the primals).
    """
    acc = acc_dtype(heads)
    zero = jnp.zeros((), acc)
    picked = [_live_cotangent(s, g) for s, g in zip(spec.stats, cotangents, strict=True)]
    live = [k for k, g in enumerate(picked) if g is not None]
    gs = {k: picked[k].astype(acc) for k in live}  # type: ignore[union-attr]
    uses_p = {h for k in live for h in spec.stats[k].uses_p}
    # Tokens with a zero cotangent take no part: selects, not products, keep a NaN in their
    # hidden state out of the gradient (0 * NaN is NaN).
    active = functools.reduce(
        jnp.logical_or, (_per_token(g != 0) for g in gs.values()), jnp.zeros((), bool)
    )
    active = jnp.broadcast_to(active, (heads[0].x.shape[0],))
    x_active = [jnp.where(active[:, None], h.x, jnp.zeros((), h.x.dtype)) for h in heads]
    operand = [jnp.result_type(h.x.dtype, h.w.dtype) for h in heads]
    per_row = [h.inv_t is not None and jnp.ndim(h.inv_t) == 1 for h in heads]
    want_inv = [spec.temperature_grad and h.inv_t is not None for h in heads]

    def block_sum(ct, ref):
        """A block of a per-column cotangent summed over the mesh axes its primal does not
        vary over (the token shards of a data axis, inside ``shard_map``), block by block:
        an all-reduce of each block, not a second dW-sized buffer for one at the end.
        """
        if not localize:
            return ct
        return _vocab.make_varying(_vocab.sum_over_extra_axes(ct, ref), _vocab.varying_axes(ref))

    def body(carry, i):
        dx, dw, db, du, d_inv, d_par = carry
        blk = block(spec, heads, u, i, offset)
        p = tuple(
            jnp.where(blk.valid, jnp.exp(z - v[:, None]), zero) if k in uses_p else None
            for k, (z, v) in enumerate(zip(blk.z, lse, strict=True))
        )
        t = Bwd(blk, p, lse, y, None, offset)
        dz: list[Any] = [None] * len(heads)
        d_par = list(d_par)
        for k in live:
            parts, dp, duc = spec.stats[k].grads(gs[k], residuals[k], t._replace(param=params[k]))
            for h, part in enumerate(parts):
                if part is not None:
                    dz[h] = part if dz[h] is None else dz[h] + part
            if dp is not None:
                d_par[k] = d_par[k] + dp
            if duc is not None and du is not None:
                duc = block_sum(duc, u).astype(du.dtype)
                du = lax.dynamic_update_slice_in_dim(du, duc, blk.start, 0)
        dx, dw, db, d_inv = (list[Any](v) for v in (dx, dw, db, d_inv))
        for h, head in enumerate(heads):
            if dz[h] is None:
                continue
            g = dz[h]
            if want_inv[h]:
                prod = g * blk.capped[h]
                d_inv[h] = d_inv[h] + (jnp.sum(prod, axis=1) if per_row[h] else jnp.sum(prod))
            if head.inv_t is not None:
                g = g * _per_row(head.inv_t).astype(acc)
            g = jnp.where(active[:, None], g * cap_slope(spec.softcap, blk.capped[h]), zero)
            gc = g.astype(operand[h])
            dx[h] = dx[h] + jnp.dot(gc, blk.w[h].T, preferred_element_type=acc)
            dwc = block_sum(jnp.dot(x_active[h].T, gc, preferred_element_type=acc), head.w)
            dw[h] = lax.dynamic_update_slice_in_dim(dw[h], dwc.astype(dw[h].dtype), blk.start, 1)
            if db[h] is not None:
                dbc = block_sum(jnp.sum(g, axis=0), head.b).astype(db[h].dtype)
                db[h] = lax.dynamic_update_slice_in_dim(db[h], dbc, blk.start, 0)
        return tuple(dx), tuple(dw), tuple(db), du, tuple(d_inv), tuple(d_par)

    def inv_zero(h, want):
        if not want:
            return None
        return jnp.zeros(h.inv_t.shape if jnp.ndim(h.inv_t) == 1 else (), acc)

    init = (
        tuple(jnp.zeros(h.x.shape, acc) for h in heads),
        tuple(jnp.zeros(h.w.shape, h.w.dtype) for h in heads),
        tuple(None if h.b is None else jnp.zeros(h.b.shape, h.b.dtype) for h in heads),
        None if u is None else jnp.zeros(u.shape, u.dtype),
        tuple(inv_zero(h, want) for h, want in zip(heads, want_inv, strict=True)),
        tuple(
            None if not _inexact(params[k]) else jnp.zeros(jnp.shape(params[k]), acc)
            for k in range(len(spec.stats))
        ),
    )
    refs = jax.tree.leaves((heads, u, y, offset, params, lse, gs, residuals))
    if localize:
        # The per-column cotangents are summed block by block (``block_sum``): they vary
        # over their primals' axes only.
        dx0, dw0, db0, du0, *rest = init
        dw0 = tuple(
            _vocab.varying_over(a, _vocab.varying_axes(h.w))
            for a, h in zip(dw0, heads, strict=True)
        )
        db0 = tuple(
            None if a is None else _vocab.varying_over(a, _vocab.varying_axes(h.b))
            for a, h in zip(db0, heads, strict=True)
        )
        du0 = None if du0 is None else _vocab.varying_over(du0, _vocab.varying_axes(u))
        rest = _vocab.varying_like(tuple(rest), *refs)
        init = (_vocab.varying_like(dx0, *refs), dw0, db0, du0, *rest)
    else:
        init = _vocab.varying_like(init, *refs)
    # Reverse order: the shifted last block writes zeros over the columns it shares with the
    # previous block, which then overwrites them with their true gradient.
    dx, dw, db, du, d_inv, d_par = _scan(spec, heads, body, init, reverse=True)

    # Inside shard_map a cotangent may vary over mesh axes its primal does not (dW sums over
    # token shards, a scalar over every shard): sum it there, as the transpose of pcast would.
    def local(ct, ref) -> Any:
        if ct is None or ref is None:
            return None
        if not localize:
            return ct
        return _vocab.sum_over_extra_axes(ct, ref).astype(jnp.result_type(ref))

    d_heads = tuple(
        Head(
            x=local(dx[h], head.x),
            w=local(dw[h], head.w),
            b=local(db[h], head.b),
            inv_t=local(d_inv[h], head.inv_t),
        )
        for h, head in enumerate(heads)
    )
    d_params = tuple(local(d, p) for d, p in zip(d_par, params, strict=True))
    return d_heads, local(du, u), d_params


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def stream(spec: Spec, heads: tuple[Head, ...], u, y, offset, params):
    """Per-token statistics ``spec.stats`` of ``heads`` (one output each), global over
    ``spec.axis_name``.

    ``u``: optional ``(V,)`` per-column weights (``ColumnSum``); ``y``: optional ``(N,)``
    local label column ids (``-1``: not in this shard); ``offset``: global id of local column
    0; ``params``: one traced parameter (or ``None``) per statistic.
    """
    return forward(spec, heads, u, y, offset, params)[0]


def _stream_fwd(spec, heads, u, y, offset, params):
    values = jax.custom_derivatives.custom_vjp_primal_tree_values
    heads, u, y, offset, params = values((heads, u, y, offset, params))
    outputs, (residuals, lse) = forward(spec, heads, u, y, offset, params)
    return outputs, (heads, u, y, offset, params, residuals, lse)


def _summed_share(g, axis_name):
    """A cotangent share summed over the axis (a tuple output part by part; integer parts,
    whose cotangents are ``float0``, and symbolic zeros as they are).
    """
    if g is None or type(g) is SymbolicZero:
        return g
    if isinstance(g, tuple):
        return tuple(_summed_share(part, axis_name) for part in g)
    if not jnp.issubdtype(g.dtype, jnp.inexact):
        return g
    return lax.psum(g, axis_name)


def _stream_bwd(spec, res, cotangents):
    heads, u, y, offset, params, residuals, lse = res
    if spec.shared_cotangents:
        # The outputs are combined over the axis; their cotangents arrive as per-device
        # shares (check_vma=False): the full cotangent is their sum, as psum's transpose.
        cotangents = tuple(_summed_share(g, spec.axis_name) for g in cotangents)
    d_heads, du, d_params = gradients(spec, heads, u, y, offset, params, residuals, lse, cotangents)
    return d_heads, du, None, None, d_params


stream.defvjp(_stream_fwd, _stream_bwd, symbolic_zeros=True)

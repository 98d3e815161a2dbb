r"""Row sums over softmax distributions with closed-form derivatives.

The materialised divergences, the entropy and the soft-target cross-entropy are sums over
the last axis of ``(..., C)`` arrays. Written as plain ``jnp`` with every numerical rule as an
extra select, their automatic derivatives keep full-size masks and intermediate arrays alive
between the forward and the backward pass. Here each is a ``jax.custom_jvp`` whose forward pass
is the row statistics (maximum, sum of exponentials, the sum itself) and whose tangent is the
closed form, e.g. :math:`\partial KL / \partial s = q - p`: ``value_and_grad`` then writes the
gradients and what XLA:CPU's reduction kernels need as inputs, nothing kept for the backward
pass. The function returns its row statistics with its value (each with its exact tangent), so
that the tangent rule reuses the forward pass's reductions. The rules hold in the value and in
derivatives of any order (the rules are plain ``jnp``, differentiable, and call the function
itself for its value):

* **exact zero at identity**: a divergence is a sum of differences of logits (``t - s``,
  exactly 0 where the two arrays agree) and of one per-row shift computed in a form that is
  exactly 0 for identical rows (:func:`_pair_stats`); no equality pass, no second form per row;
* **no overflow**: differences of logits enter halved (``t/2 - s/2``) and are doubled only
  after multiplying by a probability;
* ``0 * log 0 = 0``: a term whose probability (weight) is exactly 0 is 0 in the value and in
  every derivative (the double-``where``: its other factor is replaced before it is used);
* **NaN in, NaN out**: guards are written ``w == 0`` (False for NaN), and a NaN logit makes
  its row's normaliser NaN.

Masked classes must be ``-inf`` in every logits argument (and 0 in weights) before the call.
"""

from __future__ import annotations

from typing import TypeAlias

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

Array: TypeAlias = jax.Array


def _zero(x: Array) -> Array:
    return jnp.zeros((), x.dtype)


def row_sums(terms: tuple[Array, ...]) -> tuple[Array, ...]:
    """Sums over the last axis of same-shape arrays (one reduction each).

    Measured on XLA:CPU: one variadic reduction (producers fused in, no full-size write)
    runs 2-6x slower than separate sums, which go to a vectorised library kernel.
    """
    return tuple(jnp.sum(t, axis=-1) for t in terms)


def row_max(x: Array) -> Array:
    """The row maximum (0 where not finite) under ``stop_gradient``: ``x - m <= 0``."""
    m = jnp.max(x, axis=-1)
    return lax.stop_gradient(jnp.where(jnp.isfinite(m), m, _zero(m)))


def _value_of(value: Array, differentiable: Array) -> Array:
    """``value``, with the derivatives of ``differentiable`` (which it equals in exact math)."""
    return lax.stop_gradient(value) + (differentiable - lax.stop_gradient(differentiable))


def _tangent_sum(coef: Array, tangent) -> Array | None:
    """``sum_c coef_c * tangent_c``, or ``None`` for a symbolic zero tangent."""
    if isinstance(tangent, SymbolicZero):
        return None
    return jnp.sum(coef * tangent, axis=-1)


def _add(*parts: Array | None, like: Array) -> Array:
    total = jnp.zeros(like.shape, like.dtype)
    for part in parts:
        if part is not None:
            total = total + part
    return total


# Row statistics of a pair of logits arrays ``s``, ``t``: the functions below return them with
# their value (``(value, m_s, m_t, l_s, l_t, half_gap, near)``), each with its exact tangent, so
# that a tangent rule uses the very reduction of the forward pass (XLA does not merge two
# copies of a variadic reduction).
def _pair_stats(s: Array, t: Array, extra=None):
    r"""One read of ``s`` and ``t``: ``(m_s, m_t, l_s, l_t, half_gap, near, extra sums)``.

    ``l = log sum exp(x - m)``; ``half_gap`` is :math:`D/2`, :math:`D = \operatorname{lse}(t) -
    \operatorname{lse}(s)`, on rows near identity as :math:`\operatorname{log1p}(\sum_c q_c
    \operatorname{expm1}(t_c - s_c))` (exactly 0 where the rows agree, a relative
    :math:`\epsilon` of the gap); ``near`` is where that sum lies in ``[-1/2, 1]``.
    """
    m_s, m_t = row_max(s), row_max(t)
    e_s, e_t = jnp.exp(s - m_s[..., None]), jnp.exp(t - m_t[..., None])
    gap = jnp.where(e_s == 0, _zero(s), e_s * jnp.expm1(t - s))
    more = () if extra is None else extra(s, t, m_s, m_t, e_t)
    z_s, z_t, gap_sum, *sums = row_sums((e_s, e_t, gap) + more)
    l_s, l_t = jnp.log(z_s), jnp.log(z_t)
    total = gap_sum / z_s
    near = (total >= -0.5) & (total <= 1)
    centred = jnp.log1p(jnp.where(near, total, _zero(total))) / 2
    half_far = (m_t / 2 - m_s / 2) + (l_t - l_s) / 2  # m_t - m_s may overflow
    # the value is the centred form's where near; the derivative is the exact one, D's
    half_gap = _value_of(jnp.where(near, centred, half_far), half_far)
    return m_s, m_t, l_s, l_t, half_gap, lax.stop_gradient(near), z_t, sums


def _stats_tangents(s, t, m_s, m_t, l_s, l_t, ds, dt):
    """``(q, p, dl_s, dl_t, dhalf_gap)``: the derivative of ``l`` is the softmax."""
    q = jnp.exp((s - m_s[..., None]) - l_s[..., None])
    p = jnp.exp((t - m_t[..., None]) - l_t[..., None])
    dl_s, dl_t = _tangent_sum(q, ds), _tangent_sum(p, dt)
    like = l_s
    dgap = (_add(dl_t, like=like) - _add(dl_s, like=like)) / 2
    return q, p, dl_s, dl_t, dgap


def half_log_ratio(s, t, m_s, m_t, l_s, l_t, half_gap, near) -> Array:
    r"""``(log softmax(t) - log softmax(s)) / 2`` termwise (NaN where both are ``-inf``).

    Near rows: :math:`(t_c - s_c)/2 - D/2` (0 where the rows agree); others: the difference of
    the two halved log-probabilities, each from its own array (no cancellation of two large
    normalisers, no overflow).
    """
    centred = (t / 2 - s / 2) - half_gap[..., None]
    far = (t / 2 - m_t[..., None] / 2) - (s / 2 - m_s[..., None] / 2)
    far = far - ((l_t - l_s) / 2)[..., None]
    return jnp.where(near[..., None], centred, far)


# ----------------------------------------------------------------------------- KL
def _kl_extra(s, t, m_s, m_t, e_t):
    """The KL's sums, in the pass of the normalisers: weights ``e^{t - m_t}``, both forms."""
    live = e_t != 0
    diff = jnp.where(live, t - s, _zero(t))
    halves = (t / 2 - m_t[..., None] / 2) - (s / 2 - m_s[..., None] / 2)
    halves = jnp.where(live, halves / t.shape[-1], _zero(t))  # / C: the sum cannot overflow
    return (e_t * diff, e_t * halves)


@jax.custom_jvp
def _softmax_kl_rows(s: Array, t: Array):
    m_s, m_t, l_s, l_t, half_gap, near, z_t, (centred_sum, halves_sum) = _pair_stats(
        s, t, _kl_extra
    )
    near = near & jnp.isfinite(centred_sum)
    centred = centred_sum / z_t - 2 * half_gap
    far = (halves_sum / z_t) * (2 * s.shape[-1]) - (l_t - l_s)
    kl = jnp.where(near, centred, far)
    kl = jnp.where(kl < 0, _zero(kl), kl)
    return kl, m_s, m_t, l_s, l_t, half_gap, near.astype(s.dtype)


def _softmax_kl_rows_jvp(primals, tangents):
    s, t = primals
    ds, dt = tangents
    out = _softmax_kl_rows(s, t)
    kl, m_s, m_t, l_s, l_t, half_gap, near = out
    q, p, dl_s, dl_t, dgap = _stats_tangents(s, t, m_s, m_t, l_s, l_t, ds, dt)
    dkl_s = _tangent_sum(q - p, ds)
    dkl_t = None
    if not isinstance(dt, SymbolicZero):
        dead = p == 0
        half = half_log_ratio(s, t, m_s, m_t, l_s, l_t, half_gap, near != 0)
        half = jnp.where(dead, _zero(p), half)
        slope = jnp.where(dead, _zero(p), 2 * (p * (half - kl[..., None] / 2)))
        dkl_t = jnp.sum(slope * dt, axis=-1)
    zero = jnp.zeros_like(kl)
    dkl = _add(dkl_s, dkl_t, like=kl)
    return out, (dkl, zero, zero, _add(dl_s, like=kl), _add(dl_t, like=kl), dgap, zero)


_softmax_kl_rows.defjvp(_softmax_kl_rows_jvp, symbolic_zeros=True)


def softmax_kl(s: Array, t: Array) -> Array:
    r"""``KL(softmax(t) || softmax(s))`` over the last axis, ``>= 0``, exactly 0 for ``s == t``.

    :math:`\sum_c p_c (\log p_c - \log q_c)`: on rows near identity :math:`E_p[t - s] - D`
    (both parts small, and 0 for identical rows), elsewhere termwise from halved
    log-probabilities; one read of both arrays after their maxima. Derivatives:
    :math:`\partial/\partial s = q - p`, :math:`\partial/\partial t = p\,(\log p - \log q -
    KL)`.
    """
    return _softmax_kl_rows(s, t)[0]


# ----------------------------------------------------------------------------- JS
def _log1p_mix(w: Array, d: Array) -> Array:
    r""":math:`\log(1 - w + w e^{d})` for ``w`` in ``[0, 1]``: exactly 0 at ``d = 0`` or ``w = 0``.

    :math:`\operatorname{log1p}(w \operatorname{expm1}(d))`, relative precision for small
    ``d``; ``d`` is capped at 80 (beyond, the term it enters has a weight below
    :math:`e^{-80}`), so ``expm1`` cannot overflow.
    """
    return jnp.log1p(w * jnp.expm1(jnp.minimum(d, 80.0)))


def _js_terms(a, b, beta, m_a, m_b, l_a, l_b, half_gap, near):
    """``(p, q, w_p, w_q, g_p, g_q, d)``: ``g_p = log(m/p)``, ``g_q = log(m/q)``, 0 at w = 0."""
    p = jnp.exp((a - m_a[..., None]) - l_a[..., None])
    q = jnp.exp((b - m_b[..., None]) - l_b[..., None])
    beta = beta[..., None]
    w_p, w_q = beta * p, (1 - beta) * q
    # log q - log p; it overflows only where p or q is 0
    d = 2 * half_log_ratio(a, b, m_a, m_b, l_a, l_b, half_gap, near)
    g_p = _log1p_mix(1 - beta, jnp.where(w_p == 0, _zero(d), d))
    g_q = _log1p_mix(beta, jnp.where(w_q == 0, _zero(d), -d))
    g_p = jnp.where(w_p == 0, _zero(g_p), g_p)
    g_q = jnp.where(w_q == 0, _zero(g_q), g_q)
    return p, q, w_p, w_q, g_p, g_q, d


@jax.custom_jvp
def _js_rows(a: Array, b: Array, beta: Array):
    m_a, m_b, l_a, l_b, half_gap, near, _, _ = _pair_stats(a, b)
    _, _, w_p, w_q, g_p, g_q, _ = _js_terms(a, b, beta, m_a, m_b, l_a, l_b, half_gap, near)
    k_p, k_q = row_sums((w_p * g_p, w_q * g_q))
    k_p = jnp.where(k_p > 0, _zero(k_p), -k_p)  # beta KL(P || M) >= 0 (NaN stays)
    k_q = jnp.where(k_q > 0, _zero(k_q), -k_q)
    return k_p + k_q, k_p, k_q, m_a, m_b, l_a, l_b, half_gap, near.astype(a.dtype)


def _js_rows_jvp(primals, tangents):
    a, b, beta = primals
    da, db, dbeta = tangents
    out = _js_rows(a, b, beta)
    _, k_p, k_q, m_a, m_b, l_a, l_b, half_gap, near = out
    terms = _js_terms(a, b, beta, m_a, m_b, l_a, l_b, half_gap, near != 0)
    p, q, w_p, w_q, g_p, g_q, d = terms
    _, _, dl_a, dl_b, dgap = _stats_tangents(a, b, m_a, m_b, l_a, l_b, da, db)
    djs_a = _tangent_sum(-(p * k_p[..., None] + w_p * g_p), da)
    djs_b = _tangent_sum(-(q * k_q[..., None] + w_q * g_q), db)
    # The parts' own tangents, for a rule above this one (second order):
    # d k_p = dbeta KL(P||M) + (the JS's a-part) - sum (w_p / m) dm, alike for k_q.
    zero = _zero(p)
    mix = w_p + w_q  # m
    safe = jnp.where(mix == 0, jnp.ones((), p.dtype), mix)
    share_p = jnp.where(mix == 0, zero, w_p / safe)
    share_q = jnp.where(mix == 0, zero, w_q / safe)
    dm = jnp.zeros_like(p)
    if not isinstance(da, SymbolicZero):
        dm = dm + w_p * (da - jnp.sum(p * da, axis=-1, keepdims=True))
    if not isinstance(db, SymbolicZero):
        dm = dm + w_q * (db - jnp.sum(q * db, axis=-1, keepdims=True))
    djs_beta = dk_p_beta = dk_q_beta = None
    if not isinstance(dbeta, SymbolicZero):
        dm = dm + (p - q) * dbeta[..., None]
        # d JS / d beta = KL(P || M) - KL(Q || M), from the unweighted logs
        beta_e = beta[..., None]
        lp = jnp.where(p == 0, zero, _log1p_mix(1 - beta_e, jnp.where(p == 0, zero, d)))
        lq = jnp.where(q == 0, zero, _log1p_mix(beta_e, jnp.where(q == 0, zero, -d)))
        dk_p_beta = -jnp.sum(p * lp, axis=-1) * dbeta
        dk_q_beta = jnp.sum(q * lq, axis=-1) * dbeta
        djs_beta = dk_p_beta + dk_q_beta
    dk_p = _add(djs_a, dk_p_beta, like=k_p) - jnp.sum(share_p * dm, axis=-1)
    dk_q = _add(djs_b, dk_q_beta, like=k_q) - jnp.sum(share_q * dm, axis=-1)
    js = out[0]
    zero_rows = jnp.zeros_like(js)
    return out, (
        _add(djs_a, djs_b, djs_beta, like=js),
        dk_p,
        dk_q,
        zero_rows,
        zero_rows,
        _add(dl_a, like=js),
        _add(dl_b, like=js),
        dgap,
        zero_rows,
    )


_js_rows.defjvp(_js_rows_jvp, symbolic_zeros=True)


def js_divergence(a: Array, b: Array, beta: Array) -> Array:
    r""":math:`\beta KL(P \| M) + (1 - \beta) KL(Q \| M)`, ``P = softmax(a)``, ``Q = softmax(b)``.

    Termwise :math:`-\beta p_c \log(m_c/p_c) - (1 - \beta) q_c \log(m_c/q_c)` with
    :math:`\log(m/p) = \operatorname{log1p}((1 - \beta)\operatorname{expm1}(d))`,
    :math:`\log(m/q) = \operatorname{log1p}(\beta \operatorname{expm1}(-d))`, :math:`d =
    \log q - \log p` (:func:`half_log_ratio`, 0 for identical rows). Derivatives:
    :math:`\partial/\partial a = p\,(\beta\rho - K_p)`, :math:`\rho = \log(p/m)`,
    :math:`K_p = \beta KL(P\|M)` (alike for ``b``); :math:`\partial/\partial\beta =
    KL(P\|M) - KL(Q\|M)`. ``beta`` has the rows' shape.
    """
    return _js_rows(a, b, beta)[0]


# ----------------------------------------------------------------------------- entropy
@jax.custom_jvp
def _entropy_rows(x: Array):
    m = row_max(x)
    shifted = x - m[..., None]
    e = jnp.exp(shifted)
    z, weighted = row_sums((e, jnp.where(e == 0, _zero(e), e * shifted)))
    log_z = jnp.log(z)
    h = log_z - weighted / z
    return jnp.where(h < 0, _zero(h), h), m, log_z


def _entropy_rows_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    out = _entropy_rows(x)
    h, m, log_z = out
    log_p = (x - m[..., None]) - log_z[..., None]
    p = jnp.exp(log_p)
    dead = p == 0  # log p may be -inf there: replaced before it is used
    log_p = jnp.where(dead, _zero(p), log_p)
    slope = jnp.where(dead, _zero(p), p * (log_p + h[..., None]))
    zero = jnp.zeros_like(h)
    return out, (-jnp.sum(slope * dx, axis=-1), zero, jnp.sum(p * dx, axis=-1))


_entropy_rows.defjvp(_entropy_rows_jvp)


def entropy(x: Array) -> Array:
    r""":math:`-\sum_c p_c \log p_c`, ``p = softmax(x)``; derivative :math:`-p(\log p + H)`.

    As :math:`\log z - \sum_c e_c (x_c - m) / z` (:math:`e = e^{x - m}`, :math:`z = \sum e`),
    one read after the maximum; 0 where it rounds below 0.
    """
    return _entropy_rows(x)[0]


# ----------------------------------------------------------------------------- soft CE
@jax.custom_jvp
def _cross_entropy_rows(coef: Array, x: Array):
    m = row_max(x)
    e = jnp.exp(x - m[..., None])
    dead = (coef == 0) & (x == -jnp.inf)
    gap = jnp.where(dead, _zero(x), m[..., None] / 2 - x / 2)
    z, total, gap_sum = row_sums((e, coef, coef * gap))
    log_z = jnp.log(z)
    return total * log_z + 2 * gap_sum, m, log_z, total


def _cross_entropy_rows_jvp(primals, tangents):
    coef, x = primals
    dcoef, dx = tangents
    out = _cross_entropy_rows(coef, x)
    loss, m, log_z, total = out
    p = jnp.exp((x - m[..., None]) - log_z[..., None])
    d_x = _tangent_sum(p * total[..., None] - coef, dx)
    d_coef = None
    if not isinstance(dcoef, SymbolicZero):
        dead = (coef == 0) & (x == -jnp.inf)
        gap = jnp.where(dead, _zero(x), m[..., None] / 2 - x / 2)
        slope = jnp.where(dead, _zero(x), log_z[..., None] + 2 * gap)
        d_coef = jnp.sum(slope * dcoef, axis=-1)
    zero = jnp.zeros_like(loss)
    d_log_z = _add(_tangent_sum(p, dx), like=loss)
    d_total = _add(None if isinstance(dcoef, SymbolicZero) else jnp.sum(dcoef, -1), like=loss)
    return out, (_add(d_x, d_coef, like=loss), zero, d_log_z, d_total)


_cross_entropy_rows.defjvp(_cross_entropy_rows_jvp, symbolic_zeros=True)


def cross_entropy(coef: Array, x: Array) -> Array:
    r""":math:`\sum_c w_c (-\log \operatorname{softmax}(x)_c)` over the last axis, no overflow.

    Each term is :math:`w_c \log z + 2 w_c (m/2 - x_c/2)`, one read after the maximum; a zero
    weight on a ``-inf`` logit is exactly 0 in the value and every derivative. Derivatives:
    :math:`\partial/\partial x = p \sum_c w_c - w`, :math:`\partial/\partial w_c = -\log p_c`
    (0 at ``w_c = 0``, ``x_c = -inf``).
    """
    return _cross_entropy_rows(coef, x)[0]

r"""The numerically delicate pieces, each written once.

Every function here keeps three promises in the value and in forward- and reverse-mode
derivatives of any order:

* ``0 * log 0 = 0`` and ``0 * inf = 0`` where a weight is exactly zero (the double-``where``
  trick: the discarded branch is fed a harmless value, so its derivative is never NaN);
* NaN in gives NaN out: masks are written as ``w == 0`` rather than ``w > 0``, which would be
  False for NaN and silently drop it;
* nothing overflows where the exact result is representable: differences of logits near the
  dtype's limit are halved before they are subtracted.
"""

from __future__ import annotations

from typing import TypeAlias

import jax
import jax.numpy as jnp

Array: TypeAlias = jax.Array


def _zero(x: Array) -> Array:
    return jnp.zeros((), x.dtype)


def safe_log(w: Array) -> Array:
    """``log w``: ``-inf`` at 0 with a zero derivative there; NaN for NaN or negative ``w``."""
    at_zero = w == 0
    return jnp.where(at_zero, -jnp.inf, jnp.log(jnp.where(at_zero, jnp.ones((), w.dtype), w)))


def log_add_exp(a: Array, b: Array) -> Array:
    """``log(exp(a) + exp(b))``, ``-inf`` (with zero derivatives) where both sides are ``-inf``."""
    empty = (a == -jnp.inf) & (b == -jnp.inf)
    out = jnp.logaddexp(jnp.where(empty, _zero(a), a), jnp.where(empty, _zero(b), b))
    return jnp.where(empty, jnp.full((), -jnp.inf, out.dtype), out)


def focal_power(log_base: Array, gamma: Array) -> Array:
    r"""``base ** gamma`` from ``log base`` (``base`` in ``[0, 1]``), as :math:`e^{\gamma \log b}`.

    At ``base = 0`` (``log_base = -inf``) it is 0, or 1 when ``gamma = 0``, with a zero
    derivative. Accurate for bases near 0 and 1 when ``log_base`` is.
    """
    live = log_base != -jnp.inf
    power = jnp.exp(gamma * jnp.where(live, log_base, _zero(log_base)))
    at_zero = jnp.where(gamma == 0, 1.0, 0.0).astype(power.dtype)
    return jnp.where(live, power, at_zero)


def log_one_minus_exp(log_p: Array) -> Array:
    """``log(1 - p)`` from ``log p`` (``p`` in ``[0, 1]``): ``-inf`` with a zero derivative at 1."""
    return safe_log(-jnp.expm1(log_p))


def weighted_log_ratio(w: Array, log_a: Array, log_b: Array, support: Array) -> Array:
    r"""``sum_c w_c (log_a_c - log_b_c)`` over the last axis, on ``support`` only.

    Entries off the support (``w == 0``, masked classes) contribute exactly 0 to the value and
    every derivative, even next to an infinite log.
    """
    zero = _zero(w)
    diff = jnp.where(support, log_a, zero) - jnp.where(support, log_b, zero)
    return jnp.sum(jnp.where(support, w * diff, zero), axis=-1)


def support(w: Array, class_mask: Array | None = None) -> Array:
    """Where a weight takes part in a sum: ``w != 0`` (NaN does) and the class is not masked."""
    live = w != 0
    return live if class_mask is None else live & class_mask


def weighted_softplus(weight: Array, z: Array) -> Array:
    """``weight * softplus(z)`` with ``0 * inf = 0`` (no NaN in the value or the gradient)."""
    sp = jax.nn.softplus(z)
    dead = (weight == 0) & jnp.isinf(sp)
    return weight * jnp.where(dead, _zero(sp), sp)


def neg_log_softmax_at(coef: Array, x: Array, m: Array, log_s: Array) -> Array:
    r"""``coef * (-log p)`` for a logit ``x`` with ``logsumexp = m + log_s``, elementwise.

    :math:`-\log p = \log s + (m - x)`, and :math:`m - x \ge 0` can overflow for logits of
    opposite signs near the dtype's limit, so it enters as :math:`2 \cdot c\,(m/2 - x/2)`.
    A zero ``coef`` gives exactly 0, also at ``x = -inf`` (where only then the gap is
    replaced, so the derivative with respect to a zero ``coef`` is still ``-log p``).
    """
    gap = jnp.where((coef == 0) & (x == -jnp.inf), _zero(x), m / 2 - x / 2)
    return coef * log_s + 2 * (coef * gap)


def neg_log_softmax_sum(
    coef: Array, x: Array, m: Array, log_s: Array, class_mask: Array | None = None
) -> Array:
    r"""``sum_c coef_c (-log p_c)`` over the last axis of ``(..., C)`` arrays, without overflow.

    As :func:`neg_log_softmax_at` per class: a zero ``coef`` on a ``-inf`` logit, and a masked
    class, contribute exactly 0 to the value and every derivative; a zero ``coef`` on a finite
    logit keeps its derivative ``-log p_c`` (the gradient with respect to soft targets).
    """
    live = ~((coef == 0) & (x == -jnp.inf))
    if class_mask is not None:
        live = live & class_mask
    zero = _zero(x)
    gap = jnp.where(live, m[..., None] / 2 - x / 2, zero)
    coef = jnp.where(live, coef, zero)
    return jnp.sum(coef, axis=-1) * log_s + 2 * jnp.sum(coef * gap, axis=-1)


def times_log(weights: Array, log_values: Array) -> Array:
    """``weights * log_values`` with ``0 * (-inf) = 0``, NaN-free gradients there.

    Only the ``0 * -inf`` case is replaced (before multiplying, so no NaN reaches either
    gradient); a NaN in either argument stays NaN.
    """
    dead = (weights == 0) & jnp.isneginf(log_values)
    return weights * jnp.where(dead, jnp.zeros((), log_values.dtype), log_values)


def value_only(value: Array, replacement: Array, replace: Array) -> Array:
    """``replacement`` where ``replace`` holds, in the value only: every derivative is ``value``'s.

    For results whose exact value is known better than the computed one (a divergence of two
    identical distributions is 0; rounding must not make a divergence negative): the
    derivatives of any order stay those of the formula, so a clamp never kills a gradient.
    """
    shift = jnp.where(replace, replacement - value, _zero(value))
    return value + jax.lax.stop_gradient(shift)


def divergence_floor(value: Array, same: Array | None = None) -> Array:
    """A divergence of two normalised distributions: never negative, 0 where ``same``.

    A negative value is rounding (the exact divergence is ``>= 0``) and becomes 0; rows whose
    two arguments are the same array are exactly 0. Values only (:func:`value_only`); NaN
    stays NaN.
    """
    replace = value < 0
    if same is not None:
        replace = replace | same
    return value_only(value, _zero(value), replace)


def rounding_bound(w: Array, log_a: Array, log_b: Array, support: Array, eps: float) -> Array:
    r"""A bound on the rounding error of ``sum_c w_c (log_a_c - log_b_c)`` (no derivative).

    :math:`2\,\epsilon \sum_c |w_c| (1 + |\log a_c| + |\log b_c|)` on the support, with
    :math:`\epsilon` the compute dtype's: the error of each term, logs that are themselves
    rounded results included (``log(softmax(x))`` and ``log_softmax(x)`` differ by a few
    units in the last place).
    """
    w, log_a, log_b = (jax.lax.stop_gradient(v) for v in (w, log_a, log_b))
    zero = _zero(w)
    size = jnp.abs(jnp.where(support, log_a, zero)) + jnp.abs(jnp.where(support, log_b, zero))
    terms = jnp.where(support, jnp.abs(w) * (1 + size), zero)
    return 2 * eps * jnp.sum(terms, axis=-1)


def zero_within(value: Array, bound: Array) -> Array:
    """``value`` with ``|value| <= bound`` (finite values only) replaced by 0, in value only."""
    replace = (jnp.abs(value) <= bound) & jnp.isfinite(value)
    return value_only(value, _zero(value), replace)


def log_sum_exp(x: Array, live: Array) -> Array:
    """``log sum_c exp(x_c)`` over the last axis on ``live`` entries only, to any order.

    ``-inf`` (with zero derivatives) for a row without a live entry; entries off ``live``
    (``-inf`` padding, say) contribute exactly 0 to the value and every derivative. The shift
    is the live maximum under ``stop_gradient`` (0 where it is not finite); a NaN stays NaN.
    """
    m = jnp.max(jnp.where(live, x, -jnp.inf), axis=-1)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, _zero(m)))
    shifted = jnp.where(live, x, m[..., None]) - m[..., None]
    e = jnp.where(live, jnp.exp(shifted), _zero(x))
    return m + safe_log(jnp.sum(e, axis=-1))


def softmax_entropy(x: Array, lse: Array, live: Array) -> Array:
    r"""``-sum_c p_c log p_c`` of ``p = exp(x - lse)`` on ``live`` entries, termwise.

    :math:`\sum_c p_c (\mathrm{lse} - x_c)`, a sum of non-negative terms; a ``-inf`` entry
    (probability 0) contributes exactly 0 to the value and every derivative.
    """
    on = live & (x != -jnp.inf)
    gap = jnp.where(on, lse[..., None] - jnp.where(on, x, _zero(x)), _zero(x))
    p = jnp.where(on, jnp.exp(-gap), _zero(x))
    return jnp.sum(p * gap, axis=-1)


def truncated_log_prob(values: Array, ids: Array, label_logit: Array, labels: Array):
    """``(log p_y, H)`` of the distribution renormalised over the ``(..., k)`` top ``values``
    at ``ids`` (a top-k sampler's): ``-inf`` with a zero derivative for a label not among the
    ids, NaN where a value is NaN; ``-inf`` values (fewer real classes) have probability 0.
    """
    live = values != -jnp.inf
    lse = log_sum_exp(values, live)
    inside = jnp.any(ids == labels[..., None], axis=-1)
    log_p = jnp.where(inside, label_logit - jnp.where(inside, lse, _zero(lse)), -jnp.inf)
    # NaN from the values themselves: XLA:CPU was seen to fold ``isnan(lse)`` to False here
    # (a row of NaN values gave -inf for a label outside the ids)
    log_p = jnp.where(jnp.any(jnp.isnan(values), axis=-1), jnp.nan, log_p)
    return log_p, softmax_entropy(values, lse, live)

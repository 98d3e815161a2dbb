r"""optax's remaining names of the softmax and divergence families, with optax's signatures.

``safe_softmax_cross_entropy``, ``generalized_kl_divergence`` and its deprecated alias
``convex_kl_divergence``: here so that ``optax.losses`` -> ``jaxce`` is a drop-in for the whole
cross-entropy family. Each follows jaxce's numerics (``0 log 0 = 0``, NaN never swallowed).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _checks, _reduce

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _broadcast_pair(a: Array, b: Array, names: tuple[str, str]) -> tuple[Array, Array]:
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"`{names[0]}` {a.shape} and `{names[1]}` {b.shape} do not broadcast together."
        ) from None
    return jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)


def _times_log(weights: Array, log_values: Array) -> Array:
    """``weights * log_values`` with ``0 * (-inf) = 0``, NaN-free gradients there.

    Only the ``0 * -inf`` case is replaced (before multiplying, so no NaN reaches either
    gradient); a NaN in either argument stays NaN.
    """
    dead = (weights == 0) & jnp.isneginf(log_values)
    return weights * jnp.where(dead, jnp.zeros((), log_values.dtype), log_values)


def safe_softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
    r"""Softmax cross-entropy that treats ``0 * log 0`` as ``0`` (optax's name, optax's signature).

    .. math::
      \ell = -\sum_c y_c \log \operatorname{softmax}(x)_c,
      \qquad 0 \cdot \log 0 = 0

    so a class with logit :math:`-\infty` and label :math:`0` contributes :math:`0` to the loss
    and to the gradients (never NaN). Every jaxce cross-entropy already does this; the name
    exists so that optax code ports unchanged. A row of logits that are all :math:`-\infty` is
    NaN (no class has probability), and a positive label on a :math:`-\infty` logit gives
    :math:`+\infty`, as the mathematics says. The gradient with respect to a zero label on a
    :math:`-\infty` logit is 0 here, as in jaxce's other cross-entropies (optax gives
    :math:`+\infty`); every other gradient is optax's.

    Args:
      logits: unnormalised log-probabilities ``(..., C)``, floating.
      labels: probabilities broadcastable to ``logits``.

    Returns:
      The per-example loss, shape ``(...)`` (the broadcast shape without the class axis);
      float32 for half-precision inputs, else the inputs' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[10.0, 1.0, -2.0], [-jnp.inf, 0.0, 0.0]])
      >>> jaxce.safe_softmax_cross_entropy(logits, jnp.array([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]))
      Array([9.0001, 0.6931], dtype=float32)

    References:
      optax, ``optax.losses.safe_softmax_cross_entropy``.
    """
    logits = _checks.as_floating(logits, "logits")
    labels = _checks.as_floating(labels, "labels")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"`logits` needs a non-empty class axis (last), got {logits.shape}.")
    dtype = _reduce.compute_dtype(logits.dtype, labels.dtype)
    logits, labels = _broadcast_pair(
        logits.astype(dtype), labels.astype(dtype), ("logits", "labels")
    )
    return -jnp.sum(_times_log(labels, jax.nn.log_softmax(logits, axis=-1)), axis=-1)


def generalized_kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Generalised Kullback-Leibler divergence of unnormalised measures (optax's signature).

    The Bregman divergence of :math:`f(p) = p \log p - p`, so it is defined for positive
    measures that need not sum to 1; for probability vectors it is :math:`KL(p \| q)`:

    .. math::
      D(p \| q) = \sum_c \Big(p_c \log \frac{p_c}{q_c} - p_c + q_c\Big),
      \qquad q = \exp(\text{log\_predictions}),\ 0 \log 0 = 0

    Args:
      log_predictions: :math:`\log q`, floating, any shape.
      targets: :math:`p \ge 0`, broadcastable with ``log_predictions``.
      axis: the axis or axes summed over (``None``: all), as in optax.
      where: optional boolean mask broadcastable to the inputs: only its ``True`` elements are
        summed (optax's ``jnp.sum(where=)``).

    Returns:
      The divergence with ``axis`` reduced away; float32 for half-precision inputs, else the
      inputs' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> p = jnp.array([0.2, 0.3, 0.5])
      >>> round(float(jaxce.generalized_kl_divergence(jnp.log(jnp.array([0.4, 0.4, 0.4])), p)), 4)
      0.0866

    References:
      L. M. Bregman, "The relaxation method of finding the common point of convex sets and
      its application to the solution of problems in convex programming", 1967. S. Boyd and
      L. Vandenberghe, *Convex Optimization*, 2004, p. 90.
    """
    log_predictions = _checks.as_floating(log_predictions, "log_predictions")
    targets = _checks.as_floating(targets, "targets")
    dtype = _reduce.compute_dtype(log_predictions.dtype, targets.dtype)
    log_q, p = _broadcast_pair(
        log_predictions.astype(dtype), targets.astype(dtype), ("log_predictions", "targets")
    )
    log_p = jnp.log(jnp.where(p == 0, jnp.ones((), dtype), p))  # 0 log 0 = 0, safe gradient
    pointwise = _times_log(p, log_p) - _times_log(p, log_q) - p + jnp.exp(log_q)
    if where is not None:
        where = _checks.as_mask(where, "where")
        where = _checks.broadcastable(where, "where", pointwise.shape, "a mask of the inputs")
        pointwise = jnp.where(where, pointwise, jnp.zeros((), dtype))
    return jnp.sum(pointwise, axis=None if axis is None else _axes(axis, pointwise.ndim))


def _axes(axis, ndim: int) -> tuple[int, ...]:
    return _checks.class_axes(axis, ndim, "log_predictions")


def convex_kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Deprecated alias of :func:`generalized_kl_divergence`, warning as optax does.

    .. math::
      D(p \| q) = \sum_c \Big(p_c \log \frac{p_c}{q_c} - p_c + q_c\Big)

    Args:
      log_predictions: :math:`\log q`.
      targets: :math:`p`.
      axis: the axis or axes summed over.
      where: optional boolean mask of the elements summed.

    Returns:
      :func:`generalized_kl_divergence`'s result; a ``DeprecationWarning`` is emitted.

    Examples:
      >>> import warnings, jax.numpy as jnp
      >>> import jaxce
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     _ = jaxce.convex_kl_divergence(jnp.zeros(3), jnp.ones(3))
      >>> caught[0].category.__name__
      'DeprecationWarning'
    """
    warnings.warn(
        "`convex_kl_divergence` is deprecated (as in optax); use generalized_kl_divergence "
        "instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    return generalized_kl_divergence(log_predictions, targets, axis=axis, where=where)

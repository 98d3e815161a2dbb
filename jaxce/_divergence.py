r"""Information-theoretic losses: entropies, KL divergences (plain, log-target, distillation), JSD.

Every function here is its formula plus calls into the shared modules: the class axis,
``where``, ``sample_weights``, reductions and the dtype policy work as in the softmax family.
Sums of the form :math:`\sum_c p_c (\log p_c - \log q_c)` go through
``_numerics.weighted_log_ratio``, which makes ``0 \log 0 = 0`` hold in the value and in every
gradient while a NaN still gives NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, TypeAlias, overload

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _api, _checks, _logits, _numerics, _reduce, _row_sums
from jaxce._checks import POSITIVE, UNIT_INTERVAL, Reduction

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Loss: TypeAlias = Array | tuple[Array, Array]


def _two_arrays(first: ArrayLike, second: ArrayLike, axis, where, sample_weights, names):
    """``(first's Logits, second aligned to it, weights)`` for a loss of two class arrays."""
    return _logits.probability_targets(
        _logits.prepare(first, axis, where, names[0]), second, sample_weights, name=names[1]
    )


@overload
def entropy(
    logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def entropy(
    logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("axis", "reduction"))
def entropy(
    logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Shannon entropy of the softmax distribution, in nats.

    .. math::
      H(p) = -\sum_c p_c \log p_c, \qquad p = \operatorname{softmax}(x)

    over the classes ``where`` leaves in, with :math:`0 \log 0 = 0`: a ``-inf`` logit is a
    class of probability 0 and contributes nothing (no NaN in the value or the gradient).
    :math:`0 \le H \le \log C`, the maximum at the uniform distribution.

    Args:
      logits: ``(..., C, ...)`` float array; classes on ``axis``.
      axis: the class axis or a tuple of axes (flattened).
      where: class mask of ``logits``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example entropies (``logits``'s shape without the class axes) or a scalar; float32
      for half precision, else the logits' dtype.

    Examples:
      With :func:`kl_divergence`, cross-entropy splits as :math:`H(p, q) = H(p) + KL(p \| q)`:

      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> p, q = jnp.array([0.9, 0.1]), jnp.array([0.6, 0.4])
      >>> h = jaxce.entropy(jnp.log(p))
      >>> kl = jaxce.kl_divergence(jnp.log(q), p)
      >>> ce = jaxce.softmax_cross_entropy(jnp.log(q), p)
      >>> [round(float(v), 4) for v in (h, kl, h + kl, ce)]
      [0.3251, 0.2263, 0.5514, 0.5514]
      >>> jaxce.entropy(jnp.array([[0.0, 0.0], [0.0, -jnp.inf]]))
      Array([0.6931, 0.    ], dtype=float32)
    """
    prepared = _logits.prepare(logits, axis, where)
    weights = _logits.per_example_weights(prepared, sample_weights)
    prepared = prepared.neutralised(prepared.keep)
    h = _row_sums.entropy(prepared.values)
    return _reduce.weigh_and_reduce(h, weights, reduction)


@overload
def binary_entropy(
    logits: ArrayLike,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def binary_entropy(
    logits: ArrayLike,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("reduction",))
def binary_entropy(
    logits: ArrayLike,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Entropy of Bernoulli(sigmoid(logits)), elementwise, in nats.

    .. math::
      H = -p \log p - (1 - p)\log(1 - p)
        = p \operatorname{softplus}(-x) + (1 - p)\operatorname{softplus}(x),
      \qquad p = \sigma(x)

    Computed from ``softplus`` (no ``log`` of a rounded probability): accurate for large
    :math:`|x|`, and 0 with a zero gradient at ``x = +-inf``.

    Args:
      logits: float array of any shape.
      sample_weights: broadcastable to ``logits``.
      reduction: ``"none"`` (per element), ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.

    Returns:
      Per-element entropies of ``logits``'s shape or a scalar; float32 for half precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> jaxce.binary_entropy(jnp.array([0.0, 2.0, -jnp.inf]))
      Array([0.6931, 0.3653, 0.    ], dtype=float32)
    """
    x = _reduce.upcast(_checks.as_floating(logits, "logits"))
    h = _numerics.weighted_softplus(jax.nn.sigmoid(x), -x) + _numerics.weighted_softplus(
        jax.nn.sigmoid(-x), x
    )
    weights = _reduce.example_weights(x.shape, x.dtype, sample_weights=sample_weights)
    return _reduce.weigh_and_reduce(h, weights, reduction)


@overload
def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("axis", "reduction"))
def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Kullback-Leibler divergence :math:`KL(p \| q)` of predictions from targets (optax order).

    .. math::
      KL(p \| q) = \sum_c p_c \big(\log p_c - \log q_c\big)

    with ``log_predictions`` :math:`\log q` and ``targets`` :math:`p`, both used as given (not
    renormalised), over the classes ``where`` leaves in. A class with :math:`p_c = 0`
    contributes exactly 0 to the value and to every gradient: the loss and its gradient w.r.t.
    ``log_predictions`` stay finite even where :math:`\log q_c = -\infty` (optax and PyTorch
    give NaN there), and the gradient w.r.t. a target of exactly 0 is 0 (the one-sided
    derivative :math:`\log p_c + 1 - \log q_c` is :math:`-\infty`; we never return NaN).
    :math:`p_c > 0` with :math:`q_c = 0` gives ``+inf``.

    Summed termwise; a per-example result within the rounding error of its terms
    (:math:`2\epsilon \sum_c p_c (1 + |\log p_c| + |\log q_c|)`, in value only: the gradient
    is the formula's) is exactly 0, so two arrays that represent one distribution, such as
    ``log_softmax(s)`` and ``softmax(s)``, give 0.0 and never ``-2e-8``. Normalised inputs
    therefore never give a negative value; unnormalised ones (the formula is used as given)
    may, as the formula does. ``reduction="mean"`` averages the
    per-example divergences (PyTorch's ``kl_div`` ``"mean"`` averages over every element; see
    ``jaxce.pytorch.kl_div`` for that and ``"batchmean"``).

    Args:
      log_predictions: ``(..., C, ...)`` log-probabilities :math:`\log q`; classes on ``axis``.
      targets: probabilities :math:`p`, broadcastable to ``log_predictions``.
      axis: the class axis or a tuple of axes.
      where: class mask of ``log_predictions``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example divergences (``log_predictions``'s shape without the class axes) or a scalar;
      float32 for half precision. A negative target (on a class ``where`` leaves in) is
      invalid: that example's divergence is NaN, never a silent finite value (as in PyTorch).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> p = jnp.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
      >>> log_q = jnp.log(jnp.array([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
      >>> jaxce.kl_divergence(log_q, p)
      Array([0.6931, 0.    ], dtype=float32)

    References:
      Kullback and Leibler, *On Information and Sufficiency*, 1951.
    """
    log_q, p, weights = _two_arrays(
        log_predictions, targets, axis, where, sample_weights, ("log_predictions", "targets")
    )
    on_support = _numerics.support(p, log_q.class_mask)
    log_p = _numerics.safe_log(p)
    kl = _numerics.weighted_log_ratio(p, log_p, log_q.values, on_support)
    bound = _numerics.rounding_bound(p, log_p, log_q.values, on_support, _eps(p))
    return _reduce.weigh_and_reduce(_numerics.zero_within(kl, bound), weights, reduction)


@overload
def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("axis", "reduction"))
def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Kullback-Leibler divergence :math:`KL(p \| q)` with the targets in log space.

    .. math::
      KL(p \| q) = \sum_c e^{\log p_c} \big(\log p_c - \log q_c\big)

    As :func:`kl_divergence` (PyTorch's ``kl_div(..., log_target=True)`` summed over classes),
    but ``log_targets`` may hold ``-inf`` (probability 0): such a class contributes exactly 0,
    with zero gradients, even where ``log_predictions`` is ``-inf`` too. Identical arrays give
    exactly 0, and a result within rounding of 0 is 0, as in :func:`kl_divergence`.

    Args:
      log_predictions: ``(..., C, ...)`` log-probabilities :math:`\log q`; classes on ``axis``.
      log_targets: log-probabilities :math:`\log p`, broadcastable to ``log_predictions``.
      axis: the class axis or a tuple of axes.
      where: class mask of ``log_predictions``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example divergences or a scalar; float32 for half precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> log_p = jnp.log(jnp.array([0.5, 0.5, 0.0]))
      >>> log_q = jnp.log(jnp.array([0.25, 0.25, 0.5]))
      >>> jaxce.kl_divergence_with_log_targets(log_q, log_p)
      Array(0.6931, dtype=float32)
    """
    log_q, log_p, weights = _two_arrays(
        log_predictions,
        log_targets,
        axis,
        where,
        sample_weights,
        ("log_predictions", "log_targets"),
    )
    p = jnp.exp(log_p)
    on_support = _numerics.support(p, log_q.class_mask)
    kl = _numerics.weighted_log_ratio(p, log_p, log_q.values, on_support)
    bound = _numerics.rounding_bound(p, log_p, log_q.values, on_support, _eps(p))
    return _reduce.weigh_and_reduce(_numerics.zero_within(kl, bound), weights, reduction)


@overload
def softmax_kl_divergence(
    logits: ArrayLike,
    target_logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike = 1.0,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def softmax_kl_divergence(
    logits: ArrayLike,
    target_logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike = 1.0,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("axis", "reduction"), domains={"temperature": POSITIVE})
def softmax_kl_divergence(
    logits: ArrayLike,
    target_logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    temperature: float | ArrayLike = 1.0,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Distillation loss: temperature-scaled KL of the student's softmax from the teacher's.

    .. math::
      \ell = T^2 \, KL\big(\operatorname{softmax}(t / T) \,\|\, \operatorname{softmax}(s / T)\big)
           = T^2 \sum_c p_c (\log p_c - \log q_c)

    with student ``logits`` :math:`s`, teacher ``target_logits`` :math:`t` and temperature
    :math:`T` (Hinton et al.; the :math:`T^2` keeps gradient magnitudes comparable across
    temperatures). Both softmaxes run over the classes ``where`` leaves in, in log space, so
    logits up to the dtype's limit and ``-inf`` logits are fine (a class the teacher gives
    probability 0 contributes 0; one the student gives 0 but the teacher does not gives
    ``+inf``).

    Never negative, and exactly 0.0 for identical logits at any temperature (rounding cannot
    make it negative: such a value is returned as 0, in value only, so the gradient and the
    Hessian stay the formula's). Rows whose scaled logits differ by at most 1 use the
    centred form :math:`\sum_c p_c (d_c - D)`, :math:`d = (t - s)/T`,
    :math:`D = \operatorname{log1p}(\sum_c q_c \operatorname{expm1}(d_c))`, which keeps
    the relative precision of a small divergence between nearly equal distributions.
    Logits of any finite size are handled (``1e30``, the largest float). One caveat of
    XLA:CPU, not of this formula: with a temperature that is not a power of two, XLA may round
    ``logits / T`` differently in two fusions that read it, which for logits beyond about
    ``1e7`` shifts ``exp(z - max)`` visibly (``jax.nn.logsumexp(x / 3)`` does the same).

    The gradient flows into **both** arguments (this is a plain function of two arrays, as
    for mutual learning). For a frozen teacher pass
    ``jax.lax.stop_gradient(target_logits)``, or differentiate w.r.t. ``logits`` only.

    Args:
      logits: ``(..., C, ...)`` student logits; classes on ``axis``.
      target_logits: teacher logits, broadcastable to ``logits``.
      axis: the class axis or a tuple of axes.
      temperature: :math:`T > 0`.
      where: class mask of ``logits``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example loss.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example losses (``logits``'s shape without the class axes) or a scalar; float32 for
      half precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> student = jnp.array([1.0, 2.0, 3.0])
      >>> jaxce.softmax_kl_divergence(student, student)
      Array(0., dtype=float32)
      >>> teacher = jnp.array([3.0, 2.0, 1.0])
      >>> round(float(jaxce.softmax_kl_divergence(student, teacher, temperature=2.0)), 4)
      1.2806

    References:
      Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015.
    """
    student, teacher, weights = _two_arrays(
        logits, target_logits, axis, where, sample_weights, ("logits", "target_logits")
    )
    t, bad = _checks.hyperparameter(temperature, "temperature", student.dtype, POSITIVE)
    weights = weights.with_invalid(bad)
    kl = _row_sums.softmax_kl(student.values / t, _masked(teacher, student.class_mask) / t)
    return _reduce.weigh_and_reduce(jnp.square(t) * kl, weights, reduction)


@overload
def js_divergence(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    beta: float | ArrayLike = 0.5,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def js_divergence(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    beta: float | ArrayLike = 0.5,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("axis", "reduction"), domains={"beta": UNIT_INTERVAL})
def js_divergence(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    beta: float | ArrayLike = 0.5,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Generalised Jensen-Shannon divergence of two softmax distributions, in nats.

    .. math::
      JS_\beta(P, Q) = \beta\, KL(P \| M) + (1 - \beta)\, KL(Q \| M), \qquad
      M = \beta P + (1 - \beta) Q

    with :math:`P = \operatorname{softmax}(x_p)`, :math:`Q = \operatorname{softmax}(x_q)`
    over the classes ``where`` leaves in. :math:`\log M` is a log-sum-exp of
    :math:`\log\beta + \log P` and :math:`\log(1 - \beta) + \log Q`, so everything stays in
    log space. It is finite for all inputs, bounded by the binary entropy of :math:`\beta`
    (:math:`\log 2` at :math:`\beta = 1/2`, where it is symmetric) and 0 iff :math:`P = Q`
    (or :math:`\beta \in \{0, 1\}`). Never negative, and exactly 0.0 for identical logits
    (a rounding below 0 is returned as 0, in value only).

    Args:
      logits_p: ``(..., C, ...)`` logits of :math:`P`; classes on ``axis``.
      logits_q: logits of :math:`Q`, broadcastable to ``logits_p``.
      axis: the class axis or a tuple of axes.
      beta: mixing weight :math:`\beta \in [0, 1]`.
      where: class mask of ``logits_p``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example divergences (``logits_p``'s shape without the class axes) or a scalar;
      float32 for half precision.

    Examples:
      Disjoint distributions reach the bound :math:`\log 2`:

      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> x_p = jnp.array([0.0, -jnp.inf])
      >>> x_q = jnp.array([-jnp.inf, 0.0])
      >>> round(float(jaxce.js_divergence(x_p, x_q)), 4)
      0.6931
      >>> a, b = jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 1.0, 0.0])
      >>> [round(float(jaxce.js_divergence(u, v)), 4) for u, v in ((a, b), (b, a))]
      [0.3532, 0.3532]

    References:
      Lin, *Divergence Measures Based on the Shannon Entropy*, 1991.
    """
    first, second, weights = _two_arrays(
        logits_p, logits_q, axis, where, sample_weights, ("logits_p", "logits_q")
    )
    b, bad = _checks.hyperparameter(beta, "beta", first.dtype, UNIT_INTERVAL)
    weights = weights.with_invalid(bad)
    second = _masked(second, first.class_mask)
    rows = jnp.broadcast_to(b, first.batch_shape)
    js = _row_sums.js_divergence(first.values, second, rows)
    return _reduce.weigh_and_reduce(js, weights, reduction)


def _masked(values: Array, class_mask: Array | None) -> Array:
    """``values`` with the classes ``class_mask`` leaves out at ``-inf`` (a second logits array)."""
    if class_mask is None:
        return values
    return jnp.where(class_mask, values, jnp.full((), -jnp.inf, values.dtype))


def _eps(x: Array) -> float:
    """The compute dtype's machine epsilon."""
    return float(jnp.finfo(x.dtype).eps)


def _broadcast_pair(a: Array, b: Array, names: tuple[str, str]) -> tuple[Array, Array]:
    try:
        shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"`{names[0]}` {a.shape} and `{names[1]}` {b.shape} do not broadcast together."
        ) from None
    return jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape)


@_api.public(static=("axis",))
def generalized_kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | Sequence[int] | None = -1,
    where: ArrayLike | None = None,
) -> Array:
    r"""Generalised Kullback-Leibler divergence of unnormalised measures (optax's signature).

    The Bregman divergence of :math:`f(p) = p \log p - p`, so it is defined for positive
    measures that need not sum to 1; for probability vectors it is :math:`KL(p \| q)`.
    Every term is non-negative and computed as such (near :math:`p = q` as
    :math:`p\,(\operatorname{expm1}(d) - d)`, :math:`d = \log q - \log p`): the result is
    never negative, exactly 0 for ``(log(p), p)`` and precise for nearly equal inputs. A
    ``log_predictions`` whose exponential overflows gives ``+inf`` (the exact value exceeds
    the dtype), with the gradient :math:`q - p = +\infty` w.r.t. it:

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
    pointwise = _numerics.divergence_floor(_bregman_log_ratio(log_q, p))
    if where is not None:
        where = _checks.as_mask(where, "where")
        where = _checks.broadcastable(where, "where", pointwise.shape, "a mask of the inputs")
        pointwise = jnp.where(where, pointwise, jnp.zeros((), dtype))
    return jnp.sum(pointwise, axis=None if axis is None else _axes(axis, pointwise.ndim))


def _bregman_log_ratio(log_q: Array, p: Array) -> Array:
    r"""``p log(p/q) - p + q`` elementwise (``q = exp(log_q)``, ``0 log 0 = 0``), >= 0 exactly.

    Near :math:`p = q` (:math:`|d| \le 1` for :math:`d = \log q - \log p`) it is
    :math:`p\,(\operatorname{expm1}(d) - d)`: exactly 0 where :math:`\log q = \log p`, and
    no cancellation of the three large terms. Elsewhere the terms as written, with
    :math:`\log q` capped below the overflow of :math:`e^{\log q}`; beyond the cap (and at
    ``+inf``) the result is ``+inf`` (the exact value exceeds the dtype), with the derivatives
    ``q - p = +inf`` and :math:`\log p - \log q`. Derivatives: :math:`\partial/\partial \log q
    = q - p`, :math:`\partial/\partial p = \log p - \log q`.
    """
    zero = jnp.zeros((), p.dtype)
    live = p != 0  # NaN takes part
    log_p = jnp.log(jnp.where(live, p, jnp.ones((), p.dtype)))  # 0 log 0 = 0, safe gradient
    d = log_q - log_p
    near = live & (jnp.abs(d) <= 1)
    d_near = jnp.where(near, d, zero)
    close = p * (jnp.expm1(d_near) - d_near)
    cap = float(np.log(jnp.finfo(p.dtype).max)) - 1.0
    capped = jnp.minimum(log_q, cap)
    far = jnp.exp(capped) - p + _numerics.times_log(p, log_p) - _numerics.times_log(p, capped)
    # exp(log_q) overflows: +inf, and its derivative q - p; the derivative in p rides on a
    # zero-valued term (XLA:CPU does not keep inf - x infinite within one fusion).
    over = log_q > cap
    finite_q = jnp.where(over & jnp.isfinite(log_q), log_q, zero)
    slope = jnp.where(over & live, p * (log_p - finite_q), zero)
    beyond = jnp.exp(jnp.where(over, log_q, zero)) + (slope - jax.lax.stop_gradient(slope))
    return jnp.where(over, beyond, jnp.where(near, close, far))


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

"""Softmax cross-entropy with integer and soft targets, NLL, poly and softmax focal losses.

Each loss is its formula plus calls into the shared modules: ``_logits`` (layout, masks,
log-normaliser, targets), ``_numerics`` (overflow- and NaN-safe pieces), ``_reduce``
(weights and reductions), ``_checks`` (validation) and ``_api`` (jit compilation).
"""

from __future__ import annotations

from typing import Literal, TypeAlias, overload

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _logits, _numerics, _reduce
from jaxce._checks import NON_NEGATIVE, UNIT_INTERVAL, Reduction

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Loss: TypeAlias = Array | tuple[Array, Array]

_STATIC = ("axis", "reduction", "ignore_index")


def _smoothing_coefficients(
    logits: _logits.Logits, eps: Array, class_weights: Array | None
) -> Array:
    r"""``(..., C)`` coefficients :math:`\varepsilon w_c / C` of the uniform part."""
    coef = jnp.broadcast_to(eps / logits.count(keepdims=True), logits.values.shape)
    if class_weights is not None:
        coef = coef * _reduce.along_classes(class_weights, coef)
    return coef


def _options(weights: _reduce.ExampleWeights, dtype, label_smoothing, z_loss):
    """The traced smoothing and z-loss coefficients (``None`` when off), NaN where invalid."""
    eps = z = None
    if not _checks.is_off(label_smoothing):
        eps, bad = _checks.hyperparameter(label_smoothing, "label_smoothing", dtype, UNIT_INTERVAL)
        weights = weights.with_invalid(bad)
    if not _checks.is_off(z_loss):
        z, bad = _checks.hyperparameter(z_loss, "z_loss", dtype, NON_NEGATIVE)
        weights = weights.with_invalid(bad)
    return eps, z, weights


def _z_term(z: Array | None, m: Array, log_s: Array) -> Array | float:
    return 0.0 if z is None else _logits.z_loss_term(z, m, log_s)


@overload
def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(
    static=_STATIC,
    optional=("label_smoothing", "z_loss"),
    domains={"label_smoothing": UNIT_INTERVAL, "z_loss": NON_NEGATIVE},
)
def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> Loss:
    r"""Softmax cross-entropy with integer (class-index) labels.

    For an example with logits :math:`x`, label :math:`y`, class weights :math:`w` (ones if
    not given), smoothing :math:`\varepsilon` and :math:`C` classes left in by ``where``:

    .. math::
      \ell = (1 - \varepsilon)\, w_y \, (-\log p_y)
             + \frac{\varepsilon}{C} \sum_c w_c \, (-\log p_c)
             + \lambda_z \,\big(\operatorname{logsumexp}_c x_c\big)^2,
      \qquad p = \operatorname{softmax}(x)

    (PyTorch's ``cross_entropy`` with ``weight`` and ``label_smoothing``, plus PaLM's z-loss
    :math:`\lambda_z`), times ``sample_weights``. The mean is
    :math:`\sum_i \ell_i / \sum_i s_i w_{y_i}` over kept examples. The z-loss term carries the
    sample weight but not the class weight: it regularises the normaliser, not a class.

    The label's logit is taken directly (no full ``log_softmax``, no one-hot in memory), so the
    cost is about one pass over the logits forward and one backward.

    Args:
      logits: ``(..., C, ...)`` float array; classes on ``axis``. Half precision is computed in
        float32.
      labels: integer array of ``logits``'s shape without the class axis (or axes). With a
        tuple ``axis`` a label is a flat index into the product of those axes.
      axis: the class axis, or a tuple of axes (optax semantics). PyTorch's
        ``(N, C, d1, ..., dK)`` layout is ``axis=1``.
      where: optional boolean mask. Of ``logits``'s rank: classes to keep in the softmax
        (e.g. padded vocabulary). With the class axes removed: examples to keep. A row with no
        class left counts as ignored.
      ignore_index: label value whose examples are dropped (loss 0, gradient 0, weight 0).
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      class_weights: ``(C,)`` weights per class (PyTorch's ``weight``).
      sample_weights: weights broadcastable to the per-example loss.
      z_loss: coefficient :math:`\lambda_z` of the squared log-normaliser.
      reduction: ``"none"`` (per example), ``"sum"``, ``"mean"`` (weighted mean, 0 if every
        example is dropped) or ``"sum_and_weight"`` (the mean's numerator and denominator, for
        exact accumulation across micro-batches or devices; see :func:`weighted_mean`).

    Returns:
      Per-example losses of shape ``labels.shape`` (``reduction="none"``) or a scalar; float32
      for half-precision logits, else the logits' dtype. A label outside ``[0, C)`` that is not
      ``ignore_index``, or whose class ``where`` masks out, gives NaN for its example (and an
      error under ``jax.experimental.checkify`` with user checks).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[2.0, 0.5, 0.1], [0.1, 0.2, 0.9]])
      >>> labels = jnp.array([0, 2])
      >>> jaxce.softmax_cross_entropy_with_integer_labels(logits, labels)
      Array([0.3168, 0.6657], dtype=float32)
      >>> jaxce.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")
      Array(0.4913, dtype=float32)

      A dog (class 1) predicted as (cat, dog, horse) = (0.4, 0.4, 0.2):

      >>> probs = jnp.array([0.4, 0.4, 0.2])
      >>> jaxce.softmax_cross_entropy_with_integer_labels(jnp.log(probs), jnp.array(1))
      Array(0.9163, dtype=float32)

    References:
      Szegedy et al., *Rethinking the Inception Architecture* (label smoothing), 2016;
      Chowdhery et al., *PaLM* (z-loss), 2022.
    """
    prepared, y, weights = _logits.integer_targets(
        _logits.prepare(logits, axis, where),
        labels,
        ignore_index=ignore_index,
        class_weights=class_weights,
        sample_weights=sample_weights,
    )
    eps, z, weights = _options(weights, prepared.dtype, label_smoothing, z_loss)
    m, log_s = _logits.log_normalizer(prepared.values, prepared.class_mask)
    hard = (
        jnp.ones(prepared.batch_shape, prepared.dtype)
        if weights.label_weight is None
        else weights.label_weight
    )
    if eps is not None:
        hard = (1 - eps) * hard
    loss = _numerics.neg_log_softmax_at(hard, _reduce.take_class(prepared.values, y), m, log_s)
    if eps is not None:
        coef = _smoothing_coefficients(prepared, eps, weights.class_weights)
        loss = loss + _numerics.neg_log_softmax_sum(
            coef, prepared.values, m, log_s, prepared.class_mask
        )
    loss = loss + _z_term(z, m, log_s)
    return _reduce.weigh_and_reduce(loss, weights, reduction)


@overload
def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float | ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float | ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(
    static=("axis", "reduction"),
    optional=("label_smoothing", "z_loss"),
    domains={"label_smoothing": UNIT_INTERVAL, "z_loss": NON_NEGATIVE},
)
def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float | ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float | ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> Loss:
    r"""Softmax cross-entropy with probability (soft) targets.

    .. math::
      \ell = -\sum_c w_c \, t_c \log p_c + \lambda_z \big(\operatorname{logsumexp}_c x_c\big)^2,
      \qquad t = (1 - \varepsilon)\,\text{labels} + \varepsilon / C,
      \quad p = \operatorname{softmax}(x)

    with the sum and :math:`C` over the classes ``where`` leaves in (target mass on a masked
    class is dropped, as in optax). ``0 \log 0 = 0``: a ``-inf`` logit with zero target gives
    no NaN. Class weights scale the loss but do not enter the mean's denominator (PyTorch);
    the mean divides by the sum of ``sample_weights`` over kept examples.

    Args:
      logits: ``(..., C, ...)`` float array; classes on ``axis``.
      labels: probabilities broadcastable to ``logits``.
      axis: the class axis or a tuple of axes (flattened, optax semantics).
      where: class mask of ``logits``'s rank, or example mask without the class axes.
      label_smoothing: :math:`\varepsilon`, mixing the targets with the uniform distribution.
      class_weights: ``(C,)`` per-class weights :math:`w`.
      sample_weights: broadcastable to the per-example loss.
      z_loss: coefficient :math:`\lambda_z`.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.

    Returns:
      Per-example losses (``logits``'s shape without the class axes) or a scalar.

    Examples:
      Cross-entropy of distributions in bits: :math:`H(p, q)` for ``p = (0.9, 0.1)``:

      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> p = jnp.array([0.9, 0.1])
      >>> q1, q2 = jnp.array([0.6, 0.4]), jnp.array([0.8, 0.2])
      >>> def bits(target, pred):
      ...     return jaxce.softmax_cross_entropy(jnp.log(pred), target) / jnp.log(2)
      >>> [round(float(bits(p, q)), 4) for q in (q1, q2)]
      [0.7955, 0.5219]
      >>> round(float(bits(q2, p)), 4)  # not symmetric
      0.786
    """
    prepared, t, weights = _logits.probability_targets(
        _logits.prepare(logits, axis, where), labels, sample_weights, class_weights
    )
    eps, z, weights = _options(weights, prepared.dtype, label_smoothing, z_loss)
    if eps is not None:
        t = (1 - eps) * t + eps / prepared.count(keepdims=True)
    if weights.class_weights is not None:
        t = t * _reduce.along_classes(weights.class_weights, t)
    m, log_s = _logits.log_normalizer(prepared.values, prepared.class_mask)
    loss = _numerics.neg_log_softmax_sum(t, prepared.values, m, log_s, prepared.class_mask)
    loss = loss + _z_term(z, m, log_s)
    return _reduce.weigh_and_reduce(loss, weights, reduction)


@overload
def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=_STATIC)
def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Negative log-likelihood of integer labels under given log-probabilities.

    .. math::
      \ell = -w_y \log p_y

    with the mean :math:`\sum_i s_i \ell_i / \sum_i s_i w_{y_i}` (PyTorch's ``nll_loss``).
    ``log_probs`` are used as given (not normalised), as in PyTorch.

    Args:
      log_probs: ``(..., C, ...)`` log-probabilities; classes on ``axis``.
      labels: integer labels, ``log_probs``'s shape without the class axis.
      axis: the class axis or a tuple of axes.
      ignore_index: label value whose examples are dropped.
      class_weights: ``(C,)`` per-class weights :math:`w`.
      sample_weights: broadcastable to the per-example loss (:math:`s`).
      reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.

    Returns:
      Per-example losses or a scalar; invalid labels give NaN, as in
      :func:`softmax_cross_entropy_with_integer_labels`.

    Examples:
      ``cross_entropy(x, y) == nll_loss(log_softmax(x), y)``:

      >>> import jax, jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[2.0, 0.5, 0.1], [0.1, 0.2, 0.9]])
      >>> jaxce.nll_loss(jax.nn.log_softmax(logits), jnp.array([0, 2]))
      Array([0.3168, 0.6657], dtype=float32)
    """
    prepared, y, weights = _logits.integer_targets(
        _logits.prepare(log_probs, axis, None, name="log_probs"),
        labels,
        ignore_index=ignore_index,
        class_weights=class_weights,
        sample_weights=sample_weights,
    )
    log_p = _reduce.take_class(prepared.values, y)
    if weights.label_weight is None:
        loss = -log_p
    else:  # a zero class weight masks exactly, also a -inf log-probability
        w = weights.label_weight
        loss = -(w * jnp.where(w == 0, jnp.zeros((), log_p.dtype), log_p))
    return _reduce.weigh_and_reduce(loss, weights, reduction)


@_api.public(static=("axis",), domains={"alpha": UNIT_INTERVAL})
def smooth_labels(
    labels: ArrayLike,
    alpha: float | ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    where: ArrayLike | None = None,
) -> Array:
    r"""Mixes targets with the uniform distribution (optax-compatible).

    .. math::
      t' = (1 - \alpha)\, t + \alpha / C

    where :math:`C` is the number of classes on ``axis`` (or, with ``where``, the classes left
    in per row).

    Args:
      labels: float targets (usually one-hot), classes on ``axis``.
      alpha: smoothing weight in ``[0, 1]``.
      axis: the class axis or axes.
      where: optional class mask broadcastable to ``labels``. As in optax, every class of a
        row gets :math:`\alpha / C` with :math:`C` the classes left in; a row with no class
        left gets no uniform part (optax gives ``inf`` there).

    Returns:
      Smoothed targets, ``labels``'s shape and dtype. A concrete ``alpha`` outside
      ``[0, 1]`` raises ``ValueError``; a traced one gives NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> jaxce.smooth_labels(jnp.array([0.0, 1.0, 0.0, 0.0]), 0.2)
      Array([0.05, 0.85, 0.05, 0.05], dtype=float32)
    """
    labels = _checks.as_floating(labels, "labels")
    layout = _logits.ClassLayout.of(axis, labels.ndim, "labels")
    num_classes = layout.num_classes(labels.shape)
    if num_classes == 0:
        raise ValueError(
            f"`labels` has shape {labels.shape}: the class axis {layout.axes} is empty."
        )
    dtype = _reduce.compute_dtype(labels.dtype)
    a = _checks.as_hyperparameter(alpha, "alpha", dtype)
    bad = _checks.outside_domain(a, "alpha", UNIT_INTERVAL)
    t = labels.astype(dtype)
    if where is None:
        uniform = a / num_classes
    else:
        mask = _checks.broadcastable(
            _checks.as_mask(where, "where"), "where", labels.shape, "a class mask for `labels`"
        )
        # optax's values: alpha / count on every class of the row, masked ones included; a
        # row with no class left gets no uniform part (optax divides by zero there).
        count = jnp.sum(mask, axis=layout.axes, keepdims=True).astype(dtype)
        empty = count == 0
        uniform = jnp.where(empty, jnp.zeros((), dtype), a / jnp.where(empty, 1, count))
    smoothed = (1 - a) * t + uniform
    return jnp.where(bad, jnp.full((), jnp.nan, dtype), smoothed).astype(labels.dtype)


@overload
def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    epsilon: float | ArrayLike = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    epsilon: float | ArrayLike = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("axis", "reduction"))
def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    epsilon: float | ArrayLike = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Poly-1 loss: cross-entropy plus :math:`\epsilon` times the first polynomial term.

    .. math::
      \ell = -\sum_c t_c \log p_c + \epsilon \sum_c t_c (1 - p_c)

    optax's ``poly_loss_cross_entropy`` (soft ``labels``), with optional weights and reductions.

    Args:
      logits: ``(..., C, ...)`` float array.
      labels: probabilities broadcastable to ``logits`` (usually one-hot).
      epsilon: coefficient of the poly-1 term.
      axis: the class axis or axes.
      where: class or example mask, as in :func:`softmax_cross_entropy`.
      sample_weights: broadcastable to the per-example loss.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.

    Returns:
      Per-example losses or a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.log(jnp.array([0.5, 0.25, 0.25]))
      >>> jaxce.poly_loss_cross_entropy(logits, jnp.array([1.0, 0.0, 0.0]), epsilon=2.0)
      Array(1.6931, dtype=float32)

    References:
      Leng et al., *PolyLoss: A Polynomial Expansion Perspective of Classification Loss
      Functions*, 2022.
    """
    prepared, t, weights = _logits.probability_targets(
        _logits.prepare(logits, axis, where), labels, sample_weights
    )
    eps = _checks.as_hyperparameter(epsilon, "epsilon", prepared.dtype)
    m, log_s = _logits.log_normalizer(prepared.values, prepared.class_mask)
    ce = _numerics.neg_log_softmax_sum(t, prepared.values, m, log_s, prepared.class_mask)
    one_minus_p = -jnp.expm1((prepared.values - m[..., None]) - log_s[..., None])
    if prepared.class_mask is not None:
        one_minus_p = jnp.where(prepared.class_mask, one_minus_p, jnp.zeros((), t.dtype))
    loss = ce + eps * jnp.sum(t * one_minus_p, axis=-1)
    return _reduce.weigh_and_reduce(loss, weights, reduction)


def _focal_factor(log_p: Array, gamma: Array) -> Array:
    """``(1 - p) ** gamma``, held constant where ``p`` underflows to 0.

    There its true derivative is about ``gamma * p = 0``, and it would meet the infinite
    cotangent of ``-log p`` (0 * inf = NaN) for logits near the dtype's limit.
    """
    factor = _numerics.focal_power(_numerics.log_one_minus_exp(log_p), gamma)
    return jnp.where(log_p == -jnp.inf, jax.lax.stop_gradient(factor), factor)


def _alpha_per_class(alpha, logits: _logits.Logits) -> Array:
    if jnp.ndim(alpha) == 0:
        return _checks.as_hyperparameter(alpha, "alpha", logits.dtype)
    return _reduce.class_vector(alpha, "alpha", logits.num_classes, logits.dtype)


@overload
def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    gamma: float | ArrayLike = 2.0,
    alpha: float | ArrayLike | None = None,
    ignore_index: int | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    gamma: float | ArrayLike = 2.0,
    alpha: float | ArrayLike | None = None,
    ignore_index: int | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=_STATIC, domains={"gamma": NON_NEGATIVE})
def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    gamma: float | ArrayLike = 2.0,
    alpha: float | ArrayLike | None = None,
    ignore_index: int | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Multi-class focal loss.

    Integer labels:

    .. math::
      \ell = -\alpha_y (1 - p_y)^\gamma \log p_y

    soft (probability) labels: :math:`\ell = -\sum_c \alpha_c t_c (1 - p_c)^\gamma \log p_c`.
    :math:`\alpha` is a per-class ``(C,)`` array or a scalar (ones if ``None``); ``gamma=0`` is
    plain cross-entropy. The focal factor is computed as
    :math:`\exp(\gamma \log(-\mathrm{expm1}(\log p)))`, accurate for :math:`p \to 1`, with a
    zero (exact) gradient where :math:`p_y` rounds to 1. The mean divides by the sum of
    ``sample_weights`` over kept examples (``alpha`` is a focusing factor, not a class weight).

    Args:
      logits: ``(..., C, ...)`` float array.
      labels: integer labels (``logits``'s shape without the class axis) or probabilities
        broadcastable to ``logits``; the dtype decides.
      gamma: focusing parameter :math:`\gamma \ge 0`.
      alpha: scalar or ``(C,)`` per-class balance, or ``None``.
      axis: the class axis or axes.
      where: class or example mask, as in :func:`softmax_cross_entropy_with_integer_labels`.
      ignore_index: integer labels only: label value whose examples are dropped.
      sample_weights: broadcastable to the per-example loss.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.

    Returns:
      Per-example losses or a scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
      >>> jaxce.softmax_focal_loss(logits, jnp.array([0]), gamma=2.0)
      Array([0.1733], dtype=float32)

    References:
      Lin et al., *Focal Loss for Dense Object Detection*, 2017.
    """
    prepared = _logits.prepare(logits, axis, where)
    labels = jnp.asarray(labels)
    integer = jnp.issubdtype(labels.dtype, jnp.integer)
    if integer:
        # target: the safe integer labels (...), or the probabilities (..., C)
        prepared, target, weights = _logits.integer_targets(
            prepared, labels, ignore_index=ignore_index, sample_weights=sample_weights
        )
    elif ignore_index is not None:
        raise ValueError("`ignore_index` applies to integer labels only; got float `labels`.")
    else:
        prepared, target, weights = _logits.probability_targets(prepared, labels, sample_weights)
    g, bad = _checks.hyperparameter(gamma, "gamma", prepared.dtype, NON_NEGATIVE)
    weights = weights.with_invalid(bad)
    a = None if alpha is None else _alpha_per_class(alpha, prepared)
    m, log_s = _logits.log_normalizer(prepared.values, prepared.class_mask)
    if integer:
        x_y = _reduce.take_class(prepared.values, target)
        coef = _focal_factor((x_y - m) - log_s, g)
        if a is not None:
            coef = coef * (a if a.ndim == 0 else _reduce.take_vector(a, target))
        loss = _numerics.neg_log_softmax_at(coef, x_y, m, log_s)
    else:
        log_p = (prepared.values - m[..., None]) - log_s[..., None]
        coef = _focal_factor(log_p, g) * target
        if a is not None:
            coef = coef * (a if a.ndim == 0 else _reduce.along_classes(a, coef))
        loss = _numerics.neg_log_softmax_sum(coef, prepared.values, m, log_s, prepared.class_mask)
    return _reduce.weigh_and_reduce(loss, weights, reduction)


@_api.public()
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
    return softmax_cross_entropy(logits, labels)

"""Softmax cross-entropy with integer and soft targets, NLL, poly and softmax focal losses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _checks, _reduce
from jaxce._reduce import ClassLayout

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_SOFT_LABELS_HINT = " For probability targets use `softmax_cross_entropy`."


@dataclasses.dataclass(frozen=True)
class _Logits:
    """Logits brought into the ``(..., C)`` layout every formula uses."""

    x: Array  # (..., C), compute dtype
    class_mask: Array | None  # (..., C) bool, True = class takes part
    keep: Array | None  # batch-shaped: rows with at least one class, per `where`
    layout: ClassLayout
    shape: tuple[int, ...]  # original logits shape

    @property
    def num_classes(self) -> int:
        return self.x.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.x.shape[:-1]

    def count(self, keepdims: bool = False) -> Array | int:
        """Number of classes left in by ``where``, per row (``C`` without a mask).

        With ``keepdims`` a mask's count keeps a trailing axis, to divide ``(..., C)`` arrays.
        """
        if self.class_mask is None:
            return self.num_classes
        return jnp.sum(self.class_mask, axis=-1, keepdims=keepdims).astype(self.x.dtype)

    def neutralised(self, keep: Array | None) -> _Logits:
        """Replaces dropped rows by zero logits with every class in (the double-where trick).

        A dropped row (ignored, fully masked) may hold ``-inf``; its loss is discarded, but
        without this its discarded branch would still send NaN into the gradient.
        """
        if keep is None:
            return self
        row = keep[..., None]
        x = jnp.where(row, self.x, jnp.zeros((), self.x.dtype))
        mask = None if self.class_mask is None else self.class_mask | ~row
        return dataclasses.replace(self, x=x, class_mask=mask)


def _prepare(logits: ArrayLike, axis, where, name: str = "logits") -> _Logits:
    logits = _checks.as_floating(logits, name)
    layout = ClassLayout.of(axis, logits.ndim, name)
    class_mask, example_mask = _reduce.split_where(where, logits.shape, layout)
    keep = example_mask
    if class_mask is not None:
        has_class = jnp.any(class_mask, axis=-1)
        keep = has_class if keep is None else keep & has_class
    x = layout.to_last(_reduce.upcast(logits))
    if class_mask is not None:
        # Masked classes may hold anything (padding, NaN); -inf takes them out of every formula
        # and, unlike a mask applied after exp, keeps their gradient exactly zero.
        x = jnp.where(class_mask, x, jnp.full((), -jnp.inf, x.dtype))
    return _Logits(x, class_mask, keep, layout, logits.shape)


def _log_normalizer(x: Array, class_mask: Array | None) -> tuple[Array, Array]:
    """Returns ``(m, log_s)`` with ``logsumexp(x) = m + log_s``.

    ``m`` is the (masked) row maximum under ``stop_gradient`` (0 where not finite), so
    ``log_s >= 0`` and ``m - x_c >= 0``: losses are written as sums of these non-negative parts,
    which neither overflow nor cancel for logits near the dtype's limits.
    """
    if class_mask is None:
        m = jnp.max(x, axis=-1)
    else:
        m = jnp.max(x, axis=-1, where=class_mask, initial=-jnp.inf)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype)))
    e = jnp.exp(x - m[..., None])
    if class_mask is not None:
        e = jnp.where(class_mask, e, jnp.zeros((), e.dtype))
    return m, jnp.log(jnp.sum(e, axis=-1))


def _log_softmax(x: Array, m: Array, log_s: Array) -> Array:
    return (x - m[..., None]) - log_s[..., None]


def _z_term(z_loss, m: Array, log_s: Array) -> Array | float:
    if _checks.is_zero(z_loss):
        return 0.0
    return z_loss * jnp.square(m + log_s)


def _class_weight_vector(class_weights, lg: _Logits) -> Array | None:
    if class_weights is None:
        return None
    return _reduce.class_vector(class_weights, "class_weights", lg.num_classes, lg.x.dtype)


def _integer_labels(labels, lg: _Logits) -> Array:
    labels = _checks.as_integer(labels, "labels", _SOFT_LABELS_HINT)
    _checks.same_shape(
        labels,
        "labels",
        lg.batch_shape,
        f"`logits` {lg.shape} without the class axis {lg.layout.axes}",
    )
    return labels


def _hard_targets(
    lg: _Logits, labels, *, ignore_index=None, class_weights=None, sample_weights=None
):
    """Validated integer labels: ``(lg with dropped rows neutralised, safe labels, Examples)``."""
    labels = _integer_labels(labels, lg)
    info, y = _reduce.integer_examples(
        labels,
        lg.num_classes,
        lg.x.dtype,
        ignore_index=ignore_index,
        class_weights=class_weights,
        sample_weights=sample_weights,
        keep=lg.keep,
        class_mask=lg.class_mask,
    )
    may_drop = ignore_index is not None or lg.keep is not None
    return lg.neutralised(info.keep if may_drop else None), y, info


def _soft_targets(lg: _Logits, labels, sample_weights=None):
    """Validated probability targets: ``(lg, dropped rows neutralised; t (..., C); Examples)``."""
    labels = _checks.as_floating(labels, "labels")
    target = _checks.broadcastable(labels, "labels", lg.shape, "probabilities over `logits`")
    t = lg.layout.to_last(target.astype(lg.x.dtype))
    info = _reduce.examples(lg.batch_shape, lg.x.dtype, keep=lg.keep, sample_weights=sample_weights)
    return lg.neutralised(lg.keep), t, info


def _mean_neg_log_probs(lg: _Logits, m: Array, log_s: Array, weights: Array | None) -> Array:
    r"""``(1 / C) \sum_c w_c (-\log p_c)`` over the classes ``where`` leaves in.

    Each ``-log p_c = log_s + (m - x_c)`` is a sum of non-negative parts; dividing by ``C``
    before subtracting keeps ``(m - x_c) / C`` finite for logits near the dtype's limit.
    """
    per_row = lg.count(keepdims=True)
    gap = m[..., None] / per_row - lg.x / per_row
    present = None
    if weights is not None:
        present = jnp.broadcast_to(_reduce.along_classes(weights, gap), gap.shape)
        gap = gap * present
    if lg.class_mask is not None:
        gap = jnp.where(lg.class_mask, gap, jnp.zeros((), gap.dtype))
        if present is not None:
            present = jnp.where(lg.class_mask, present, jnp.zeros((), gap.dtype))
    mean_weight = 1.0 if present is None else jnp.sum(present, axis=-1) / lg.count()
    return mean_weight * log_s + jnp.sum(gap, axis=-1)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    reduction: str = "none",
):
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
    lg, y, info = _hard_targets(
        _prepare(logits, axis, where),
        labels,
        ignore_index=ignore_index,
        class_weights=class_weights,
        sample_weights=sample_weights,
    )
    m, log_s = _log_normalizer(lg.x, lg.class_mask)
    nll = log_s + (m - _reduce.take_class(lg.x, y))
    weights = _class_weight_vector(class_weights, lg)
    if weights is not None:
        nll = nll * weights[y]
    loss = nll
    if not _checks.is_zero(label_smoothing):
        smooth = _mean_neg_log_probs(lg, m, log_s, weights)
        loss = (1 - label_smoothing) * nll + label_smoothing * smooth
    loss = loss + _z_term(z_loss, m, log_s)
    return _reduce.finish(loss, info, reduction)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    reduction: str = "none",
):
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
    lg, t, info = _soft_targets(_prepare(logits, axis, where), labels, sample_weights)
    if not _checks.is_zero(label_smoothing):
        t = (1 - label_smoothing) * t + label_smoothing / lg.count(keepdims=True)
    m, log_s = _log_normalizer(lg.x, lg.class_mask)
    log_p = _log_softmax(lg.x, m, log_s)
    loss = -jnp.sum(
        _safe_product(t, log_p, lg.class_mask, _class_weight_vector(class_weights, lg)), axis=-1
    )
    loss = loss + _z_term(z_loss, m, log_s)
    return _reduce.finish(loss, info, reduction)


def _safe_product(t: Array, log_p: Array, class_mask: Array | None, weights=None) -> Array:
    """``w * t * log_p`` with ``0 * log 0 = 0`` and masked classes dropped, NaN-free gradients."""
    drop = (t == 0) & (log_p == -jnp.inf)
    if class_mask is not None:
        drop = drop | ~class_mask
    log_p = jnp.where(drop, jnp.zeros((), log_p.dtype), log_p)
    out = t * log_p
    if class_mask is not None:
        out = jnp.where(class_mask, out, jnp.zeros((), out.dtype))
    return out if weights is None else out * _reduce.along_classes(weights, out)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
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
    lg, y, info = _hard_targets(
        _prepare(log_probs, axis, None, name="log_probs"),
        labels,
        ignore_index=ignore_index,
        class_weights=class_weights,
        sample_weights=sample_weights,
    )
    loss = -_reduce.take_class(lg.x, y)
    weights = _class_weight_vector(class_weights, lg)
    if weights is not None:
        loss = loss * weights[y]
    return _reduce.finish(loss, info, reduction)


def smooth_labels(
    labels: ArrayLike,
    alpha: float,
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
      where: optional class mask broadcastable to ``labels``.

    Returns:
      Smoothed targets, ``labels``'s shape and dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> jaxce.smooth_labels(jnp.array([0.0, 1.0, 0.0, 0.0]), 0.2)
      Array([0.05, 0.85, 0.05, 0.05], dtype=float32)
    """
    labels = _checks.as_floating(labels, "labels")
    axes = _checks.class_axes(axis, labels.ndim, "labels")
    if where is None:
        count = 1
        for a in axes:
            count *= labels.shape[a]
    else:
        where = _checks.as_mask(where, "where")
        count = jnp.sum(where, axis=axes, keepdims=True)
    return ((1.0 - alpha) * labels + alpha / count).astype(labels.dtype)


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    epsilon: float = 2.0,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
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
    lg, t, info = _soft_targets(_prepare(logits, axis, where), labels, sample_weights)
    m, log_s = _log_normalizer(lg.x, lg.class_mask)
    log_p = _log_softmax(lg.x, m, log_s)
    ce = -jnp.sum(_safe_product(t, log_p, lg.class_mask), axis=-1)
    one_minus_p = -jnp.expm1(log_p)
    if lg.class_mask is not None:
        one_minus_p = jnp.where(lg.class_mask, one_minus_p, jnp.zeros((), t.dtype))
    return _reduce.finish(ce + epsilon * jnp.sum(t * one_minus_p, axis=-1), info, reduction)


def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: float | ArrayLike | None = None,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
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
    lg = _prepare(logits, axis, where)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        lg, y, info = _hard_targets(
            lg, labels, ignore_index=ignore_index, sample_weights=sample_weights
        )
        m, log_s = _log_normalizer(lg.x, lg.class_mask)
        log_p_y = (_reduce.take_class(lg.x, y) - m) - log_s
        loss = -_focal_factor(log_p_y, gamma) * log_p_y
        if alpha is not None:
            loss = loss * (_alpha(alpha, lg)[y] if jnp.ndim(alpha) else alpha)
        return _reduce.finish(loss, info, reduction)
    if ignore_index is not None:
        raise ValueError("`ignore_index` applies to integer labels only; got float `labels`.")
    lg, t, info = _soft_targets(lg, labels, sample_weights)
    m, log_s = _log_normalizer(lg.x, lg.class_mask)
    log_p = _log_softmax(lg.x, m, log_s)
    terms = _focal_factor(log_p, gamma) * _safe_product(t, log_p, lg.class_mask)
    if alpha is not None:
        terms = terms * (
            _reduce.along_classes(_alpha(alpha, lg), terms) if jnp.ndim(alpha) else alpha
        )
    return _reduce.finish(-jnp.sum(terms, axis=-1), info, reduction)


def _alpha(alpha, lg: _Logits) -> Array:
    return _reduce.class_vector(alpha, "alpha", lg.num_classes, lg.x.dtype)


def _focal_factor(log_p: Array, gamma) -> Array:
    """``(1 - p) ** gamma`` from ``log p``; zero gradient (exact) where ``p`` rounds to 1."""
    one_minus_p = -jnp.expm1(log_p)
    positive = one_minus_p > 0
    safe = jnp.where(positive, one_minus_p, jnp.ones((), log_p.dtype))
    factor = jnp.exp(gamma * jnp.log(safe))
    at_one = jnp.where(jnp.asarray(gamma) == 0, 1.0, 0.0).astype(log_p.dtype)
    return jnp.where(positive, factor, at_one)

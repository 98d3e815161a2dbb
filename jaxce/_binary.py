"""Elementwise binary losses: sigmoid cross-entropy, cross-entropy on probabilities, focal loss.

Every loss here is elementwise: an "example" is one element of ``logits``, ``labels`` have
(or broadcast to) the shape of ``logits``, and the weights, reductions and dtype policy are
``_reduce``'s. All logs are taken in log space with ``softplus``:
``-log sigmoid(x) = softplus(-x)`` and ``-log(1 - sigmoid(x)) = softplus(x)``, both
non-negative, so nothing cancels or overflows for logits up to the dtype's limit. A label
outside ``[0, 1]`` (or NaN) is invalid: NaN for its element, and an error under ``checkify``.
"""

from __future__ import annotations

from typing import Literal, TypeAlias, overload

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _numerics, _reduce
from jaxce._checks import NON_NEGATIVE, UNIT_INTERVAL, Reduction

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Loss: TypeAlias = Array | tuple[Array, Array]

_LOG_CLAMP = -100.0  # PyTorch's clamp of each log term in ``binary_cross_entropy``


def _in_unit_interval(values: Array, what: str) -> Array:
    """Where ``values`` leave ``[0, 1]`` (NaN included), with a ``checkify`` check."""
    bad = ~_checks.UNIT_INTERVAL.holds(values)
    _checks.value_check(~jnp.any(bad), f"{what} must lie in [0, 1].")
    return bad


def _binary_inputs(
    values: ArrayLike, labels: ArrayLike, name: str, sample_weights: ArrayLike | None
) -> tuple[Array, Array, _reduce.ExampleWeights]:
    """``(values upcast, labels in their dtype and shape, weights)``; invalid labels marked."""
    x = _reduce.upcast(_checks.as_floating(values, name))
    labels = jnp.asarray(labels)
    kinds = (jnp.floating, jnp.integer, jnp.bool_)
    if not any(jnp.issubdtype(labels.dtype, kind) for kind in kinds):
        raise TypeError(
            f"`labels` must have a floating, integer or bool dtype, got {labels.dtype}."
        )
    y = _checks.broadcastable(labels, "labels", x.shape, f"targets for `{name}`").astype(x.dtype)
    weights = _reduce.example_weights(x.shape, x.dtype, sample_weights=sample_weights)
    return x, y, weights.with_invalid(_in_unit_interval(y, "binary `labels`"))


def _sigmoid_ce(x: Array, y: Array, pos_weight: Array | None = None) -> Array:
    r"""``-(w y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))`` as two non-negative parts."""
    pos = y if pos_weight is None else pos_weight * y
    neg = 1 - y
    # softplus(+-x) = relu(+-x) + log1p(exp(-|x|)): one exp and one log1p for both terms.
    # A zero weight on an infinite relu is 0 (replaced before multiplying: no NaN gradient).
    # Both pieces split at x >= 0, so the derivative at x = 0 is softplus's (no tie).
    zero = jnp.zeros((), x.dtype)
    right = x >= 0
    below = jnp.where(right | (pos == 0), zero, -x)
    above = jnp.where(right & (neg != 0), x, zero)
    magnitude = jnp.where(right, x, -x)
    return pos * below + neg * above + (pos + neg) * jnp.log1p(jnp.exp(-magnitude))


@overload
def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(
    static=("reduction",), optional=("label_smoothing",), domains={"label_smoothing": UNIT_INTERVAL}
)
def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> Loss:
    r"""Binary cross-entropy on logits (optax's and PyTorch's ``BCEWithLogits``), elementwise.

    For a logit :math:`x`, target :math:`y \in [0, 1]` and positive-class weight :math:`w_+`:

    .. math::
      \ell = w_+\, y \,\operatorname{softplus}(-x) + (1 - y)\operatorname{softplus}(x)
           = -\big(w_+\, y \log\sigma(x) + (1 - y)\log(1 - \sigma(x))\big)

    With :math:`w_+ = 1` this is the stable ``max(x, 0) - x * y + log1p(exp(-|x|))``. Label
    smoothing :math:`\varepsilon` replaces :math:`y` by :math:`y (1 - \varepsilon) +
    \varepsilon / 2`. The loss is then multiplied by ``sample_weights``.

    Both terms are computed as non-negative ``softplus`` values, so logits up to the dtype's
    limit neither overflow nor cancel. At infinite logits a term with zero weight is exactly
    0 (no NaN, unlike optax and PyTorch): ``x = -inf, y = 0`` gives loss 0 and gradient 0.
    Where the exact loss is infinite (``x = -inf`` with :math:`y > 0`, or ``x = +inf`` with
    :math:`y < 1`) the loss is ``+inf`` and its gradient w.r.t. the logit is the finite limit
    :math:`\sigma(x)(1 - y + w_+ y) - w_+ y` (e.g. ``-1`` at ``x = -inf, y = 1``).

    The mean is the weighted mean :math:`\sum_i s_i \ell_i / \sum_i s_i` over elements
    (``sample_weights`` :math:`s`); PyTorch's ``weight`` with ``reduction="mean"`` is instead
    :math:`\operatorname{mean}(s \ell)` (``jaxce.pytorch`` keeps that).

    Args:
      logits: float array of any shape; half precision is computed in float32.
      labels: targets in ``[0, 1]`` (float, or integer/bool ``{0, 1}``), broadcastable to
        ``logits``.
      pos_weight: weight :math:`w_+` of the positive term, broadcastable to ``logits`` as in
        PyTorch (per class on the last axis: shape ``(C,)``; for ``(N, C, H, W)`` logits:
        ``(C, 1, 1)``).
      sample_weights: weights broadcastable to ``logits``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      reduction: ``"none"`` (per element), ``"sum"``, ``"mean"`` (weighted mean) or
        ``"sum_and_weight"`` (numerator and denominator of the mean).

    Returns:
      Per-element losses of ``logits``'s shape (``reduction="none"``) or a scalar; float32 for
      half-precision logits, else the logits' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.log(jnp.array([0.7, 0.2]) / jnp.array([0.3, 0.8]))  # sigmoid = (0.7, 0.2)
      >>> labels = jnp.array([1.0, 0.0])
      >>> jaxce.sigmoid_binary_cross_entropy(logits, labels)
      Array([0.3567, 0.2231], dtype=float32)
      >>> round(float(jaxce.sigmoid_binary_cross_entropy(logits, labels, reduction="mean")), 4)
      0.2899
      >>> jaxce.sigmoid_binary_cross_entropy(jnp.array([-jnp.inf, 1e30]), jnp.array([0.0, 1.0]))
      Array([0., 0.], dtype=float32)
    """
    x, y, weights = _binary_inputs(logits, labels, "logits", sample_weights)
    if not _checks.is_off(label_smoothing):
        eps, bad = _checks.hyperparameter(
            label_smoothing, "label_smoothing", x.dtype, UNIT_INTERVAL
        )
        y = y * (1 - eps) + eps / 2
        weights = weights.with_invalid(bad)
    pw = None
    if pos_weight is not None:
        pw = _checks.float_array_like(
            pos_weight, "pos_weight", x.shape, x.dtype, "a weight per element of `logits`"
        )
    return _reduce.weigh_and_reduce(_sigmoid_ce(x, y, pw), weights, reduction)


def _clamped_log(p: Array) -> Array:
    """``max(log p, -100)`` with a finite gradient: 0 where the clamp is active, including
    ``p = 0`` and probabilities below the dtype's smallest normal number (which count as 0).
    NaN stays NaN.
    """
    live = ~(p < jnp.finfo(p.dtype).tiny)
    log_p = jnp.log(jnp.where(live, p, jnp.ones((), p.dtype)))
    live = live & ~(log_p <= _LOG_CLAMP)
    return jnp.where(live, log_p, jnp.full((), _LOG_CLAMP, p.dtype))


@overload
def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("reduction",))
def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Binary cross-entropy on probabilities (PyTorch's ``binary_cross_entropy``), elementwise.

    .. math::
      \ell = -\big(y \max(\log p, -100) + (1 - y)\max(\log(1 - p), -100)\big)

    Each log term is clamped at ``-100`` as in PyTorch, so ``p = 0`` or ``p = 1`` gives a finite
    loss (at most 100). The gradient is that of this clamped function and is finite everywhere
    in ``[0, 1]``: a clamped term contributes 0 (PyTorch instead returns
    :math:`(p - y) / \max(p (1 - p), 10^{-12})`). Probabilities below the dtype's smallest normal
    number count as 0. A probability outside ``[0, 1]`` gives NaN for its element. Prefer
    :func:`sigmoid_binary_cross_entropy` on logits: it is exact where this one clamps.

    Args:
      probs: probabilities in ``[0, 1]``, float array of any shape.
      labels: targets in ``[0, 1]`` (float, or integer/bool), broadcastable to ``probs``.
      sample_weights: weights broadcastable to ``probs``.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-element losses of ``probs``'s shape or a scalar; float32 for half precision, else
      ``probs``'s dtype.

    Examples:
      Credit default: targets ``(1, 0)``, predicted default probabilities ``(0.7, 0.2)``
      (scikit-learn's ``log_loss`` and PyTorch's ``BCELoss`` give the same):

      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> probs, labels = jnp.array([0.7, 0.2]), jnp.array([1.0, 0.0])
      >>> jaxce.binary_cross_entropy(probs, labels)
      Array([0.3567, 0.2231], dtype=float32)
      >>> round(float(jaxce.binary_cross_entropy(probs, labels, reduction="mean")), 4)
      0.2899
      >>> jaxce.binary_cross_entropy(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]))
      Array([100.,   0.], dtype=float32)
    """
    p, y, weights = _binary_inputs(probs, labels, "probs", sample_weights)
    loss = y * -_clamped_log(p) + (1 - y) * -_clamped_log(1 - p)
    weights = weights.with_invalid(_in_unit_interval(p, "`probs`"))
    return _reduce.weigh_and_reduce(loss, weights, reduction)


def _log_pt_parts(x: Array, y: Array) -> tuple[Array, Array]:
    r"""``(log p_t, log(1 - p_t))`` of the true class, in log space, NaN-free.

    :math:`p_t = y\,\sigma(x) + (1 - y)\,\sigma(-x)`, each side a log-sigmoid plus a safe
    log of its weight.
    """
    log_y, log_not_y = _numerics.safe_log(y), _numerics.safe_log(1 - y)
    log_pt = _numerics.log_add_exp(log_y - jax.nn.softplus(-x), log_not_y - jax.nn.softplus(x))
    log_q = _numerics.log_add_exp(log_not_y - jax.nn.softplus(-x), log_y - jax.nn.softplus(x))
    return log_pt, log_q


@overload
def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | ArrayLike | None = None,
    gamma: float | ArrayLike = 2.0,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | ArrayLike | None = None,
    gamma: float | ArrayLike = 2.0,
    sample_weights: ArrayLike | None = None,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("reduction",), domains={"alpha": UNIT_INTERVAL, "gamma": NON_NEGATIVE})
def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: float | ArrayLike | None = None,
    gamma: float | ArrayLike = 2.0,
    sample_weights: ArrayLike | None = None,
    reduction: Reduction = "none",
) -> Loss:
    r"""Sigmoid focal loss (optax-compatible), elementwise.

    .. math::
      \ell = \alpha_t \, (1 - p_t)^\gamma \, \mathrm{BCE}(x, y), \qquad
      1 - p_t = (1 - y)\,\sigma(x) + y\,\sigma(-x), \qquad
      \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    with :math:`\mathrm{BCE}` as in :func:`sigmoid_binary_cross_entropy` and
    :math:`\alpha_t = 1` when ``alpha`` is ``None``. For hard labels this is
    :math:`-\alpha_t (1 - p_t)^\gamma \log p_t`; soft labels in ``[0, 1]`` use the same
    formula (as optax). The focal factor is :math:`\exp(\gamma \log(1 - p_t))` with
    :math:`\log(1 - p_t)` computed as a log-sum-exp of log-sigmoids, so it is accurate for
    confident predictions and finite, with finite gradients, for logits of ``+-1e30`` and
    ``+-inf`` (where :math:`1 - p_t = 0` the factor is 0, or 1 if :math:`\gamma = 0`).

    Args:
      logits: float array of any shape.
      labels: targets in ``[0, 1]`` (float, or integer/bool), broadcastable to ``logits``.
      alpha: balance :math:`\alpha \in [0, 1]` of positives against negatives (scalar or
        broadcastable to ``logits``), or ``None``.
      gamma: focusing parameter :math:`\gamma \ge 0`; ``gamma=0`` is (alpha-weighted) BCE.
      sample_weights: weights broadcastable to ``logits``.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-element losses of ``logits``'s shape or a scalar; float32 for half precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([2.0, -1.0])  # p = sigmoid(2) = 0.8808, sigmoid(-1) = 0.2689
      >>> jaxce.sigmoid_focal_loss(logits, jnp.array([1.0, 1.0]), gamma=2.0)
      Array([0.0018, 0.7019], dtype=float32)

    References:
      Lin et al., *Focal Loss for Dense Object Detection*, 2017.
    """
    x, y, weights = _binary_inputs(logits, labels, "logits", sample_weights)
    g, bad = _checks.hyperparameter(gamma, "gamma", x.dtype, NON_NEGATIVE)
    weights = weights.with_invalid(bad)
    log_pt, log_q = _log_pt_parts(x, y)
    factor = _numerics.focal_power(log_q, g)
    ce = _sigmoid_ce(x, y)
    # Where p_t underflows to 0 the factor is flat to working precision, while ce is huge or
    # infinite: its cotangent would overflow and meet a zero derivative (inf * 0 = NaN), so
    # the factor is held constant there, which changes no derivative that floats can hold.
    flat = jnp.exp(log_pt) == 0
    infinite = jnp.isinf(ce)
    factor = jnp.where(flat, jax.lax.stop_gradient(factor), factor)
    zero = jnp.zeros((), x.dtype)
    # The infinite branch needs a symbolic-zero tangent for the factor (0 * inf in jvp).
    loss = jnp.where(
        infinite, jax.lax.stop_gradient(factor) * ce, factor * jnp.where(infinite, zero, ce)
    )
    if alpha is not None:
        a, bad = _checks.hyperparameter(alpha, "alpha", x.dtype, UNIT_INTERVAL)
        a = _checks.broadcastable(a, "alpha", x.shape, "a balance per element of `logits`")
        weights = weights.with_invalid(bad)
        loss = (a * y + (1 - a) * (1 - y)) * loss
    return _reduce.weigh_and_reduce(loss, weights, reduction)

r"""PyTorch loss semantics in JAX: drop-in counterparts of ``torch.nn.functional`` losses.

Each function has the name, argument names, defaults, layouts and results of its
``torch.nn.functional`` namesake (to float32 tolerance), so porting a PyTorch loss is an
import change::

    # loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    loss = jaxce.pytorch.cross_entropy(logits, labels, ignore_index=-100)

They are thin layers over the core losses (class axis ``1``, PyTorch's argument names and
PyTorch's reductions). What differs from the core, on purpose, because PyTorch does it:

* ``reduction="mean"`` is the default, not ``"none"``;
* a weighted mean over no weight (every target ignored, or all-zero class weights) is ``NaN``
  rather than ``0``;
* for the binary losses ``"mean"`` is ``mean(weight * loss)`` over all elements, not
  the weighted mean ``sum(weight * loss) / sum(weight)``;
* ``kl_div`` is elementwise (no sum over a class axis) and offers ``"batchmean"``.

Bad *values* PyTorch rejects (a class index out of range, probabilities outside ``[0, 1]``)
raise here too when the arrays are concrete (eager calls). Under ``jax.jit`` values are not
known while tracing; the core's behaviour applies instead: an out-of-range class index gives a
``NaN`` loss for its example.

The loss modules (``CrossEntropyLoss``, ``NLLLoss``, ``BCELoss``, ``BCEWithLogitsLoss``,
``KLDivLoss``) take ``torch.nn``'s constructor arguments and are called as
``criterion(input, target)``; each is a JAX pytree (its ``weight``/``pos_weight`` arrays are
leaves, every other option static), so it can be closed over or passed through ``jax.jit``.

Signatures are ``torch.nn.functional``'s positionally, the deprecated ``size_average`` and
``reduce`` included. When either is not ``None``, ``reduction`` is ignored and derived as
PyTorch derives it (``reduce=False``: ``"none"``; otherwise ``size_average=False``: ``"sum"``;
otherwise ``"mean"``; a ``None`` counts as ``True``), with PyTorch's ``UserWarning``.

Errors, eagerly (concrete arrays), next to what PyTorch raises:

=====================================================  ==============  =====================
bad value                                              PyTorch         jaxce.pytorch
=====================================================  ==============  =====================
class index outside ``[0, C)``, not ``ignore_index``   IndexError      IndexError
``binary_cross_entropy`` input/target outside [0, 1]   RuntimeError    InvalidValueError
``label_smoothing > 1``                                RuntimeError    InvalidValueError
``label_smoothing < 0``                                (treated as 0)  InvalidValueError
unknown ``reduction``                                  ValueError      ValueError
shape mismatch, wrong ``weight`` length                Value/Runtime   ValueError
=====================================================  ==============  =====================

``InvalidValueError`` subclasses both ``ValueError`` and ``RuntimeError``. Under ``jax.jit``
values are unknown and nothing raises; the loss of an affected element is ``NaN``.

Half-precision inputs are computed in float32 and the loss comes back in float32 (PyTorch
returns the input's dtype); values agree to the tolerance of the input's dtype.
"""

from __future__ import annotations

import math
import warnings
from typing import TypeAlias, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _binary, _checks, _divergence, _numerics, _reduce, _softmax

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "InvalidValueError",
    "KLDivLoss",
    "NLLLoss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "kl_div",
    "nll_loss",
]

_REDUCTIONS = ("none", "mean", "sum")


# --------------------------------------------------------------------------------------------
# Argument checks (PyTorch names in the messages)


class InvalidValueError(ValueError, RuntimeError):
    """A value PyTorch rejects with ``RuntimeError``, raised eagerly (concrete arrays only).

    Both a ``ValueError`` (jaxce's convention for bad values) and a ``RuntimeError`` (what the
    ported PyTorch code may catch), so either ``except`` clause keeps working.
    """


def _legacy_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """PyTorch's mapping of the deprecated ``size_average``/``reduce`` onto ``reduction``.

    When either is given, ``reduction`` is ignored (as in PyTorch): both default to ``True``,
    ``reduce=False`` means ``"none"``, else ``size_average=False`` means ``"sum"``, else
    ``"mean"``. PyTorch warns with a ``UserWarning``, so this does too.
    """
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else bool(size_average)
    reduce = True if reduce is None else bool(reduce)
    legacy = ("mean" if size_average else "sum") if reduce else "none"
    warnings.warn(
        "`size_average` and `reduce` are deprecated (as in PyTorch); "
        f"pass reduction={legacy!r} instead.",
        UserWarning,
        stacklevel=3,
    )
    return legacy


def _is_concrete(*xs) -> bool:
    """True when no argument is a tracer: values are known and may be validated eagerly."""
    return not any(_checks.is_tracer(x) for x in xs)


def _reduction(reduction: str, allowed=_REDUCTIONS) -> str:
    if reduction not in allowed:
        raise ValueError(f"`reduction` must be one of {allowed}, got {reduction!r}.")
    return reduction


def _class_layout(input: Array) -> tuple[int, tuple[int, ...]]:
    """``(class_axis, target_shape)`` for PyTorch's ``(C)``, ``(N, C)``, ``(N, C, d1..dK)``."""
    if input.ndim == 0:
        raise ValueError(
            "`input` must have shape (C), (N, C) or (N, C, d1, ..., dK); got a scalar."
        )
    axis = 0 if input.ndim == 1 else 1
    if input.shape[axis] == 0:
        raise ValueError(f"`input` has shape {input.shape}: its class axis {axis} is empty.")
    return axis, input.shape[:1] + input.shape[2:] if axis else ()


def _class_indices(target: Array, input: Array, num_classes: int, ignore_index: int) -> Array:
    """Validates class-index targets: shape always, values when concrete (PyTorch raises)."""
    _, shape = _class_layout(input)
    if target.shape != shape:
        raise ValueError(
            f"`target` of class indices has shape {target.shape} but `input` {input.shape} "
            f"needs shape {shape} (`input` without its class axis)."
        )
    if jnp.issubdtype(target.dtype, jnp.unsignedinteger):
        target = target.astype(jnp.int32)  # so that a negative `ignore_index` compares exactly
    if _is_concrete(target):
        values = np.asarray(target)
        bad = (values != ignore_index) & ((values < 0) | (values >= num_classes))
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise IndexError(
                f"`target` holds class index {int(values[where])} at position {where}, outside "
                f"[0, {num_classes}) and not `ignore_index` ({ignore_index})."
            )
    return target


def _float_weight(weight, name: str, dtype) -> Array:
    """``weight`` as a floating array: a boolean mask, or a Python/NumPy scalar such as
    ``pos_weight=2``, is cast to ``dtype`` (the contract); other non-float arrays raise.
    """
    scalar = isinstance(weight, int | float | np.number)
    weight = jnp.asarray(weight)
    if weight.dtype == jnp.bool_ or (scalar and not jnp.issubdtype(weight.dtype, jnp.floating)):
        return weight.astype(dtype)
    return _checks.as_floating(weight, name)


def _class_weight(weight, num_classes: int, dtype) -> Array | None:
    if weight is None:
        return None
    weight = _float_weight(weight, "weight", dtype)
    _checks.same_shape(weight, "weight", (num_classes,), "one weight per class")
    return weight


def _label_smoothing(label_smoothing) -> None:
    if _is_concrete(label_smoothing) and not 0.0 <= float(label_smoothing) <= 1.0:
        # PyTorch raises RuntimeError above 1 (and ignores a negative value); jaxce rejects both.
        raise InvalidValueError(
            f"`label_smoothing` must lie in [0, 1], got {float(label_smoothing)}."
        )


def _mean(total: Array, denominator: Array) -> Array:
    """PyTorch's mean: ``total / denominator``, ``NaN`` (with zero gradient) when it is 0."""
    return _reduce.divide_or(total, denominator, jnp.nan)


def _elementwise_mean(total: Array, size: int) -> Array:
    """PyTorch's mean over elements: ``total / size`` (``NaN`` for an empty input)."""
    return total / jnp.asarray(size, total.dtype)


def _reduce_parts(parts, reduction: str):
    """Applies a PyTorch reduction to the core's ``reduction="sum_and_weight"`` output."""
    total, denominator = parts
    if reduction == "sum":
        return total
    return _mean(total, denominator)


# --------------------------------------------------------------------------------------------
# Softmax family


def cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Array:
    r"""Softmax cross-entropy with PyTorch's ``torch.nn.functional.cross_entropy`` semantics.

    Class-index targets (integer dtype), with class weights :math:`w` (ones if not given),
    smoothing :math:`\varepsilon`, :math:`C` classes and :math:`p = \operatorname{softmax}(x)`
    over the class axis:

    .. math::
      \ell_n = (1 - \varepsilon)\, w_{y_n} (-\log p_{n, y_n})
               + \frac{\varepsilon}{C} \sum_c w_c (-\log p_{n, c}),
      \qquad
      \text{mean} = \frac{\sum_{n:\, y_n \ne \text{ignore}} \ell_n}
                         {\sum_{n:\, y_n \ne \text{ignore}} w_{y_n}}

    with :math:`\ell_n = 0` for ignored targets. Probability targets (floating dtype, the
    shape of ``input``):

    .. math::
      \ell_n = -\sum_c w_c\, t_{n, c} \log p_{n, c},
      \quad t = (1 - \varepsilon)\,\text{target} + \varepsilon / C,
      \qquad \text{mean} = \frac{1}{N'} \sum_n \ell_n

    where :math:`N'` is the number of examples (``input.size / C``): class weights do not
    enter this denominator. The mean over no weight (every target ignored) is ``NaN``, as in
    PyTorch, with a zero gradient.

    Args:
      input: logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``; classes on axis 1
        (axis 0 for ``(C)``).
      target: class indices of shape ``()``, ``(N)`` or ``(N, d1, ..., dK)`` (any integer
        dtype), or probabilities of ``input``'s shape (floating dtype).
      weight: optional ``(C,)`` class weights.
      size_average: deprecated, as in PyTorch; see ``reduce``.
      ignore_index: class-index target value whose examples are dropped from the loss, the
        gradient and the mean's denominator. Probability targets accept only negative
        values (ignored), as in PyTorch.
      reduce: deprecated, as in PyTorch: if it or ``size_average`` is not ``None``,
        ``reduction`` is ignored and derived from them (see the module docstring), with a
        ``UserWarning``.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.

    Returns:
      ``reduction="none"``: per-example losses of ``input``'s shape without the class axis;
      otherwise a scalar. float32 for half-precision ``input``, else ``input``'s dtype.

    Raises:
      IndexError: eagerly (concrete ``target``), for a class index outside ``[0, C)`` that is
        not ``ignore_index``. Under ``jax.jit`` such an example's loss is ``NaN`` instead.
      InvalidValueError: (a ``ValueError`` and a ``RuntimeError``, as PyTorch raises) for a
        concrete ``label_smoothing`` outside ``[0, 1]``.
      ValueError: for shapes PyTorch rejects, a non-negative ``ignore_index`` with probability
        targets or an unknown ``reduction``.

    Differences from PyTorch: none in values. A negative ``label_smoothing`` raises here
    (PyTorch silently treats it as 0); if the class weights of every kept example are zero
    the mean is ``NaN`` with a zero gradient (PyTorch's gradient is ``NaN`` there).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> logits = jnp.array([[2.0, 0.5, 0.1], [0.1, 0.2, 0.9], [1.0, 1.0, 1.0]])
      >>> pytorch.cross_entropy(logits, jnp.array([0, 2, -100]))
      Array(0.4913, dtype=float32)
      >>> pytorch.cross_entropy(logits, jnp.array([0, 2, -100]), reduction="none")
      Array([0.3168, 0.6657, 0.    ], dtype=float32)
      >>> pytorch.cross_entropy(logits, jnp.array([-100, -100, -100]))
      Array(nan, dtype=float32)
      >>> pytorch.cross_entropy(logits, jnp.eye(3), weight=jnp.array([1.0, 2.0, 3.0]),
      ...                       label_smoothing=0.1)
      Array(2.1631, dtype=float32)
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    input = _checks.as_floating(input, "input")
    target = jnp.asarray(target)
    _reduction(reduction)
    _label_smoothing(label_smoothing)
    axis, _ = _class_layout(input)
    num_classes = input.shape[axis]
    weight = _class_weight(weight, num_classes, input.dtype)
    core_reduction = "none" if reduction == "none" else "sum_and_weight"
    if jnp.issubdtype(target.dtype, jnp.integer):
        target = _class_indices(target, input, num_classes, ignore_index)
        out = _softmax.softmax_cross_entropy_with_integer_labels(
            input,
            target,
            axis=axis,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            class_weights=weight,
            reduction=core_reduction,
        )
    elif jnp.issubdtype(target.dtype, jnp.floating):
        if target.shape != input.shape:
            raise ValueError(
                f"`target` of probabilities has shape {target.shape} but must have `input`'s "
                f"shape {input.shape}; class-index targets need an integer dtype."
            )
        if ignore_index >= 0:
            raise ValueError(
                f"`ignore_index` ({ignore_index}) is not supported with probability (floating) "
                "`target`s; leave it at its default or pass class indices."
            )
        out = _softmax.softmax_cross_entropy(
            input,
            target,
            axis=axis,
            label_smoothing=label_smoothing,
            class_weights=weight,
            reduction=core_reduction,
        )
    else:
        raise TypeError(
            f"`target` must hold class indices (integer dtype) or probabilities (floating "
            f"dtype), got {target.dtype}."
        )
    return out if reduction == "none" else _reduce_parts(out, reduction)  # type: ignore[return-value]


def nll_loss(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Array:
    r"""Negative log-likelihood with PyTorch's ``torch.nn.functional.nll_loss`` semantics.

    .. math::
      \ell_n = -w_{y_n}\, x_{n, y_n},
      \qquad
      \text{mean} = \frac{\sum_{n:\, y_n \ne \text{ignore}} \ell_n}
                         {\sum_{n:\, y_n \ne \text{ignore}} w_{y_n}}

    ``input`` holds log-probabilities :math:`x` and is used as given (not normalised). The
    mean over no weight (every target ignored) is ``NaN`` as in PyTorch, with zero gradient.

    Args:
      input: log-probabilities of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``.
      target: class indices (integer dtype) of shape ``()``, ``(N)`` or ``(N, d1, ..., dK)``.
      weight: optional ``(C,)`` class weights :math:`w`.
      size_average: deprecated, as in PyTorch; see ``reduce``.
      ignore_index: target value whose examples are dropped.
      reduce: deprecated, as in PyTorch: if it or ``size_average`` is not ``None``,
        ``reduction`` is ignored and derived from them (see the module docstring), with a
        ``UserWarning``.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Returns:
      Per-example losses (``"none"``, ``input``'s shape without the class axis) or a scalar.

    Raises:
      IndexError: eagerly, for a class index outside ``[0, C)`` that is not
        ``ignore_index`` (``NaN`` for that example under ``jax.jit``).
      TypeError: for a non-integer ``target``; ValueError: for mismatched shapes.

    Differences from PyTorch: none in values (see :func:`cross_entropy` for all-zero weights).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> log_probs = jax.nn.log_softmax(jnp.array([[2.0, 0.5, 0.1], [0.1, 0.2, 0.9]]))
      >>> pytorch.nll_loss(log_probs, jnp.array([0, 2]), weight=jnp.array([1.0, 1.0, 3.0]))
      Array(0.5785, dtype=float32)
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    input = _checks.as_floating(input, "input")
    target = _checks.as_integer(
        target, "target", " `nll_loss` takes class indices; for probabilities use `cross_entropy`."
    )
    _reduction(reduction)
    axis, _ = _class_layout(input)
    target = _class_indices(target, input, input.shape[axis], ignore_index)
    weight = _class_weight(weight, input.shape[axis], input.dtype)
    out = _softmax.nll_loss(
        input,
        target,
        axis=axis,
        ignore_index=ignore_index,
        class_weights=weight,
        reduction="none" if reduction == "none" else "sum_and_weight",
    )
    return out if reduction == "none" else _reduce_parts(out, reduction)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Binary family (elementwise)


def _same_shape_target(target: ArrayLike, input: Array) -> Array:
    target = jnp.asarray(target)
    if target.shape != input.shape:
        raise ValueError(
            f"`target` has shape {target.shape} but must have `input`'s shape {input.shape}."
        )
    return target


def _elementwise_weight(weight, name: str, input: Array) -> Array | None:
    """``weight`` broadcast to ``input``'s shape (PyTorch broadcasts it, never ``input``)."""
    if weight is None:
        return None
    weight = _float_weight(weight, name, input.dtype)
    return _checks.broadcastable(weight, name, input.shape, f"`input` {input.shape}")


def _binary_reduce(out, reduction: str, size: int):
    """``out`` is the core's ``"none"`` output or its ``"sum"`` (for ``"sum"``/``"mean"``)."""
    return _elementwise_mean(out, size) if reduction == "mean" else out


def binary_cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Array:
    r"""Binary cross-entropy on probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    Elementwise, with each log clamped at :math:`-100` as in PyTorch:

    .. math::
      \ell_i = -w_i \big(y_i \max(\log x_i, -100) + (1 - y_i) \max(\log(1 - x_i), -100)\big),
      \qquad \text{mean} = \frac{1}{n} \sum_{i=1}^{n} \ell_i

    over all :math:`n` elements: the mean of the weighted losses (PyTorch), not the weighted
    mean :math:`\sum_i \ell_i / \sum_i w_i` of :func:`jaxce.binary_cross_entropy`.

    Args:
      input: probabilities :math:`x \in [0, 1]`, any shape.
      target: targets :math:`y \in [0, 1]` of ``input``'s shape.
      weight: optional weights :math:`w` broadcastable to ``input``'s shape.
      size_average: deprecated, as in PyTorch; see ``reduce``.
      reduce: deprecated, as in PyTorch: if it or ``size_average`` is not ``None``,
        ``reduction`` is ignored and derived from them (see the module docstring), with a
        ``UserWarning``.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Returns:
      Per-element losses of ``input``'s shape (``"none"``) or a scalar.

    Raises:
      InvalidValueError: (a ``ValueError`` and a ``RuntimeError``, as PyTorch raises)
        eagerly (concrete arrays), when ``input`` or ``target`` has a value outside
        ``[0, 1]``, NaN included. Under ``jax.jit`` an ``input`` outside ``[0, 1]`` gives
        ``NaN`` for its element.
      ValueError: for mismatched shapes or an unknown ``reduction``.

    Differences from PyTorch: none in values. Gradients agree except where a log is clamped
    (:math:`x` within about :math:`e^{-100}` of 0 or 1): there a clamped term contributes a
    zero gradient, where PyTorch divides by :math:`\max(x (1 - x), 10^{-12})`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> probs, target = jnp.array([0.7, 0.2, 0.0]), jnp.array([1.0, 0.0, 1.0])
      >>> pytorch.binary_cross_entropy(probs, target, reduction="none")
      Array([  0.3567,   0.2231, 100.    ], dtype=float32)
      >>> pytorch.binary_cross_entropy(probs, target, weight=jnp.array([1.0, 2.0, 0.0]))
      Array(0.2677, dtype=float32)
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    input = _checks.as_floating(input, "input")
    target = _same_shape_target(target, input)
    _reduction(reduction)
    weight = _elementwise_weight(weight, "weight", input)
    for name, values in (("input", input), ("target", target)):
        if _is_concrete(values):
            values = np.asarray(values)
            if values.size and not ((values >= 0) & (values <= 1)).all():
                raise InvalidValueError(f"every element of `{name}` must lie in [0, 1].")
    out = _binary.binary_cross_entropy(
        input, target, sample_weights=weight, reduction="none" if reduction == "none" else "sum"
    )
    return _binary_reduce(out, reduction, input.size)


def binary_cross_entropy_with_logits(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
) -> Array:
    r"""Binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Elementwise, with :math:`\sigma` the logistic sigmoid and positive-class weight :math:`w_+`:

    .. math::
      \ell_i = -w_i \big(w_{+,i}\, y_i \log \sigma(x_i) + (1 - y_i) \log(1 - \sigma(x_i))\big),
      \qquad \text{mean} = \frac{1}{n} \sum_{i=1}^{n} \ell_i

    computed stably in log space (softplus), for logits of any size. As in PyTorch, this is
    :math:`(1 - y_i) x_i - (1 + (w_{+,i} - 1) y_i) \log \sigma(x_i)` for every real target,
    in value and gradient (targets and weights included).

    Args:
      input: logits :math:`x`, any shape.
      target: targets :math:`y` of ``input``'s shape: probabilities, or any real number
        (PyTorch evaluates the formula for every target, e.g. its own tests' ``randn``
        targets; the core :func:`jaxce.sigmoid_binary_cross_entropy` instead gives NaN
        outside ``[0, 1]``).
      weight: optional weights :math:`w` broadcastable to ``input``'s shape.
      size_average: deprecated, as in PyTorch; see ``reduce``.
      reduce: deprecated, as in PyTorch: if it or ``size_average`` is not ``None``,
        ``reduction`` is ignored and derived from them (see the module docstring), with a
        ``UserWarning``.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      pos_weight: optional :math:`w_+` broadcastable to ``input``'s shape: per class on the
        last axis, shape ``(C,)``; for ``(N, C, H, W)`` inputs, ``(C, 1, 1)``.

    Returns:
      Per-element losses of ``input``'s shape (``"none"``) or a scalar.

    Raises:
      ValueError: for mismatched shapes or an unknown ``reduction``.

    Differences from PyTorch: none in values. At infinite logits a term with zero weight is
    exactly 0 (PyTorch gives NaN there).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> logits = jnp.array([[0.8, -1.2, 2.0], [0.1, 0.4, -0.3]])
      >>> target = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
      >>> pytorch.binary_cross_entropy_with_logits(logits, target)
      Array(0.4288, dtype=float32)
      >>> pytorch.binary_cross_entropy_with_logits(logits, target,
      ...                                          pos_weight=jnp.array([1.0, 3.0, 0.5]))
      Array(0.5893, dtype=float32)
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    input = _checks.as_floating(input, "input")
    target = _same_shape_target(target, input)
    _reduction(reduction)
    weight = _elementwise_weight(weight, "weight", input)
    x = _reduce.upcast(input)
    if not any(jnp.issubdtype(target.dtype, k) for k in (jnp.floating, jnp.integer, jnp.bool_)):
        raise TypeError(
            f"`target` must have a floating, integer or bool dtype, got {target.dtype}."
        )
    y = target.astype(x.dtype)
    positive = y
    if pos_weight is not None:
        pos_weight = _float_weight(pos_weight, "pos_weight", input.dtype)
        positive = y * _checks.float_array_like(
            pos_weight, "pos_weight", x.shape, x.dtype, "a weight per element of `input`"
        )
    # PyTorch's formula for any real target (the core marks targets outside [0, 1] invalid):
    # (1 - y) x - (1 + (w+ - 1) y) log sigmoid(x) = w+ y softplus(-x) + (1 - y) softplus(x).
    loss = _numerics.weighted_softplus(positive, -x) + _numerics.weighted_softplus(1 - y, x)
    weights = _reduce.example_weights(x.shape, x.dtype, sample_weights=weight)
    out = _reduce.weigh_and_reduce(loss, weights, "none" if reduction == "none" else "sum")
    return _binary_reduce(cast(Array, out), reduction, input.size)


# --------------------------------------------------------------------------------------------
# Kullback-Leibler divergence (elementwise)


def kl_div(
    input: ArrayLike,
    target: ArrayLike,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> Array:
    r"""Pointwise Kullback-Leibler divergence, as ``torch.nn.functional.kl_div``.

    ``input`` holds log-probabilities :math:`\log q`, ``target`` probabilities :math:`p` (or
    :math:`\log p` with ``log_target=True``). Elementwise, with :math:`0 \log 0 = 0`:

    .. math::
      \ell_i = p_i \big(\log p_i - \log q_i\big),
      \qquad
      \text{batchmean} = \frac{1}{N} \sum_i \ell_i,
      \qquad
      \text{mean} = \frac{1}{n} \sum_i \ell_i

    where :math:`N` is ``input.shape[0]`` (1 for a scalar ``input``) and :math:`n` the number of
    elements. ``"batchmean"`` is the KL divergence per example, :math:`KL(p \| q)` averaged
    over the batch (what the mathematics means); PyTorch's ``"mean"`` also divides by the
    number of classes.

    Args:
      input: log-probabilities :math:`\log q`, any shape (PyTorch's ``(N, *)``).
      target: :math:`p` (or :math:`\log p`), broadcastable with ``input``.
      size_average: deprecated, as in PyTorch; see ``reduce``.
      reduce: deprecated, as in PyTorch: if it or ``size_average`` is not ``None``,
        ``reduction`` is ignored and derived from them (see the module docstring), with a
        ``UserWarning``.
      reduction: ``"none"``, ``"batchmean"``, ``"sum"`` or ``"mean"``.
      log_target: whether ``target`` holds :math:`\log p`.

    Returns:
      Per-element values of the broadcast shape of ``input`` and ``target`` (``"none"``) or a
      scalar.

    Differences from PyTorch: none for finite inputs. A negative target gives NaN for its
    element, as in PyTorch. Where PyTorch gives NaN for a zero target (or a ``-inf`` log
    target) next to a ``-inf`` ``input``, this follows the core's :math:`0 \log 0 = 0` and
    gives 0. PyTorch warns that ``"mean"`` is not the KL divergence; this does not. An
    element, or a reduced total, within the rounding error of its terms is exactly 0 (value
    only), so two arrays of one distribution, e.g. ``log_softmax(s)`` and ``softmax(s)``,
    give 0.0 where PyTorch gives a rounding residue (``-6e-8`` summed over 64 x 1000).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> p = jnp.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
      >>> log_q = jnp.log(jnp.array([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]]))
      >>> pytorch.kl_div(log_q, p, reduction="batchmean")
      Array(0.4332, dtype=float32)
      >>> pytorch.kl_div(log_q[1], jnp.log(p[1]), reduction="none", log_target=True)
      Array([-0.1733,  0.    ,  0.3466], dtype=float32)
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _reduction(reduction, _REDUCTIONS + ("batchmean",))
    input = _checks.as_floating(input, "input")
    target = _checks.as_floating(target, "target")
    try:
        shape = np.broadcast_shapes(input.shape, target.shape)
    except ValueError:
        raise ValueError(
            f"`input` {input.shape} and `target` {target.shape} do not broadcast together."
        ) from None
    batch = input.shape[0] if input.ndim else 1
    # A trailing class axis of size 1 makes the core's per-example KL the pointwise term.
    input = jnp.broadcast_to(input, shape)[..., None]
    target = jnp.broadcast_to(target, shape)[..., None]
    kl = _divergence.kl_divergence_with_log_targets if log_target else _divergence.kl_divergence
    out = kl(input, target, axis=-1, reduction="none" if reduction == "none" else "sum")
    if reduction != "none":
        # Each element within rounding of 0 is 0 already; so is a total within the rounding of
        # its terms (two copies of one distribution sum to exactly 0, never to -2e-8).
        log_q, t = _reduce.upcast(input).ravel(), _reduce.upcast(target).ravel()
        log_p = t if log_target else _numerics.safe_log(t)
        p = jnp.exp(t) if log_target else t
        eps = float(jnp.finfo(out.dtype).eps)
        bound = _numerics.rounding_bound(p, log_p, log_q, _numerics.support(p), eps)
        out = _numerics.zero_within(out, bound)
    if reduction == "mean":
        return _elementwise_mean(out, math.prod(shape))
    if reduction == "batchmean":
        return _elementwise_mean(out, batch)
    return out


# --------------------------------------------------------------------------------------------
# Loss modules: torch.nn's constructors, JAX pytrees


class _Loss:
    """Base of the loss modules: a pytree of its array options, the rest static.

    Subclasses list their array attributes in ``_arrays`` (pytree leaves; ``None`` when not
    given) and the others in ``_static`` (hashable aux data, part of a jit cache key).
    """

    _arrays: tuple[str, ...] = ()
    _static: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(cls, cls._flatten, cls._unflatten)

    def _flatten(self):
        return [getattr(self, n) for n in self._arrays], tuple(
            getattr(self, n) for n in self._static
        )

    @classmethod
    def _unflatten(cls, static, arrays):
        loss = object.__new__(cls)
        for name, value in zip(cls._arrays + cls._static, tuple(arrays) + static, strict=True):
            setattr(loss, name, value)
        return loss

    def __call__(self, input: ArrayLike, target: ArrayLike) -> Array:
        return self.forward(input, target)

    def forward(self, input: ArrayLike, target: ArrayLike) -> Array:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._static)
        return f"{type(self).__name__}({options})"


def _array_or_none(x) -> Array | None:
    return None if x is None else jnp.asarray(x)


class CrossEntropyLoss(_Loss):
    r"""``torch.nn.CrossEntropyLoss``: :func:`cross_entropy` with options fixed at construction.

    .. math::
      \ell_n = (1 - \varepsilon)\, w_{y_n} (-\log p_{n, y_n})
               + \frac{\varepsilon}{C} \sum_c w_c (-\log p_{n, c}),
      \qquad p = \operatorname{softmax}(\text{input}) \text{ over axis 1}

    A JAX pytree: ``weight`` is a leaf (traced when the module is passed into a jitted
    function, differentiable), ``ignore_index``, ``reduction`` and ``label_smoothing`` are
    static aux data.

    Args:
      weight: optional ``(C,)`` class weights.
      size_average: deprecated, as in PyTorch (see :func:`cross_entropy`).
      ignore_index: class index whose targets are dropped.
      reduce: deprecated, as in PyTorch.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.

    Calling ``criterion(input, target)`` returns :func:`cross_entropy`'s result: per-example
    losses of ``input``'s shape without axis 1 (``"none"``) or a scalar, float32 for
    half-precision ``input``, else ``input``'s dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> criterion = pytorch.CrossEntropyLoss(weight=jnp.array([1.0, 2.0, 1.0]))
      >>> logits = jnp.array([[2.0, 0.5, 0.1], [0.1, 0.2, 0.9]])
      >>> criterion(logits, jnp.array([0, 2]))
      Array(0.4913, dtype=float32)
      >>> jax.jit(lambda c, x: c(x, jnp.array([0, 2])))(criterion, logits)
      Array(0.4913, dtype=float32)
    """

    _arrays = ("weight",)
    _static = ("ignore_index", "reduction", "label_smoothing")

    def __init__(
        self,
        weight: ArrayLike | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        self.weight = _array_or_none(weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing

    def forward(self, input: ArrayLike, target: ArrayLike) -> Array:
        """The loss of ``input`` against ``target``, as torch's ``forward``."""
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class NLLLoss(_Loss):
    r"""``torch.nn.NLLLoss``: :func:`nll_loss` with options fixed at construction.

    .. math::
      \ell_n = -w_{y_n}\, x_{n, y_n}

    A JAX pytree: ``weight`` is a leaf, ``ignore_index`` and ``reduction`` static aux data.

    Args:
      weight: optional ``(C,)`` class weights :math:`w`.
      size_average: deprecated, as in PyTorch (see :func:`nll_loss`).
      ignore_index: class index whose targets are dropped.
      reduce: deprecated, as in PyTorch.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Calling ``criterion(input, target)`` (log-probabilities, class indices) returns
    :func:`nll_loss`'s result.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> log_probs = jax.nn.log_softmax(jnp.array([[2.0, 0.5, 0.1], [0.1, 0.2, 0.9]]))
      >>> pytorch.NLLLoss(reduction="sum")(log_probs, jnp.array([0, 2]))
      Array(0.9825, dtype=float32)
    """

    _arrays = ("weight",)
    _static = ("ignore_index", "reduction")

    def __init__(
        self,
        weight: ArrayLike | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        self.weight = _array_or_none(weight)
        self.ignore_index = ignore_index
        self.reduction = _legacy_reduction(size_average, reduce, reduction)

    def forward(self, input: ArrayLike, target: ArrayLike) -> Array:
        """The loss of ``input`` against ``target``, as torch's ``forward``."""
        return nll_loss(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction
        )


class BCELoss(_Loss):
    r"""``torch.nn.BCELoss``: :func:`binary_cross_entropy` with options fixed at construction.

    .. math::
      \ell_i = -w_i \big(y_i \max(\log x_i, -100) + (1 - y_i) \max(\log(1 - x_i), -100)\big)

    A JAX pytree: ``weight`` is a leaf, ``reduction`` static aux data.

    Args:
      weight: optional weights broadcastable to ``input``'s shape.
      size_average: deprecated, as in PyTorch (see :func:`binary_cross_entropy`).
      reduce: deprecated, as in PyTorch.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Calling ``criterion(input, target)`` (probabilities, targets) returns
    :func:`binary_cross_entropy`'s result; it raises :class:`InvalidValueError` eagerly for
    concrete values outside ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> pytorch.BCELoss()(jnp.array([0.7, 0.2]), jnp.array([1.0, 0.0]))
      Array(0.2899, dtype=float32)
    """

    _arrays = ("weight",)
    _static = ("reduction",)

    def __init__(
        self,
        weight: ArrayLike | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
    ) -> None:
        self.weight = _array_or_none(weight)
        self.reduction = _legacy_reduction(size_average, reduce, reduction)

    def forward(self, input: ArrayLike, target: ArrayLike) -> Array:
        """The loss of ``input`` against ``target``, as torch's ``forward``."""
        return binary_cross_entropy(input, target, self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    r"""``torch.nn.BCEWithLogitsLoss``: :func:`binary_cross_entropy_with_logits`, options fixed.

    .. math::
      \ell_i = -w_i \big(w_{+,i}\, y_i \log \sigma(x_i) + (1 - y_i) \log(1 - \sigma(x_i))\big)

    A JAX pytree: ``weight`` and ``pos_weight`` are leaves, ``reduction`` static aux data.

    Args:
      weight: optional weights broadcastable to ``input``'s shape.
      size_average: deprecated, as in PyTorch (see :func:`binary_cross_entropy_with_logits`).
      reduce: deprecated, as in PyTorch.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      pos_weight: optional positive-class weights :math:`w_+` broadcastable to ``input``.

    Calling ``criterion(input, target)`` (logits, targets) returns
    :func:`binary_cross_entropy_with_logits`'s result.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> criterion = pytorch.BCEWithLogitsLoss(pos_weight=jnp.array([3.0, 1.0]))
      >>> criterion(jnp.array([[0.8, -1.2]]), jnp.array([[1.0, 0.0]]))
      Array(0.6883, dtype=float32)
    """

    _arrays = ("weight", "pos_weight")
    _static = ("reduction",)

    def __init__(
        self,
        weight: ArrayLike | None = None,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        pos_weight: ArrayLike | None = None,
    ) -> None:
        self.weight = _array_or_none(weight)
        self.pos_weight = _array_or_none(pos_weight)
        self.reduction = _legacy_reduction(size_average, reduce, reduction)

    def forward(self, input: ArrayLike, target: ArrayLike) -> Array:
        """The loss of ``input`` against ``target``, as torch's ``forward``."""
        return binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


class KLDivLoss(_Loss):
    r"""``torch.nn.KLDivLoss``: :func:`kl_div` with options fixed at construction.

    .. math::
      \ell_i = p_i \big(\log p_i - \log q_i\big)

    A JAX pytree with no leaves: ``reduction`` and ``log_target`` are static aux data.

    Args:
      size_average: deprecated, as in PyTorch (see :func:`kl_div`).
      reduce: deprecated, as in PyTorch.
      reduction: ``"none"``, ``"batchmean"``, ``"sum"`` or ``"mean"``.
      log_target: whether ``target`` holds :math:`\log p`.

    Calling ``criterion(input, target)`` (:math:`\log q`, :math:`p`) returns :func:`kl_div`'s
    result.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxce import pytorch
      >>> p = jnp.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
      >>> log_q = jnp.log(jnp.array([[0.25, 0.25, 0.5], [0.5, 0.25, 0.25]]))
      >>> pytorch.KLDivLoss(reduction="batchmean")(log_q, p)
      Array(0.4332, dtype=float32)
    """

    _static = ("reduction", "log_target")

    def __init__(
        self,
        size_average: bool | None = None,
        reduce: bool | None = None,
        reduction: str = "mean",
        log_target: bool = False,
    ) -> None:
        self.reduction = _legacy_reduction(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input: ArrayLike, target: ArrayLike) -> Array:
        """The loss of ``input`` against ``target``, as torch's ``forward``."""
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)

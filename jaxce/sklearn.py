r"""scikit-learn metric semantics in JAX: a drop-in ``log_loss``.

``jaxce.sklearn.log_loss`` gives ``sklearn.metrics.log_loss``'s results (scikit-learn 1.9) as a
differentiable, jit-compatible JAX function::

    # from sklearn.metrics import log_loss
    from jaxce.sklearn import log_loss

scikit-learn is not needed (nor imported) at run time.
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

__all__ = ["log_loss"]


def _is_concrete(*xs) -> bool:
    return not any(_checks.is_tracer(x) for x in xs)


def _classes(y_true: Array, labels, num_columns: int) -> np.ndarray:
    """The sorted class values the columns of ``y_proba`` stand for (a static NumPy array).

    ``labels`` if given (sorted, as scikit-learn's ``LabelBinarizer`` sorts them); else the
    distinct values of a concrete ``y_true`` (scikit-learn's inference); else, under ``jit``,
    ``0 .. C - 1``.
    """
    if labels is not None:
        given = np.asarray(labels)
        classes = np.unique(given)
        if given.shape != classes.shape or not (given == classes).all():
            warnings.warn(
                f"`labels` {given.tolist()} are not sorted; as in scikit-learn, the columns of "
                f"`y_proba` are taken to follow the sorted labels {classes.tolist()}.",
                UserWarning,
                stacklevel=3,
            )
    elif _is_concrete(y_true):
        classes = np.unique(np.asarray(y_true))
    else:
        return np.arange(num_columns)
    if classes.size < 2:
        raise ValueError(
            f"`log_loss` needs at least two classes, got {classes.tolist()}"
            + ("" if labels is not None else " in `y_true`; pass them all through `labels`")
            + "."
        )
    if classes.size != num_columns:
        source = "`labels`" if labels is not None else "`y_true`"
        raise ValueError(
            f"{source} has {classes.size} classes {classes.tolist()} but `y_proba` has "
            f"{num_columns} columns; pass every class through `labels`."
        )
    return classes


def _one_hot(y_true: Array, classes: np.ndarray, dtype) -> Array:
    """``(N, C)`` indicator of ``y_true``'s class; a row of NaN for a value not in ``classes``."""
    if _is_concrete(y_true):
        unknown = np.setdiff1d(np.asarray(y_true), classes)
        if unknown.size:
            raise ValueError(
                f"`y_true` holds {unknown.tolist()}, not among the classes {classes.tolist()}."
            )
    # A comparison with each (distinct, static) class rather than a search and a gather: it
    # is elementwise, so it stays with the examples on any mesh.
    hit = y_true[:, None] == jnp.asarray(classes)[None, :]
    known = jnp.any(hit, axis=1, keepdims=True)
    return jnp.where(known, hit.astype(dtype), jnp.full((), jnp.nan, dtype))


def _check_probabilities(y_proba: Array) -> None:
    """Eager checks scikit-learn makes: values in ``[0, 1]`` (raise), rows summing to 1 (warn)."""
    if not _is_concrete(y_proba) or y_proba.size == 0:
        return
    values = np.asarray(y_proba, np.float64)
    if np.nanmax(values, initial=0.0) > 1 or np.nanmin(values, initial=1.0) < 0:
        raise ValueError("`y_proba` holds values outside [0, 1].")
    rtol = np.sqrt(np.finfo(np.asarray(y_proba).dtype).eps)
    sums = values.sum(axis=1)
    if not np.isclose(sums[~np.isnan(sums)], 1.0, rtol=rtol, atol=0.0).all():
        warnings.warn(
            "The rows of `y_proba` do not sum to one; they are used as given (as in "
            "scikit-learn). Make sure to pass probabilities.",
            UserWarning,
            stacklevel=3,
        )


def log_loss(
    y_true: ArrayLike,
    y_proba: ArrayLike,
    *,
    normalize: bool = True,
    sample_weight: ArrayLike | None = None,
    labels: Sequence[int] | None = None,
) -> Array:
    r"""Log loss (cross-entropy of a classifier's probabilities), as ``sklearn.metrics.log_loss``.

    With :math:`T` the one-hot encoding of ``y_true`` over the classes, :math:`P` the
    probabilities clipped to :math:`[\epsilon, 1 - \epsilon]` (:math:`\epsilon` the machine
    epsilon of ``y_proba``'s compute dtype) and sample weights :math:`w` (ones by default):

    .. math::
      \ell_n = -\sum_c T_{n c} \log P_{n c},
      \qquad
      \text{normalize=True: } \frac{\sum_n w_n \ell_n}{\sum_n w_n},
      \qquad
      \text{normalize=False: } \sum_n w_n \ell_n

    A 1-D ``y_proba`` is the probability of the positive (larger) class, used as the columns
    ``[1 - p, p]``. Rows that do not sum to 1 are used as given, as current scikit-learn does
    (it warns; so does this function on concrete arrays, never under ``jit``).

    Classes: the columns of ``y_proba`` follow the sorted ``labels`` when given. Otherwise, on
    a concrete ``y_true``, its distinct values (scikit-learn's inference: ``y_true = [3, 7]``
    makes class 3 column 0); under ``jit`` (traced ``y_true``), ``0, ..., C - 1``. Pass
    ``labels`` for classes that ``y_true`` lacks, or for class values other than
    ``0 .. C - 1`` under ``jit``.

    Under ``jax.jit``, ``normalize`` and ``labels`` must be static (``labels`` a tuple of
    ints); ``y_true``, ``y_proba`` and ``sample_weight`` may be traced. Differentiable with
    respect to ``y_proba`` (zero gradient where clipped) and ``sample_weight``.

    Args:
      y_true: integer class labels ``(N,)``, or an ``(N, C)`` 0/1 indicator matrix (used as
        :math:`T` directly, as scikit-learn does).
      y_proba: probabilities ``(N, C)``, or ``(N,)`` for the positive class (integer or
        boolean 0/1 predictions are converted to the default float dtype: float64, as in
        scikit-learn, only with ``jax_enable_x64``; its epsilon sets the clipping).
      normalize: the weighted mean if ``True``, else the weighted sum.
      sample_weight: optional weights ``(N,)``; boolean masks are cast.
      labels: optional class values (static), e.g. ``(0, 1, 2)`` when ``y_true`` lacks 2.

    Returns:
      A scalar in ``y_proba``'s dtype (float32 for half precision). scikit-learn returns a
      Python float; call ``float()`` on this for one. ``NaN`` when the weights sum to 0 with
      ``normalize=True`` (scikit-learn raises) and for an empty batch; ``NaN`` probabilities
      give ``NaN`` (scikit-learn raises); under ``jit`` a ``y_true`` value outside the
      classes, or a row of ``y_proba`` with a value outside ``[0, 1]``, gives ``NaN`` (not a
      clipped finite loss; under ``jax.experimental.checkify`` with user checks the latter
      raises). A zero ``sample_weight`` masks its row, NaN included (jaxce's rule).

    Raises:
      ValueError: eagerly (concrete arrays), as scikit-learn: ``y_proba`` outside ``[0, 1]``,
        fewer than two classes, a class count that does not match ``y_proba``'s columns, or
        a ``y_true`` value not among ``labels``. Also for mismatched shapes (any time).

    Examples:
      The credit-default example: targets ``(1, 0)``, probabilities of default
      ``(0.7, 0.2)``.

      >>> import jax.numpy as jnp
      >>> from jaxce.sklearn import log_loss
      >>> print(round(float(log_loss([1, 0], [[0.3, 0.7], [0.8, 0.2]])), 6))
      0.289909
      >>> print(round(float(log_loss(jnp.array([1, 0]), jnp.array([0.7, 0.2]))), 6))
      0.289909
      >>> print(round(float(log_loss([0, 1], [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]],
      ...                            labels=(0, 1, 2), normalize=False)), 4))
      0.462
    """
    y_proba = jnp.asarray(y_proba)
    if jnp.issubdtype(y_proba.dtype, jnp.integer) or y_proba.dtype == jnp.bool_:
        # scikit-learn converts 0/1 predictions to floats; so does this (default float dtype).
        y_proba = y_proba.astype(jnp.result_type(float))
    y_proba = _checks.as_floating(y_proba, "y_proba")
    dtype = _reduce.compute_dtype(y_proba.dtype)
    y_proba = y_proba.astype(dtype)
    if y_proba.ndim not in (1, 2):
        raise ValueError(f"`y_proba` must have shape (N,) or (N, C), got {y_proba.shape}.")
    if y_proba.ndim == 1:
        y_proba = jnp.stack([1 - y_proba, y_proba], axis=1)
    _check_probabilities(y_proba)
    num_examples, num_columns = y_proba.shape
    y_true = jnp.asarray(y_true)
    if y_true.shape == y_proba.shape and labels is None:
        target = y_true.astype(dtype)  # an indicator matrix, used as the one-hot encoding
    else:
        if y_true.dtype == jnp.bool_:
            y_true = y_true.astype(jnp.int32)
        y_true = _checks.as_integer(
            y_true, "y_true", " `log_loss` takes integer class labels or an indicator matrix."
        )
        _checks.same_shape(y_true, "y_true", (num_examples,), "one label per row of `y_proba`")
        labels = None if labels is None else tuple(labels)
        target = _one_hot(y_true, _classes(y_true, labels, num_columns), dtype)
    eps = jnp.finfo(dtype).eps
    # A plain product, not xlogy: the clipped log is finite, and 0 * NaN must stay NaN.
    loss = -jnp.sum(target * jnp.log(jnp.clip(y_proba, eps, 1 - eps)), axis=1)
    # Under jit (eagerly it raised above): a row with a probability outside [0, 1] is NaN
    # rather than clipped to a finite loss, as `binary_cross_entropy`'s probabilities.
    outside = ~_checks.UNIT_INTERVAL.holds(y_proba) & ~jnp.isnan(y_proba)
    _checks.value_check(~jnp.any(outside), "`y_proba` must lie in [0, 1].")
    loss = jnp.where(jnp.any(outside, axis=1), jnp.full((), jnp.nan, dtype), loss)
    if sample_weight is None:
        weight = jnp.ones((num_examples,), dtype)
    else:
        weight = jnp.asarray(sample_weight)
        weight = weight.astype(dtype) if weight.dtype == jnp.bool_ else weight
        weight = _checks.as_floating(weight, "sample_weight").astype(dtype)
        _checks.same_shape(weight, "sample_weight", (num_examples,), "one weight per example")
    # A zero weight masks its row (the contract's rule): select before multiplying, so that a
    # NaN row it excludes is dropped rather than turned into 0 * NaN.
    total = jnp.sum(jnp.where(weight == 0, jnp.zeros((), dtype), weight * loss))
    return total / jnp.sum(weight) if normalize else total

"""Float64 NumPy references written from the formulas in the docstrings.

Only NumPy: nothing here calls jaxce (a reference that shared code with the library could not
catch its bugs) or JAX. The JAX-side test machinery (gradient checks, tolerances, shared
inputs) lives in ``helpers.py``.
"""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-softmax over the last axis, masked classes excluded (set to -inf)."""
    x = np.asarray(x, np.float64)
    if mask is not None:
        x = np.where(mask, x, -np.inf)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def xlogy(t: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """t * logp with 0 * log 0 = 0."""
    with np.errstate(invalid="ignore"):
        return np.where(t == 0, 0.0, t * logp)


def weighted_reduce(loss: np.ndarray, weight: np.ndarray, reduction: str):
    """Reference reductions: loss already carries its weight; mean = sum(loss) / sum(weight)."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    total, denom = loss.sum(), np.sum(weight)
    if reduction == "sum_and_weight":
        return total, denom
    return total / denom if denom != 0 else 0.0

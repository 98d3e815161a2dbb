"""Float64 NumPy references written from the formulas in the docstrings, and test helpers.

Nothing here calls jaxce: a reference that shared code with the library could not catch its
bugs.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.test_util import check_grads


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


def check_grads_2(f, args, eps=1e-4, atol=1e-5, rtol=1e-5):
    """``check_grads`` to order 2 in forward and reverse mode, in float64.

    ``args`` are NumPy arrays; they are converted to float64 JAX arrays inside ``enable_x64``.
    ``f`` is jitted first: differentiating a jitted function compiles each derivative once,
    where eager evaluation would compile every primitive separately (minutes per test on CI).
    """
    with jax.enable_x64(True):
        jargs = tuple(jax.numpy.asarray(np.asarray(a, np.float64)) for a in args)
        check_grads(jax.jit(f), jargs, order=2, modes=("fwd", "rev"), eps=eps, atol=atol, rtol=rtol)


def check_half_precision_policy(f, a, b, dtype, rtol, atol):
    """``f(a, b)`` on ``dtype`` inputs: a float32 result equal to ``f`` on the same values in
    float32, and a gradient with respect to ``a`` in ``dtype`` (the contract's precision rule).
    """
    import jax.numpy as jnp

    ah, bh = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    got = f(ah, bh)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, f(np.asarray(ah, np.float32), np.asarray(bh, np.float32)), rtol=rtol, atol=atol
    )
    assert jax.grad(lambda v: jnp.sum(f(v, bh)))(ah).dtype == dtype


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    """``assert_allclose`` for an array or for matching tuples of arrays."""
    if isinstance(want, tuple):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)
    else:
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)

"""Trace-time validation shared by every loss.

Every check here looks only at shapes and dtypes, so it runs while JAX traces and raises a
plain ``TypeError``/``ValueError`` naming the argument, what was seen and what was expected.
Checks on *values* (label ranges) cannot raise under ``jit``; they live in ``_reduce`` and turn
bad values into NaN plus a ``checkify`` check.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "sum", "mean", "sum_and_weight")


def as_floating(x: jax.typing.ArrayLike, name: str) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is floating."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype, got {x.dtype}.")
    return x


def as_integer(x: jax.typing.ArrayLike, name: str, hint: str = "") -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is a (non-bool) integer."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"`{name}` must have an integer dtype, got {x.dtype}.{hint}")
    return x


def as_mask(x: jax.typing.ArrayLike, name: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype != jnp.bool_:
        raise TypeError(f"`{name}` must be a boolean mask, got dtype {x.dtype}.")
    return x


def is_zero(value) -> bool:
    """True for a Python/NumPy scalar zero, so a default option can skip its work entirely.

    A traced value is never "zero" here: it is computed, whatever it turns out to be.
    """
    return not isinstance(value, jax.core.Tracer) and jnp.ndim(value) == 0 and float(value) == 0


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {value!r}.")
    return value


def class_axes(axis: int | Sequence[int], ndim: int, name: str = "logits") -> tuple[int, ...]:
    """Canonical (non-negative) class axes, in the order given, as a tuple."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    if not axes or not all(isinstance(a, (int, np.integer)) for a in axes):
        raise TypeError(f"`axis` must be an int or a non-empty tuple of ints, got {axis!r}.")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"`axis` {a} is out of range for `{name}` of rank {ndim}.")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`axis` {axis!r} repeats an axis.")
    return tuple(out)


def same_shape(x: jax.Array, name: str, expected: tuple[int, ...], what: str) -> None:
    if x.shape != tuple(expected):
        raise ValueError(
            f"`{name}` has shape {x.shape} but must have shape {tuple(expected)} ({what})."
        )


def broadcastable(x: jax.Array, name: str, target: tuple[int, ...], what: str) -> jax.Array:
    """Broadcasts ``x`` to ``target`` or raises ``ValueError`` naming both shapes."""
    try:
        shape = np.broadcast_shapes(x.shape, tuple(target))
    except ValueError:
        shape = None
    if shape != tuple(target):
        raise ValueError(
            f"`{name}` has shape {x.shape}, which does not broadcast to {tuple(target)} ({what})."
        )
    return jnp.broadcast_to(x, target)

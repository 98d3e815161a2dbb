"""Validation shared by every loss: shapes and dtypes at trace time, values where they can be.

Checks on shapes and dtypes run while JAX traces and raise a plain ``TypeError``/``ValueError``
naming the argument, what was seen and what was expected. Values cannot raise under ``jit``:
a hyperparameter that is a Python or NumPy value is checked against its domain before tracing
(``check_concrete_domain``); a traced one, or a bad label, turns the affected examples into
NaN and raises only under ``jax.experimental.checkify`` (``outside_domain``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import core
from jax.experimental import checkify

Reduction = Literal["none", "sum", "mean", "sum_and_weight"]
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean", "sum_and_weight")


def as_floating(x: jax.typing.ArrayLike, name: str) -> jax.Array:
    """Returns ``x`` as an array, raising ``TypeError`` unless its dtype is floating."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype, got {x.dtype}.")
    return x


def as_weights(x: jax.typing.ArrayLike, name: str) -> jax.Array:
    """Weights as an array: floating, or boolean (a mask, cast later to the compute dtype)."""
    x = jnp.asarray(x)
    if not (jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.bool_):
        raise TypeError(f"`{name}` must have a floating or boolean dtype, got {x.dtype}.")
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


def as_hyperparameter(value: Any, name: str, dtype) -> jax.Array:
    """A float hyperparameter (Python, NumPy or JAX; int and bool accepted) in ``dtype``."""
    value = jnp.asarray(value)
    if not (jnp.issubdtype(value.dtype, jnp.number) or value.dtype == jnp.bool_):
        raise TypeError(f"`{name}` must be a number, got dtype {value.dtype}.")
    return value.astype(dtype)


def is_tracer(value: Any) -> bool:
    """Whether ``value`` is being traced (its value is unknown until run)."""
    return isinstance(value, core.Tracer)


def is_zero(value: Any) -> bool:
    """True for a Python/NumPy scalar zero, so a default option can skip its work entirely.

    A traced value is never "zero" here: it is computed, whatever it turns out to be.
    """
    if isinstance(value, core.Tracer) or jnp.ndim(value) != 0:
        return False
    return float(value) == 0


def is_off(value: Any) -> bool:
    """An optional float option that is off: ``None`` (what ``_api`` passes for a concrete 0)."""
    return value is None or is_zero(value)


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {value!r}.")
    return value


def is_int(value: Any) -> bool:
    """A Python or NumPy integer that is not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def class_axes(axis: int | Sequence[int], ndim: int, name: str = "logits") -> tuple[int, ...]:
    """Canonical (non-negative) class axes, in the order given, as a tuple."""
    axes: Any = (axis,) if is_int(axis) else axis
    if not isinstance(axes, (tuple, list)) or not axes or not all(is_int(a) for a in axes):
        raise TypeError(f"`axis` must be an int or a non-empty tuple of ints, got {axis!r}.")
    out: list[int] = []
    for a in axes:
        a = int(a)
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


def float_array_like(
    x: jax.typing.ArrayLike, name: str, shape: tuple[int, ...], dtype, what: str
) -> jax.Array:
    """A floating array broadcast to ``shape`` and cast to ``dtype`` (weights, second inputs)."""
    return broadcastable(as_floating(x, name), name, shape, what).astype(dtype)


def static_option(value: Any, name: str) -> Any:
    """A static option (axis, reduction, ignore_index, sizes) in a hashable canonical form.

    NumPy integers become ``int``, lists become tuples; arrays cannot shape a computation.
    """
    if isinstance(value, core.Tracer):
        raise TypeError(
            f"`{name}` must be a Python value (it shapes the computation), got a tracer."
        )
    if isinstance(value, (np.ndarray, jax.Array)):
        if value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer):
            return int(value)
        raise TypeError(
            f"`{name}` must be a Python value (it shapes the computation), got an array."
        )
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, list):
        return tuple(static_option(v, name) for v in value)
    if isinstance(value, tuple):
        return tuple(static_option(v, name) for v in value)
    return value


# ------------------------------------------------------------------------- parameter domains


@dataclasses.dataclass(frozen=True)
class Domain:
    """An interval of allowed values: ``[low, high]``; ``open_low``/``open_high`` exclude an end."""

    low: float
    high: float
    open_low: bool
    text: str
    open_high: bool = False

    def holds(self, value):
        """Elementwise membership; NaN is never a member (works for NumPy and JAX arrays)."""
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above & below


UNIT_INTERVAL = Domain(0.0, 1.0, False, "in [0, 1]")
NON_NEGATIVE = Domain(0.0, math.inf, False, ">= 0")
POSITIVE = Domain(0.0, math.inf, True, "> 0")


def check_concrete_domain(value: Any, name: str, domain: Domain) -> None:
    """Raises ``ValueError`` for a Python/NumPy ``value`` outside ``domain``.

    JAX arrays (traced or not) are left to ``outside_domain``: reading them here would cost a
    transfer from the device on every call.
    """
    if value is None or isinstance(value, jax.Array):
        return
    values = np.asarray(value)
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    if values.size and not np.all(domain.holds(values.astype(np.float64))):
        raise ValueError(f"`{name}` must be {domain.text}, got {value!r}.")


def outside_domain(value: jax.Array, name: str, domain: Domain) -> jax.Array:
    """Where a (possibly traced) ``value`` leaves ``domain``; a ``checkify`` check names it."""
    bad = ~domain.holds(value)
    value_check(~jnp.any(bad), f"`{name}` must be {domain.text}.")
    return bad


# A ``checkify.debug_check`` in a jitted function makes every dispatch of it about 100 us
# slower, even outside checkify. Checkify can only see a loss it traces, so the checks are
# emitted only when a public loss is traced from outside (``_api`` sets this), not in the
# executable that an eager call with concrete arrays dispatches.
_EMIT_VALUE_CHECKS = contextvars.ContextVar("jaxce_emit_value_checks", default=True)


@contextlib.contextmanager
def value_checks(emit: bool):
    token = _EMIT_VALUE_CHECKS.set(emit)
    try:
        yield
    finally:
        _EMIT_VALUE_CHECKS.reset(token)


def value_check(ok: jax.Array, message: str, **values: Any) -> None:
    """``checkify.debug_check(ok, message, **values)`` where checks are being emitted."""
    if _EMIT_VALUE_CHECKS.get():
        checkify.debug_check(ok, message, **values)


def first_where(bad: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(flat position, value)`` of the first ``True`` of ``bad`` (row-major), for messages.

    Written as masked reductions over the array's own axes (no flattening reshape, no dynamic
    index), so it traces for arrays sharded on any mesh; where nothing is bad it gives
    ``(bad.size, values' minimum)``. Only a ``checkify`` message reads it.
    """
    dtype = jnp.int32 if bad.size < 2**31 else jnp.int64
    flat = jnp.zeros(bad.shape, dtype)
    stride = 1
    for axis in reversed(range(bad.ndim)):
        flat = flat + jax.lax.broadcasted_iota(dtype, bad.shape, axis) * stride
        stride *= bad.shape[axis]
    first = jnp.min(jnp.where(bad, flat, jnp.asarray(bad.size, dtype)))
    lowest = jnp.asarray(
        jnp.iinfo(values.dtype).min if jnp.issubdtype(values.dtype, jnp.integer) else -jnp.inf,
        values.dtype,
    )
    value = jnp.max(jnp.where(flat == first, values, lowest))
    return first, value


def hyperparameter(value: Any, name: str, dtype, domain: Domain) -> tuple[jax.Array, jax.Array]:
    """``(value in dtype, where it leaves domain)``: the traced half of the domain rule."""
    value = as_hyperparameter(value, name, dtype)
    return value, outside_domain(value, name, domain)


def nan_outside_domain(value: Any, name: str, dtype, domain: Domain) -> jax.Array:
    """``value`` in ``dtype``, NaN where a traced value leaves ``domain``.

    For losses without per-example weights to mark invalid (the fused ones): a NaN coefficient
    makes the loss and every gradient through it NaN, never a finite gradient of a NaN loss.
    """
    value, bad = hyperparameter(value, name, dtype, domain)
    return jnp.where(bad, jnp.full((), jnp.nan, dtype), value)

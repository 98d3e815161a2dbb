"""Logits in the layout every formula uses, their masks and their log-normaliser.

Every softmax-family and divergence loss starts here:

1. ``ClassLayout`` moves the class axes of ``logits`` to the end and flattens them, so a
   formula only ever sees ``(..., C)``;
2. ``split_where`` turns optax's ``where`` into a class mask and an example mask;
3. ``prepare`` validates and upcasts the logits, fills masked classes with ``-inf`` and
   records which rows keep a class (``Logits``);
4. ``integer_targets`` / ``probability_targets`` / ``Logits.align`` bring the second argument
   into the same layout with its ``ExampleWeights``;
5. ``log_normalizer`` gives ``logsumexp = m + log_s`` as two non-negative parts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TypeAlias

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _checks, _reduce

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike

_SOFT_LABELS_HINT = " For probability targets use `softmax_cross_entropy`."


@dataclasses.dataclass(frozen=True)
class ClassLayout:
    """Where the classes live in an array of rank ``ndim``: ``axes`` (canonical, in given order)."""

    axes: tuple[int, ...]
    ndim: int

    @classmethod
    def of(cls, axis: int | Sequence[int], ndim: int, name: str = "logits") -> ClassLayout:
        return cls(_checks.class_axes(axis, ndim, name), ndim)

    @property
    def batch_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a not in self.axes)

    def batch_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(shape[a] for a in self.batch_axes)

    def num_classes(self, shape: Sequence[int]) -> int:
        return math.prod(shape[a] for a in self.axes)

    def to_last(self, x: Array) -> Array:
        """``x`` (rank ``ndim``) with the class axes moved to the end and flattened to one."""
        order = self.batch_axes + self.axes
        if order != tuple(range(self.ndim)):
            x = jnp.transpose(x, order)
        # Explicit sizes: a -1 cannot be inferred for an empty batch.
        batch = len(self.batch_axes)
        return x.reshape(x.shape[:batch] + (math.prod(x.shape[batch:]),))


def split_where(where: ArrayLike | None, shape: tuple[int, ...], layout: ClassLayout):
    """Splits optax's ``where`` into ``(class_mask (..., C) or None, example_mask or None)``.

    A ``where`` of the rank of ``logits`` masks classes (broadcast to ``logits``); one with the
    class axes removed masks whole examples, as in optax.
    """
    if where is None:
        return None, None
    where = _checks.as_mask(where, "where")
    batch = layout.batch_shape(shape)
    if where.ndim == len(shape):
        mask = _checks.broadcastable(where, "where", shape, "a class mask for `logits`")
        return layout.to_last(mask), None
    if where.ndim == len(batch):
        mask = _checks.broadcastable(
            where, "where", batch, "an example mask: `logits` without the class axis"
        )
        return None, mask
    expand = ", ".join("None" if a in layout.batch_axes else ":" for a in range(len(shape)))
    raise ValueError(
        f"`where` has rank {where.ndim} (shape {where.shape}) but a mask must have the rank of "
        f"`logits` {tuple(shape)} ({len(shape)}: a class mask, size-1 axes broadcast) or that "
        f"rank without the class axes ({len(batch)}: an example mask). For one class mask "
        f"shared by every example add the batch axes: `where[{expand}]`."
    )


@dataclasses.dataclass(frozen=True)
class Logits:
    """Logits brought into the ``(..., C)`` layout every formula uses."""

    values: Array  # (..., C), compute dtype; masked classes are -inf
    class_mask: Array | None  # (..., C) bool, True = class takes part
    keep: Array | None  # batch-shaped: rows with at least one class, per `where`
    layout: ClassLayout
    shape: tuple[int, ...]  # the original shape
    name: str  # the argument's name, for messages

    @property
    def num_classes(self) -> int:
        return self.values.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.values.shape[:-1]

    @property
    def dtype(self):
        return self.values.dtype

    def count(self, keepdims: bool = False) -> Array | int:
        """Number of classes left in by ``where``, per row (``C`` without a mask).

        With ``keepdims`` a mask's count keeps a trailing axis, to divide ``(..., C)`` arrays.
        """
        if self.class_mask is None:
            return self.num_classes
        return jnp.sum(self.class_mask, axis=-1, keepdims=keepdims).astype(self.dtype)

    def neutralised(self, keep: Array | None) -> Logits:
        """Replaces dropped rows by zero logits with every class in (the double-where trick).

        A dropped row (ignored, fully masked) may hold ``-inf``; its loss is discarded, but
        without this its discarded branch would still send NaN into the gradient.
        """
        if keep is None:
            return self
        row = keep[..., None]
        values = jnp.where(row, self.values, jnp.zeros((), self.dtype))
        mask = None if self.class_mask is None else self.class_mask | ~row
        return dataclasses.replace(self, values=values, class_mask=mask)

    def align(self, other: ArrayLike, name: str) -> Array:
        """A second float array over the same classes (targets, teacher logits), in layout.

        Broadcast to the original shape, cast to the compute dtype and moved like the logits;
        masked classes and rows this ``Logits`` drops get zeros, so no NaN reaches the
        gradient from them.
        """
        other = _checks.float_array_like(
            other, name, self.shape, self.dtype, f"the shape of `{self.name}`"
        )
        other = self.layout.to_last(other)
        if self.class_mask is not None:
            other = jnp.where(self.class_mask, other, jnp.zeros((), other.dtype))
        if self.keep is not None:
            other = jnp.where(self.keep[..., None], other, jnp.zeros((), other.dtype))
        return other


def prepare(logits: ArrayLike, axis, where: ArrayLike | None, name: str = "logits") -> Logits:
    """Validated logits in the ``(..., C)`` layout, masked classes at ``-inf``."""
    logits = _checks.as_floating(logits, name)
    layout = ClassLayout.of(axis, logits.ndim, name)
    if layout.num_classes(logits.shape) == 0:
        raise ValueError(
            f"`{name}` has shape {logits.shape}: the class axis {layout.axes} is empty, and a "
            "loss needs at least one class."
        )
    class_mask, keep = split_where(where, logits.shape, layout)
    if class_mask is not None:
        has_class = jnp.any(class_mask, axis=-1)
        keep = has_class if keep is None else keep & has_class
    values = layout.to_last(_reduce.upcast(logits))
    if class_mask is not None:
        # Masked classes may hold anything (padding, NaN); -inf takes them out of every formula
        # and, unlike a mask applied after exp, keeps their gradient exactly zero.
        values = jnp.where(class_mask, values, jnp.full((), -jnp.inf, values.dtype))
    return Logits(values, class_mask, keep, layout, logits.shape, name)


def log_normalizer(x: Array, class_mask: Array | None) -> tuple[Array, Array]:
    """Returns ``(m, log_s)`` with ``logsumexp(x) = m + log_s`` over the last axis.

    ``m`` is the (masked) row maximum under ``stop_gradient`` (0 where not finite), so
    ``log_s >= 0`` and ``m - x_c >= 0``: losses are written as sums of these non-negative parts,
    which neither overflow nor cancel for logits near the dtype's limits. A NaN logit makes
    ``log_s`` NaN; a row of ``-inf`` gives ``log_s = -inf``.
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


def log_softmax(x: Array, class_mask: Array | None, temperature: Array | None = None) -> Array:
    """``log_softmax(x / T)`` over the classes the mask leaves in; masked classes are ``-inf``."""
    if temperature is not None:
        x = x / temperature
    m, log_s = log_normalizer(x, class_mask)
    log_p = (x - m[..., None]) - log_s[..., None]
    if class_mask is not None:
        log_p = jnp.where(class_mask, log_p, jnp.full((), -jnp.inf, log_p.dtype))
    return log_p


def z_loss_term(z_loss, m: Array, log_s: Array) -> Array | float:
    """``z_loss * logsumexp**2`` (PaLM), or nothing when ``z_loss`` is off."""
    if _checks.is_off(z_loss):
        return 0.0
    return z_loss * jnp.square(m + log_s)


def integer_targets(
    logits: Logits,
    labels: ArrayLike,
    *,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
) -> tuple[Logits, Array, _reduce.ExampleWeights]:
    """Validated integer labels: ``(logits, dropped rows neutralised; safe labels; weights)``."""
    labels = _checks.as_integer(labels, "labels", _SOFT_LABELS_HINT)
    _checks.same_shape(
        labels,
        "labels",
        logits.batch_shape,
        f"`{logits.name}` {logits.shape} without the class axis {logits.layout.axes}",
    )
    weights, safe_labels = _reduce.integer_label_weights(
        labels,
        logits.num_classes,
        logits.dtype,
        ignore_index=ignore_index,
        class_weights=class_weights,
        sample_weights=sample_weights,
        keep=logits.keep,
        class_mask=logits.class_mask,
    )
    may_drop = ignore_index is not None or logits.keep is not None
    return logits.neutralised(weights.keep if may_drop else None), safe_labels, weights


def probability_targets(
    logits: Logits,
    labels: ArrayLike,
    sample_weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    name: str = "labels",
) -> tuple[Logits, Array, _reduce.ExampleWeights]:
    """A second array over the classes: ``(logits, rows neutralised; (..., C) array; weights)``."""
    target = logits.align(labels, name)
    weights = per_example_weights(logits, sample_weights, class_weights)
    return logits.neutralised(logits.keep), target, weights


def per_example_weights(
    logits: Logits,
    sample_weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
) -> _reduce.ExampleWeights:
    """``ExampleWeights`` of a loss without integer labels (soft targets, divergences)."""
    vector = None
    if class_weights is not None:
        vector = _reduce.class_vector(
            class_weights, "class_weights", logits.num_classes, logits.dtype
        )
    return _reduce.example_weights(
        logits.batch_shape,
        logits.dtype,
        keep=logits.keep,
        sample_weights=sample_weights,
        class_weights=vector,
    )

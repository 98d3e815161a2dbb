"""The one mechanism for weights, dropped and invalid examples, reductions and dtypes.

A loss computes one raw value per example; this module says which examples count and with
what weight, and reduces:

1. ``example_weights`` / ``integer_label_weights`` build the per-example ``ExampleWeights``:
   whether the example counts (``keep``), its weight (``sample_weights * keep``), its term of
   the mean's denominator (times ``class_weights[label]`` for integer labels) and whether it
   is invalid (its loss is then NaN);
2. ``weigh_and_reduce`` zeroes dropped examples, marks invalid ones NaN, applies the weight
   and the reduction.

The weighted mean is ``sum(w * loss) / sum(w)`` and is ``0`` (with zero gradient) when
``sum(w) == 0``; ``reduction="sum_and_weight"`` returns the numerator and the denominator so
that micro-batches and devices can be combined exactly (see ``weighted_mean``). Weights may be
negative (PyTorch accepts them): they enter both sums as given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _api, _checks

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike


def compute_dtype(*dtypes) -> jnp.dtype:
    """The dtype losses are computed and returned in: half precision is promoted to float32."""
    dtype = jnp.result_type(*dtypes)
    if jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def upcast(x: Array) -> Array:
    return x.astype(compute_dtype(x.dtype))


def class_vector(values: ArrayLike, name: str, num_classes: int, dtype) -> Array:
    """Validates a per-class vector (``class_weights``, ``alpha``) of length ``num_classes``."""
    values = _checks.as_weights(values, name)
    if values.ndim > 1 and values.size == num_classes:
        values = values.reshape(num_classes)
    _checks.same_shape(values, name, (num_classes,), "one entry per class")
    return values.astype(dtype)


def along_classes(values: Array, like: Array) -> Array:
    """A ``(C,)`` vector reshaped to broadcast against ``like`` of shape ``(..., C)``."""
    return values.reshape((1,) * (like.ndim - 1) + (values.shape[0],))


@dataclasses.dataclass(frozen=True)
class ExampleWeights:
    """Per-example bookkeeping, all of the loss's batch shape.

    Attributes:
      keep: whether the example counts (not ignored, not in a fully masked row).
      weight: what ``weigh_and_reduce`` multiplies the raw loss by: ``sample_weights`` times
        ``keep``. Class weights are not in it: a formula applies them where they belong.
      denominator: the example's term of ``sum(w)`` in the mean: ``weight`` times
        ``class_weights[label]`` for integer labels, ``weight`` alone for soft targets.
      invalid: kept examples whose input is invalid; their loss is NaN. ``None`` if none is.
      class_weights: the validated ``(C,)`` class weights, or ``None``.
      label_weight: ``class_weights[label]``, or ``None``.
    """

    keep: Array
    weight: Array
    denominator: Array
    invalid: Array | None = None
    class_weights: Array | None = None
    label_weight: Array | None = None

    def with_invalid(self, invalid: Array | None) -> ExampleWeights:
        """Also marks ``invalid`` (broadcast to the batch) as NaN."""
        if invalid is None:
            return self
        invalid = self.keep & jnp.broadcast_to(invalid, self.keep.shape)
        if self.invalid is not None:
            invalid = invalid | self.invalid
        return dataclasses.replace(self, invalid=invalid)


def example_weights(
    batch: tuple[int, ...],
    dtype,
    *,
    keep: Array | None = None,
    sample_weights: ArrayLike | None = None,
    label_weight: Array | None = None,
    class_weights: Array | None = None,
) -> ExampleWeights:
    """Builds ``ExampleWeights`` from the optional pieces; missing pieces count as ones."""
    keep = jnp.ones(batch, bool) if keep is None else jnp.broadcast_to(keep, batch)
    weight = keep.astype(dtype)
    if sample_weights is not None:
        sample_weights = _checks.as_weights(sample_weights, "sample_weights")
        sample_weights = _checks.broadcastable(
            sample_weights, "sample_weights", batch, "the per-example loss shape"
        )
        weight = weight * sample_weights.astype(dtype)
    denominator = weight if label_weight is None else weight * label_weight
    return ExampleWeights(
        keep=keep,
        weight=weight,
        denominator=denominator,
        class_weights=class_weights,
        label_weight=label_weight,
    )


def _comparable(ignore_index: int | None, dtype) -> int | None:
    """``ignore_index`` if a label of ``dtype`` can equal it, else ``None`` (nothing ignored)."""
    if ignore_index is None:
        return None
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
    limits = jnp.iinfo(dtype)
    return int(ignore_index) if limits.min <= ignore_index <= limits.max else None


def integer_label_weights(
    labels: Array,
    num_classes: int,
    dtype,
    *,
    ignore_index: int | None = None,
    class_weights: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    keep: Array | None = None,
    class_mask: Array | None = None,
) -> tuple[ExampleWeights, Array]:
    """Bookkeeping for integer labels. Returns ``(ExampleWeights, safe_labels)``.

    ``safe_labels`` are the labels with ignored and invalid entries replaced by ``0``, safe to
    gather with (negative labels would otherwise wrap around). A label is invalid when it is
    not ``ignore_index`` and lies outside ``[0, C)``, or when ``class_mask`` excludes its class
    in a row that still has classes; such an example's loss is NaN and, under
    ``jax.experimental.checkify``, raises. An ``ignore_index`` no label of ``labels``'s dtype
    can hold (``2**40`` for int32 labels) ignores nothing.
    """
    batch = labels.shape
    keep = jnp.ones(batch, bool) if keep is None else jnp.broadcast_to(keep, batch)
    ignore_index = _comparable(ignore_index, labels.dtype)
    if ignore_index is not None:
        keep = keep & (labels != ignore_index)
    in_range = (labels >= 0) & (labels < num_classes)
    safe_labels = jnp.where(in_range & keep, labels, 0)
    invalid = keep & ~in_range
    if class_mask is not None:
        invalid = invalid | (keep & ~take_class(class_mask, safe_labels))
    _check_labels(invalid, labels, num_classes, ignore_index)
    vector = label_weight = None
    if class_weights is not None:
        vector = class_vector(class_weights, "class_weights", num_classes, dtype)
        label_weight = take_vector(vector, safe_labels)
    weights = example_weights(
        batch,
        dtype,
        keep=keep,
        sample_weights=sample_weights,
        label_weight=label_weight,
        class_weights=vector,
    )
    return dataclasses.replace(weights, invalid=invalid), safe_labels


def _check_labels(invalid: Array, labels: Array, num_classes: int, ignore_index) -> None:
    """Under ``checkify`` (user checks), raises naming the first invalid label; else a no-op.

    The invalid examples are already NaN elementwise; the message's label and position are
    masked reductions (``_checks.first_where``), which trace on any mesh and are dead code,
    removed by XLA, outside ``checkify``: a per-example loss compiles with no collective.
    """
    if invalid.size == 0:
        return
    pos, label = _checks.first_where(invalid, labels)
    _checks.value_check(
        ~jnp.any(invalid),
        "invalid integer label {label} at flat position {pos}: labels must lie in "
        f"[0, {num_classes}), be `ignore_index` ({ignore_index}), and name a class that "
        "`where` leaves in.",
        label=label,
        pos=pos,
    )


def take_class(x: Array, labels: Array) -> Array:
    """``x[..., labels]`` for ``x`` ``(..., C)`` and in-range ``labels`` ``(...)``."""
    return take_along_classes(x, labels[..., None])[..., 0]


def gather_along_classes(x: Array, indices: Array) -> Array:
    """``take_along_axis(x, indices, -1)`` for ``x`` ``(..., C)`` and in-range ``indices``
    ``(..., K)``, on any mesh: a gather whose leading axes are batching dimensions, so the
    partitioner keeps every row on the device that holds it. Differentiated by JAX's own
    rules (the transpose is a scatter-add with the same batching dimensions), which costs
    ``O(K)`` per row where :func:`take_along_classes`'s compare-and-select costs ``O(K C)``.
    """
    batch = tuple(range(indices.ndim - 1))
    dims = jax.lax.GatherDimensionNumbers(
        offset_dims=(),
        collapsed_slice_dims=(x.ndim - 1,),
        start_index_map=(x.ndim - 1,),
        operand_batching_dims=batch,
        start_indices_batching_dims=batch,
    )
    return jax.lax.gather(
        x,
        indices[..., None],
        dims,
        slice_sizes=(1,) * x.ndim,
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def top_k_positions(x: Array, k: int, *others: Array) -> tuple[Array, ...]:
    """The positions of the ``k`` largest of ``x (..., C)`` along the last axis (ties: the
    smaller position, as ``lax.top_k``), and each of ``others`` (same shape) at them.

    A two-key ``lax.sort`` rather than ``lax.top_k``: the partitioner keeps a sort over the
    last axis on the devices holding the rows, where ``top_k`` all-gathers a batch-sharded
    operand. Not differentiated (gather the values at the positions for a gradient).
    """
    # Laid out like ``x`` (on an Explicit mesh every sort operand needs its sharding).
    iota = jnp.zeros_like(x, jnp.int32) + jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    out = jax.lax.sort((-jax.lax.stop_gradient(x), iota, *others), dimension=x.ndim - 1, num_keys=2)
    return tuple(o[..., :k] for o in out[1:])


@jax.custom_jvp
def take_along_classes(x: Array, indices: Array) -> Array:
    """``take_along_axis(x, indices, -1)`` for ``x`` ``(..., C)`` and in-range ``indices``
    ``(..., K)``, on any mesh.

    The value is a gather whose leading axes are batching dimensions, so the partitioner keeps
    every row on the device that holds it (flat integer indexing with an ``arange`` of rows
    all-gathers on an Auto mesh and does not trace on an Explicit one). The derivative is a
    compare-and-select against the class index: its transpose (the gradient) is elementwise,
    fused by XLA into the rest of the backward pass with no temporary, and, unlike the gather's
    own transpose (a scatter with batching dimensions), ``checkify``'s index checks transform it.
    """
    return gather_along_classes(x, indices)


@take_along_classes.defjvp
def _take_along_classes_jvp(primals, tangents):
    x, indices = primals
    dx, _ = tangents
    return take_along_classes(x, indices), _select_along_classes(dx, indices)


def _select_along_classes(x: Array, indices: Array) -> Array:
    """``take_along_classes`` as a sum of a compare-and-select: linear in ``x``, elementwise
    transpose.
    """
    classes = jax.lax.broadcasted_iota(indices.dtype, x.shape, x.ndim - 1)
    hit = classes[..., None, :] == indices[..., None]  # (..., K, C)
    zero = jnp.zeros((), x.dtype)
    return jnp.sum(jnp.where(hit, x[..., None, :], zero), axis=-1)


def take_vector(vector: Array, labels: Array) -> Array:
    """``vector[labels]`` for a per-class ``(C,)`` vector and in-range ``labels``, laid out
    like ``labels`` (on an Explicit mesh the gather's output sharding must be given).
    """
    return vector.at[labels].get(out_sharding=jax.typeof(labels).sharding)


def reshard(x: Array, spec: jax.sharding.PartitionSpec) -> Array:
    """``x`` laid out as ``spec`` on the Explicit mesh of its own type (else the context's).

    ``jax.sharding.reshard`` with a bare ``PartitionSpec`` needs a context mesh
    (``jax.set_mesh``); global arrays with Explicit shardings may reach ``jit`` without one.
    """
    mesh = jax.typeof(x).sharding.mesh
    if mesh.empty:  # not laid out on a mesh yet: the context mesh's axes
        return jax.sharding.reshard(x, spec)
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, spec))


def replicated(x: Array) -> Array:
    """``x`` whole on every device where its type says it is sharded (an Explicit mesh: an
    all-gather, for computations that meet every example); else ``x``, for the partitioner
    (Auto meshes) or as it is (inside ``shard_map``).
    """
    spec = getattr(jax.typeof(x).sharding, "spec", None)
    if spec is None or all(axis is None for axis in spec):
        return x
    return reshard(x, jax.sharding.PartitionSpec())


def weigh_and_reduce(raw_loss: Array, weights: ExampleWeights, reduction: str):
    """Zeroes dropped examples, marks invalid ones NaN, weights and reduces."""
    # A zero weight masks its example exactly: select before multiplying, or an infinite loss
    # would give inf * 0 = NaN (and a NaN gradient with respect to the weight).
    dropped = ~weights.keep | (weights.weight == 0)
    loss = jnp.where(dropped, jnp.zeros((), raw_loss.dtype), raw_loss) * weights.weight
    if weights.invalid is not None:
        loss = jnp.where(weights.invalid, jnp.full((), jnp.nan, loss.dtype), loss)
    return reduce_loss(loss, weights.denominator, reduction)


def reduce_loss(loss: Array, weight: Array | None, reduction: str):
    """Reduces an already-weighted per-example ``loss`` with per-example ``weight``."""
    _checks.reduction(reduction)
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    if weight is None:
        denominator = jnp.asarray(math.prod(loss.shape), loss.dtype)
    else:
        denominator = jnp.sum(jnp.broadcast_to(weight, loss.shape)).astype(loss.dtype)
    if reduction == "sum_and_weight":
        return total, denominator
    return divide_or(total, denominator, 0.0)


@_api.public()
def weighted_mean(total: ArrayLike, weight: ArrayLike) -> Array:
    r"""``total / weight``, defined as ``0`` (with zero gradient) where ``weight == 0``.

    Combines the two parts that ``reduction="sum_and_weight"`` returns. Summing the parts over
    micro-batches (or ``jax.lax.psum`` over devices) before dividing gives exactly the
    full-batch weighted mean.

    .. math::
      \bar\ell = \frac{\sum_i w_i \ell_i}{\sum_i w_i}

    Args:
      total: the weighted sum of losses, any shape.
      weight: the sum of weights, broadcastable with ``total``.

    Returns:
      The weighted mean, of the broadcast shape of ``total`` and ``weight`` and the dtype of
      ``total``. A NaN in either part gives NaN.

    Raises:
      ValueError: if the shapes of ``total`` and ``weight`` do not broadcast together.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.array([[2.0, 0.5, 0.1], [0.1, 0.2, 0.9], [1.0, 1.0, 1.0]])
      >>> labels = jnp.array([0, 2, -100])
      >>> parts = [jaxce.softmax_cross_entropy_with_integer_labels(
      ...     logits[i:i + 2], labels[i:i + 2], ignore_index=-100, reduction="sum_and_weight")
      ...     for i in (0, 2)]
      >>> total, weight = (sum(p[k] for p in parts) for k in (0, 1))
      >>> print(round(float(jaxce.weighted_mean(total, weight)), 4))
      0.4913
    """
    return divide_or(total, weight, 0.0)


def divide_or(total: ArrayLike, weight: ArrayLike, empty: float) -> Array:
    """``total / weight``, and ``empty`` where ``weight == 0``, with a zero gradient there.

    ``weighted_mean`` is ``empty=0``; ``jaxce.pytorch`` uses ``empty=nan`` (PyTorch's mean).
    """
    total = jnp.asarray(total)
    weight = jnp.asarray(weight)
    try:
        shape = np.broadcast_shapes(total.shape, weight.shape)
    except ValueError:
        raise ValueError(
            f"`total` has shape {total.shape} and `weight` has shape {weight.shape}: they must "
            "broadcast together (the two parts of reduction='sum_and_weight')."
        ) from None
    total, weight = jnp.broadcast_to(total, shape), jnp.broadcast_to(weight, shape)
    nonzero = weight != 0
    safe = jnp.where(nonzero, weight, jnp.ones((), weight.dtype))
    return jnp.where(nonzero, total / safe, jnp.full((), empty, total.dtype))

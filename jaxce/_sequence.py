r"""Per-sequence reductions of per-token values, in the padded and the packed layout.

A shared mechanism (the policy-gradient losses aggregate through it, and users form the
per-sequence log-probabilities of the preference losses with it):

* **padded** layout: per-token values ``(..., T)``, one sequence per row, an optional boolean
  token mask ``where`` ``(..., T)``; per-sequence results have shape ``(...)``;
* **packed** layout: ``segment_ids`` ``(..., T)`` integers, ``0`` for padding and
  ``1..num_segments`` for the sequences packed into that row (the convention of t5x, MaxText
  and tunix), a static ``num_segments``; per-sequence results have shape
  ``(..., num_segments)``.

``Layout`` holds the bookkeeping once (which tokens are kept, which sequence each belongs to,
which ids are invalid) and ``Layout.sums`` / ``Layout.counts`` / ``Layout.to_tokens`` do the
reductions and the broadcast back to tokens. Masked tokens are dropped with a select before any
arithmetic (the double-``where`` trick), so a NaN there reaches neither the value nor a
derivative; a kept NaN reaches its sequence's result.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, TypeAlias

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _reduce

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which tokens count and which sequence each belongs to.

    Attributes:
      token_shape: the shape ``(..., T)`` of the per-token values.
      keep: ``(..., T)`` boolean, the tokens that count (mask and ``segment_ids > 0``).
      num_segments: ``None`` for the padded layout, else the static number of segments.
      segment: ``(..., T)`` int32 segment index ``0..num_segments - 1`` of each token with a
        valid non-zero id (``0`` for the others); ``None`` in the padded layout.
      bad_row: ``(...)`` boolean, rows holding a segment id outside ``[0, num_segments]``
        (their per-sequence results are NaN); ``None`` when there are none to mark.
      occupied: ``(..., T)`` boolean, packed tokens with a valid non-zero id, whether ``where``
        keeps them or not; ``None`` in the padded layout.
      invalid: ``(..., T)`` boolean, tokens whose segment id lies outside
        ``[0, num_segments]`` (NaN in ``masked``); ``None`` in the padded layout.
    """

    token_shape: tuple[int, ...]
    keep: Array
    num_segments: int | None = None
    segment: Array | None = None
    bad_row: Array | None = None
    occupied: Array | None = None
    invalid: Array | None = None

    def num_sequences(self, dtype) -> Array:
        """How many sequences there are: every row (padded), every segment id that occurs in
        its row, kept or not (packed).
        """
        if self.occupied is None:
            return jnp.asarray(math.prod(self.token_shape[:-1]), dtype)
        present = dataclasses.replace(self, keep=self.occupied).counts(dtype) > 0
        return jnp.sum(present).astype(dtype)

    @property
    def packed(self) -> bool:
        return self.num_segments is not None

    @property
    def sequence_shape(self) -> tuple[int, ...]:
        """``(...)`` padded, ``(..., num_segments)`` packed."""
        rows = self.token_shape[:-1]
        return rows if self.num_segments is None else (*rows, self.num_segments)

    def masked(self, values: Array) -> Array:
        """``values`` with dropped tokens exactly 0 (a select: no NaN or derivative leaks) and
        tokens with an invalid segment id NaN.
        """
        out = jnp.where(self.keep, values, jnp.zeros((), values.dtype))
        if self.invalid is not None:
            out = jnp.where(self.invalid, jnp.full((), jnp.nan, out.dtype), out)
        return out

    def sums(self, values: Array) -> Array:
        """Per-sequence sums of the kept tokens' ``values`` ``(..., T)``."""
        masked = self.masked(values)
        if self.num_segments is None:
            return jnp.sum(masked, axis=-1)
        assert self.segment is not None
        rows = self.token_shape[:-1]
        num_rows = math.prod(rows)
        length = self.token_shape[-1]
        s = self.num_segments
        # One flat segment per (row, sequence) and one spare bucket for the dropped tokens.
        row_offset = (jnp.arange(num_rows, dtype=jnp.int32) * s)[:, None]
        ids = jnp.where(
            self.keep.reshape(num_rows, length),
            self.segment.reshape(num_rows, length) + row_offset,
            num_rows * s,
        )
        flat = jax.ops.segment_sum(
            masked.reshape(num_rows * length),
            ids.reshape(num_rows * length),
            num_segments=num_rows * s + 1,
        )
        out = flat[: num_rows * s].reshape(*rows, s)
        if self.bad_row is not None:
            out = jnp.where(self.bad_row[..., None], jnp.full((), jnp.nan, out.dtype), out)
        return out

    def counts(self, dtype) -> Array:
        """Per-sequence numbers of kept tokens, in ``dtype``."""
        return self.sums(jnp.ones(self.token_shape, dtype))

    def to_tokens(self, per_sequence: Array) -> Array:
        """Broadcasts per-sequence values back to ``(..., T)`` (0 on dropped tokens)."""
        if self.num_segments is None:
            out = jnp.broadcast_to(per_sequence[..., None], self.token_shape)
        else:
            assert self.segment is not None
            # Flat integer indexing rather than ``take_along_axis`` (see ``_reduce.take_class``).
            num_rows = math.prod(self.token_shape[:-1])
            length = self.token_shape[-1]
            flat = per_sequence.reshape(num_rows, self.num_segments)
            rows = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
            out = flat[rows, self.segment.reshape(num_rows, length)].reshape(self.token_shape)
        return self.masked(out)


def layout(
    token_shape: tuple[int, ...],
    where: ArrayLike | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
    values_name: str = "values",
) -> Layout:
    """Validates the mask and segment ids for per-token values of ``token_shape``."""
    if len(token_shape) < 1:
        raise ValueError(
            f"`{values_name}` must have at least one axis (the token axis), got shape "
            f"{token_shape}."
        )
    keep = jnp.ones(token_shape, bool)
    if where is not None:
        where = _checks.as_mask(where, "where")
        _checks.same_shape(where, "where", token_shape, f"a token mask of `{values_name}`")
        keep = where
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("`num_segments` is given without `segment_ids` (the packed layout).")
        return Layout(token_shape=token_shape, keep=keep)
    if num_segments is None:
        raise ValueError(
            "`segment_ids` (the packed layout) needs the static `num_segments`: the number of "
            "sequences a row can hold."
        )
    if not _checks.is_int(num_segments) or num_segments < 1:
        raise ValueError(f"`num_segments` must be an int >= 1, got {num_segments!r}.")
    ids = _checks.as_integer(segment_ids, "segment_ids")
    _checks.same_shape(
        ids, "segment_ids", token_shape, f"a segment id per token of `{values_name}`"
    )
    invalid = (ids < 0) | (ids > num_segments)
    bad_row = jnp.any(invalid, axis=-1)
    _checks.value_check(
        ~jnp.any(invalid),
        f"`segment_ids` must lie in [0, {num_segments}] (0 = padding, 1..num_segments = the "
        "sequences of a row).",
    )
    occupied = (ids > 0) & ~invalid
    segment = jnp.where(occupied, ids - 1, 0).astype(jnp.int32)
    return Layout(
        token_shape=token_shape,
        keep=keep & occupied,
        num_segments=int(num_segments),
        segment=segment,
        bad_row=bad_row,
        occupied=occupied,
        invalid=invalid,
    )


@_api.public(static=("num_segments", "reduction"))
def sequence_reduce(
    values: ArrayLike,
    where: ArrayLike | None = None,
    *,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Array:
    r"""Per-sequence sums or token means of per-token values (padded or packed sequences).

    For sequence :math:`s` with kept tokens :math:`K_s`:

    .. math::
      \mathrm{sum}_s = \sum_{t \in K_s} v_t, \qquad
      \mathrm{mean}_s = \frac{1}{|K_s|} \sum_{t \in K_s} v_t \quad (0 \text{ if } K_s = \emptyset)

    **Padded layout** (no ``segment_ids``): each row of ``values`` ``(..., T)`` is one sequence,
    :math:`K_s` the tokens that ``where`` keeps (all if ``where`` is ``None``); the result has
    shape ``(...)``. **Packed layout**: ``segment_ids`` ``(..., T)`` gives each token's sequence
    within its row, ``0`` for padding and ``1..num_segments`` for the sequences packed there (the
    t5x/MaxText/tunix convention); ``where``, if given, drops further tokens; the result has shape
    ``(..., num_segments)``, entry ``j`` for segment id ``j + 1``. Packing sequences into rows
    gives exactly the per-sequence results of padding them into rows of their own.

    Typical uses: a completion's log-probability (``"sum"``, DPO) or its per-token average
    (``"mean"``, SimPO, ORPO, IPO) from the per-token log-probs of ``linear_log_probs``.

    A sequence with no kept token has sum 0, mean 0 and a zero gradient. Dropped tokens are
    selected away before any arithmetic: a NaN there reaches neither the result nor a gradient,
    while a NaN in a kept token makes its sequence's result NaN. A segment id outside
    ``[0, num_segments]`` makes every result of its row NaN (and raises under
    ``jax.experimental.checkify``).

    Args:
      values: per-token floating values ``(..., T)``; half precision is computed in float32.
      where: optional boolean token mask of the shape of ``values``.
      segment_ids: optional integer segment ids of the shape of ``values`` (packed layout).
      num_segments: static ``int >= 1``, the number of sequences a row can hold (required with
        ``segment_ids``).
      reduction: ``"sum"`` or ``"mean"``.

    Returns:
      ``(...)`` (padded) or ``(..., num_segments)`` (packed); float32 for half-precision
      ``values``, else their dtype.

    Raises:
      ValueError: a shape mismatch, ``segment_ids`` without ``num_segments`` (or the reverse),
        or an unknown ``reduction``.
      TypeError: a non-floating ``values``, a non-boolean ``where`` or non-integer
        ``segment_ids``.

    Examples:
      Two completions padded to length 4, and the same two packed into one row:

      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> log_probs = jnp.array([[-1.0, -2.0, -3.0, 0.0], [-0.5, -1.5, 0.0, 0.0]])
      >>> mask = jnp.array([[True, True, True, False], [True, True, False, False]])
      >>> jaxce.sequence_reduce(log_probs, mask)
      Array([-6., -2.], dtype=float32)
      >>> jaxce.sequence_reduce(log_probs, mask, reduction="mean")
      Array([-2., -1.], dtype=float32)
      >>> packed = jnp.array([-1.0, -2.0, -3.0, -0.5, -1.5, 0.0])
      >>> ids = jnp.array([1, 1, 1, 2, 2, 0])
      >>> jaxce.sequence_reduce(packed, segment_ids=ids, num_segments=2)
      Array([-6., -2.], dtype=float32)
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
    x = _reduce.upcast(_checks.as_floating(values, "values"))
    lay = layout(x.shape, where, segment_ids, num_segments)
    total = lay.sums(x)
    if reduction == "sum":
        return total
    return _reduce.divide_or(total, lay.counts(x.dtype), 0.0)

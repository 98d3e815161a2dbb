"""Shared machinery of the vocabulary-chunked (fused) losses.

A fused loss never materialises the ``(tokens, V)`` logits: it walks over blocks of
``chunk`` columns of a ``(D, V)`` weight. This module holds what every such loss needs: the
automatic chunk size, the column blocks (the last one shifted, never shrunk or padded), the
checks of its arguments (hidden states against a kernel, biases, the vocabulary over shards,
the chunk size), and the bookkeeping of device-varying mesh axes that ``lax.scan`` needs
inside ``shard_map``.
"""

from __future__ import annotations

from typing import NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
from jax import lax

from jaxce import _checks

Array: TypeAlias = jax.Array

# Automatic chunk: a (tokens x chunk) float32 tile of about 2**22 elements (16 MiB), at least
# 256 columns and a multiple of 128.
TILE_ELEMENTS = 1 << 22
MIN_CHUNK = 256


def auto_chunk(num_tokens: int, vocab: int) -> int:
    """Columns per tile for ``num_tokens`` rows: about ``TILE_ELEMENTS`` elements a tile."""
    chunk = TILE_ELEMENTS // max(num_tokens, 1)
    chunk = max(MIN_CHUNK, chunk // 128 * 128)
    return max(1, min(chunk, vocab))


def num_chunks(vocab: int, chunk: int) -> int:
    return -(-vocab // chunk)


def column_block(w: Array, b: Array | None, i, chunk: int):
    """Block ``i`` of ``chunk`` columns of ``w`` (and ``b``): ``(wc, bc, cols, fresh, start)``.

    Blocks never shrink: the last one is shifted left to end at the last column, and the
    columns it shares with the previous block are marked not ``fresh``, so no padded copy of
    ``w`` is ever made. ``cols`` are the local column ids of the block.
    """
    vocab = w.shape[1]
    start = jnp.minimum(i * chunk, vocab - chunk)
    wc = lax.dynamic_slice_in_dim(w, start, chunk, axis=1)
    bc = None if b is None else lax.dynamic_slice_in_dim(b, start, chunk)
    cols = start + lax.iota(jnp.int32, chunk)
    return wc, bc, cols, cols >= i * chunk, start


def _varying_axes(x) -> frozenset:
    """Mesh axes over which ``x`` is device-varying inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def make_varying(x, axes):
    """``x`` marked device-varying over ``axes`` (those it already varies over are skipped)."""
    missing = tuple(sorted(frozenset(axes) - _varying_axes(x), key=str))
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)  # type: ignore[attr-defined]  # older JAX


def sum_over_extra_axes(ct, ref):
    extra = tuple(sorted(_varying_axes(ct) - _varying_axes(ref), key=str))
    return lax.psum(ct, extra) if extra else ct


def varying_like(arrays, *refs):
    """Marks fresh scan carries device-varying over the mesh axes any of ``refs`` varies over.

    Inside ``shard_map`` a ``lax.scan`` needs its initial carry to have the same
    varying-manual-axes type as the body's output; outside it this is a no-op.
    """
    axes = frozenset().union(*(_varying_axes(r) for r in refs if r is not None))
    if not axes:
        return arrays
    return jax.tree.map(lambda a: make_varying(a, axes), arrays)


# ------------------------------------------------------------------ token tiles (added)

# Automatic token tile of a gradient-in-forward scan (tokens x whole local vocabulary): four
# times the elements of a vocabulary tile (2**24, 64 MiB in float32), since fewer, larger
# tiles amortise packing the whole weight for each tile's matmuls (measured on CPU,
# benchmarks/README.md), and at least MIN_ROWS tokens.
ROW_TILE_ELEMENTS = 4 * TILE_ELEMENTS
# Columns of one block of the dW accumulation: a (D x block) product of about 2**22 elements.
PRODUCT_ELEMENTS = 1 << 22
MIN_ROWS = 128


def auto_partitioned() -> bool:
    """Whether the context mesh (``jax.set_mesh`` / ``use_mesh``) has several devices and only
    Auto axes: the partitioner, not a ``shard_map``, then splits the tokens, and a loop that
    slices the token axis (the fused cross-entropy's gradient-in-forward tiles) would make it
    gather them. Inside a ``shard_map`` (a Manual axis) or without a context mesh: ``False``.
    """
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    if mesh is None or getattr(mesh, "empty", True) or mesh.size <= 1:
        return False
    auto = jax.sharding.AxisType.Auto
    return all(kind == auto for kind in mesh.axis_types)


def auto_rows(num_tokens: int, vocab: int, chunk: int | None = None) -> int:
    """Tokens per tile for a scan over token tiles against all ``vocab`` columns.

    With an explicit ``chunk`` (columns per vocabulary tile) the token tile has as many
    elements as that vocabulary tile: ``chunk * num_tokens / vocab`` rows.
    """
    if chunk is None:
        rows = max(MIN_ROWS, ROW_TILE_ELEMENTS // max(vocab, 1) // 8 * 8)
    else:
        rows = chunk * max(num_tokens, 1) // max(vocab, 1)
    return max(1, min(rows, num_tokens))


def product_columns(rows: int, vocab: int) -> int:
    """Columns per block when a ``(rows, vocab)`` accumulator is updated block by block."""
    block = max(128, PRODUCT_ELEMENTS // max(rows, 1) // 128 * 128)
    return min(block, vocab)


def varying_axes(*refs) -> frozenset:
    """The union of the mesh axes over which any of ``refs`` is device-varying."""
    return frozenset().union(*(_varying_axes(r) for r in refs if r is not None))


def varying_over(arrays, axes):
    """Marks fresh scan carries device-varying over exactly ``axes`` (no-op when empty)."""
    if not axes:
        return arrays
    return jax.tree.map(lambda a: make_varying(a, axes), arrays)


# ------------------------------------------------------------------------ argument checks


def hidden_and_kernel(hidden, hidden_name: str, weight, weight_name: str) -> tuple[Array, Array]:
    """``hidden (..., D)`` and ``weight (D, V)`` as floating arrays, ``V >= 1``, or an error."""
    hidden = _checks.as_floating(hidden, hidden_name)
    weight = _checks.as_floating(weight, weight_name)
    if hidden.ndim < 1:
        raise ValueError(f"`{hidden_name}` must have shape (..., D), got a scalar.")
    if weight.ndim != 2:
        raise ValueError(f"`{weight_name}` has shape {weight.shape} but must be 2-D (D, V).")
    if hidden.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"`{hidden_name}` has shape {hidden.shape} and `{weight_name}` has shape "
            f"{weight.shape}: the last axis of `{hidden_name}` must equal the first axis of "
            f"`{weight_name}` ({weight.shape[0]})."
        )
    if weight.shape[1] == 0:
        raise ValueError(f"`{weight_name}` has shape {weight.shape}: it needs at least one class.")
    return hidden, weight


def per_column(value, name: str, local_vocab: int) -> Array | None:
    """An optional ``(V,)`` float array with one entry per (local) column of the kernel."""
    if value is None:
        return None
    value = _checks.as_floating(value, name)
    _checks.same_shape(value, name, (local_vocab,), "one entry per vocabulary column")
    return value


class Shards(NamedTuple):
    """Where this device's columns sit in the vocabulary."""

    offset: Array  # global id of local column 0 (traced under shard_map)
    vocab_size: int  # the real classes; columns from it on are padding


def shards(axis_name: str | None, local_vocab: int, vocab_size) -> Shards:
    """The shard offset and the checked ``vocab_size`` (default: every column of all shards)."""
    if axis_name is None:
        count, offset = 1, jnp.zeros((), jnp.int32)
    else:
        count = lax.axis_size(axis_name)
        offset = (lax.axis_index(axis_name) * local_vocab).astype(jnp.int32)
    full_vocab = local_vocab * count
    vocab_size = full_vocab if vocab_size is None else vocab_size
    if not _checks.is_int(vocab_size) or not 0 < vocab_size <= full_vocab:
        raise ValueError(
            f"`vocab_size` must be an int in [1, {full_vocab}] (the columns of `weight`"
            f"{' over all shards' if count > 1 else ''}), got {vocab_size!r}."
        )
    return Shards(offset, int(vocab_size))


def chunk_size(value) -> int | None:
    """A static ``chunk_size``: a positive int, or ``None`` for the automatic one."""
    if value is None:
        return None
    if not _checks.is_int(value) or value < 1:
        raise ValueError(f"`chunk_size` must be a positive int or None, got {value!r}.")
    return int(value)


def logit_softcap(value) -> float | None:
    """A static ``logit_softcap``: a positive Python float, or ``None`` for no cap."""
    if value is None:
        return None
    if _checks.is_tracer(value) or jnp.ndim(value) != 0:
        raise TypeError("`logit_softcap` must be a Python float or None.")
    value = float(value)
    if not value > 0:
        raise ValueError(f"`logit_softcap` must be positive, got {value}.")
    return value


def labelled_inputs(hidden, weight, labels, bias):
    """``(hidden, weight, labels, bias, batch)`` of a loss with integer labels, checked:
    ``hidden (..., D)``, ``weight (D, V)``, ``labels`` of shape ``hidden.shape[:-1]``,
    an optional ``bias (V,)``.
    """
    hidden, weight = hidden_and_kernel(hidden, "hidden", weight, "weight")
    labels = _checks.as_integer(labels, "labels")
    batch = hidden.shape[:-1]
    _checks.same_shape(labels, "labels", batch, f"`hidden` {hidden.shape} without its last axis")
    return hidden, weight, labels, per_column(bias, "bias", weight.shape[1]), batch


def local_labels(safe_labels: Array, offset, local_vocab: int) -> Array:
    """Flat int32 local column ids of global labels, ``-1`` where not in this shard."""
    y = safe_labels.reshape(-1).astype(jnp.int32) - offset
    return jnp.where((y >= 0) & (y < local_vocab), y, -1)


def vma_unchecked(axis_name) -> bool:
    """Whether this trace is inside a ``shard_map(..., check_vma=False)`` over ``axis_name``.

    There, JAX cannot tell a replicated value from a device-varying one, so it treats the
    cotangent of a replicated value as a *share* (the output's cotangent divided over the
    axis, the shares summed back by ``psum``'s transpose): a ``custom_vjp`` whose forward
    combined its outputs over ``axis_name`` must ``psum`` their cotangents itself. Known by
    a probe: a cast to device-varying is a no-op there (and over a size-1 axis, where the
    ``psum`` that follows is one too).
    """
    if axis_name is None:
        return False
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    probe = make_varying(jnp.zeros((), jnp.float32), axes)
    return not frozenset(axes) <= _varying_axes(probe)

"""Mesh dispatch of the fused losses: data and vocabulary parallel under plain ``jax.jit``.

Every fused loss (a body on the streaming engine, ``_stream``) is written once, for the
arrays one device sees, with an ``axis_name`` for a vocabulary sharded over a mesh axis inside
``shard_map``. ``fused`` is the one place that turns a call on global arrays into that: it
reads where the arrays are (or where the caller asks the vocabulary to be), re-lays out the
kernels over the vocabulary, and runs the body under ``jax.shard_map``.

How a fused loss uses it (every fused loss, and any added later)::

    def _body(hidden, weight, labels, bias, *, axis_name, vocab_size, reduction, **static):
        ...  # the per-device loss: weight is the (D, V / shards) shard under axis_name

    @_api.public(static=(..., "axis_name", "vocab_axis", "mesh"))
    def linear_something(hidden, weight, labels, *, bias=None, reduction="none", ...,
                         axis_name=None, vocab_axis=None, mesh=None, vocab_size=None):
        return _vocab_parallel.fused(
            functools.partial(_body, **static_options),
            hiddens={"hidden": hidden}, kernels={"weight": weight},
            columns={"bias": bias}, tokens={"labels": labels}, shared={},
            reduction=reduction, has_aux=False,
            axis_name=axis_name, vocab_axis=vocab_axis, mesh=mesh, vocab_size=vocab_size)

The operands by role: ``hiddens`` ``(..., D)`` per-token rows (the batch shape is the first
one's without its last axis), ``kernels`` ``(D, V)`` (sharded over the vocabulary),
``columns`` ``(V,)`` (sharded like the kernels' columns), ``tokens`` arrays broadcastable to
the batch shape (labels, sample weights, temperatures), ``shared`` scalars (hyperparameters).
``None`` operands are passed through as ``None``. The body gets them by name, plus
``axis_name`` and ``vocab_size`` (and ``reduction`` when the loss has one), and returns the
loss (``has_aux``: ``(loss, aux)``) in which every array is a scalar (a reduction) or of the
batch shape (per token).

The three cases:

* ``axis_name`` given: the caller is inside its own ``shard_map``; the body runs as is.
* An Explicit mesh (the arrays' types carry their shardings): the vocabulary axis is the
  kernel's column axis (``jax.typeof(weight).sharding.spec[1]``), or, for a kernel sharded
  over ``D`` only (FSDP), its row axis, re-laid out over the vocabulary with
  ``jax.sharding.reshard`` (an all-to-all; never gathered). The body runs fully manual:
  tokens over the hidden states' batch axes (the vocabulary axis taken out of them), the
  vocabulary over its axis. A scalar reduction is the ``psum`` of the body's
  ``"sum_and_weight"`` over the token axes; per-token outputs keep the tokens' sharding and
  need no collective.
* ``vocab_axis`` given (Auto meshes; the mesh from ``mesh=`` or the context,
  ``jax.set_mesh``/``jax.sharding.use_mesh``): the body runs under a ``shard_map`` manual over
  that axis only, the other axes left to the partitioner. The vocabulary is padded to a
  multiple of the shard count (padding columns take no part, ``vocab_size``).

Without a vocabulary axis or a token sharding (Auto meshes, one device) the body runs as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxce import _checks, _reduce

Array: TypeAlias = jax.Array
P = jax.sharding.PartitionSpec
AxisType = jax.sharding.AxisType


# ------------------------------------------------------------------------- sharding types


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one entry of a ``PartitionSpec`` (``None``, a name or a tuple)."""
    if entry is None:
        return ()
    if isinstance(entry, tuple):
        return tuple(entry)
    return (entry,)


def _entry(axes: tuple[str, ...]):
    """A ``PartitionSpec`` entry for ``axes``."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _explicit_spec(x) -> tuple[Any, tuple[tuple[str, ...], ...]] | None:
    """``(abstract mesh, per-dimension Explicit axes)`` of ``x``'s type, or ``None``."""
    try:
        sharding = jax.typeof(x).sharding
    except (AttributeError, TypeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    spec = getattr(sharding, "spec", None)
    if mesh is None or spec is None or getattr(mesh, "empty", True):
        return None
    explicit = {
        name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    }  # fmt: skip
    if not explicit:
        return None
    dims = tuple(spec) + (None,) * (jnp.ndim(x) - len(spec))
    return mesh, tuple(tuple(a for a in _axes(e) if a in explicit) for e in dims)


def _size(mesh, axes: tuple[str, ...]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))


def _reshard(x, spec: jax.sharding.PartitionSpec):
    """``x`` with the Explicit sharding ``spec`` (a no-op when it has it already)."""
    current = jax.typeof(x).sharding.spec
    if tuple(current) + (None,) * (x.ndim - len(current)) == tuple(spec) + (None,) * (
        x.ndim - len(spec)
    ):
        return x
    return _reduce.reshard(x, spec)


# ------------------------------------------------------------------------------ dispatch


def check_exclusive(axis_name, vocab_axis) -> None:
    if axis_name is not None and vocab_axis is not None:
        raise ValueError(
            "`axis_name` and `vocab_axis` are mutually exclusive: `axis_name` names the "
            "vocabulary axis inside your own `shard_map`, `vocab_axis` asks the loss to "
            f"shard the vocabulary over a mesh axis itself (got axis_name={axis_name!r}, "
            f"vocab_axis={vocab_axis!r})."
        )


def fused(
    body: Callable[..., Any],
    *,
    hiddens: Mapping[str, Any],
    kernels: Mapping[str, Any],
    columns: Mapping[str, Any] | None = None,
    tokens: Mapping[str, Any] | None = None,
    shared: Mapping[str, Any] | None = None,
    reduction: str | None = None,
    has_aux: bool = False,
    axis_name=None,
    vocab_axis=None,
    mesh=None,
    vocab_size=None,
) -> Any:
    """Runs the per-device fused-loss ``body`` on global arrays (see the module docstring)."""
    check_exclusive(axis_name, vocab_axis)
    columns, tokens, shared = dict(columns or {}), dict(tokens or {}), dict(shared or {})
    operands = {**hiddens, **kernels, **columns, **tokens, **shared}
    extra: dict[str, Any] = {"vocab_size": vocab_size}
    if reduction is not None:
        extra["reduction"] = reduction

    def direct(axis):
        return body(**operands, axis_name=axis, **extra)

    if axis_name is not None:
        return direct(axis_name)
    if mesh is not None and vocab_axis is None:
        raise ValueError("`mesh` is only used with `vocab_axis`; pass both, or neither.")
    hidden_name = next(iter(hiddens))
    hidden = _checks.as_floating(hiddens[hidden_name], hidden_name)
    if hidden.ndim < 1:
        return direct(None)  # the body raises its own error
    batch = hidden.shape[:-1]
    kernel_list = [jnp.asarray(k) for k in kernels.values()]
    for name, k in zip(kernels, kernel_list, strict=True):
        if k.ndim != 2:
            return direct(None)  # the body raises its own error
        del name
    vocab = kernel_list[0].shape[1]
    _check_columns(kernels, kernel_list, columns, vocab)

    if vocab_axis is not None:
        return _auto(
            body, hiddens, kernels, columns, tokens, shared, extra, vocab_axis, mesh, vocab
        )
    placed = _explicit_spec(kernel_list[0])
    hidden_placed = _explicit_spec(hidden)
    if placed is None and hidden_placed is None:
        return direct(None)
    amesh = (placed or hidden_placed)[0]  # type: ignore[index]
    vaxes: tuple[str, ...] = ()
    for k in kernel_list:
        spec = _explicit_spec(k)
        if spec is not None and (spec[1][1] or spec[1][0]):
            vaxes = spec[1][1] or spec[1][0]
            break
    if vaxes and _size(amesh, vaxes) == 1:
        vaxes = ()
    bspec: tuple[tuple[str, ...], ...] = (
        tuple(tuple(a for a in d if a not in vaxes) for d in hidden_placed[1][:-1])
        if hidden_placed is not None
        else ((),) * len(batch)
    )
    taxes = tuple(a for d in bspec for a in d)
    if not vaxes and not taxes:
        return direct(None)
    return _explicit(
        body, hiddens, kernels, columns, tokens, shared, extra, amesh, vaxes, bspec, batch,
        vocab, has_aux,
    )  # fmt: skip


def _check_columns(kernels, kernel_list, columns, vocab) -> None:
    for name, k in zip(kernels, kernel_list, strict=True):
        if k.shape[1] != vocab:
            first = next(iter(kernels))
            raise ValueError(
                f"`{name}` has shape {k.shape} and `{first}` has shape {kernel_list[0].shape}: "
                "both need the same number of vocabulary columns."
            )
    for name, c in columns.items():
        if c is not None and jnp.shape(c) != (vocab,):
            raise ValueError(
                f"`{name}` has shape {jnp.shape(c)} but must be ({vocab},) (one entry per "
                "vocabulary column)."
            )


def _pad_columns(kernels, columns, vocab: int, shards: int, vocab_size):
    """Kernels and columns padded to a multiple of ``shards`` columns, and ``vocab_size``."""
    padded = -(-vocab // shards) * shards
    if padded == vocab:
        return kernels, columns, vocab_size
    extra = padded - vocab
    kernels = {n: jnp.pad(jnp.asarray(k), ((0, 0), (0, extra))) for n, k in kernels.items()}
    columns = {
        n: None if c is None else jnp.pad(jnp.asarray(c), (0, extra)) for n, c in columns.items()
    }
    return kernels, columns, vocab if vocab_size is None else vocab_size


def _split(operands: Mapping[str, Any]):
    """``(names of arrays, arrays, constants)``: ``None`` operands stay out of ``shard_map``."""
    names = [n for n, v in operands.items() if v is not None]
    return names, [operands[n] for n in names], {n: v for n, v in operands.items() if v is None}


def _auto(body, hiddens, kernels, columns, tokens, shared, extra, vocab_axis, mesh, vocab):
    """Vocabulary parallel over ``vocab_axis`` of ``mesh`` (or the context mesh)."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            raise ValueError(
                f"`vocab_axis={vocab_axis!r}` needs a mesh: call the loss under "
                "`jax.set_mesh(mesh)` (or `jax.sharding.use_mesh`), or pass `mesh=`."
            )
    vaxes = _axes(vocab_axis)
    missing = [a for a in vaxes if a not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"`vocab_axis={vocab_axis!r}` is not an axis of the mesh (axes "
            f"{tuple(mesh.axis_names)})."
        )
    shards = _size(mesh, vaxes)
    kernels, columns, vocab_size = _pad_columns(
        kernels, columns, vocab, shards, extra["vocab_size"]
    )
    extra = {**extra, "vocab_size": vocab_size}
    operands = {**hiddens, **kernels, **columns, **tokens, **shared}
    names, arrays, constants = _split(operands)
    col = _entry(vaxes)
    specs = tuple(P(None, col) if n in kernels else P(col) if n in columns else P() for n in names)

    def local(*arrays):
        return body(**dict(zip(names, arrays, strict=True)), **constants, axis_name=vocab_axis,
                    **extra)  # fmt: skip

    return jax.shard_map(
        local, mesh=mesh, in_specs=specs, out_specs=P(), axis_names=frozenset(vaxes)
    )(*arrays)


def _token_operand(value, name: str, batch, rows):
    """A per-token operand broadcast to ``batch`` with the tokens' sharding ``rows``."""
    value = jnp.asarray(value)
    if value.shape != tuple(batch):
        value = _checks.broadcastable(value, name, tuple(batch), "the tokens' shape")
    return _reshard(value, P(*rows))


def _explicit(
    body, hiddens, kernels, columns, tokens, shared, extra, amesh, vaxes, bspec, batch, vocab,
    has_aux,
):  # fmt: skip
    """Fully manual ``shard_map``: tokens over ``bspec``, the vocabulary over ``vaxes``."""
    shards = _size(amesh, vaxes) if vaxes else 1
    # A kernel sharded over D only is re-laid out over the vocabulary: pad first, where V
    # is whole on every device.
    kernels, columns, vocab_size = _pad_columns(
        kernels, columns, vocab, shards, extra["vocab_size"]
    )
    extra = {**extra, "vocab_size": vocab_size}
    col = _entry(vaxes)
    rows = tuple(_entry(d) for d in bspec)
    kernels = {n: _reshard(jnp.asarray(k), P(None, col)) for n, k in kernels.items()}
    columns = {
        n: None if c is None else _reshard(jnp.asarray(c), P(col)) for n, c in columns.items()
    }
    hiddens = {n: _reshard(jnp.asarray(h), P(*rows, None)) for n, h in hiddens.items()}
    # A scalar "token" operand (one temperature for all) is shared; the others are broadcast
    # to the batch shape, so that each device gets its tokens' entries.
    shared = {**shared, **{n: t for n, t in tokens.items() if t is not None and jnp.ndim(t) == 0}}
    tokens = {
        n: None if t is None else _token_operand(t, n, batch, rows)
        for n, t in tokens.items() if t is None or jnp.ndim(t) > 0
    }  # fmt: skip
    shared = {n: None if s is None else _reshard(jnp.asarray(s), P()) for n, s in shared.items()}
    taxes = tuple(a for d in bspec for a in d)
    reduction = extra.get("reduction")
    sums = reduction in ("sum", "mean", "sum_and_weight") and bool(taxes)
    if sums:
        extra = {**extra, "reduction": "sum_and_weight"}
    operands = {**hiddens, **kernels, **columns, **tokens, **shared}
    names, arrays, constants = _split(operands)
    specs = tuple(
        P(None, col) if n in kernels
        else P(col) if n in columns
        else P(*rows, None) if n in hiddens
        else P(*rows) if n in tokens
        else P()
        for n in names
    )  # fmt: skip
    per_token = P(*rows)

    def local(*arrays):
        out = body(**dict(zip(names, arrays, strict=True)), **constants,
                   axis_name=_entry(vaxes) if vaxes else None, **extra)  # fmt: skip
        loss, aux = out if has_aux else (out, None)
        if sums:
            loss = tuple(lax.psum(part, taxes) for part in loss)
        return loss if not has_aux else (loss, aux)

    # The loss is a scalar (or the pair of "sum_and_weight") for a scalar reduction, else
    # per token; auxiliary outputs are per token.
    loss_spec = P() if reduction not in (None, "none") else per_token
    out_specs = (loss_spec, per_token) if has_aux else loss_spec
    out: Any = jax.shard_map(local, mesh=amesh, in_specs=specs, out_specs=out_specs)(*arrays)
    if sums and reduction != "sum_and_weight":
        loss, aux = out if has_aux else (out, None)
        total, weight = loss  # type: ignore[misc]
        loss = total if reduction == "sum" else _reduce.weighted_mean(total, weight)
        out = (loss, aux) if has_aux else loss
    return out

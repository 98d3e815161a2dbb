r"""Connectionist temporal classification (CTC): the sequence-level negative log-likelihood.

The forward algorithm runs in log space over time in one ``lax.scan``. Its state, per label
position :math:`n` of a sequence :math:`y_1 \dots y_N`, has two parts (optax's layout, so
that the returned forward probabilities are optax's):

* ``ready[n]`` (:math:`n = 0 \dots N`): the first :math:`n` labels are complete and the next
  frame may start :math:`y_{n+1}` or be a blank; its final frame was a blank, or a frame of
  :math:`y_n` followed by an (empty) closing step;
* ``emitting[n]`` (:math:`n = 0 \dots N - 1`): the current frame emits :math:`y_{n+1}`
  (its first frame or a repeat of it).

A frame first *closes* each ``emitting[n]`` into ``ready[n + 1]``, unless
:math:`y_{n+2} = y_{n+1}` (two equal labels must be separated by a blank); then emits (a
label from ``ready`` or from itself) or a blank (``ready`` stays, and an emitting label
followed by a blank becomes ready). Impossible states hold ``log_epsilon`` rather than
:math:`-\infty`, as in optax, so that no gradient is NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _numerics, _reduce

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _validate(logits, logit_paddings, labels, label_paddings):
    logits = _checks.as_floating(logits, "logits")
    labels = _checks.as_integer(labels, "labels")
    logit_paddings = jnp.asarray(logit_paddings)
    label_paddings = jnp.asarray(label_paddings)
    if logits.ndim != 3:
        raise ValueError(f"`logits` must have shape (B, T, K), got {logits.shape}.")
    if labels.ndim != 2:
        raise ValueError(f"`labels` must have shape (B, N), got {labels.shape}.")
    batch, frames, classes = logits.shape
    if classes == 0:
        raise ValueError("`logits` has no classes (K = 0); CTC needs at least the blank.")
    if labels.shape[0] != batch:
        raise ValueError(
            f"`labels` {labels.shape} must have `logits`' batch size {batch} (shape (B, N))."
        )
    _checks.same_shape(logit_paddings, "logit_paddings", (batch, frames), "`logits` without K")
    _checks.same_shape(label_paddings, "label_paddings", labels.shape, "one flag per label")
    return logits, logit_paddings, labels, label_paddings


def _blank_id(blank_id, classes: int) -> int:
    """``blank_id`` as a class index in ``[0, K)``; anything else raises (never wraps)."""
    if isinstance(blank_id, bool) or not isinstance(blank_id, int):
        try:
            blank_id = _checks.static_option(blank_id, "blank_id")
        except (TypeError, ValueError):
            raise TypeError(f"`blank_id` must be an int, got {blank_id!r}.") from None
    if not 0 <= int(blank_id) < classes:
        raise ValueError(
            f"`blank_id` must be a class of `logits`, in [0, {classes}) (K = {classes}), got "
            f"{blank_id}."
        )
    return int(blank_id)


@_api.public(static=("blank_id",))
def ctc_loss_with_forward_probs(
    logits: ArrayLike,
    logit_paddings: ArrayLike,
    labels: ArrayLike,
    label_paddings: ArrayLike,
    *,
    blank_id: int = 0,
    log_epsilon: ArrayLike = -1e5,
) -> tuple[Array, Array, Array]:
    r"""CTC loss and the log forward probabilities, as ``optax.ctc_loss_with_forward_probs``.

    With :math:`p_t = \operatorname{softmax}(\text{logits}_t)`, the frames :math:`1 \dots T_b`
    of sequence :math:`b` that are not padding, its labels :math:`y` (the non-padded ones) and
    :math:`\mathcal{B}` the map that merges repeated symbols and then drops blanks:

    .. math::
      \ell_b = -\log \sum_{\pi \in \{1..K\}^{T_b}:\ \mathcal{B}(\pi) = y}\ \prod_{t=1}^{T_b}
               p_{t, \pi_t}

    computed by the forward algorithm (the module docstring describes its states).

    Args:
      logits: ``(B, T, K)`` unnormalised log-probabilities; ``K`` counts the blank.
      logit_paddings: ``(B, T)``, 1.0 for a padded frame, 0.0 otherwise (any frame may be
        padded; padded frames are skipped).
      labels: ``(B, N)`` integer labels, right-padded.
      label_paddings: ``(B, N)``, 1.0 for a padded label, 0.0 otherwise; each row is zeros
        followed by ones.
      blank_id: the class of the blank symbol.
      log_epsilon: the finite stand-in for :math:`\log 0` of impossible states.

    Returns:
      ``(loss, logalpha_blank, logalpha_emit)``: ``loss`` ``(B,)``; ``logalpha_blank``
      ``(T, B, N + 1)`` the ``ready`` states after each frame (the last frame's after the final
      closing step, so ``logalpha_blank[-1, b, N_b] = -loss[b]``); ``logalpha_emit``
      ``(T, B, N)`` the ``emitting`` states. float32 for half-precision ``logits``, else their
      dtype. A non-padded label outside ``[0, K)`` makes its sequence's loss NaN (optax would
      silently read a zero log-probability) and, under ``jax.experimental.checkify`` (user
      checks), raises naming the label. An impossible alignment (more labels than
      frames allow) gives a loss of about ``-log_epsilon``, as in optax.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.log(jnp.array([[[0.5, 0.4, 0.1], [0.3, 0.6, 0.1]]]))  # blank, a, b
      >>> loss, _, _ = jaxce.ctc_loss_with_forward_probs(
      ...     logits, jnp.zeros((1, 2)), jnp.array([[1]]), jnp.zeros((1, 1)))
      >>> loss  # -log(p(a a) + p(a -) + p(- a)) = -log(0.24 + 0.12 + 0.30)
      Array([0.4155], dtype=float32)

    References:
      A. Graves, S. Fernandez, F. Gomez and J. Schmidhuber, "Connectionist temporal
      classification: labelling unsegmented sequence data with recurrent neural networks",
      ICML 2006.
    """
    logits, logit_paddings, labels, label_paddings = _validate(
        logits, logit_paddings, labels, label_paddings
    )
    dtype = _reduce.compute_dtype(logits.dtype)
    batch, frames, classes = logits.shape
    num_labels = labels.shape[1]
    blank_id = _blank_id(blank_id, classes)
    log_probs = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    eps = jnp.asarray(log_epsilon, dtype)

    valid = (labels >= 0) & (labels < classes)
    padded_label = label_paddings.astype(bool)
    bad_label = ~valid & ~padded_label
    bad = jnp.any(bad_label, axis=1)
    if labels.size:
        _, first_bad = _checks.first_where(bad_label, labels)
        _checks.value_check(
            ~jnp.any(bad),
            f"invalid CTC label {{label}}: non-padded labels must lie in [0, {classes}).",
            label=first_bad,
        )
    # (B, T, N): log p_t(y_n), gathered per (sequence, frame) row.
    safe_labels = jnp.broadcast_to(
        jnp.where(valid, labels, 0)[:, None, :], (batch, frames, num_labels)
    )
    label_log_probs = _reduce.take_along_classes(log_probs, safe_labels)
    blank_log_probs = log_probs[:, :, blank_id]  # (B, T)
    # repeats[n]: y_{n+1} == y_n, so emitting[n] may not close into ready[n + 1] directly.
    repeats = jnp.concatenate(
        [labels[:, 1:] == labels[:, :-1], jnp.zeros_like(labels[:, : min(num_labels, 1)], bool)],
        axis=1,
    ).astype(dtype)

    def close(ready, emitting, penalty):
        """Adds ``emitting[n] + penalty[n]`` into ``ready[n + 1]`` (log space)."""
        return ready.at[:, 1:].set(_numerics.log_add_exp(ready[:, 1:], emitting + penalty))

    def frame(state, inputs):
        ready, emitting = state
        emit_lp, blank_lp, padded = inputs
        closed = close(ready, emitting, eps * repeats)
        next_emitting = emit_lp + _numerics.log_add_exp(closed[:, :-1], emitting)
        # A repeated label reaches ready[n + 1] through this blank only.
        next_ready = close(
            closed + blank_lp[:, None], emitting + blank_lp[:, None], eps * (1 - repeats)
        )
        padded = padded[:, None]
        next_ready = jnp.where(padded, ready, next_ready)
        next_emitting = jnp.where(padded, emitting, next_emitting)
        return (next_ready, next_emitting), (next_ready, next_emitting)

    lengths = num_labels - jnp.sum(padded_label, axis=1)
    # The scan's starting states, laid out like the sequences (a carry's sharding is its type
    # on an Explicit mesh, and the body's output is sharded like the batch).
    zeros = jnp.zeros_like(lengths, dtype)[:, None]
    start_ready = zeros + jnp.where(jnp.arange(num_labels + 1) == 0, 0.0, eps)[None, :]
    start_emitting = zeros + jnp.full((1, num_labels), eps)
    inputs = (
        jnp.swapaxes(label_log_probs, 0, 1),
        jnp.swapaxes(blank_log_probs, 0, 1),
        jnp.swapaxes(logit_paddings.astype(bool), 0, 1),
    )
    (ready, emitting), (ready_t, emitting_t) = jax.lax.scan(
        frame, (start_ready, start_emitting), inputs
    )
    final_ready = close(ready, emitting, jnp.zeros((), dtype))
    if frames:
        ready_t = ready_t.at[-1].set(final_ready)
    loss = -_reduce.take_class(final_ready, lengths)
    loss = jnp.where(bad, jnp.full((), jnp.nan, dtype), loss)
    return loss, ready_t, emitting_t


@_api.public(static=("blank_id",))
def ctc_loss(
    logits: ArrayLike,
    logit_paddings: ArrayLike,
    labels: ArrayLike,
    label_paddings: ArrayLike,
    *,
    blank_id: int = 0,
    log_epsilon: ArrayLike = -1e5,
) -> Array:
    r"""CTC loss per sequence, as ``optax.ctc_loss``.

    .. math::
      \ell_b = -\log \sum_{\pi:\ \mathcal{B}(\pi) = y_b}\ \prod_{t=1}^{T_b} p_{t, \pi_t}

    See :func:`ctc_loss_with_forward_probs` for the definitions and the arguments.

    Args:
      logits: ``(B, T, K)`` unnormalised log-probabilities (``K`` includes the blank).
      logit_paddings: ``(B, T)`` padding flags (1.0 = padded frame).
      labels: ``(B, N)`` integer labels, right-padded.
      label_paddings: ``(B, N)`` padding flags (1.0 = padded label).
      blank_id: the class of the blank symbol.
      log_epsilon: the finite stand-in for :math:`\log 0`.

    Returns:
      ``(B,)`` losses, float32 for half-precision ``logits``, else their dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> logits = jnp.log(jnp.array([[[0.5, 0.4, 0.1], [0.3, 0.6, 0.1]]]))
      >>> jaxce.ctc_loss(logits, jnp.zeros((1, 2)), jnp.array([[1, 2]]), jnp.zeros((1, 2)))
      Array([3.2189], dtype=float32)

    References:
      A. Graves et al., "Connectionist temporal classification", ICML 2006.
    """
    loss, _, _ = ctc_loss_with_forward_probs(
        logits, logit_paddings, labels, label_paddings, blank_id=blank_id, log_epsilon=log_epsilon
    )
    return loss

"""``ctc_loss`` and ``ctc_loss_with_forward_probs``.

The float64 reference enumerates every alignment (all ``K**T`` frame-label paths), collapses
each one (merge repeats, drop blanks) and sums the probabilities of those that give the
labels: the definition, sharing nothing with the forward algorithm under test.
"""

from __future__ import annotations

import inspect
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads_2
from jax.experimental import checkify
from reference import log_softmax

import jaxce

optax = pytest.importorskip("optax")


# Jitted once per shape: eager calls would compile every primitive of the scan separately.
_ctc_loss = jax.jit(jaxce.ctc_loss, static_argnames=("blank_id",))
_ctc_forward = jax.jit(jaxce.ctc_loss_with_forward_probs, static_argnames=("blank_id",))


def _seeded(*case):
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _collapse(path, blank):
    merged = [k for i, k in enumerate(path) if i == 0 or k != path[i - 1]]
    return tuple(k for k in merged if k != blank)


def _reference_loss(logits, logit_paddings, labels, label_paddings, blank=0):
    """-log sum over paths of the non-padded frames whose collapse is the non-padded labels."""
    out = []
    for b in range(logits.shape[0]):
        lp = log_softmax(logits[b][logit_paddings[b] == 0])
        target = tuple(int(y) for y in labels[b][label_paddings[b] == 0])
        total = 0.0
        for path in itertools.product(range(lp.shape[1]), repeat=lp.shape[0]):
            if _collapse(path, blank) == target:
                total += np.exp(sum(lp[t, k] for t, k in enumerate(path)))
        out.append(-np.log(total))
    return np.array(out)


def _case(rng, batch, frames, classes, max_labels, blank, pad_frames=True):
    """Random logits and labels (repeats included) whose every sequence is feasible."""
    logits = rng.normal(size=(batch, frames, classes)) * 1.5
    symbols = [k for k in range(classes) if k != blank]
    labels = rng.choice(symbols, size=(batch, max_labels))
    if max_labels > 1:
        labels[0, 1] = labels[0, 0]  # a repeated label needs a blank between its copies
    label_paddings = np.zeros((batch, max_labels))
    logit_paddings = np.zeros((batch, frames))
    for b in range(batch):
        n = rng.integers(0, max_labels + 1) if b else max_labels
        label_paddings[b, n:] = 1.0
        needed = n + sum(labels[b, i] == labels[b, i + 1] for i in range(n - 1))
        spare = frames - needed
        assert spare >= 0, "choose more frames"
        if pad_frames and spare:
            dropped = rng.choice(frames, size=rng.integers(0, spare + 1), replace=False)
            logit_paddings[b, dropped] = 1.0  # padded frames may sit anywhere
    return logits, logit_paddings, labels.astype(np.int32), label_paddings


GRID = [
    (frames, classes, max_labels, blank)
    for frames, classes, max_labels in [(1, 3, 1), (3, 3, 1), (4, 3, 2), (5, 4, 2), (5, 3, 3)]
    for blank in (0, 2)
]


@pytest.mark.parametrize(("frames", "classes", "max_labels", "blank"), GRID)
def test_loss_equals_sum_over_alignments(frames, classes, max_labels, blank):
    rng = _seeded(frames, classes, max_labels, blank)
    args = _case(rng, 3, frames, classes, max_labels, blank)
    with jax.enable_x64(True):
        got = _ctc_loss(*args, blank_id=blank)
    np.testing.assert_allclose(got, _reference_loss(*args, blank=blank), rtol=1e-10)


@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize("log_epsilon", [-1e5, -50.0])
def test_parity_with_optax_including_forward_probabilities(blank, log_epsilon):
    rng = _seeded(blank, log_epsilon)
    args = _case(rng, 4, 9, 5, 4, blank)
    kwargs = {"blank_id": blank, "log_epsilon": log_epsilon}
    with jax.enable_x64(True):
        got = _ctc_forward(*args, **kwargs)
        want = jax.jit(optax.losses.ctc_loss_with_forward_probs, static_argnames="blank_id")(
            *args, **kwargs
        )
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-8)
        grad = jax.jit(jax.grad(lambda x: jaxce.ctc_loss(x, *args[1:], **kwargs).sum()))
        want_grad = jax.jit(jax.grad(lambda x: optax.losses.ctc_loss(x, *args[1:], **kwargs).sum()))
        np.testing.assert_allclose(grad(args[0]), want_grad(args[0]), rtol=1e-8, atol=1e-10)
    # The last blank forward probability at the label length is minus the loss.
    loss, blank_alpha, _ = got
    lengths = (args[3] == 0).sum(1)
    np.testing.assert_allclose(blank_alpha[-1, np.arange(4), lengths], -loss, rtol=1e-10)


def test_float32_parity_with_optax():
    rng = _seeded("f32")
    args = [np.asarray(a, np.float32) for a in _case(rng, 3, 8, 6, 3, 0)]
    args[2] = args[2].astype(np.int32)
    for g, w in zip(
        _ctc_forward(*args),
        jax.jit(optax.losses.ctc_loss_with_forward_probs)(*args),
        strict=True,
    ):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=1e-5)


@pytest.mark.slow
def test_second_order_gradients():
    rng = _seeded("grads")
    logits, logit_paddings, labels, label_paddings = _case(rng, 2, 4, 3, 2, 0)

    def loss(x):
        return jaxce.ctc_loss(x, logit_paddings, labels, label_paddings)

    check_grads_2(loss, (logits,))


def test_gradient_is_softmax_minus_alignment_posterior_for_a_forced_alignment():
    """One-to-one alignment (T = N, no repeats): the gradient is softmax - one_hot(labels)."""
    rng = _seeded("forced")
    logits = rng.normal(size=(2, 4, 5))
    labels = np.array([[1, 2, 3, 4], [4, 1, 4, 2]], np.int32)
    with jax.enable_x64(True):
        grad = jax.jit(
            jax.grad(lambda x: jaxce.ctc_loss(x, np.zeros((2, 4)), labels, np.zeros((2, 4))).sum())
        )(logits)
    want = np.exp(log_softmax(logits)) - np.eye(5)[labels]
    np.testing.assert_allclose(grad, want, rtol=1e-8, atol=1e-10)


def test_jit_and_vmap():
    rng = _seeded("vmap")
    cases = [_case(rng, 2, 5, 4, 2, 0, pad_frames=False) for _ in range(3)]
    stacked = [np.stack(parts) for parts in zip(*cases, strict=True)]
    stacked = [jnp.asarray(a, jnp.int32 if i == 2 else jnp.float32) for i, a in enumerate(stacked)]
    eager = jnp.stack([_ctc_loss(*[p[i] for p in stacked]) for i in range(3)])
    np.testing.assert_allclose(jax.vmap(jaxce.ctc_loss)(*stacked), eager, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(jaxce.ctc_loss, static_argnames="blank_id")(*[p[0] for p in stacked]),
        eager[0],
        rtol=1e-6,
    )


def test_no_labels_is_the_all_blank_path():
    rng = _seeded("empty labels")
    logits = rng.normal(size=(2, 3, 4))
    with jax.enable_x64(True):
        loss = jaxce.ctc_loss(
            logits, np.zeros((2, 3)), np.zeros((2, 0), np.int32), np.zeros((2, 0))
        )
    np.testing.assert_allclose(loss, -log_softmax(logits)[:, :, 0].sum(1), rtol=1e-12)


def test_empty_batch_and_zero_frames():
    loss, blank_alpha, emit_alpha = jaxce.ctc_loss_with_forward_probs(
        jnp.zeros((0, 3, 4)), jnp.zeros((0, 3)), jnp.zeros((0, 2), jnp.int32), jnp.zeros((0, 2))
    )
    assert loss.shape == (0,) and blank_alpha.shape == (3, 0, 3) and emit_alpha.shape == (3, 0, 2)
    grad = jax.grad(
        lambda x: jaxce.ctc_loss(
            x, jnp.zeros((0, 3)), jnp.zeros((0, 2), jnp.int32), jnp.zeros((0, 2))
        ).sum()
    )(jnp.zeros((0, 3, 4)))
    assert grad.shape == (0, 3, 4)
    # No frames: the empty label sequence has probability 1.
    loss, blank_alpha, _ = jaxce.ctc_loss_with_forward_probs(
        jnp.zeros((2, 0, 4)), jnp.zeros((2, 0)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1))
    )
    np.testing.assert_array_equal(loss, [0.0, 0.0])
    assert blank_alpha.shape == (0, 2, 2)


def test_bad_values_give_nan_and_bad_shapes_raise():
    rng = _seeded("bad")
    logits, logit_paddings, labels, label_paddings = _case(rng, 3, 5, 4, 2, 0, pad_frames=False)
    label_paddings[:] = 0.0
    bad = labels.copy()
    bad[1, 0] = 7  # out of range, not padded
    loss = np.asarray(jaxce.ctc_loss(logits, logit_paddings, bad, label_paddings))
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2]]).all()
    checked = checkify.checkify(jaxce.ctc_loss, errors=checkify.user_checks)
    error, _ = checked(logits, logit_paddings, bad, label_paddings)
    with pytest.raises(checkify.JaxRuntimeError, match="invalid CTC label 7"):
        error.throw()
    padded_bad = labels.copy()
    padded_bad[2, 1], label_paddings[2, 1] = -1, 1.0  # a padded entry may hold anything
    assert np.isfinite(jaxce.ctc_loss(logits, logit_paddings, padded_bad, label_paddings)).all()
    nan_logits = logits.copy()
    nan_logits[0, 2, 1] = np.nan
    loss = np.asarray(jaxce.ctc_loss(nan_logits, logit_paddings, labels, label_paddings))
    assert np.isnan(loss[0]) and np.isfinite(loss[1:]).all()
    with pytest.raises(ValueError, match="logits"):
        jaxce.ctc_loss(logits[0], logit_paddings, labels, label_paddings)
    with pytest.raises(ValueError, match="labels"):
        jaxce.ctc_loss(logits, logit_paddings, labels[:2], label_paddings[:2])
    with pytest.raises(ValueError, match="logit_paddings"):
        jaxce.ctc_loss(logits, logit_paddings[:, :3], labels, label_paddings)
    with pytest.raises(ValueError, match="label_paddings"):
        jaxce.ctc_loss(logits, logit_paddings, labels, label_paddings[:, :1])
    with pytest.raises(ValueError, match="classes"):
        jaxce.ctc_loss(logits[:, :, :0], logit_paddings, labels, label_paddings)
    with pytest.raises(TypeError, match="labels"):
        jaxce.ctc_loss(logits, logit_paddings, labels.astype(float), label_paddings)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_computed_in_float32(dtype):
    rng = _seeded("half")
    logits, logit_paddings, labels, label_paddings = _case(rng, 2, 5, 4, 2, 0)
    half = jnp.asarray(logits, dtype)
    loss = jaxce.ctc_loss(half, logit_paddings, labels, label_paddings)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(
        loss,
        jaxce.ctc_loss(np.asarray(half, np.float32), logit_paddings, labels, label_paddings),
        rtol=1e-6,
    )
    grad = jax.grad(lambda x: jaxce.ctc_loss(x, logit_paddings, labels, label_paddings).sum())(half)
    assert grad.dtype == dtype


@pytest.mark.parametrize("name", ["ctc_loss", "ctc_loss_with_forward_probs"])
def test_signatures_are_optaxs(name):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    assert params(getattr(jaxce, name)) == params(getattr(optax.losses, name))


_FMAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    "frame0",
    [
        [-np.inf, 0.0, 0.0],  # the reproducer: the blank, which `a a` does not need
        [0.0, 0.0, -np.inf],  # a class no alignment uses
        [_FMAX, -_FMAX, 0.0],  # log_softmax gives -inf for class 1 ... which `- a` avoids
        [0.0, _FMAX, -_FMAX],
        [-_FMAX, 0.0, 0.0],
    ],
)
def test_gradient_finite_for_infinite_and_extreme_logits(frame0):
    """A class of probability 0 that an alignment can do without leaves a finite loss, and its
    gradient must be finite too (it was NaN: logaddexp of two -inf states): equal to the
    gradient with that logit at a large finite value, where its probability is negligible."""
    labels, paddings = jnp.array([[1]]), jnp.zeros((1, 1))

    def loss(logits):
        return jaxce.ctc_loss(logits, jnp.zeros((1, 2)), labels, paddings).sum()

    logits = jnp.array([[frame0, [0.0, 0.0, 0.0]]], jnp.float32)
    value, grad = jax.value_and_grad(loss)(logits)
    assert np.isfinite(value) and np.isfinite(np.asarray(grad)).all(), grad
    tame = jnp.clip(logits, -60.0, 60.0)  # same probabilities to float32 precision
    np.testing.assert_allclose(value, loss(tame), rtol=1e-6)
    np.testing.assert_allclose(grad, jax.grad(loss)(tame), atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_gradient_under_checkify_all_checks(batch):
    """``checkify(grad(ctc_loss), errors=all_checks)`` ran into JAX's ``IndexError: tuple index
    out of range`` (take_along_axis's gradient) once the batch had two sequences."""
    rng = _seeded("checkify", batch)
    logits, logit_paddings, labels, label_paddings = _case(rng, batch, 5, 4, 2, 0, pad_frames=False)

    def loss(x):
        return jaxce.ctc_loss(x, logit_paddings, labels, label_paddings).sum()

    error, grad = checkify.checkify(jax.grad(loss), errors=checkify.all_checks)(logits)
    assert error.get() is None
    np.testing.assert_allclose(grad, jax.grad(loss)(logits), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("blank_id", [4, 7, -1, -4])
def test_blank_id_outside_classes_raises(blank_id):
    """``blank_id`` must be a class: it was silently clamped (4 -> 3) or wrapped (-1 -> 3)."""
    rng = _seeded("blank", blank_id)
    args = _case(rng, 2, 5, 4, 2, 0, pad_frames=False)
    for fn in (jaxce.ctc_loss, jaxce.ctc_loss_with_forward_probs):
        with pytest.raises(ValueError, match="blank_id"):
            fn(*args, blank_id=blank_id)
    assert np.isfinite(jaxce.ctc_loss(*args, blank_id=3)).all()

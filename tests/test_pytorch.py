"""Parity of ``jaxce.pytorch`` with ``torch.nn.functional``: values and input gradients.

Every expected value comes from PyTorch itself (CPU, float32), never from jaxce. The grids are
seeded and run eagerly (op-by-op), which keeps the file fast: a few distinct shapes, no
per-case ``jit`` compile.
"""

from __future__ import annotations

import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxce import pytorch

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL = ATOL = 2e-5
C = 5
SHAPES = [(C,), (4, C), (3, C, 2), (2, C, 3, 2)]  # (C), (N, C), (N, C, d1), (N, C, d1, d2)


def _seeded(*case):
    """A generator seeded from the test case (stable across processes, unlike ``hash``)."""
    return np.random.default_rng(zlib.crc32(repr(case).encode()))


def _torch(x, dtype=None):
    x = np.asarray(x)
    if dtype is not None:
        x = x.astype(dtype)
    return torch.from_numpy(x.copy())


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, equal_nan=True
    )


def _target_shape(shape):
    return () if len(shape) == 1 else shape[:1] + shape[2:]


def _index_target(rng, shape, ignore_index, frac_ignored=0.3):
    target = rng.integers(0, C, _target_shape(shape))
    drop = rng.random(target.shape) < frac_ignored
    return np.where(drop, ignore_index, target).astype(np.int32)


def _prob_target(rng, shape):
    raw = rng.normal(size=shape)
    axis = 0 if len(shape) == 1 else 1
    e = np.exp(raw - raw.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def _compare(jax_fn, torch_fn, x, rng):
    """Compares value and the vector-Jacobian product w.r.t. ``x`` of ``jax_fn`` and ``torch_fn``.

    ``jax_fn(x)`` / ``torch_fn(x)`` must return arrays of the same shape; the cotangent is
    random (ones for a scalar), so a wrong gradient of any single element shows.
    """
    out, vjp = jax.vjp(jax_fn, jnp.asarray(x))
    cot = rng.normal(size=out.shape).astype(np.float32) if out.ndim else np.float32(1.0)
    (grad,) = vjp(jnp.asarray(cot, out.dtype))
    _check_torch(torch_fn, x, cot, out, grad)


def _check_torch(torch_fn, x, cot, out, grad):
    xt = _torch(x).requires_grad_(True)
    out_t = torch_fn(xt)
    assert out.shape == tuple(out_t.shape), (out.shape, out_t.shape)
    _close(out, out_t.detach().numpy())
    out_t.backward(_torch(cot) if out_t.ndim else None)
    _close(grad, xt.grad.numpy())


@functools.cache
def _static(fn, **static_kwargs):
    """``fn`` with static keyword arguments, one (hashable) object per distinct call."""
    return functools.partial(fn, **static_kwargs)


@functools.partial(jax.jit, static_argnames=("loss", "reductions"))
def _values_and_grads(x, cot, kwargs, *, loss, reductions):
    """For each reduction: ``loss(x, reduction=r, **kwargs)`` and its VJP w.r.t. ``x``.

    One compiled program per (loss, shapes, which arguments are ``None``) serves every case of
    a parity grid: array arguments (targets, weights, smoothing) are traced, not baked in. The
    cotangent is ``cot`` for ``"none"`` and 1 for scalar reductions.
    """
    results = {}
    for reduction in reductions:
        out, vjp = jax.vjp(lambda v, r=reduction: loss(v, reduction=r, **kwargs), x)
        (grad,) = vjp(cot if out.ndim else jnp.ones((), out.dtype))
        results[reduction] = out, grad
    return results


def _parity_grid(
    loss, torch_loss, x, kwargs, torch_kwargs, rng, reductions=("none", "sum", "mean")
):
    """Values and input gradients of ``loss`` vs ``torch_loss`` for every reduction."""
    kwargs = {k: (None if v is None else jnp.asarray(v)) for k, v in kwargs.items()}
    shape = jax.eval_shape(lambda v: loss(v, reduction="none", **kwargs), x).shape
    cot = rng.normal(size=shape).astype(np.float32)
    results = _values_and_grads(
        jnp.asarray(x), jnp.asarray(cot), kwargs, loss=loss, reductions=reductions
    )
    for reduction, (out, grad) in results.items():
        _check_torch(
            lambda v, r=reduction: torch_loss(v, reduction=r, **torch_kwargs),
            x,
            cot if out.ndim else None,
            out,
            grad,
        )
    return {reduction: out for reduction, (out, _) in results.items()}


def _ce_grid(x, target, rng, weight=None, label_smoothing=0.0, ignore_index=-100):
    """``_parity_grid`` for ``cross_entropy``; same compiled programs as its parity grid."""
    pass_weight = weight is not None
    weight = weight if pass_weight else np.ones(x.shape[0 if x.ndim == 1 else 1], np.float32)
    index = np.issubdtype(np.asarray(target).dtype, np.integer)
    return _parity_grid(
        _static(pytorch.cross_entropy, ignore_index=ignore_index),
        F.cross_entropy,
        x,
        {"target": target, "weight": weight, "label_smoothing": np.float32(label_smoothing)},
        {
            "target": _torch(target, np.int64) if index else _torch(target),
            "weight": _torch(weight) if pass_weight else None,
            "label_smoothing": label_smoothing,
            "ignore_index": ignore_index,
        },
        rng,
    )


# --------------------------------------------------------------------------------------------
# cross_entropy


def _weight(rng, weighted):
    """Random class weights, or ones standing for PyTorch's ``weight=None``.

    Passing ones keeps a single compiled program per grid cell; ``weight=None`` itself is
    covered by the edge-case tests.
    """
    if weighted:
        return rng.uniform(0.2, 2.0, C).astype(np.float32), True
    return np.ones(C, np.float32), False


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["index", "index_ignore_class", "prob"])
def test_cross_entropy_parity(shape, kind):
    """Grid: shape x target kind x (weight, label smoothing) x reduction, values and grads."""
    rng = _seeded(shape, kind)
    x = (2 * rng.normal(size=shape)).astype(np.float32)
    ignore_index = 1 if kind == "index_ignore_class" else -100  # 1: a real class
    if kind == "prob":
        target = _prob_target(rng, shape)
    else:
        target = _index_target(rng, shape, ignore_index)  # about 30% ignored
    for weighted, label_smoothing in itertools.product([False, True], [0.0, 0.2]):
        weight = rng.uniform(0.2, 2.0, C).astype(np.float32) if weighted else None
        _ce_grid(x, target, rng, weight, label_smoothing, ignore_index)


@pytest.mark.slow
def test_cross_entropy_default_arguments_match_torch(rng):
    x = rng.normal(size=(4, C)).astype(np.float32)
    y = rng.integers(0, C, 4).astype(np.int32)
    y[1] = -100
    _close(pytorch.cross_entropy(x, y), F.cross_entropy(_torch(x), _torch(y, np.int64)))
    _close(pytorch.nll_loss(x, y), F.nll_loss(_torch(x), _torch(y, np.int64)))


def test_all_ignored_mean_is_nan_like_torch(rng):
    x = rng.normal(size=(4, C)).astype(np.float32)
    y = np.full(4, -100, np.int32)
    yt = _torch(y, np.int64)
    for fn, fn_t in [(pytorch.cross_entropy, F.cross_entropy), (pytorch.nll_loss, F.nll_loss)]:
        assert np.isnan(float(fn_t(_torch(x), yt)))
        assert np.isnan(float(fn(x, y)))
        assert float(fn(x, y, reduction="sum")) == 0.0
    assert np.isnan(float(jax.jit(pytorch.cross_entropy)(x, y)))
    # values and gradients (zero for the NaN mean, in both) with weights and smoothing
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    for label_smoothing in (0.0, 0.1):
        out = _ce_grid(x, y, rng, w, label_smoothing)
        assert np.isnan(out["mean"]) and out["sum"] == 0.0
    _parity_grid(
        _static(pytorch.nll_loss, ignore_index=-100),
        F.nll_loss,
        x,
        {"target": y, "weight": w},
        {"target": yt, "weight": _torch(w)},
        rng,
    )


def test_unbatched_input(rng):
    x = rng.normal(size=(C,)).astype(np.float32)
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    for y in (np.int32(3), np.int32(-100)):  # the ignored one has a NaN mean in both
        _ce_grid(x, y, rng, w, 0.1)
        _parity_grid(
            _static(pytorch.nll_loss, ignore_index=-100),
            F.nll_loss,
            x,
            {"target": y, "weight": w},
            {"target": _torch(y, np.int64), "weight": _torch(w)},
            rng,
        )
    _ce_grid(x, _prob_target(rng, (C,)), rng, w, 0.1)
    out = jax.eval_shape(lambda v: pytorch.cross_entropy(v, np.int32(3), reduction="none"), x)
    assert out.shape == ()


def test_probability_targets_mean_divides_by_number_of_examples(rng):
    """PyTorch: with probability targets, class weights do not enter the mean's denominator."""
    x = rng.normal(size=(3, C, 2)).astype(np.float32)
    p = _prob_target(rng, x.shape)
    w = rng.uniform(0.1, 3, C).astype(np.float32)
    for label_smoothing in (0.0, 0.3):
        out = _ce_grid(x, p, rng, w, label_smoothing)
        _close(out["mean"], out["sum"] / 6)  # N * d1 examples, whatever the weights


def test_probability_targets_with_non_negative_ignore_index_raise_like_torch(rng):
    x = rng.normal(size=(3, C)).astype(np.float32)
    p = _prob_target(rng, x.shape)
    with pytest.raises(RuntimeError):
        F.cross_entropy(_torch(x), _torch(p), ignore_index=0)
    with pytest.raises(ValueError, match="ignore_index"):
        pytorch.cross_entropy(x, p, ignore_index=0)
    # negative values are accepted (and have no effect) in both
    _close(
        pytorch.cross_entropy(x, p, ignore_index=-1),
        F.cross_entropy(_torch(x), _torch(p), ignore_index=-1),
    )


def test_weight_label_smoothing_and_ignore_index_together(rng):
    x = (4 * rng.normal(size=(3, C, 2))).astype(np.float32)
    y = rng.integers(0, C, (3, 2)).astype(np.int32)
    y[0, :] = 1  # ignore_index, a real class: a whole row of the batch and one more
    y[2, 1] = 1
    w = rng.uniform(0.1, 3, C).astype(np.float32)
    out = _ce_grid(x, y, rng, w, 0.25, ignore_index=1)
    assert np.all(np.asarray(out["none"])[y == 1] == 0)


@pytest.mark.parametrize("bad", [C, -1, 100])
def test_out_of_range_index_raises_eagerly_and_is_nan_under_jit(rng, bad):
    x = rng.normal(size=(3, C)).astype(np.float32)
    y = np.array([0, bad, 2], np.int32)
    with pytest.raises(IndexError):
        F.cross_entropy(_torch(x), _torch(y, np.int64))
    for fn in (pytorch.cross_entropy, pytorch.nll_loss):
        with pytest.raises(IndexError, match="target"):
            fn(x, y)
        per_example = jax.jit(fn, static_argnames="reduction")(x, y, reduction="none")
        per_example = np.asarray(per_example)
        assert np.isnan(per_example[1]) and np.isfinite(per_example[[0, 2]]).all()
        assert np.isnan(jax.jit(fn)(x, y))
    # the same value as `ignore_index` is fine, in both libraries
    _close(
        pytorch.cross_entropy(x, y, ignore_index=bad),
        F.cross_entropy(_torch(x), _torch(y, np.int64), ignore_index=bad),
    )


def test_jit_equals_eager_and_torch(rng):
    x = rng.normal(size=(4, C)).astype(np.float32)
    y = _index_target(rng, x.shape, -100)
    w = rng.uniform(0.5, 2, C).astype(np.float32)
    f = jax.jit(lambda v: pytorch.cross_entropy(v, y, weight=w, label_smoothing=0.1))
    expected = F.cross_entropy(
        _torch(x), _torch(y, np.int64), weight=_torch(w), label_smoothing=0.1
    )
    _close(f(x), expected)
    _close(pytorch.cross_entropy(x, y, weight=w, label_smoothing=0.1), expected)


def test_target_dtypes(rng):
    x = rng.normal(size=(4, C)).astype(np.float32)
    y = rng.integers(0, C, 4)
    expected = F.cross_entropy(_torch(x), _torch(y, np.int64))
    for dtype in (np.int32, np.uint8, np.int8):
        _close(pytorch.cross_entropy(x, y.astype(dtype)), expected)
    with pytest.raises(TypeError, match="target"):
        pytorch.cross_entropy(x, y.astype(bool))
    with pytest.raises(TypeError, match="target"):
        pytorch.nll_loss(x, y.astype(np.float32))


def test_bad_arguments_raise(rng):
    x = rng.normal(size=(4, C)).astype(np.float32)
    y = rng.integers(0, C, 4).astype(np.int32)
    with pytest.raises(ValueError, match="target"):
        pytorch.cross_entropy(x, y[:3])
    with pytest.raises(ValueError, match="target"):
        pytorch.cross_entropy(x, _prob_target(rng, (4, C + 1)))
    with pytest.raises(ValueError, match="input"):
        pytorch.cross_entropy(jnp.float32(1.0), jnp.int32(0))
    for fn in (pytorch.cross_entropy, pytorch.nll_loss):
        with pytest.raises(ValueError, match="`weight`"):
            fn(x, y, weight=np.ones(C + 1, np.float32))
    with pytest.raises(ValueError, match="label_smoothing"):
        pytorch.cross_entropy(x, y, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        pytorch.cross_entropy(x, y, reduction="batchmean")
    with pytest.raises(ValueError, match="reduction"):
        pytorch.nll_loss(x, y, reduction="sum_and_weight")


# --------------------------------------------------------------------------------------------
# nll_loss


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_nll_loss_parity(shape, ignore_index):
    rng = _seeded(shape, ignore_index)
    x = rng.normal(size=shape).astype(np.float32)  # used as given: not normalised
    y = _index_target(rng, shape, ignore_index)
    loss = _static(pytorch.nll_loss, ignore_index=ignore_index)
    for weighted in (False, True):
        weight, pass_weight = _weight(rng, weighted)
        _parity_grid(
            loss,
            F.nll_loss,
            x,
            {"target": y, "weight": weight},
            {
                "target": _torch(y, np.int64),
                "weight": _torch(weight) if pass_weight else None,
                "ignore_index": ignore_index,
            },
            rng,
        )


# --------------------------------------------------------------------------------------------
# binary_cross_entropy, binary_cross_entropy_with_logits

BINARY_SHAPES = [(6,), (4, C), (2, C, 3)]


def _binary_target(rng, shape, hard):
    if hard:
        return rng.integers(0, 2, shape).astype(np.float32)
    return rng.uniform(0, 1, shape).astype(np.float32)


@pytest.mark.parametrize("shape", BINARY_SHAPES, ids=str)
def test_binary_cross_entropy_parity(shape):
    rng = _seeded("bce", shape)
    x = rng.uniform(0.02, 0.98, shape).astype(np.float32)
    loss = _static(pytorch.binary_cross_entropy)
    for hard, weighted in itertools.product([False, True], [False, True]):
        y = _binary_target(rng, shape, hard)
        # a weight along the last axis, broadcast as PyTorch does; ones stand for `None`
        weight = rng.uniform(0.2, 2, shape[-1:]) if weighted else np.ones(shape[-1:])
        weight = weight.astype(np.float32)
        _parity_grid(
            loss,
            F.binary_cross_entropy,
            x,
            {"target": y, "weight": weight},
            {"target": _torch(y), "weight": _torch(weight) if weighted else None},
            rng,
        )


@pytest.mark.parametrize("shape", BINARY_SHAPES, ids=str)
def test_binary_cross_entropy_with_logits_parity(shape):
    rng = _seeded("bce_logits", shape)
    x = (3 * rng.normal(size=shape)).astype(np.float32)
    loss = _static(pytorch.binary_cross_entropy_with_logits)
    for hard, weighted, pos_weighted in itertools.product([False, True], repeat=3):
        y = _binary_target(rng, shape, hard)
        weight = rng.uniform(0.2, 2, shape) if weighted else np.ones(shape)
        weight = weight.astype(np.float32)
        pos = rng.uniform(0.2, 4, shape[-1:]) if pos_weighted else np.ones(shape[-1:])
        pos = pos.astype(np.float32)
        _parity_grid(
            loss,
            F.binary_cross_entropy_with_logits,
            x,
            {"target": y, "weight": weight, "pos_weight": pos},
            {
                "target": _torch(y),
                "weight": _torch(weight) if weighted else None,
                "pos_weight": _torch(pos) if pos_weighted else None,
            },
            rng,
        )


@pytest.mark.slow
def test_binary_losses_defaults_and_none_weights_match_torch(rng):
    p = rng.uniform(0.05, 0.95, (4, C)).astype(np.float32)
    logits = rng.normal(size=(4, C)).astype(np.float32)
    y = _binary_target(rng, (4, C), hard=False)
    _compare(
        lambda v: pytorch.binary_cross_entropy(v, y),
        lambda v: F.binary_cross_entropy(v, _torch(y)),
        p,
        rng,
    )
    _compare(
        lambda v: pytorch.binary_cross_entropy_with_logits(v, y),
        lambda v: F.binary_cross_entropy_with_logits(v, _torch(y)),
        logits,
        rng,
    )


def test_binary_cross_entropy_clamps_logs_like_torch():
    p = np.array([0.0, 1.0, 0.0, 1.0, 1e-45, 0.5], np.float32)
    y = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.3], np.float32)
    w = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 1.0], np.float32)
    for reduction in ("none", "sum", "mean"):
        _close(
            pytorch.binary_cross_entropy(p, y, weight=w, reduction=reduction),
            F.binary_cross_entropy(_torch(p), _torch(y), weight=_torch(w), reduction=reduction),
        )


def test_binary_mean_is_mean_of_weighted_losses_not_weighted_mean(rng):
    """PyTorch's mean ignores the weights' sum: mean(w * l) over elements."""
    p = rng.uniform(0.05, 0.95, (3, C)).astype(np.float32)
    y = _binary_target(rng, (3, C), hard=True)
    w = np.zeros((3, 1), np.float32)
    w[0] = 2.0  # (N, 1) weight broadcast over the last axis
    expected = F.binary_cross_entropy(_torch(p), _torch(y), weight=_torch(w))
    _close(pytorch.binary_cross_entropy(p, y, weight=w), expected)
    expected = F.binary_cross_entropy_with_logits(_torch(p), _torch(y), weight=_torch(w))
    _close(pytorch.binary_cross_entropy_with_logits(p, y, weight=w), expected)


def test_pos_weight_broadcasts_over_channels_like_torch(rng):
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    y = _binary_target(rng, x.shape, hard=True)
    pos = rng.uniform(0.5, 3, (3, 1, 1)).astype(np.float32)
    _compare(
        lambda v: pytorch.binary_cross_entropy_with_logits(v, y, pos_weight=pos),
        lambda v: F.binary_cross_entropy_with_logits(v, _torch(y), pos_weight=_torch(pos)),
        x,
        rng,
    )


def test_binary_bad_arguments_raise(rng):
    p = rng.uniform(0.05, 0.95, (4, C)).astype(np.float32)
    y = _binary_target(rng, (4, C), hard=False)
    for fn in (pytorch.binary_cross_entropy, pytorch.binary_cross_entropy_with_logits):
        with pytest.raises(ValueError, match="target"):
            fn(p, y[:, :2])
        with pytest.raises(ValueError, match="weight"):
            fn(p, y, weight=np.ones((4, C, 1), np.float32))
        with pytest.raises(ValueError, match="reduction"):
            fn(p, y, reduction="batchmean")
    with pytest.raises(ValueError, match="pos_weight"):
        pytorch.binary_cross_entropy_with_logits(p, y, pos_weight=np.ones(4, np.float32))
    # out-of-range probabilities: PyTorch raises, so does the eager call; NaN under jit
    with pytest.raises(RuntimeError):
        F.binary_cross_entropy(_torch(p * 3), _torch(y))
    with pytest.raises(ValueError, match="input"):
        pytorch.binary_cross_entropy(p * 3, y)
    with pytest.raises(ValueError, match="target"):
        pytorch.binary_cross_entropy(p, y * 3)
    bad = p.copy()
    bad[0, 0] = 1.5
    out = jax.jit(pytorch.binary_cross_entropy, static_argnames="reduction")(
        bad, y, reduction="none"
    )
    assert np.isnan(np.asarray(out)[0, 0])


# --------------------------------------------------------------------------------------------
# kl_div

KL_REDUCTIONS = ("none", "sum", "mean", "batchmean")


# PyTorch warns that its "mean" is not the KL divergence; "mean" is tested on purpose.
KL_MEAN_WARNING = "ignore:reduction. 'mean' divides:UserWarning"


@pytest.mark.filterwarnings(KL_MEAN_WARNING)
@pytest.mark.parametrize("shape", [(C,), (4, C), (2, C, 3)], ids=str)
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_parity(shape, log_target):
    rng = _seeded("kl", shape, log_target)
    x = np.log(_prob_target(rng, shape))
    p = _prob_target(rng, shape)
    if not log_target:
        p = np.where(rng.random(shape) < 0.2, 0.0, p).astype(np.float32)  # 0 log 0 = 0
    target = np.log(p) if log_target else p
    _parity_grid(
        _static(pytorch.kl_div, log_target=log_target),
        F.kl_div,
        x,
        {"target": target},
        {"target": _torch(target), "log_target": log_target},
        rng,
        reductions=KL_REDUCTIONS,
    )


@pytest.mark.filterwarnings(KL_MEAN_WARNING)
def test_kl_div_batchmean_is_sum_over_first_dimension(rng):
    x = np.log(_prob_target(rng, (4, C, 3)))
    p = _prob_target(rng, (4, C, 3))
    expected = F.kl_div(_torch(x), _torch(p), reduction="sum") / 4
    _close(pytorch.kl_div(x, p, reduction="batchmean"), expected)
    _close(
        pytorch.kl_div(x, p, reduction="batchmean"),
        F.kl_div(_torch(x), _torch(p), reduction="batchmean"),
    )
    # "mean" divides by every element, batchmean by the batch only
    _close(pytorch.kl_div(x, p, reduction="mean"), expected / (C * 3))
    _close(pytorch.kl_div(x, p), expected / (C * 3))  # default reduction is "mean"
    # a scalar input: batchmean divides by 1, as in PyTorch
    _close(
        pytorch.kl_div(np.float32(-1.2), np.float32(0.5), reduction="batchmean"),
        F.kl_div(torch.tensor(-1.2), torch.tensor(0.5), reduction="batchmean"),
    )


@pytest.mark.filterwarnings(KL_MEAN_WARNING)
def test_kl_div_broadcasts_like_torch(rng):
    x = np.log(_prob_target(rng, (C,)))
    p = _prob_target(rng, (3, C))
    for reduction in KL_REDUCTIONS:
        _compare(
            lambda v, r=reduction: pytorch.kl_div(v, p, reduction=r),
            lambda v, r=reduction: F.kl_div(v, _torch(p), reduction=r),
            x,
            rng,
        )
    with pytest.raises(ValueError, match="input"):
        pytorch.kl_div(x, p[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        pytorch.kl_div(x, p, reduction="batch_mean")


def test_vmap_over_unbatched_calls_equals_torch_per_example(rng):
    """Under ``vmap`` targets are tracers: no eager check, the same values as PyTorch."""
    x = rng.normal(size=(4, C)).astype(np.float32)
    y = np.array([0, 3, -100, 4], np.int32)
    expected = F.cross_entropy(_torch(x), _torch(y, np.int64), reduction="none").numpy()
    per_row = np.asarray(jax.vmap(pytorch.cross_entropy)(x, y))
    _close(per_row[[0, 1, 3]], expected[[0, 1, 3]])
    assert np.isnan(per_row[2])  # the mean of one ignored example is NaN, as in PyTorch


# --------------------------------------------------------------------------------------------
# Errors and the contract's bad-input rules


def _raises_both(torch_call, jax_call, match):
    """torch raises RuntimeError; jaxce raises InvalidValueError (a ValueError as well)."""
    with pytest.raises(RuntimeError):
        torch_call()
    with pytest.raises(pytorch.InvalidValueError, match=match) as info:
        jax_call()
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("probs", "target"),
    [
        ([1.5, 0.5], [1.0, 0.0]),
        ([-0.1, 0.5], [1.0, 0.0]),
        ([np.nan, 0.5], [1.0, 0.0]),
        ([0.5, 0.5], [1.5, 0.0]),
        ([0.5, 0.5], [np.nan, 0.0]),
    ],
)
def test_binary_cross_entropy_values_outside_unit_interval_raise_as_torch(probs, target):
    p, t = np.array(probs, np.float32), np.array(target, np.float32)
    _raises_both(
        lambda: F.binary_cross_entropy(_torch(p), _torch(t)),
        lambda: pytorch.binary_cross_entropy(jnp.asarray(p), jnp.asarray(t)),
        r"\[0, 1\]",
    )


def test_label_smoothing_above_one_raises_as_torch(rng):
    x, t = rng.normal(size=(3, C)).astype(np.float32), np.array([0, 1, 2])
    _raises_both(
        lambda: F.cross_entropy(_torch(x), _torch(t, np.int64), label_smoothing=1.5),
        lambda: pytorch.cross_entropy(x, t, label_smoothing=1.5),
        "label_smoothing",
    )


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_class_index_out_of_range_raises_index_error_as_torch(fn, rng):
    x, t = rng.normal(size=(3, C)).astype(np.float32), np.array([0, C, 1])
    with pytest.raises(IndexError):
        getattr(F, fn)(_torch(x), _torch(t, np.int64))
    with pytest.raises(IndexError, match=str(C)):
        getattr(pytorch, fn)(x, t)


@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss", "binary_cross_entropy", "kl_div"])
def test_unknown_reduction_raises_value_error_as_torch(fn, rng):
    x = rng.random((3, C)).astype(np.float32)
    t = np.array([0, 1, 2]) if fn in ("cross_entropy", "nll_loss") else x
    with pytest.raises(ValueError):
        getattr(F, fn)(_torch(x), _torch(t, t.dtype), reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        getattr(pytorch, fn)(x, t, reduction="avg")


def _empty_case(fn, shape):
    """``(input, target)`` with a zero-size batch, for ``fn``."""
    x = np.zeros(shape, np.float32)
    if fn in ("cross_entropy", "nll_loss"):
        return x, np.zeros(shape[:1] + shape[2:], np.int64)
    return x, np.zeros(shape, np.float32)


EMPTY_FNS = [
    "cross_entropy",
    "cross_entropy_probs",
    "nll_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
]


EMPTY_CASES = [
    (fn, reduction)
    for fn in EMPTY_FNS
    for reduction in ("none", "sum", "mean") + (("batchmean",) if fn == "kl_div" else ())
]


@pytest.mark.parametrize(("fn", "reduction"), EMPTY_CASES)
@pytest.mark.parametrize("shape", [(0, C), (0, C, 3), (2, C, 0)], ids=str)
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_empty_inputs_give_torchs_values_and_empty_gradients(fn, reduction, shape):
    name = "cross_entropy" if fn == "cross_entropy_probs" else fn
    x, t = _empty_case(fn if fn != "cross_entropy_probs" else "kl_div", shape)
    want = getattr(F, name)(_torch(x), _torch(t), reduction=reduction).numpy()
    loss = functools.partial(getattr(pytorch, name), reduction=reduction)
    got, vjp = jax.vjp(lambda v: loss(v, jnp.asarray(t)), jnp.asarray(x))
    assert got.shape == want.shape
    _close(got, want)  # "none": empty; "sum": 0; "mean"/"batchmean": NaN, as torch
    (grad,) = vjp(jnp.ones(got.shape, got.dtype))
    assert grad.shape == x.shape


def _nan_at(x, where):
    x = np.array(x, np.float32)
    x[where] = np.nan
    return x


@pytest.mark.parametrize(
    ("fn", "nan_in"),
    [
        ("cross_entropy", "input"),
        ("cross_entropy_probs", "input"),
        ("cross_entropy_probs", "target"),
        ("nll_loss", "input"),
        ("binary_cross_entropy_with_logits", "input"),
        ("binary_cross_entropy_with_logits", "target"),
        ("kl_div", "input"),
        ("kl_div", "target"),
    ],
)
def test_nan_propagates_as_in_torch(fn, nan_in, rng):
    name = "cross_entropy" if fn == "cross_entropy_probs" else fn
    x = rng.normal(size=(3, C)).astype(np.float32)
    if fn in ("cross_entropy", "nll_loss"):
        t = np.array([0, 1, 2], np.int64)
    else:
        t = rng.random((3, C)).astype(np.float32)
    if nan_in == "input":
        x = _nan_at(x, (1, 1))  # row 1: class 1 is its target (nll_loss reads only that)
    else:
        t = _nan_at(t, (1, 1))
    for reduction in ("none", "sum", "mean"):
        want = getattr(F, name)(_torch(x), _torch(t), reduction=reduction).numpy()
        got = getattr(pytorch, name)(jnp.asarray(x), jnp.asarray(t), reduction=reduction)
        assert np.isnan(want).any(), (fn, reduction)  # what torch does, checked here
        _close(got, want)


def test_python_and_numpy_scalars_are_accepted(rng):
    x = rng.normal(size=(4, C)).astype(np.float32)
    t = np.array([0, 1, 2, 1])
    want = F.cross_entropy(
        _torch(x), _torch(t, np.int64), ignore_index=1, label_smoothing=0.1
    ).numpy()
    got = pytorch.cross_entropy(x, t, ignore_index=np.int64(1), label_smoothing=np.float64(0.1))
    _close(got, want)
    _close(
        pytorch.binary_cross_entropy_with_logits(0.3, 1.0, pos_weight=2),
        F.binary_cross_entropy_with_logits(
            torch.tensor(0.3), torch.tensor(1.0), pos_weight=torch.tensor(2.0)
        ).numpy(),
    )
    _close(
        pytorch.binary_cross_entropy(0.3, 1.0, np.float32(0.5)),
        F.binary_cross_entropy(torch.tensor(0.3), torch.tensor(1.0), torch.tensor(0.5)).numpy(),
    )
    _close(pytorch.kl_div(-1.2, 0.25), F.kl_div(torch.tensor(-1.2), torch.tensor(0.25)).numpy())


def test_boolean_weights_are_cast(rng):
    x = rng.normal(size=(4, C)).astype(np.float32)
    t = np.array([0, 1, 2, 1])
    mask = np.array([True, False, True, True, False])
    want = F.cross_entropy(_torch(x), _torch(t, np.int64), weight=_torch(mask, np.float32))
    _close(pytorch.cross_entropy(x, t, weight=mask), want.numpy())
    p = 1 / (1 + np.exp(-x))
    m = rng.random((4, C)) < 0.5
    _close(
        pytorch.binary_cross_entropy(p, p > 0.5, weight=m),
        F.binary_cross_entropy(_torch(p), _torch(p > 0.5, np.float32), weight=_torch(m)).numpy(),
    )

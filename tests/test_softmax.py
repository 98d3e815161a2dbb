"""Tests of the softmax cross-entropy family against float64 references.

The optax and PyTorch parity tests are in ``test_parity_optax.py`` and ``test_parity_torch.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    REDUCTIONS,
    SOFTMAX_SHAPE,
    assert_transforms_match_eager,
    check_grads_2,
    softmax_data,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.experimental import checkify
from reference import log_softmax, weighted_reduce, xlogy

import jaxce

N, C = SOFTMAX_SHAPE


# ----------------------------------------------------------------------------- references
def _ref_inputs(x, cw, sw, mask):
    """float64 logits and the reference defaults: unit weights, every class in."""
    x = np.asarray(x, np.float64)
    n_rows, n_cls = x.shape
    cw = np.ones(n_cls) if cw is None else np.asarray(cw, np.float64)
    sw = np.ones(n_rows) if sw is None else np.broadcast_to(np.asarray(sw, np.float64), (n_rows,))
    mask = np.ones_like(x, bool) if mask is None else np.broadcast_to(mask, x.shape)
    return x, cw, sw, mask


def ref_integer_ce(
    x, y, *, mask=None, ignore_index=None, eps=0.0, cw=None, sw=None, z=0.0, reduction="none"
):
    """Float64 reference of softmax_cross_entropy_with_integer_labels, classes last."""
    x, cw, sw, mask = _ref_inputs(x, cw, sw, mask)
    n_rows, n_cls = x.shape
    loss, weight = np.zeros(n_rows), np.zeros(n_rows)
    for i in range(n_rows):
        if (ignore_index is not None and y[i] == ignore_index) or not mask[i].any():
            continue
        if not (0 <= y[i] < n_cls) or not mask[i, y[i]]:
            loss[i], weight[i] = np.nan, sw[i] * (cw[y[i]] if 0 <= y[i] < n_cls else 1.0)
            continue
        lp = log_softmax(x[i], mask[i])
        smooth = np.sum(np.where(mask[i], cw * -lp, 0.0)) / mask[i].sum()
        lse = _lse(x[i][mask[i]])
        loss[i] = sw[i] * ((1 - eps) * cw[y[i]] * -lp[y[i]] + eps * smooth + z * lse**2)
        weight[i] = sw[i] * cw[y[i]]
    return weighted_reduce(loss, weight, reduction)


def _lse(v):
    m = np.max(v)
    return m + np.log(np.sum(np.exp(v - m)))


def ref_soft_ce(x, t, *, mask=None, eps=0.0, cw=None, sw=None, z=0.0, reduction="none"):
    x, cw, sw, mask = _ref_inputs(x, cw, sw, mask)
    n_rows = x.shape[0]
    loss, weight = np.zeros(n_rows), np.zeros(n_rows)
    for i in range(n_rows):
        if not mask[i].any():
            continue
        ti = (1 - eps) * np.asarray(t[i], np.float64) + eps / mask[i].sum()
        lp = log_softmax(x[i], mask[i])
        lse = _lse(x[i][mask[i]])
        loss[i] = sw[i] * (-np.sum(np.where(mask[i], cw * xlogy(ti, lp), 0.0)) + z * lse**2)
        weight[i] = sw[i]
    return weighted_reduce(loss, weight, reduction)


def ref_focal(x, y, gamma, alpha=None):
    lp = log_softmax(x)
    lp_y = np.take_along_axis(lp, np.asarray(y)[:, None], -1)[:, 0]
    a = 1.0 if alpha is None else (np.asarray(alpha)[y] if np.ndim(alpha) else alpha)
    return -a * (1 - np.exp(lp_y)) ** gamma * lp_y


INTEGER_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "class_weights": {"class_weights": True},
    "smoothing_weights": {"label_smoothing": 0.2, "class_weights": True},
    "ignore": {"ignore_index": 2},
    "where": {"where": True},
    "sample_weights": {"sample_weights": True},
    "z_loss": {"z_loss": 1e-2},
    "everything": {
        "label_smoothing": 0.1,
        "class_weights": True,
        "ignore_index": 2,
        "where": True,
        "sample_weights": True,
        "z_loss": 1e-2,
    },
}


def _integer_call(options, x, y, mask, cw, sw):
    """Translates an INTEGER_OPTIONS entry into jaxce kwargs and reference kwargs."""
    kw, ref = {}, {}
    if "label_smoothing" in options:
        kw["label_smoothing"] = ref["eps"] = options["label_smoothing"]
    if options.get("class_weights"):
        kw["class_weights"], ref["cw"] = cw, cw
    if "ignore_index" in options:
        kw["ignore_index"] = ref["ignore_index"] = options["ignore_index"]
    if options.get("where"):
        kw["where"], ref["mask"] = mask, mask
    if options.get("sample_weights"):
        kw["sample_weights"], ref["sw"] = sw, sw
    if "z_loss" in options:
        kw["z_loss"] = ref["z"] = options["z_loss"]
    return kw, ref


# ----------------------------------------------------------------------------- integer labels
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(INTEGER_OPTIONS))
def test_integer_ce_matches_float64_reference(name, reduction):
    x, y, _, mask, cw, sw = softmax_data(1)
    kw, ref = _integer_call(INTEGER_OPTIONS[name], x, y, mask, cw, sw)
    got = jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction=reduction, **kw)
    want = ref_integer_ce(x, y, reduction=reduction, **ref)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize(
    "name", ["plain", pytest.param("everything", marks=pytest.mark.slow), "smoothing_weights"]
)
def test_integer_ce_grads_order_2(name):
    x, y, _, mask, cw, sw = softmax_data(2)
    kw, _ = _integer_call(INTEGER_OPTIONS[name], x, y, mask, cw, sw)
    kw = {
        k: (np.asarray(v, np.float64) if k in ("class_weights", "sample_weights") else v)
        for k, v in kw.items()
    }

    def f(logits):
        return jaxce.softmax_cross_entropy_with_integer_labels(logits, y, reduction="mean", **kw)

    check_grads_2(f, (x,))


def test_integer_ce_z_loss_gradient_matches_formula():
    x, y, *_ = softmax_data(3)
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        g = jax.grad(
            lambda v: jaxce.softmax_cross_entropy_with_integer_labels(
                v, y, z_loss=0.5, reduction="sum"
            )
        )(x64)
    p = np.exp(log_softmax(x))
    lse = np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    want = p - np.eye(C)[y] + 0.5 * 2 * lse * p
    np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-12)


def test_jit_equals_eager():
    x, y, _, mask, cw, sw = softmax_data(4)
    f = functools.partial(
        jaxce.softmax_cross_entropy_with_integer_labels,
        label_smoothing=0.1,
        class_weights=cw,
        sample_weights=sw,
        ignore_index=1,
        z_loss=1e-3,
    )
    np.testing.assert_allclose(jax.jit(f)(x, y, where=mask), f(x, y, where=mask), rtol=1e-6)
    g = functools.partial(jaxce.softmax_cross_entropy, label_smoothing=0.1, class_weights=cw)
    t = softmax_data(4)[2]
    np.testing.assert_allclose(jax.jit(g)(x, t), g(x, t), rtol=1e-6)


def test_vmap_over_batch_and_spatial_axes():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, C, 4, 2)).astype(np.float32)  # (N, C, H, W), classes on axis 1
    y = rng.integers(0, C, size=(3, 4, 2))
    t = np.asarray(jax.nn.softmax(jnp.asarray(rng.normal(size=x.shape)), axis=1))
    integer = functools.partial(
        jaxce.softmax_cross_entropy_with_integer_labels, label_smoothing=0.1
    )
    soft = jaxce.softmax_cross_entropy

    @jax.jit
    def all_ways(x, y, t):
        return (
            integer(x, y, axis=1),
            jax.vmap(functools.partial(integer, axis=0))(x, y),  # over the batch axis
            jax.vmap(functools.partial(integer, axis=1), in_axes=(3, 2), out_axes=2)(x, y),  # W
            soft(x, t, axis=1),
            jax.vmap(functools.partial(soft, axis=0))(x, t),
        )

    full, over_batch, over_width, soft_full, soft_batch = all_ways(x, y, t)
    np.testing.assert_allclose(over_batch, full, rtol=1e-6)
    np.testing.assert_allclose(over_width, full, rtol=1e-6)
    np.testing.assert_allclose(soft_batch, soft_full, rtol=1e-6)


@pytest.mark.parametrize("axis", [0, 1, 2, -2])
def test_moved_class_axis_equals_moveaxis(axis):
    rng = np.random.default_rng(6)
    last = rng.normal(size=(3, 4, C)).astype(np.float32)
    y = rng.integers(0, C, size=(3, 4))
    moved = np.moveaxis(last, -1, axis)
    want = jaxce.softmax_cross_entropy_with_integer_labels(last, y, class_weights=softmax_data()[4])
    got = jaxce.softmax_cross_entropy_with_integer_labels(
        moved, y, axis=axis, class_weights=softmax_data()[4]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    t = rng.dirichlet(np.ones(C), size=(3, 4))
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy(moved, np.moveaxis(t, -1, axis), axis=axis),
        jaxce.softmax_cross_entropy(last, t),
        rtol=1e-6,
    )


def test_where_equals_boolean_indexing():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 7)).astype(np.float32)
    keep = np.array([True, False, True, True, False, True, False])
    kept = np.flatnonzero(keep)
    y_kept = rng.integers(0, kept.size, size=4)
    y_full = kept[y_kept]
    got = jaxce.softmax_cross_entropy_with_integer_labels(
        x, y_full, where=keep[None, :], label_smoothing=0.2
    )
    want = jaxce.softmax_cross_entropy_with_integer_labels(x[:, keep], y_kept, label_smoothing=0.2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    t_kept = rng.dirichlet(np.ones(kept.size), size=4).astype(np.float32)
    t_full = np.zeros_like(x)
    t_full[:, keep] = t_kept
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy(x, t_full, where=keep[None, :], label_smoothing=0.2),
        jaxce.softmax_cross_entropy(x[:, keep], t_kept, label_smoothing=0.2),
        rtol=1e-6,
    )


def test_example_mask_where_drops_examples():
    x, y, t, *_ = softmax_data(8)
    keep = np.array([True, False, True, True, False, True])
    got = jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=keep, reduction="mean")
    want = jaxce.softmax_cross_entropy_with_integer_labels(x[keep], y[keep], reduction="mean")
    np.testing.assert_allclose(got, want, rtol=1e-6)
    per = jaxce.softmax_cross_entropy(x, t, where=keep)
    assert np.all(np.asarray(per)[~keep] == 0)


def test_tuple_axis_matches_flat_index():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    y = rng.integers(0, 15, size=(2, 4))
    got = jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=(1, 3))
    flat = np.transpose(x, (0, 2, 1, 3)).reshape(2, 4, 15)
    np.testing.assert_allclose(
        got, ref_integer_ce(flat.reshape(8, 15), y.reshape(8)).reshape(2, 4), rtol=1e-5
    )


# ----------------------------------------------------------------------------- soft labels
SOFT_OPTIONS = {
    "plain": {},
    "smoothing": {"eps": 0.1},
    "class_weights": {"cw": True},
    "where": {"mask": True},
    "sample_weights": {"sw": True},
    "z_loss": {"z": 1e-2},
    "everything": {"eps": 0.1, "cw": True, "mask": True, "sw": True, "z": 1e-2},
}
_SOFT_KW = {
    "eps": "label_smoothing",
    "cw": "class_weights",
    "mask": "where",
    "sw": "sample_weights",
    "z": "z_loss",
}


def _soft_call(options, mask, cw, sw):
    values = {"mask": mask, "cw": cw, "sw": sw}
    ref = {k: (values[k] if v is True else v) for k, v in options.items()}
    return {_SOFT_KW[k]: v for k, v in ref.items()}, ref


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(SOFT_OPTIONS))
def test_soft_ce_matches_float64_reference(name, reduction):
    x, _, t, mask, cw, sw = softmax_data(10)
    kw, ref = _soft_call(SOFT_OPTIONS[name], mask, cw, sw)
    got = jaxce.softmax_cross_entropy(x, t, reduction=reduction, **kw)
    np.testing.assert_allclose(
        got, ref_soft_ce(x, t, reduction=reduction, **ref), rtol=2e-6, atol=2e-6
    )


@pytest.mark.parametrize("name", ["plain", pytest.param("everything", marks=pytest.mark.slow)])
def test_soft_ce_grads_order_2(name):
    x, _, t, mask, cw, sw = softmax_data(11)
    kw, _ = _soft_call(SOFT_OPTIONS[name], mask, cw, sw)
    kw = {
        k: (np.asarray(v, np.float64) if k in ("class_weights", "sample_weights") else v)
        for k, v in kw.items()
    }
    check_grads_2(
        lambda logits, target: jaxce.softmax_cross_entropy(logits, target, reduction="mean", **kw),
        (x, t),
    )


def test_soft_ce_with_onehot_equals_integer_ce():
    x, y, *_ = softmax_data(12)
    onehot = np.eye(C, dtype=np.float32)[y]
    for kw in ({}, {"label_smoothing": 0.3}, {"z_loss": 0.1}):
        np.testing.assert_allclose(
            jaxce.softmax_cross_entropy(x, onehot, **kw),
            jaxce.softmax_cross_entropy_with_integer_labels(x, y, **kw),
            rtol=1e-5,
            atol=1e-6,
        )


# ----------------------------------------------------------------------------- other members
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_matches_reference(reduction):
    x, y, _, _, cw, sw = softmax_data(13)
    lp = np.asarray(jax.nn.log_softmax(x), np.float64)
    y = y.copy()
    y[0] = -100
    got = jaxce.nll_loss(
        lp, y, ignore_index=-100, class_weights=cw, sample_weights=sw, reduction=reduction
    )
    keep = y != -100
    ys = np.where(keep, y, 0)
    w = keep * sw * cw[ys]
    want = weighted_reduce(-w * lp[np.arange(N), ys], w, reduction)
    np.testing.assert_allclose(got, want, rtol=2e-6)


def test_nll_loss_grads():
    x, y, *_ = softmax_data(13)
    lp = np.asarray(jax.nn.log_softmax(x), np.float64)
    y = y.copy()
    y[0] = -100
    check_grads_2(lambda v: jaxce.nll_loss(v, y, ignore_index=-100, reduction="mean"), (lp,))


def test_cross_entropy_equals_nll_of_log_softmax():
    x, y, _, _, cw, _ = softmax_data(14)
    np.testing.assert_allclose(
        jaxce.nll_loss(jax.nn.log_softmax(x), y, class_weights=cw, reduction="mean"),
        jaxce.softmax_cross_entropy_with_integer_labels(x, y, class_weights=cw, reduction="mean"),
        rtol=1e-6,
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.25, "vector"])
def test_softmax_focal_matches_reference(gamma, alpha):
    x, y, _, _, cw, _ = softmax_data(15)
    a = cw if alpha == "vector" else alpha
    got = jaxce.softmax_focal_loss(x, y, gamma=gamma, alpha=a)
    np.testing.assert_allclose(got, ref_focal(x, y, gamma, a), rtol=2e-6, atol=1e-7)
    onehot = np.eye(C, dtype=np.float32)[y]
    np.testing.assert_allclose(
        jaxce.softmax_focal_loss(x, onehot, gamma=gamma, alpha=a), got, rtol=2e-6, atol=1e-7
    )


def test_softmax_focal_gamma_zero_is_cross_entropy():
    x, y, *_ = softmax_data(16)
    np.testing.assert_allclose(
        jaxce.softmax_focal_loss(x, y, gamma=0.0),
        jaxce.softmax_cross_entropy_with_integer_labels(x, y),
        rtol=1e-6,
    )


@pytest.mark.slow
def test_softmax_focal_grads():
    x, y, *_ = softmax_data(16)
    check_grads_2(lambda v: jaxce.softmax_focal_loss(v, y, gamma=1.5, reduction="sum"), (x,))
    check_grads_2(
        lambda v: jaxce.softmax_focal_loss(v, y, gamma=0.5, ignore_index=y[0], reduction="mean"),
        (x,),
    )


def test_softmax_focal_confident_prediction_has_zero_finite_gradient():
    x = jnp.array([[200.0, 0.0, 0.0]])  # p_y rounds to 1 in float32
    for gamma in (0.5, 2.0):
        g = jax.grad(
            lambda v, gm=gamma: jaxce.softmax_focal_loss(v, jnp.array([0]), gamma=gm).sum()
        )(x)
        assert np.all(np.isfinite(g)) and np.allclose(g, 0)


def test_softmax_focal_gradient_at_dtype_max_logits():
    """A logit at +-f32max: where p_y underflows to 0 the loss is -log p_y (~3.4e38, finite)
    and the gradient is cross-entropy's, p - onehot (it was NaN: the focal factor's zero
    derivative met gamma * 3.4e38 = inf); integer and one-hot labels agree."""
    big = float(np.finfo(np.float32).max)
    x = jnp.array([[big, 0.0, 1.0], [-big, 0.0, 1.0], [big, -big, 1.0]])
    y = jnp.array([1, 0, 2])
    for labels in (y, jax.nn.one_hot(y, 3)):
        assert np.isfinite(jaxce.softmax_focal_loss(x, labels, gamma=2.0)).all()
        g = jax.grad(lambda v, lab=labels: jaxce.softmax_focal_loss(v, lab, gamma=2.0).sum())(x)
        want = np.asarray(jax.nn.softmax(x)) - np.asarray(jax.nn.one_hot(y, 3))
        np.testing.assert_allclose(g, want, atol=1e-6)


def test_poly_loss_matches_reference_and_grads():
    x, _, t, mask, *_ = softmax_data(17)
    lp = log_softmax(x)
    want = -np.sum(t * lp, -1) + 2.0 * np.sum(t * (1 - np.exp(lp)), -1)
    got = jaxce.poly_loss_cross_entropy(x, t, epsilon=2.0)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    check_grads_2(
        lambda v: jaxce.poly_loss_cross_entropy(v, t, epsilon=1.5, reduction="mean"), (x,)
    )


def test_smooth_labels_matches_formula():
    _, y, _, mask, *_ = softmax_data(18)
    onehot = np.eye(C, dtype=np.float32)[y]
    np.testing.assert_allclose(jaxce.smooth_labels(onehot, 0.1), 0.9 * onehot + 0.1 / C, rtol=1e-6)
    check_grads_2(lambda v: jaxce.smooth_labels(v, 0.2), (onehot,))


def test_label_smoothing_equals_ce_on_smoothed_labels():
    x, y, _, mask, *_ = softmax_data(19)
    onehot = np.eye(C, dtype=np.float32)[y]
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing=0.3),
        jaxce.softmax_cross_entropy(x, jaxce.smooth_labels(onehot, 0.3)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=mask, label_smoothing=0.3),
        jaxce.softmax_cross_entropy(x, jaxce.smooth_labels(onehot, 0.3, where=mask), where=mask),
        rtol=1e-5,
    )


def test_fully_masked_rows_give_zero():
    x, y, t, *_ = softmax_data(21)
    mask = np.ones_like(x, bool)
    mask[2] = False
    ours = jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=mask)
    assert ours[2] == 0
    mean = jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=mask, reduction="mean")
    np.testing.assert_allclose(mean, np.delete(np.asarray(ours), 2).mean(), rtol=1e-6)
    g = jax.grad(lambda v: jaxce.softmax_cross_entropy(v, t, where=mask, reduction="mean"))(x)
    assert np.all(np.asarray(g)[2] == 0) and np.all(np.isfinite(g))


# ----------------------------------------------------------------------------- reductions
def test_sum_and_weight_parts_combine_exactly_across_micro_batches():
    x, y, _, _, cw, sw = softmax_data(25, n=8)
    y[[1, 5]] = -1
    kw = {"ignore_index": -1, "class_weights": cw, "sample_weights": sw}
    full = jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean", **kw)
    parts = [
        jaxce.softmax_cross_entropy_with_integer_labels(
            x[i : i + 4],
            y[i : i + 4],
            reduction="sum_and_weight",
            ignore_index=-1,
            class_weights=cw,
            sample_weights=sw[i : i + 4],
        )
        for i in (0, 4)
    ]
    total = sum(p[0] for p in parts)
    weight = sum(p[1] for p in parts)
    np.testing.assert_allclose(jaxce.weighted_mean(total, weight), full, rtol=1e-6)


def test_sum_and_weight_with_psum_over_devices_axis():
    x, y, *_ = softmax_data(26, n=8)
    y[2] = -100
    full = jaxce.softmax_cross_entropy_with_integer_labels(
        x, y, ignore_index=-100, reduction="mean"
    )

    def shard(xs, ys):
        total, weight = jaxce.softmax_cross_entropy_with_integer_labels(
            xs, ys, ignore_index=-100, reduction="sum_and_weight"
        )
        return jaxce.weighted_mean(jax.lax.psum(total, "d"), jax.lax.psum(weight, "d"))

    out = jax.jit(jax.vmap(shard, axis_name="d"))(x.reshape(4, 2, C), y.reshape(4, 2))
    np.testing.assert_allclose(out, np.full(4, full), rtol=1e-6)


def test_all_ignored_mean_is_zero_with_zero_gradient():
    x, y, *_ = softmax_data(27)
    y[:] = -100
    f = lambda v: jaxce.softmax_cross_entropy_with_integer_labels(
        v, y, ignore_index=-100, reduction="mean"
    )
    assert f(x) == 0.0
    g = jax.grad(f)(x)
    assert np.all(np.asarray(g) == 0)


def test_zero_sample_weight_masks_an_infinite_loss_exactly():
    x = jnp.array([[0.0, -jnp.inf, 1.0], [0.5, 0.2, 0.1]])
    y = jnp.array([1, 0])  # the first label sits on a -inf logit: its loss is +inf
    sw = jnp.array([0.0, 1.0])
    f = lambda v, w: jaxce.softmax_cross_entropy_with_integer_labels(
        v, y, sample_weights=w, reduction="mean"
    )
    np.testing.assert_allclose(
        f(x, sw), ref_integer_ce(np.asarray(x)[1:], np.asarray(y)[1:])[0], rtol=1e-6
    )
    gx, gw = jax.grad(f, argnums=(0, 1))(x, sw)
    assert np.all(np.asarray(gx)[0] == 0) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))


def test_reduction_none_carries_weights():
    x, y, _, _, cw, sw = softmax_data(28)
    per = jaxce.softmax_cross_entropy_with_integer_labels(x, y, class_weights=cw, sample_weights=sw)
    plain = jaxce.softmax_cross_entropy_with_integer_labels(x, y)
    np.testing.assert_allclose(per, plain * cw[y] * sw, rtol=1e-6)


def test_checkpoint_gradients_equal():
    x, y, *_ = softmax_data(29)
    f = lambda v: jaxce.softmax_cross_entropy_with_integer_labels(
        v, y, label_smoothing=0.1, reduction="mean"
    )
    np.testing.assert_allclose(
        jax.jit(jax.grad(jax.checkpoint(f)))(x), jax.jit(jax.grad(f))(x), rtol=1e-6
    )


_FAMILY = {
    "integer_ce": lambda x, y, t: jaxce.softmax_cross_entropy_with_integer_labels(
        x, y, label_smoothing=0.1, z_loss=1e-2
    ),
    "soft_ce": lambda x, y, t: jaxce.softmax_cross_entropy(x, t, label_smoothing=0.1),
    "nll": lambda x, y, t: jaxce.nll_loss(jax.nn.log_softmax(x), y),
    "focal_integer": lambda x, y, t: jaxce.softmax_focal_loss(x, y, gamma=1.5),
    "focal_soft": lambda x, y, t: jaxce.softmax_focal_loss(x, t, gamma=1.5),
    "poly": lambda x, y, t: jaxce.poly_loss_cross_entropy(x, t, epsilon=1.0),
    "smooth_labels": lambda x, y, t: jnp.sum(jaxce.smooth_labels(t, 0.2) * x, axis=-1),
}


@pytest.mark.parametrize("name", sorted(_FAMILY))
def test_every_member_under_jit_vmap_and_checkpoint(name):
    rng = np.random.default_rng(35)
    x = rng.normal(size=(3, 4, C)).astype(np.float32)  # two batch axes
    y = rng.integers(0, C, size=(3, 4))
    t = rng.dirichlet(np.ones(C), size=(3, 4)).astype(np.float32)
    assert_transforms_match_eager(_FAMILY[name], x, y, t)


def test_weighted_mean_reference_and_grads():
    total = np.array([3.0, -1.5, 0.0, 2.0])
    weight = np.array([2.0, 0.5, 0.0, 4.0])
    want = np.where(weight != 0, total / np.where(weight != 0, weight, 1.0), 0.0)
    np.testing.assert_allclose(jaxce.weighted_mean(total, weight), want, rtol=1e-6)
    g = jax.grad(lambda a, b: jnp.sum(jaxce.weighted_mean(a, b)), argnums=(0, 1))(
        jnp.asarray(total), jnp.asarray(weight)
    )
    assert np.all(np.asarray(g[0])[2] == 0) and np.all(np.isfinite(g[1]))
    check_grads_2(lambda a, b: jaxce.weighted_mean(a, b), (total[[0, 1, 3]], weight[[0, 1, 3]]))


# ----------------------------------------------------------------------------- numerics
def test_neg_inf_logits_with_zero_target_mass_are_finite_to_second_order():
    x = jnp.array([[0.5, -jnp.inf, 1.0, -jnp.inf], [2.0, 1.0, -jnp.inf, 0.0]])
    y = jnp.array([0, 3])
    t = jnp.array([[0.3, 0.0, 0.7, 0.0], [0.2, 0.5, 0.0, 0.3]])
    losses = {
        "integer": lambda v: jaxce.softmax_cross_entropy_with_integer_labels(
            v, y, label_smoothing=0.0, z_loss=1e-3, reduction="sum"
        ),
        "soft": lambda v: jaxce.softmax_cross_entropy(v, t, z_loss=1e-3, reduction="sum"),
        "focal": lambda v: jaxce.softmax_focal_loss(v, y, gamma=2.0, reduction="sum"),
        "poly": lambda v: jaxce.poly_loss_cross_entropy(v, t, reduction="sum"),
    }
    for name, f in losses.items():
        value, grad, hessian, tangent = jax.jit(
            lambda v, f=f: (
                f(v),
                jax.grad(f)(v),
                jax.hessian(f)(v),
                jax.jvp(f, (v,), (jnp.ones_like(v),))[1],
            )
        )(x)
        for what, out in (("value", value), ("grad", grad), ("hessian", hessian), ("jvp", tangent)):
            assert np.all(np.isfinite(out)), (name, what)


def test_masked_classes_holding_nan_do_not_leak():
    x = jnp.array([[1.0, jnp.nan, 0.0]])
    mask = jnp.array([[True, False, True]])
    f = lambda v: jaxce.softmax_cross_entropy_with_integer_labels(
        v, jnp.array([0]), where=mask
    ).sum()
    value, grad = jax.jit(jax.value_and_grad(f))(x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_logits_near_float32_max_do_not_overflow():
    big = np.finfo(np.float32).max / 2
    x = jnp.array([[big, -big, 0.0], [big, big * 0.999, -big]])
    y = jnp.array([0, 1])
    loss = jaxce.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing=0.1)
    with jax.enable_x64(True):
        want = ref_integer_ce(np.asarray(x, np.float64), np.asarray(y), eps=0.1)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    g = jax.grad(lambda v: jaxce.softmax_cross_entropy_with_integer_labels(v, y).sum())(x)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_computes_in_float32(dtype):
    x, y, t, *_ = softmax_data(30)
    xh = jnp.asarray(x, dtype)
    loss = jaxce.softmax_cross_entropy_with_integer_labels(xh, y, label_smoothing=0.1)
    assert loss.dtype == jnp.float32
    want = ref_integer_ce(np.asarray(xh.astype(jnp.float32)), y, eps=0.1)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    g = jax.grad(lambda v: jaxce.softmax_cross_entropy(v, t, reduction="mean"))(xh)
    assert g.dtype == dtype
    big = jnp.array([[jnp.finfo(dtype).max, 0.0, -jnp.finfo(dtype).max]], dtype)
    assert np.isfinite(jaxce.softmax_cross_entropy_with_integer_labels(big, jnp.array([1])))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-1, C, C + 7])
def test_out_of_range_label_gives_nan_only_for_that_example(bad):
    x, y, *_ = softmax_data(31)
    y[2] = bad
    loss = np.asarray(jaxce.softmax_cross_entropy_with_integer_labels(x, y))
    assert np.isnan(loss[2]) and np.all(np.isfinite(np.delete(loss, 2)))
    assert np.isnan(jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean"))
    assert np.isnan(jaxce.nll_loss(x, y)[2])
    assert np.isnan(jaxce.softmax_focal_loss(x, y)[2])


def test_label_of_masked_class_is_invalid():
    x, y, *_ = softmax_data(32)
    mask = np.ones_like(x, bool)
    mask[1, y[1]] = False
    loss = np.asarray(jaxce.softmax_cross_entropy_with_integer_labels(x, y, where=mask))
    assert np.isnan(loss[1]) and np.all(np.isfinite(np.delete(loss, 1)))


def test_checkify_names_the_bad_label():
    x, y, *_ = softmax_data(33)
    y[4] = 17
    f = jax.jit(lambda v, lab: jaxce.softmax_cross_entropy_with_integer_labels(v, lab))
    err, _ = checkify.checkify(f, errors=checkify.user_checks)(x, y)
    with pytest.raises(
        checkify.JaxRuntimeError, match="invalid integer label 17 at flat position 4"
    ):
        err.throw()
    y[4] = 0
    err, _ = checkify.checkify(f, errors=checkify.user_checks)(x, y)
    err.throw()  # valid labels: no error


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y.astype(np.float32)),
            TypeError,
            "`labels` must have an integer dtype",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y[:-1]),
            ValueError,
            r"`labels` has shape \(5,\) but must have shape \(6,\)",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x.astype(np.int32), y),
            TypeError,
            "`logits` must have a floating dtype",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, axis=2),
            ValueError,
            "`axis` 2 is out of range",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(x, y, reduction="avg"),
            ValueError,
            "`reduction` must be one of",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, class_weights=np.ones(3)
            ),
            ValueError,
            r"`class_weights` has shape \(3,\) but must have shape \(5,\)",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, sample_weights=np.ones(4)
            ),
            ValueError,
            r"`sample_weights` has shape \(4,\)",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, where=np.ones((6, 5))
            ),
            TypeError,
            "`where` must be a boolean mask",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, where=np.ones((2, 6, 5), bool)
            ),
            ValueError,
            r"`where` has rank 3 \(shape \(2, 6, 5\)\)",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy(x, np.ones((6, 4), np.float32)),
            ValueError,
            r"`labels` has shape \(6, 4\), which does not broadcast to \(6, 5\)",
        ),
        (
            lambda x, y: jaxce.softmax_cross_entropy(x, y),
            TypeError,
            "`labels` must have a floating dtype",
        ),
        (
            lambda x, y: jaxce.nll_loss(x, y, class_weights=np.ones(2)),
            ValueError,
            "`class_weights`",
        ),
        (
            lambda x, y: jaxce.softmax_focal_loss(x, jax.nn.one_hot(y, 5), ignore_index=0),
            ValueError,
            "`ignore_index` applies to integer labels only",
        ),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    x, y, *_ = softmax_data(34)
    with pytest.raises(error, match=match):
        call(x, y)
    with pytest.raises(error, match=match):
        jax.jit(call)(x, y)


# ----------------------------------------------------------------------------- properties
_PROP_SHAPE = (4, 6)
_logits = hnp.arrays(np.float32, _PROP_SHAPE, elements=st.floats(-30, 30, width=32))
_labels = hnp.arrays(np.int32, _PROP_SHAPE[:1], elements=st.integers(0, _PROP_SHAPE[1] - 1))


@jax.jit
def _shifted_pair(x, y, shift):
    f = functools.partial(jaxce.softmax_cross_entropy_with_integer_labels, label_smoothing=0.1)
    return f(x, y), f(x + shift, y)


@jax.jit
def _onehot_identities(x, y, eps):
    onehot = jax.nn.one_hot(y, x.shape[-1])
    ce = jaxce.softmax_cross_entropy(x, onehot)
    nll = jaxce.nll_loss(jax.nn.log_softmax(x), y)
    smoothed = jaxce.softmax_cross_entropy_with_integer_labels(x, y, label_smoothing=eps)
    uniform = jaxce.softmax_cross_entropy(x, jnp.full_like(onehot, 1.0 / x.shape[-1]))
    return ce, nll, smoothed, (1 - eps) * ce + eps * uniform


@settings(max_examples=30, deadline=None)
@given(_logits, _labels, st.floats(-50, 50, width=32))
def test_shift_invariance_and_non_negativity(x, y, shift):
    loss, shifted = _shifted_pair(x, y, shift)
    assert np.all(np.asarray(loss) >= 0)
    np.testing.assert_allclose(shifted, loss, rtol=1e-4, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(_logits, _labels, st.floats(0.0, 1.0))
def test_onehot_ce_equals_nll_and_smoothing_identity(x, y, eps):
    ce, nll, smoothed, mixed = _onehot_identities(x, y, eps)
    np.testing.assert_allclose(ce, nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(smoothed, mixed, rtol=1e-4, atol=1e-4)

"""``linear_softmax_cross_entropy``: auxiliary outputs, the gradient-in-forward path against
the recompute path, the transformations it supports, bad inputs, and PyTorch parity.

References: the materialised ``softmax_cross_entropy_with_integer_labels`` and
``jax.nn.logsumexp`` of ``cap(h @ W + b)``, and ``torch.nn.functional.linear_cross_entropy``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from test_linear import assert_close, make, materialised

import jaxce
from jaxce import _vocab
from jaxce import linear_softmax_cross_entropy as fused

N, D, V = 45, 13, 203  # odd sizes: tiles of both scans are shifted


def capped_logits(h, w, b, cap):
    z = h @ w + b[None, :]
    return z if cap is None else cap * jnp.tanh(z / cap)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum_and_weight"])
@pytest.mark.parametrize("cap", [None, 4.0])
def test_aux_values_and_gradients_match_materialised(rng, reduction, cap):
    h, w, b, y, sw = make(rng, N, D, V, ignore_frac=0.2)
    zl = 1e-2
    kw = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": zl, "sample_weights": sw}
    r1 = jnp.linspace(0.5, 1.5, N)
    r2 = jnp.linspace(2.0, -1.0, N)

    def total(parts):
        return sum(jnp.sum(p) for p in jax.tree.leaves(parts))

    def with_fused(h, w, b):
        loss, aux = fused(
            h, w, y, bias=b, logit_softcap=cap, reduction=reduction, chunk_size=64,
            return_aux=True, **kw,
        )  # fmt: skip
        return total(loss) + jnp.sum(r1 * aux.lse) + jnp.sum(r2 * aux.z_loss), aux

    def with_dense(h, w, b):
        z = capped_logits(h, w, b, cap)
        loss = jaxce.softmax_cross_entropy_with_integer_labels(z, y, reduction=reduction, **kw)
        lse = jax.nn.logsumexp(z, axis=-1)
        zterm = jnp.where(y != -100, zl * lse**2, 0.0)
        return total(loss) + jnp.sum(r1 * lse) + jnp.sum(r2 * zterm), (lse, zterm)

    (val, aux), grads = jax.jit(jax.value_and_grad(with_fused, (0, 1, 2), has_aux=True))(h, w, b)
    (ref, (lse, zterm)), ref_grads = jax.value_and_grad(with_dense, (0, 1, 2), has_aux=True)(
        h, w, b
    )
    assert aux.lse.dtype == jnp.float32 and aux.argmax.dtype == jnp.int32
    assert aux.lse.shape == aux.z_loss.shape == aux.argmax.shape == (N,)
    assert_close(val, ref, what="value")
    assert_close(aux.lse, lse, what="lse")
    assert_close(aux.z_loss, zterm, what="z_loss")
    np.testing.assert_array_equal(aux.argmax, np.argmax(capped_logits(h, w, b, cap), axis=-1))
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, r, what=name)


@pytest.mark.parametrize("chunk", [2, 3, 64])
def test_argmax_ties_go_to_the_smallest_id_and_skip_padding(rng, chunk):
    h, w, b, y, _ = make(rng, 6, 5, 10)
    w[:, 7] = w[:, 2]  # columns 2 and 7 tie wherever they win
    w[:, 8] = w[:, 3] = 0.0
    b[:] = 0.0
    b[2] = b[7] = 10.0  # and they win everywhere
    wp = np.concatenate([w, np.zeros((5, 3), np.float32)], axis=1)
    bp = np.concatenate([b, np.full(3, 50.0, np.float32)])  # padding would win if counted
    _, aux = fused(h, wp, y, bias=bp, vocab_size=10, chunk_size=chunk, return_aux=True)
    np.testing.assert_array_equal(aux.argmax, np.full(6, 2))


def test_aux_is_the_same_on_both_paths(rng):
    h, w, b, y, sw = make(rng, N, D, V, ignore_frac=0.2)
    kw = {"bias": b, "ignore_index": -100, "z_loss": 1e-3, "return_aux": True, "chunk_size": 32}
    _, aux_none = jax.jit(lambda h: fused(h, w, y, **kw))(h)
    _, aux_mean = jax.jit(lambda h: fused(h, w, y, reduction="mean", **kw))(h)
    # The gradient-in-forward rule (token tiles) computes the same aux as the statistics scan.
    fwd = jax.jit(lambda h: jax.vjp(lambda h: fused(h, w, y, reduction="mean", **kw), h)[0])
    aux_fwd = fwd(h)[1]
    for a, b_ in ((aux_none, aux_mean), (aux_none, aux_fwd)):
        assert_close(a.lse, b_.lse)
        assert_close(a.z_loss, b_.z_loss)
        np.testing.assert_array_equal(a.argmax, b_.argmax)


def test_fast_path_matches_recompute_path_for_every_gradient(rng):
    """The scalar reductions (gradient in forward) against the per-token path reduced by hand,
    differentiating every float input, traced hyperparameters included."""
    h, w, b, y, sw = make(rng, N, D, V, ignore_frac=0.2)
    cw = rng.uniform(0.2, 3.0, size=V).astype(np.float32)

    def loss(reduction):
        def f(h, w, b, cw, sw, eps, zl):
            out = fused(
                h, w, y, bias=b, class_weights=cw, sample_weights=sw, label_smoothing=eps,
                z_loss=zl, logit_softcap=5.0, ignore_index=-100, reduction=reduction,
                chunk_size=48,
            )  # fmt: skip
            if reduction == "none":
                keep = (y != -100).astype(np.float32)
                return jnp.sum(out) / jnp.sum(sw * cw[np.where(y == -100, 0, y)] * keep)
            return out

        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(7))))

    args = (h, w, b, cw, sw, 0.15, 1e-2)
    fast, slow = loss("mean")(*args), loss("none")(*args)
    names = ("value", "hidden", "weight", "bias", "class_weights", "sample_weights", "eps", "zl")
    for name, a, c in zip(names, jax.tree.leaves(fast), jax.tree.leaves(slow), strict=True):
        assert_close(a, c, rtol=2e-5, what=name)

    def dense(h, w, b, cw, sw, eps, zl):
        return materialised(
            h, w, y, bias=b, class_weights=cw, sample_weights=sw, label_smoothing=eps,
            z_loss=zl, logit_softcap=5.0, ignore_index=-100, reduction="mean",
        )  # fmt: skip

    ref = jax.value_and_grad(dense, argnums=tuple(range(7)))(*args)
    for name, a, c in zip(names, jax.tree.leaves(fast), jax.tree.leaves(ref), strict=True):
        assert_close(a, c, rtol=2e-5, what=name)


@pytest.mark.parametrize("reduction", ["sum", "mean", "sum_and_weight"])
def test_fast_path_scales_by_the_cotangent(rng, reduction):
    h, w, b, y, sw = make(rng, N, D, V, ignore_frac=0.2)
    kw = {"bias": b, "ignore_index": -100, "sample_weights": sw}
    f = lambda h, w: fused(h, w, y, reduction=reduction, chunk_size=40, **kw)  # noqa: E731
    g = lambda h, w: materialised(h, w, y, reduction=reduction, **kw)  # noqa: E731
    out, vjp = jax.vjp(jax.jit(f), h, w)
    ref, ref_vjp = jax.vjp(g, h, w)
    ct = (jnp.float32(-2.5), jnp.float32(3.0)) if reduction == "sum_and_weight" else -2.5
    ct = jax.tree.map(jnp.asarray, ct)
    for a, c in zip(
        jax.tree.leaves((out, vjp(ct))), jax.tree.leaves((ref, ref_vjp(ct))), strict=True
    ):
        assert_close(a, c)


def test_weight_gradient_in_column_blocks_with_a_shorter_last_block(rng, monkeypatch):
    """The fast path adds each token tile's dW a block of columns at a time: several blocks
    and a remainder (333 = 2 * 128 + 77 columns) give the materialised gradients, with and
    without label smoothing (its gradient touches every column) and with a bias."""
    monkeypatch.setattr(_vocab, "PRODUCT_ELEMENTS", 128 * 37)
    assert _vocab.product_columns(37, 333) == 128
    h, w, b, y, sw = make(rng, 90, 37, 333, ignore_frac=0.2)
    for eps in (0.0, 0.2):
        kw = {"bias": b, "ignore_index": -100, "sample_weights": sw, "label_smoothing": eps}

        def f(h, w, b, kw=kw):
            return fused(h, w, y, reduction="mean", chunk_size=111, **{**kw, "bias": b})

        def g(h, w, b, kw=kw):
            return materialised(h, w, y, reduction="mean", **{**kw, "bias": b})

        got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)
        want = jax.value_and_grad(g, argnums=(0, 1, 2))(h, w, b)
        for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert_close(a, c)


def test_transformations_vmap_checkpoint_vjp(rng):
    h, w, b, y, sw = make(rng, 24, 8, 70, ignore_frac=0.2)
    hb, yb, swb = (jnp.asarray(a) for a in (h.reshape(3, 8, 8), y.reshape(3, 8), sw.reshape(3, 8)))
    for reduction in ("mean", "none"):

        def per_batch(loss, w, reduction=reduction):
            f = lambda h, y, s: loss(  # noqa: E731
                h, w, y, sample_weights=s, ignore_index=-100, reduction=reduction, z_loss=1e-2
            )
            out = jax.vmap(f)(hb, yb, swb)
            return jnp.sum(out * jnp.linspace(1.0, 2.0, out.size).reshape(out.shape))

        got = jax.jit(jax.value_and_grad(jax.checkpoint(lambda w: per_batch(fused, w))))(w)
        ref = jax.value_and_grad(lambda w: per_batch(materialised, w))(w)
        for a, c in zip(got, ref, strict=True):
            assert_close(a, c, what=reduction)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_second_order_reverse_mode_and_hessian(rng, reduction):
    h, w, b, y, sw = make(rng, 7, 4, 11, ignore_frac=0.2)
    kw = {"ignore_index": -100, "sample_weights": sw, "z_loss": 0.05, "label_smoothing": 0.1}
    kw["logit_softcap"] = 3.0
    with jax.enable_x64(True):
        h64, w64, b64 = (jnp.asarray(a, jnp.float64) for a in (h, w, b))

        def scalar(loss, **extra):
            return lambda h, w: jnp.sum(loss(h, w, y, bias=b64, reduction=reduction, **kw, **extra))

        f, g = scalar(fused, chunk_size=4), scalar(materialised)
        v = jnp.asarray(rng.normal(size=h.shape))

        def hvp(s):
            return jax.jit(jax.grad(lambda w: jnp.vdot(jax.grad(s)(h64, w).sum(0), v[0])))(w64)

        np.testing.assert_allclose(hvp(f), hvp(g), rtol=1e-9, atol=1e-10)
        hess = jax.jit(jax.hessian(f, argnums=(0, 1)))(h64, w64)
        ref = jax.hessian(g, argnums=(0, 1))(h64, w64)
        for a, c in zip(jax.tree.leaves(hess), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nan_hidden_poisons_only_its_token(rng, reduction):
    h, w, b, y, _ = make(rng, 8, 6, 30)
    h[3, 2] = np.nan
    y[5] = -100
    h[5, 0] = np.nan  # an ignored token's NaN is dropped with it
    f = lambda h, w: fused(h, w, y, ignore_index=-100, reduction=reduction, chunk_size=8)  # noqa: E731
    out = np.asarray(jax.jit(f)(h, w))
    if reduction == "none":
        assert np.isnan(out[3]) and out[5] == 0 and np.all(np.isfinite(np.delete(out, 3)))
    else:
        assert np.isnan(out)
    # Gradients are finite wherever the materialised loss's are (its softmax backward
    # multiplies the dropped row's NaN probabilities by a zero cotangent: NaN in that row).
    h[3, 2] = 0.0
    val, grads = jax.jit(jax.value_and_grad(lambda h, w: jnp.sum(f(h, w)), argnums=(0, 1)))(h, w)
    g = lambda h, w: jnp.sum(  # noqa: E731
        materialised(h, w, y, ignore_index=-100, reduction=reduction)
    )
    ref_grads = jax.grad(g, argnums=(0, 1))(h, w)
    assert np.isfinite(val)
    for a, r in zip(grads, ref_grads, strict=True):
        finite = np.isfinite(np.asarray(r))
        assert np.all(np.isfinite(np.asarray(a))[finite])
        assert_close(np.asarray(a)[finite], np.asarray(r)[finite])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_and_weight"])
def test_empty_batch(rng, reduction):
    h = np.zeros((0, 6), np.float32)
    w = rng.normal(size=(6, 30)).astype(np.float32)
    y = np.zeros((0,), np.int32)
    out = fused(h, w, y, reduction=reduction, label_smoothing=0.1)
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert all(float(o) == 0.0 for o in jax.tree.leaves(out))

    def scalar(h, w):
        return sum(jnp.sum(o) for o in jax.tree.leaves(fused(h, w, y, reduction=reduction)))

    gh, gw = jax.jit(jax.grad(scalar, argnums=(0, 1)))(h, w)
    assert gh.shape == h.shape and gw.shape == w.shape and not np.any(np.asarray(gw))
    _, aux = fused(h, w, y, reduction=reduction, return_aux=True)
    assert aux.lse.shape == aux.argmax.shape == (0,)


def test_hyperparameter_domains(rng):
    h, w, b, y, _ = make(rng, 6, 8, 50)
    for kw, name in (
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"z_loss": -1e-3}, "z_loss"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.0}, "chunk_size"),
        ({"vocab_size": 0}, "vocab_size"),
    ):
        with pytest.raises(ValueError, match=f"`{name}`"):
            fused(h, w, y, **kw)
    # NumPy scalars are accepted.
    got = fused(h, w, y, chunk_size=np.int64(2), vocab_size=np.int64(3), label_smoothing=0.0)
    ref = fused(h, w, y, chunk_size=2, vocab_size=3)
    assert_close(got, ref)
    got = fused(h, w, y, label_smoothing=np.float32(0.1), z_loss=np.float64(1e-3))
    assert_close(got, fused(h, w, y, label_smoothing=0.1, z_loss=1e-3))
    # A traced value outside the domain gives NaN, and a checkify error.
    for reduction in ("none", "mean"):
        out = jax.jit(lambda e, r=reduction: fused(h, w, y, label_smoothing=e, reduction=r))(1.5)
        assert np.all(np.isnan(np.asarray(out)))
        # ...and NaN gradients, on the gradient-in-forward path (mean) as on the recompute
        # path (none): never a finite gradient of a NaN loss.
        for kw in ({"label_smoothing": 1.5}, {"z_loss": -1.0}):

            def total(h_, w_, r=reduction, kw=kw):
                traced = {k: jnp.asarray(v) for k, v in kw.items()}
                return jnp.sum(fused(h_, w_, y, reduction=r, **traced))

            gh, gw = jax.jit(jax.grad(total, argnums=(0, 1)))(h, w)
            assert np.all(np.isnan(np.asarray(gh))) and np.all(np.isnan(np.asarray(gw)))
        checked = checkify.checkify(
            jax.jit(lambda z, r=reduction: fused(h, w, y, z_loss=z, reduction=r)),
            errors=checkify.user_checks,
        )
        err, _ = checked(-1.0)
        with pytest.raises(checkify.JaxRuntimeError, match="z_loss"):
            err.throw()


def test_boolean_sample_weights_are_masks(rng):
    h, w, b, y, _ = make(rng, 20, 8, 50)
    mask = rng.uniform(size=20) > 0.4
    for reduction in ("none", "mean"):
        got = fused(h, w, y, sample_weights=mask, reduction=reduction)
        ref = fused(h, w, y, sample_weights=mask.astype(np.float32), reduction=reduction)
        assert got.dtype == jnp.float32
        assert_close(got, ref)
    # Half-precision inputs: the mask is cast to float32, the loss is float32.
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    assert fused(hb, wb, y, sample_weights=mask, reduction="mean").dtype == jnp.float32


def test_class_weights_shape_is_checked(rng):
    h, w, b, y, _ = make(rng, 6, 8, 50)
    with pytest.raises(ValueError, match="`class_weights` has shape"):
        fused(h, w, y, class_weights=np.ones(49, np.float32))
    with pytest.raises(TypeError, match="`class_weights`"):
        fused(h, w, y, class_weights=np.ones(50, np.int32))


def test_matches_torch_linear_cross_entropy(rng):
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    if not hasattr(functional, "linear_cross_entropy"):
        pytest.skip("torch has no F.linear_cross_entropy")
    h, w, b, y, _ = make(rng, 40, 12, 90, ignore_frac=0.2)
    cw = rng.uniform(0.2, 3.0, size=90).astype(np.float32)
    for reduction in ("mean", "sum", "none"):
        th = torch.tensor(h, requires_grad=True)
        tw = torch.tensor(w.T.copy(), requires_grad=True)  # torch's weight is (V, D)
        out = functional.linear_cross_entropy(
            th, tw, torch.tensor(y, dtype=torch.int64), linear_bias=torch.tensor(b),
            weight=torch.tensor(cw), reduction=reduction, ignore_index=-100,
            label_smoothing=0.1,
        )  # fmt: skip
        out.sum().backward()
        kw = {"bias": b, "class_weights": cw, "ignore_index": -100, "label_smoothing": 0.1}
        f = lambda h, w, r=reduction, kw=kw: jnp.sum(fused(h, w, y, reduction=r, **kw))  # noqa: E731
        val, (gh, gw) = jax.value_and_grad(f, argnums=(0, 1))(h, w)
        assert_close(val, out.sum().item(), what=reduction)
        assert_close(gh, th.grad.numpy(), what=reduction)
        assert_close(gw, tw.grad.numpy().T, what=reduction)

"""Tests for the fused large-vocabulary loss ``linear_softmax_cross_entropy``.

References: the materialised ``softmax_cross_entropy_with_integer_labels(cap(h @ W + b))``
(float32 and bfloat16) and, once, a float64 NumPy value-and-gradient reference written from
the docstring's formula.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_host_devices_script
from jax.experimental import checkify

import jaxce
from jaxce import _vocab
from jaxce import linear_softmax_cross_entropy as fused

# Odd shapes: 128 does not divide V, so the last tile is shifted; N, D are not powers of two.
N, D, V = 252, 123, 507


def make(rng, n=N, d=D, v=V, ignore_frac=0.0, scale=0.5):
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * scale / np.sqrt(d)).astype(np.float32) * 4
    b = rng.normal(size=(v,)).astype(np.float32)
    y = rng.integers(0, v, size=n).astype(np.int32)
    y[rng.uniform(size=n) < ignore_frac] = -100
    sw = rng.uniform(0.2, 2.0, size=n).astype(np.float32)
    return h, w, b, y, sw


def materialised(h, w, y, *, bias=None, logit_softcap=None, **kw):
    z = jnp.dot(h, w, preferred_element_type=jnp.float32 if h.dtype == jnp.float32 else h.dtype)
    if bias is not None:
        z = z + bias.reshape((1,) * (z.ndim - 1) + (-1,))
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    return jaxce.softmax_cross_entropy_with_integer_labels(z, y, **kw)


def value_and_grads(
    loss, h, w, b, y, *, class_weights=None, sample_weights=None, diff_sw=True, **kw
):
    """Value and grads of sum(loss(...)) with a fixed random cotangent: w.r.t. hidden, weight,
    bias, and class_weights / float sample_weights when given."""
    diff_cw = class_weights is not None
    diff_sw = diff_sw and sample_weights is not None

    def scalar(h, w, b, cw, sw):
        out = loss(
            h, w, y, bias=b, class_weights=cw if diff_cw else None,
            sample_weights=sw if diff_sw else sample_weights, **kw,
        )  # fmt: skip
        if out.ndim:
            out = out * jnp.linspace(0.5, 1.5, out.size, dtype=out.dtype).reshape(out.shape)
        return jnp.sum(out), out

    argnums = (0, 1, 2) + ((3,) if diff_cw else ()) + ((4,) if diff_sw else ())
    cw = class_weights if diff_cw else 0.0
    sw = sample_weights if diff_sw else 0.0
    step = jax.jit(jax.value_and_grad(scalar, argnums=argnums, has_aux=True))
    (_, out), grads = step(h, w, b, cw, sw)
    return out, grads


def assert_close(a, b, rtol=2e-5, atol=2e-5, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


GRAD_NAMES = ("hidden", "weight", "bias", "class_weights", "sample_weights")

CASES = [
    # label_smoothing, z_loss, softcap, ignore_frac, sample weights, class weights, bias,
    # reduction, chunk
    (0.0, 0.0, None, 0.0, None, False, False, "none", 128),
    (0.1, 0.0, None, 0.2, None, False, True, "mean", 128),
    (0.0, 1e-3, None, 0.2, "float", False, False, "sum", 128),
    (0.2, 1e-2, 5.0, 0.2, "float", True, True, "mean", 128),
    (0.2, 1e-2, 5.0, 0.2, "float", True, True, "none", 128),
    (0.1, 0.0, None, 0.2, "bool", True, False, "sum", 64),
    (0.0, 1e-3, None, 0.0, "bool", False, True, "none", 100),
    (0.0, 0.0, 3.0, 0.0, None, False, True, "none", 1024),  # V smaller than the chunk
    (0.0, 0.0, 3.0, 0.0, None, True, True, "mean", 1024),
    (0.1, 1e-3, None, 1.0, "float", True, True, "mean", 128),  # every token ignored
    (0.0, 0.0, None, 0.2, "float", False, False, "sum_and_weight", None),  # automatic chunk
    (0.1, 0.0, None, 0.2, "bool", True, False, "sum_and_weight", 128),
]


def token_weights(rng, kind, sw):
    if kind == "bool":
        return rng.uniform(size=sw.shape) > 0.3
    return sw if kind == "float" else None


@pytest.mark.parametrize("eps,zl,cap,ignore_frac,weights,with_cw,with_bias,reduction,chunk", CASES)
def test_matches_materialised_float32(
    rng, eps, zl, cap, ignore_frac, weights, with_cw, with_bias, reduction, chunk
):
    h, w, b, y, sw = make(rng, ignore_frac=ignore_frac)
    cw = rng.uniform(0.2, 3.0, size=V).astype(np.float32) if with_cw else None
    sw = token_weights(rng, weights, sw)
    kw = {
        "label_smoothing": eps,
        "z_loss": zl,
        "logit_softcap": cap,
        "ignore_index": -100,
        "class_weights": cw,
    }
    bias = b if with_bias else np.zeros_like(b)
    ref_sw = None if sw is None else sw.astype(np.float32)
    if reduction == "sum_and_weight":
        got = fused(
            h, w, y, bias=bias, reduction=reduction, chunk_size=chunk, sample_weights=sw, **kw
        )
        want = materialised(h, w, y, bias=bias, reduction=reduction, sample_weights=ref_sw, **kw)
        assert_close(got[0], want[0], what="sum")
        assert_close(got[1], want[1], what="weight")
        return
    diff = weights == "float"
    out, grads = value_and_grads(
        fused, h, w, bias, y, reduction=reduction, chunk_size=chunk, sample_weights=sw,
        diff_sw=diff, **kw,
    )  # fmt: skip
    ref, ref_grads = value_and_grads(
        materialised, h, w, bias, y, reduction=reduction, sample_weights=ref_sw, diff_sw=diff,
        **kw,
    )  # fmt: skip
    assert out.dtype == jnp.float32 and out.shape == ref.shape
    assert_close(out, ref, what="value")
    names = [n for n in GRAD_NAMES if n != "sample_weights" or weights == "float"]
    names = [n for n in names if n != "class_weights" or with_cw]
    assert len(grads) == len(ref_grads) == len(names)
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        assert g.dtype == jnp.float32
        assert_close(g, r, what=name)
    if ignore_frac == 1.0:
        assert float(out) == 0.0 and all(not np.any(np.asarray(g)) for g in grads[:3])


@pytest.mark.parametrize(
    "eps,zl,cap,reduction", [(0.0, 0.0, None, "none"), (0.1, 1e-3, 5.0, "mean")]
)
def test_bfloat16_no_worse_than_materialised_bfloat16(rng, eps, zl, cap, reduction):
    h, w, b, y, sw = make(rng, ignore_frac=0.2)
    hb, wb, bb = (jnp.asarray(a, jnp.bfloat16) for a in (h, w, b))
    h32, w32, b32 = (a.astype(jnp.float32) for a in (hb, wb, bb))
    kw = {
        "label_smoothing": eps,
        "z_loss": zl,
        "logit_softcap": cap,
        "ignore_index": -100,
        "sample_weights": sw,
        "reduction": reduction,
    }
    out, grads = value_and_grads(fused, hb, wb, bb, y, chunk_size=128, diff_sw=False, **kw)
    ref32, grads32 = value_and_grads(materialised, h32, w32, b32, y, diff_sw=False, **kw)
    ref16, grads16 = value_and_grads(materialised, hb, wb, bb, y, diff_sw=False, **kw)
    assert out.dtype == jnp.float32
    assert [g.dtype for g in grads[:3]] == [jnp.bfloat16] * 3

    def err(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    for name, a, r32, r16 in zip(
        ("value", "hidden", "weight", "bias"),
        (out, *grads),
        (ref32, *grads32),
        (ref16, *grads16),
        strict=True,
    ):
        tol = 1e-3 * max(1.0, float(jnp.max(jnp.abs(r32))))
        assert err(a, r32) <= err(r16, r32) + tol, name


def test_float64_against_numpy_formula(rng):
    n, d, v, eps, zl, cap = 37, 19, 61, 0.15, 0.02, 2.5
    h, w, b, y, sw = make(rng, n, d, v, ignore_frac=0.2)
    h, w, b, sw = (a.astype(np.float64) for a in (h, w, b, sw))
    keep = y != -100
    ys = np.where(keep, y, 0)
    # Reference from the formula: z = s tanh((hW + b)/s), L = logsumexp(z),
    # l = (1-eps)(L - z_y) + eps (L - mean z) + zl L^2, times sample weight, mean over kept.
    u = h @ w + b[None, :]
    z = cap * np.tanh(u / cap)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    zy = z[np.arange(n), ys]
    loss = (1 - eps) * (lse - zy) + eps * (lse - z.mean(axis=1)) + zl * lse**2
    wt = sw * keep
    value = np.sum(loss * wt) / np.sum(wt)
    p = np.exp(z - lse[:, None])
    onehot = np.eye(v)[ys]
    dz = (1 + 2 * zl * lse)[:, None] * p - (1 - eps) * onehot - eps / v
    du = dz * (1 - (z / cap) ** 2) * (wt / np.sum(wt))[:, None]
    want = (value, du @ w.T, h.T @ du, du.sum(axis=0))
    with jax.enable_x64(True):

        def f(h, w, b):
            return fused(
                h,
                w,
                jnp.asarray(y),
                bias=b,
                ignore_index=-100,
                label_smoothing=eps,
                z_loss=zl,
                logit_softcap=cap,
                sample_weights=jnp.asarray(sw),
                reduction="mean",
                chunk_size=16,
            )

        val, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(*map(jnp.asarray, (h, w, b)))
        assert val.dtype == jnp.float64
        for got, ref in zip((val, *grads), want, strict=True):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-10, atol=1e-12)


def test_aux_argmax_under_x64(rng):
    # The argmax is carried through the vocabulary scan as int32; under x64 the block start
    # (from the scan index) is int64, which once broke the carry's type at trace time.
    h, w, b, y, _ = make(rng, 9, 5, 23, ignore_frac=0.0)
    with jax.enable_x64(True):
        h, w = (jnp.asarray(a, jnp.float64) for a in (h, w))

        def f(h, w):
            loss, aux = fused(h, w, jnp.asarray(y), return_aux=True, chunk_size=7)
            return jnp.sum(loss), aux.argmax

        (_, arg), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
    assert arg.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(arg), np.argmax(np.asarray(h) @ np.asarray(w), 1))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.slow
def test_leading_axes_tied_embedding_and_transforms(rng):
    bsz, t, d, v = 3, 20, 16, 300
    emb = jnp.asarray(rng.normal(size=(v, d)) / 4, jnp.float32)
    h = jnp.asarray(rng.normal(size=(bsz, t, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=(bsz, t)), jnp.int32)

    def tied(loss, **kw):
        return lambda emb, h: loss(h, emb.T, y, reduction="mean", **kw)

    ref, ref_g = jax.value_and_grad(tied(materialised), argnums=(0, 1))(emb, h)
    for f in (tied(fused, chunk_size=128), jax.checkpoint(tied(fused, chunk_size=128))):
        val, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(emb, h)
        assert_close(val, ref)
        assert g[0].shape == emb.shape and g[1].shape == h.shape
        assert_close(g[0], ref_g[0], what="embedding")
        assert_close(g[1], ref_g[1], what="hidden")
    # (B, T, D) hidden gives (B, T) losses equal to flattening the tokens.
    per_token = jax.jit(fused)(h, emb.T, y)
    assert per_token.shape == (bsz, t)
    assert_close(per_token.reshape(-1), jax.jit(fused)(h.reshape(-1, d), emb.T, y.reshape(-1)))

    # vmap over an extra batch axis, with gradients through it.
    def batched(loss, w, **kw):
        per = jax.vmap(lambda hb, yb: loss(hb, w, yb, reduction="mean", **kw))(h, y)
        return jnp.sum(per * jnp.arange(1.0, bsz + 1.0)), per

    (_, per), gw = jax.jit(
        jax.value_and_grad(lambda w: batched(fused, w, chunk_size=128), has_aux=True)
    )(emb.T)
    (_, ref_per), ref_gw = jax.value_and_grad(lambda w: batched(materialised, w), has_aux=True)(
        emb.T
    )
    assert_close(per, ref_per)
    assert_close(gw, ref_gw)


def test_padded_vocabulary(rng):
    h, w, b, y, _ = make(rng, n=40, d=12, v=100)
    wp = np.concatenate([w, rng.normal(size=(12, 28)).astype(np.float32)], axis=1)
    bp = np.concatenate([b, np.full(28, 50.0, np.float32)])
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "reduction": "mean"}
    out, grads = value_and_grads(fused, h, wp, bp, y, vocab_size=100, chunk_size=32, **kw)
    ref, ref_grads = value_and_grads(materialised, h, w, b, y, **kw)
    assert_close(out, ref)
    assert_close(grads[0], ref_grads[0])
    assert_close(grads[1][:, :100], ref_grads[1])
    assert_close(grads[2][:100], ref_grads[2])
    assert not np.any(np.asarray(grads[1][:, 100:])) and not np.any(np.asarray(grads[2][100:]))
    # A label in the padding is out of range.
    assert np.isnan(fused(h[:1], wp, np.array([110], np.int32), vocab_size=100)[0])


def test_bad_labels_nan_and_checkify(rng):
    h, w, _, y, _ = make(rng, n=6, d=8, v=50)
    y[2], y[4] = 50, -3
    out = np.asarray(jax.jit(fused)(h, w, y))
    assert np.isnan(out[2]) and np.isnan(out[4]) and np.all(np.isfinite(out[[0, 1, 3, 5]]))
    grads = jax.grad(lambda h: jnp.sum(jnp.nan_to_num(fused(h, w, y))))(h)
    assert np.all(np.isfinite(np.asarray(grads)))
    checked = checkify.checkify(jax.jit(fused), errors=checkify.user_checks)
    err, _ = checked(h, w, y)
    with pytest.raises(checkify.JaxRuntimeError, match="invalid integer label 50"):
        err.throw()


def test_bad_shapes_raise(rng):
    h, w, b, y, _ = make(rng, n=6, d=8, v=50)
    with pytest.raises(ValueError, match=r"`hidden` has shape \(6, 8\).*\(9, 50\)"):
        fused(h, np.zeros((9, 50), np.float32), y)
    with pytest.raises(ValueError, match="`weight`"):
        fused(h, np.zeros(50, np.float32), y)
    with pytest.raises(ValueError, match="`labels` has shape"):
        fused(h, w, y[:5])
    with pytest.raises(TypeError, match="`labels` must have an integer dtype"):
        fused(h, w, y.astype(np.float32))
    with pytest.raises(ValueError, match="`bias` has shape"):
        fused(h, w, y, bias=b[:49])
    with pytest.raises(ValueError, match="`reduction`"):
        fused(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="`chunk_size`"):
        fused(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="`vocab_size`"):
        fused(h, w, y, vocab_size=51)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_forward_mode_is_refused_with_advice(rng, reduction):
    h, w, _, y, _ = make(rng, n=6, d=8, v=50)
    advice = r"linear_softmax_cross_entropy.*softmax_cross_entropy_with_integer_labels"
    with pytest.raises(TypeError, match=advice):
        jax.jvp(lambda h: fused(h, w, y, reduction=reduction), (h,), (h,))
    with pytest.raises(TypeError, match="forward-mode"):  # under jit: JAX's own message
        jax.jvp(jax.jit(lambda h: fused(h, w, y, reduction=reduction)), (h,), (h,))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_memory_is_o_chunk(reduction):
    """Compiled temporaries of value_and_grad: the recompute path (reduction="none") holds
    O(chunk) tiles and the float32 dhidden; the gradient-in-forward path (scalar reductions)
    O(chunk) tiles and one float32 dweight-sized accumulator. Neither holds (N, V)."""
    n, d, v = 4096, 256, 32768
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def loss(h, w, y):
        out = fused(h, w, y, label_smoothing=0.1, z_loss=1e-4, reduction=reduction)
        return jnp.mean(out) if reduction == "none" else out

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    if reduction == "none":
        tile = n * _vocab.auto_chunk(n, v) * 4
        assert temp <= 3 * tile + n * d * 4, temp
    else:
        tile = _vocab.auto_rows(n, v) * v * 4
        assert temp <= 4 * tile + d * v * 4, temp
    sizes = [
        int(np.prod([int(s) for s in dims.split(",")]))
        for dims in re.findall(r"\b(?:f32|bf16|f16|s32|pred)\[([\d,]+)\]", compiled.as_text())
    ]
    assert sizes and max(sizes) < n * v, max(sizes)
    # The check can fail: the materialised loss holds the logits (and their gradient).
    naive = jax.jit(
        jax.value_and_grad(lambda h, w, y: materialised(h, w, y, reduction="mean"), argnums=(0, 1))
    )
    naive_temp = naive.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert naive_temp > n * v * 4
    assert temp <= naive_temp / 5, (temp, naive_temp)


@pytest.mark.slow
def test_vocab_parallel_shard_map_matches_unsharded():
    words = run_host_devices_script("sharded_linear_check.py", 8)
    assert words == ["ok", "8"]

"""Tests for the fused distillation losses ``linear_softmax_kl_divergence`` and
``linear_js_divergence``.

References: the materialised ``softmax_kl_divergence`` / ``js_divergence`` of
``hidden @ weight + bias`` and ``target_hidden @ target_weight + target_bias`` (float32 and
bfloat16, differentiated by JAX), a float64 NumPy reference written from the docstrings'
formulas, and numerical differentiation (``check_grads``) in float64.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads, run_host_devices_script
from jax.experimental import checkify

import jaxce

# Odd shapes: the chunks used (64, 128) do not divide V, so the last block is shifted.
N, D, DT, V = 37, 24, 40, 301
NAMES = ("hidden", "weight", "bias", "target_hidden", "target_weight", "target_bias")


def make(rng, n=N, d=D, dt=DT, v=V, dtype=np.float32):
    """Student and teacher arrays (h, w, b, ht, wt, bt) and sample weights with some zeros."""
    h = rng.normal(size=(n, d))
    w = rng.normal(size=(d, v)) * 1.5 / np.sqrt(d)
    b = rng.normal(size=(v,)) * 0.5
    ht = rng.normal(size=(n, dt))
    wt = rng.normal(size=(dt, v)) * 2.0 / np.sqrt(dt)
    bt = rng.normal(size=(v,)) * 0.5
    sw = rng.uniform(0.2, 2.0, size=n)
    sw[rng.uniform(size=n) < 0.2] = 0.0
    return tuple(a.astype(dtype) for a in (h, w, b, ht, wt, bt)), sw.astype(dtype)


def logits(h, w, b):
    """``h @ w + b`` as a user writes it: half-precision inputs give half-precision logits."""
    z = jnp.dot(h, w)
    return z + b.reshape((1,) * (z.ndim - 1) + (-1,))


def materialised_kl(h, w, ht, wt, *, bias, target_bias, temperature=1.0, **kw):
    s, t = logits(h, w, bias), logits(ht, wt, target_bias)
    return jaxce.softmax_kl_divergence(s, t, temperature=temperature, **kw)


def materialised_js(h, w, ht, wt, *, bias, target_bias, beta=0.5, temperature=1.0, **kw):
    s, t = logits(h, w, bias), logits(ht, wt, target_bias)
    return jaxce.js_divergence(s / temperature, t / temperature, beta=beta, **kw)


FUSED = {"kl": jaxce.linear_softmax_kl_divergence, "js": jaxce.linear_js_divergence}
DENSE = {"kl": materialised_kl, "js": materialised_js}


def value_and_grads(loss, arrays, **kw):
    """Value and the gradients w.r.t. all six arrays of a randomly weighted sum of ``loss``."""

    def scalar(h, w, b, ht, wt, bt):
        out = loss(h, w, ht, wt, bias=b, target_bias=bt, **kw)
        total = jnp.sum(out[0]) + 0.5 * out[1] if isinstance(out, tuple) else out
        if not isinstance(out, tuple) and out.ndim:
            cot = jnp.linspace(0.5, 1.5, out.size, dtype=out.dtype).reshape(out.shape)
            total = jnp.sum(out * cot)
        return total, out

    step = jax.jit(jax.value_and_grad(scalar, argnums=tuple(range(6)), has_aux=True))
    (_, out), grads = step(*arrays)
    return out, grads


def assert_close(a, b, rtol=2e-5, atol=2e-5, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale, err_msg=what)


def assert_matches(kind, arrays, rtol=2e-5, atol=2e-5, **kw):
    out, grads = value_and_grads(FUSED[kind], arrays, **kw)
    dense_kw = {k: x for k, x in kw.items() if k not in ("chunk_size",)}
    ref, ref_grads = value_and_grads(DENSE[kind], arrays, **dense_kw)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, rtol, atol, what="value")
    for name, g, r, a in zip(NAMES, grads, ref_grads, arrays, strict=True):
        assert g.dtype == a.dtype and g.shape == a.shape, name
        assert_close(g, r, rtol, atol, what=name)
    return out, grads


@pytest.mark.parametrize(
    "temperature,reduction,weighted,chunk",
    [
        (1.0, "none", False, 64),
        (2.0, "mean", True, 128),
        (0.5, "sum", True, 64),
        (4.0, "sum_and_weight", True, 1024),  # V smaller than the chunk: one block
        (1.0, "mean", False, None),  # automatic chunk
    ],
)
def test_kl_matches_materialised(rng, temperature, reduction, weighted, chunk):
    arrays, sw = make(rng)
    assert_matches(
        "kl",
        arrays,
        temperature=temperature,
        reduction=reduction,
        sample_weights=sw if weighted else None,
        chunk_size=chunk,
    )


@pytest.mark.parametrize(
    "beta,temperature,reduction,weighted,chunk",
    [
        (0.5, 1.0, "none", False, 64),
        (0.1, 2.0, "mean", True, 128),
        (0.9, 0.5, "sum", True, 64),
        (0.0, 1.0, "sum_and_weight", True, 128),  # M = Q: KL(P || Q) weighted by 0
        (1.0, 3.0, "mean", True, None),
    ],
)
def test_js_matches_materialised(rng, beta, temperature, reduction, weighted, chunk):
    arrays, sw = make(rng)
    assert_matches(
        "js",
        arrays,
        beta=beta,
        temperature=temperature,
        reduction=reduction,
        sample_weights=sw if weighted else None,
        chunk_size=chunk,
    )


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_without_biases_and_with_boolean_mask(rng, kind):
    (h, w, _, ht, wt, _), sw = make(rng)
    mask = sw > 0
    fused = jax.jit(functools.partial(FUSED[kind], reduction="mean", chunk_size=100))
    got = fused(h, w, ht, wt, sample_weights=mask)
    same = fused(h, w, ht, wt, sample_weights=mask.astype(np.float32))
    zeros = np.zeros(V, np.float32)
    dense = jax.jit(functools.partial(DENSE[kind], bias=zeros, target_bias=zeros, reduction="mean"))
    ref = dense(h, w, ht, wt, sample_weights=mask.astype(np.float32))
    assert_close(got, same)
    # The mean counts only the kept tokens: it equals the mean over the kept rows.
    kept = fused(h[mask], w, ht[mask], wt)
    assert_close(got, kept)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5)


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_bfloat16_no_worse_than_materialised_bfloat16(rng, kind):
    arrays, sw = make(rng)
    half = tuple(jnp.asarray(a, jnp.bfloat16) for a in arrays)
    full = tuple(a.astype(jnp.float32) for a in half)
    kw = {"temperature": 2.0, "sample_weights": sw, "reduction": "none"}
    if kind == "js":
        kw["beta"] = 0.3
    out, grads = value_and_grads(FUSED[kind], half, chunk_size=64, **kw)
    ref32, grads32 = value_and_grads(DENSE[kind], full, **kw)
    ref16, grads16 = value_and_grads(DENSE[kind], half, **kw)
    assert out.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 6

    def err(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    for name, a, r32, r16 in zip(
        ("value", *NAMES), (out, *grads), (ref32, *grads32), (ref16, *grads16), strict=True
    ):
        tol = 1e-3 * max(1.0, float(jnp.max(jnp.abs(r32))))
        assert err(a, r32) <= err(r16, r32) + tol, name


def numpy_reference(kind, h, w, b, ht, wt, bt, sw, temperature, beta):
    """Per-token weighted losses from the formulas, float64."""
    a = (h @ w + b) / temperature
    c = (ht @ wt + bt) / temperature

    def log_softmax(x):
        m = x.max(axis=1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))

    log_p, log_q = log_softmax(a), log_softmax(c)
    p, q = np.exp(log_p), np.exp(log_q)
    if kind == "kl":
        loss = temperature**2 * np.sum(q * (log_q - log_p), axis=1)
    else:
        log_m = np.log(beta * p + (1 - beta) * q)
        loss = np.sum(beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m), axis=1)
    return loss * sw


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_float64_formula_and_numerical_gradients(rng, kind):
    arrays, sw = make(rng, n=9, d=5, dt=7, v=23, dtype=np.float64)
    temperature, beta = 1.7, 0.35
    want = numpy_reference(kind, *arrays, sw, temperature, beta)
    extra = {"beta": beta} if kind == "js" else {}
    with jax.enable_x64(True):
        jarrays = tuple(jnp.asarray(a) for a in arrays)
        h, w, b, ht, wt, bt = jarrays
        got = FUSED[kind](
            h,
            w,
            ht,
            wt,
            bias=b,
            target_bias=bt,
            sample_weights=sw,
            temperature=temperature,
            chunk_size=4,
            **extra,
        )
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-11, atol=1e-13)
        # Gradients, tight, against JAX's autodiff of the materialised loss ...
        out, grads = value_and_grads(
            FUSED[kind],
            jarrays,
            temperature=temperature,
            sample_weights=sw,
            reduction="mean",
            chunk_size=4,
            **extra,
        )
        ref, ref_grads = value_and_grads(
            DENSE[kind],
            jarrays,
            temperature=temperature,
            sample_weights=sw,
            reduction="mean",
            **extra,
        )
        for g, r in zip((out, *grads), (ref, *ref_grads), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-10, atol=1e-12)

        # ... and numerically, including the traced hyperparameters.
        def f(h, w, b, ht, wt, bt, t, beta):
            kw = {"beta": beta} if kind == "js" else {}
            return FUSED[kind](
                h,
                w,
                ht,
                wt,
                bias=b,
                target_bias=bt,
                temperature=t,
                sample_weights=sw,
                reduction="sum",
                chunk_size=4,
                **kw,
            )

        args = (*jarrays, jnp.asarray(temperature), jnp.asarray(beta))
        check_grads(f, args, order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_traced_hyperparameter_gradients_match_materialised(rng, kind):
    arrays, sw = make(rng, n=11, v=70)
    h, w, b, ht, wt, bt = arrays

    def scalar(loss, t, beta, **kw):
        extra = {"beta": beta} if kind == "js" else {}
        return loss(
            h,
            w,
            ht,
            wt,
            bias=b,
            target_bias=bt,
            temperature=t,
            sample_weights=sw,
            reduction="mean",
            **extra,
            **kw,
        )

    got = jax.jit(jax.grad(lambda t, be: scalar(FUSED[kind], t, be, chunk_size=32), (0, 1)))(
        1.5, 0.4
    )
    want = jax.jit(jax.grad(lambda t, be: scalar(DENSE[kind], t, be), (0, 1)))(1.5, 0.4)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(float(g), float(r), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_leading_axes_vmap_checkpoint_and_tied_kernels(rng, kind):
    bsz, t, d, dt, v = 3, 7, 16, 12, 150
    emb = jnp.asarray(rng.normal(size=(v, d)) / 3, jnp.float32)  # tied student embedding
    wt = jnp.asarray(rng.normal(size=(dt, v)) / 3, jnp.float32)
    h = jnp.asarray(rng.normal(size=(bsz, t, d)), jnp.float32)
    ht = jnp.asarray(rng.normal(size=(bsz, t, dt)), jnp.float32)
    zeros = jnp.zeros(v, jnp.float32)

    def tied(loss, **kw):
        return lambda emb, h: loss(h, emb.T, ht, wt, reduction="mean", **kw)

    def dense(emb, h):
        return DENSE[kind](h, emb.T, ht, wt, bias=zeros, target_bias=zeros, reduction="mean")

    ref, ref_g = jax.jit(jax.value_and_grad(dense, argnums=(0, 1)))(emb, h)
    fused = tied(FUSED[kind], chunk_size=64)
    for f in (fused, jax.checkpoint(fused)):
        val, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(emb, h)
        assert_close(val, ref)
        assert_close(g[0], ref_g[0], what="embedding")
        assert_close(g[1], ref_g[1], what="hidden")
    # (B, T, D) hidden states give (B, T) losses, one per token.
    per_token = jax.jit(FUSED[kind])(h, emb.T, ht, wt)
    dense_per_token = jax.jit(lambda: DENSE[kind](h, emb.T, ht, wt, bias=zeros, target_bias=zeros))
    assert per_token.shape == (bsz, t)
    assert_close(per_token, dense_per_token())

    # vmap over the leading axis, differentiated through.
    def batched(loss, w, **kw):
        per = jax.vmap(lambda a, c: loss(a, w, c, wt, reduction="mean", **kw))(h, ht)
        return jnp.sum(per * jnp.arange(1.0, bsz + 1.0)), per

    (_, per), gw = jax.jit(
        jax.value_and_grad(lambda w: batched(FUSED[kind], w, chunk_size=64), has_aux=True)
    )(emb.T)
    (_, ref_per), ref_gw = jax.jit(
        jax.value_and_grad(
            lambda w: batched(
                lambda *a, **k: DENSE[kind](*a, bias=zeros, target_bias=zeros, **k), w
            ),
            has_aux=True,
        )
    )(emb.T)
    assert_close(per, ref_per)
    assert_close(gw, ref_gw)


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_padded_vocabulary(rng, kind):
    (h, w, b, ht, wt, bt), sw = make(rng, v=100)
    pad = 28
    wp = np.concatenate([w, rng.normal(size=(D, pad)).astype(np.float32)], axis=1)
    wtp = np.concatenate([wt, rng.normal(size=(DT, pad)).astype(np.float32)], axis=1)
    bp, btp = np.pad(b, (0, pad), constant_values=30.0), np.pad(bt, (0, pad))
    kw = {"sample_weights": sw, "reduction": "mean"}
    out, grads = value_and_grads(
        FUSED[kind], (h, wp, bp, ht, wtp, btp), vocab_size=100, chunk_size=32, **kw
    )
    ref, ref_grads = value_and_grads(DENSE[kind], (h, w, b, ht, wt, bt), **kw)
    assert_close(out, ref)
    for name, g, r in zip(NAMES, grads, ref_grads, strict=True):
        if name in ("hidden", "target_hidden"):
            assert_close(g, r, what=name)
        else:
            assert_close(g[..., :100], r, what=name)
            assert not np.any(np.asarray(g[..., 100:])), name


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_nan_in_nan_out_and_dropped_nan(rng, kind):
    (h, w, b, ht, wt, bt), _ = make(rng, n=6, v=50)

    def f(*arrays, **kw):
        return jax.jit(functools.partial(FUSED[kind], chunk_size=16, **kw))(*arrays)

    h_nan = h.copy()
    h_nan[2, 3] = np.nan
    out = np.asarray(f(h_nan, w, ht, wt, bias=b, target_bias=bt))
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(out, 2)))
    wt_nan = wt.copy()
    wt_nan[1, 7] = np.nan
    assert np.all(np.isnan(np.asarray(f(h, w, ht, wt_nan))))
    assert np.isnan(float(f(h_nan, w, ht, wt, reduction="mean")))
    # A zero weight drops the NaN token: finite loss and finite gradients everywhere.
    sw = np.ones(6, np.float32)
    sw[2] = 0.0
    grads = jax.jit(
        jax.grad(
            lambda h, w: FUSED[kind](
                h, w, ht, wt, sample_weights=sw, reduction="mean", chunk_size=16
            ),
            argnums=(0, 1),
        )
    )(h_nan, w)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert not np.any(np.asarray(grads[0][2]))


def _float64_through_tempered_logits(kind, arrays, temperature):
    """The materialised loss at ``T = 1`` of the float64 tempered logits ``(h W + b) / T``
    (divided in NumPy: on XLA:CPU a division by 3 inside the program can round differently
    in two fusions, which for a logit of 1e28 is an error of 1e12), its gradients carried to
    the six arrays by the chain rule, with the cotangents of ``value_and_grads``.
    """
    h, w, b, ht, wt, bt = (np.asarray(a, np.float64) for a in arrays)
    s, t = (h @ w + b) / temperature, (ht @ wt + bt) / temperature
    scale = temperature**2 if kind == "kl" else 1.0
    dense = jaxce.softmax_kl_divergence if kind == "kl" else jaxce.js_divergence
    with jax.enable_x64(True):

        def total(s, t):
            out = scale * dense(s, t)
            return jnp.sum(out * jnp.linspace(0.5, 1.5, out.size, dtype=out.dtype)), out

        (_, out), (ds, dt) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(s, t)
        ds, dt = np.asarray(ds) / temperature, np.asarray(dt) / temperature
    grads = (ds @ w.T, h.T @ ds, ds.sum(0), dt @ wt.T, ht.T @ dt, dt.sum(0))
    return np.asarray(out), grads


# Temperatures that are powers of two: on XLA:CPU a logit scaled by 1/3 can round differently
# in two fusions that read it (a fused multiply-add in one), and at 1e28 one ulp is 1e21, so
# even ``jax.nn.logsumexp(x / 3)`` is inf there (the docstrings' "Numerics" say so).
@pytest.mark.parametrize("kind,temperature", [("kl", 1.0), ("js", 1.0), ("kl", 2.0), ("js", 0.5)])
def test_huge_hidden_values_match_float64(rng, kind, temperature):
    """One hidden value of +-1e30 or +-f32max in the student's or the teacher's row: the
    divergence is finite (the student's ~1e29-1e37, a bounded JS, the teacher's a few nats:
    its softmax is one-hot), and the fused float32 values and gradients are those of the
    materialised loss in float64 (before: inf, 0 or NaN, from log1p(E_p[expm1(c - a)])
    overflowing and from the huge terms of E_q[c - a] - log E_p[e^(c - a)] cancelling).
    """
    (h, w, b, ht, wt, bt), _ = make(rng, n=10, v=50)
    w, wt = w * 0.2, wt * 0.2  # logits up to ~0.2 f32max: representable
    top = float(np.finfo(np.float32).max)
    for row, (student, value) in enumerate(
        [(True, 1e30), (False, -1e30), (True, -top), (False, top), (True, -1e30), (False, 1e30)]
    ):
        (h if student else ht)[row, row % 3] = value
    arrays = (h, w, b, ht, wt, bt)
    out, grads = value_and_grads(FUSED[kind], arrays, chunk_size=16, temperature=temperature)
    ref, ref_grads = _float64_through_tempered_logits(kind, arrays, temperature)
    assert np.all(np.isfinite(np.asarray(out))) and np.all(np.asarray(out) >= 0)
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref), rtol=1e-6)
    for name, g, r in zip(NAMES, grads, ref_grads, strict=True):
        g, r = np.asarray(g, np.float64), np.asarray(r)
        top_r = np.abs(r) > top  # f32max times a gradient: inf in float32, as it must be
        assert np.array_equal(np.isinf(g), top_r), name
        # float32 rounding of the one-hot teacher's log-ratio (~1e-7) times a hidden value
        # of f32max: gradients within 1e-4 of the array's largest entry
        scale = np.abs(r[~top_r]).max()
        np.testing.assert_allclose(g[~top_r], r[~top_r], atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("kind", ["kl", "js"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "sum_and_weight"])
def test_empty_batch(rng, kind, reduction):
    (_, w, b, _, wt, bt), _ = make(rng, v=40)
    h, ht = np.zeros((0, D), np.float32), np.zeros((2, 0, DT), np.float32)[0]

    def scalar(h, w, ht, wt):
        out = FUSED[kind](h, w, ht, wt, bias=b, target_bias=bt, reduction=reduction)
        return jnp.sum(out[0] + out[1]) if isinstance(out, tuple) else jnp.sum(out)

    out = FUSED[kind](h, w, ht, wt, reduction=reduction)
    if reduction == "none":
        assert out.shape == (0,)
    else:
        assert all(float(x) == 0.0 for x in jax.tree.leaves(out))
    grads = jax.jit(jax.grad(scalar, argnums=(0, 1, 2, 3)))(h, w, ht, wt)
    assert [g.shape for g in grads] == [h.shape, w.shape, ht.shape, wt.shape]
    assert not any(np.any(np.asarray(g)) for g in grads)


def test_hyperparameter_domains(rng):
    (h, w, _, ht, wt, _), _ = make(rng, n=4, v=30)
    kl, js = jaxce.linear_softmax_kl_divergence, jaxce.linear_js_divergence
    for bad in (0.0, -1.0, np.float32(-2.0), float("nan")):
        with pytest.raises(ValueError, match=r"`temperature` must be > 0"):
            kl(h, w, ht, wt, temperature=bad)
        with pytest.raises(ValueError, match=r"`temperature` must be > 0"):
            js(h, w, ht, wt, temperature=bad)
    for bad in (-0.1, 1.5, np.float64(2.0)):
        with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]"):
            js(h, w, ht, wt, beta=bad)
    # Traced values outside the domain give NaN, and raise under checkify.
    kl_t = jax.jit(lambda t: kl(h, w, ht, wt, temperature=t))
    js_b = jax.jit(lambda be: js(h, w, ht, wt, beta=be))
    assert np.all(np.isnan(np.asarray(kl_t(-1.0)))) and np.all(np.isfinite(kl_t(2.0)))
    assert np.all(np.isnan(np.asarray(js_b(1.5)))) and np.all(np.isfinite(js_b(1.0)))
    err, _ = checkify.checkify(kl_t, errors=checkify.user_checks)(-1.0)
    with pytest.raises(checkify.JaxRuntimeError, match="temperature"):
        err.throw()
    # Python and NumPy scalars are accepted.
    numpy_scalars = functools.partial(kl, temperature=np.float32(2.0), chunk_size=np.int64(8))
    python_scalars = functools.partial(kl, temperature=2, chunk_size=8)
    assert_close(jax.jit(numpy_scalars)(h, w, ht, wt), kl_t(2.0))
    assert_close(jax.jit(python_scalars)(h, w, ht, wt), kl_t(2.0))


def test_bad_shapes_raise(rng):
    (h, w, b, ht, wt, bt), _ = make(rng, n=6, v=50)
    kl = jaxce.linear_softmax_kl_divergence
    with pytest.raises(ValueError, match=r"`hidden` has shape \(6, 24\).*\(9, 50\)"):
        kl(h, np.zeros((9, 50), np.float32), ht, wt)
    with pytest.raises(ValueError, match=r"`target_hidden` has shape \(6, 40\).*`target_weight`"):
        kl(h, w, ht, np.zeros((24, 50), np.float32))
    with pytest.raises(ValueError, match="leading"):
        kl(h, w, ht[:5], wt)
    with pytest.raises(ValueError, match="same number of vocabulary columns"):
        kl(h, w, ht, wt[:, :49])
    with pytest.raises(ValueError, match="`target_bias` has shape"):
        kl(h, w, ht, wt, target_bias=bt[:49])
    with pytest.raises(ValueError, match="`sample_weights`"):
        kl(h, w, ht, wt, sample_weights=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="`reduction`"):
        jaxce.linear_js_divergence(h, w, ht, wt, reduction="avg")
    with pytest.raises(ValueError, match="`chunk_size`"):
        kl(h, w, ht, wt, chunk_size=0)
    with pytest.raises(TypeError, match="`target_weight` must have a floating dtype"):
        kl(h, w, ht, wt.astype(np.int32))


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_forward_mode_is_refused_with_the_functions_name(rng, kind):
    (h, w, _, ht, wt, _), _ = make(rng, n=6, v=50)
    name = FUSED[kind].__name__
    with pytest.raises(TypeError, match=f"{name} supports reverse-mode"):
        jax.jvp(lambda h: FUSED[kind](h, w, ht, wt), (h,), (h,))


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_memory_is_o_chunk(kind):
    n, d, dt, v = 2048, 256, 256, 32768
    shapes = ((n, d), (d, v), (v,), (n, dt), (dt, v), (v,))
    args = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)

    def compiled(loss, **kw):
        def scalar(h, w, b, ht, wt, bt):
            return loss(h, w, ht, wt, bias=b, target_bias=bt, reduction="mean", **kw)

        step = jax.jit(jax.value_and_grad(scalar, argnums=tuple(range(6))))
        return step.lower(*args).compile()

    fused = compiled(FUSED[kind], temperature=2.0)
    temp = fused.memory_analysis().temp_size_in_bytes
    assert temp <= n * v * 4 / 8, temp / 2**20
    sizes = [
        int(np.prod([int(s) for s in dims.split(",")]))
        for dims in re.findall(r"\b(?:f32|bf16|f16|s32|pred)\[([\d,]+)\]", fused.as_text())
    ]
    assert sizes and max(sizes) < n * v, max(sizes)
    # The bound can fail: the materialised loss holds (N, V) logits and probabilities.
    naive = compiled(DENSE[kind], temperature=2.0).memory_analysis().temp_size_in_bytes
    assert naive > n * v * 4, naive / 2**20


@pytest.mark.slow
def test_vocab_parallel_shard_map_matches_unsharded():
    words = run_host_devices_script("sharded_distill_check.py", 8)
    assert words == ["ok", "8"]

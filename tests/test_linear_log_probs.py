"""Tests for the fused per-token log-probabilities and entropy ``linear_log_probs``.

References: a float64 NumPy reference written from the docstring's formula, and the
materialised ``-softmax_cross_entropy_with_integer_labels(z)`` / ``entropy(z)`` of
``z = cap(h @ W + b) / T`` in float64, for both outputs and their gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads, run_host_devices_script
from jax.experimental import checkify

import jaxce
from jaxce import linear_log_probs as fused

# Odd shapes: the chunks below do not divide V, so the last block is shifted.
N, D, V = 37, 13, 211


def make(rng, n=N, d=D, v=V, dtype=np.float32):
    h = rng.normal(size=(n, d)).astype(dtype)
    w = (rng.normal(size=(d, v)) * 1.5 / np.sqrt(d)).astype(dtype)
    b = rng.normal(size=(v,)).astype(dtype)
    y = rng.integers(0, v, size=n).astype(np.int32)
    return h, w, b, y


def numpy_reference(h, w, b, y, *, temperature=1.0, softcap=None, vocab_size=None):
    """``(log p_y, H)`` in float64 from the formula, over the first ``vocab_size`` columns."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    u = h @ w + (0.0 if b is None else np.asarray(b, np.float64))
    if softcap is not None:
        u = softcap * np.tanh(u / softcap)
    z = u / np.broadcast_to(np.asarray(temperature, np.float64), y.shape)[..., None]
    z = z[..., : z.shape[-1] if vocab_size is None else vocab_size]
    m = z.max(-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(-1, keepdims=True))
    logp = z - lse
    lp = np.take_along_axis(logp, y[..., None], -1)[..., 0]
    return lp, -(np.exp(logp) * logp).sum(-1)


def materialised(h, w, y, *, bias=None, temperature=1.0, logit_softcap=None, vocab_size=None):
    """The dense pair ``(-CE(z, y), entropy(z))`` with jaxce's materialised losses."""
    u = h @ w if bias is None else h @ w + bias[None, :]
    if logit_softcap is not None:
        u = logit_softcap * jnp.tanh(u / logit_softcap)
    z = u / jnp.broadcast_to(jnp.asarray(temperature, u.dtype), y.shape)[..., None]
    if vocab_size is not None:
        z = z[..., :vocab_size]
    return (
        -jaxce.softmax_cross_entropy_with_integer_labels(z, y),
        jaxce.entropy(z),
    )


def objective(fn, a, c):
    """``sum(a * log_probs + c * entropy)``: random cotangents on both outputs."""

    def scalar(h, w, b):
        lp, ent = fn(h, w, b)
        return jnp.sum(a * lp + c * ent)

    return scalar


CASES = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"bias": True, "logit_softcap": 2.5},
    "temperature": {"temperature": 0.7},
    "per_sequence_temperature": {"temperature": "per_token", "logit_softcap": 3.0},
    "padded": {"bias": True, "vocab_size": 190},
    "ignore_index": {"ignore_index": -100},
}


def _options(rng, case, y):
    opts = dict(CASES[case])
    use_bias = opts.pop("bias", False)
    if opts.get("temperature") == "per_token":
        opts["temperature"] = rng.uniform(0.5, 2.0, size=y.shape).astype(np.float32)
    if "ignore_index" in opts:
        y = y.copy()
        y[::5] = -100
    return use_bias, opts, y


# 64 does not divide V (the last block is shifted); None is one block of all V columns.
@pytest.mark.parametrize(
    ("case", "chunk"), [(case, 64) for case in CASES] + [("plain", None), ("softcap", None)]
)
def test_float64_matches_numpy_and_materialised(rng, case, chunk):
    h, w, b, y = make(rng)
    use_bias, opts, y = _options(rng, case, y)
    a, c = rng.normal(size=N), rng.normal(size=N)
    ignored = y == -100
    vocab = opts.get("vocab_size")
    if vocab is not None:
        y = np.minimum(y, vocab - 1)
    with jax.enable_x64(True):
        h64, w64, b64 = (jnp.asarray(v, jnp.float64) for v in (h, w, b))
        ys = np.where(ignored, 0, y)

        def fn(hh, ww, bb):
            return fused(
                hh, ww, y, bias=bb if use_bias else None, return_entropy=True, chunk_size=chunk,
                **opts,
            )  # fmt: skip

        lp, ent = fn(h64, w64, b64)
        assert lp.dtype == ent.dtype == jnp.float64
        t = opts.get("temperature", 1.0)
        want_lp, want_h = numpy_reference(
            h, w, b if use_bias else None, ys, temperature=t,
            softcap=opts.get("logit_softcap"), vocab_size=vocab,
        )  # fmt: skip
        want_lp, want_h = np.where(ignored, 0, want_lp), np.where(ignored, 0, want_h)
        np.testing.assert_allclose(lp, want_lp, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ent, want_h, rtol=1e-10, atol=1e-12)

        def dense(hh, ww, bb):
            mlp, mh = materialised(
                hh, ww, jnp.asarray(ys), bias=bb if use_bias else None, temperature=t,
                logit_softcap=opts.get("logit_softcap"), vocab_size=vocab,
            )  # fmt: skip
            return jnp.where(ignored, 0, mlp), jnp.where(ignored, 0, mh)

        for aa, cc in ((a, c), (0 * a, c), (a, 0 * c)):  # both, entropy only, log-probs only
            got = jax.grad(objective(fn, aa, cc), argnums=(0, 1, 2))(h64, w64, b64)
            want = jax.grad(objective(dense, aa, cc), argnums=(0, 1, 2))(h64, w64, b64)
            for g, wnt, name in zip(got, want, ("hidden", "weight", "bias"), strict=True):
                if name == "bias" and not use_bias:
                    continue
                np.testing.assert_allclose(g, wnt, rtol=1e-9, atol=1e-11, err_msg=name)
            if vocab is not None:
                assert not np.any(np.asarray(got[1])[:, vocab:])


def test_without_entropy_equals_first_output_and_its_gradient(rng):
    h, w, b, y = make(rng)
    lp_only = fused(h, w, y, bias=b, chunk_size=50)
    lp, _ = fused(h, w, y, bias=b, chunk_size=50, return_entropy=True)
    np.testing.assert_allclose(lp_only, lp, rtol=1e-6, atol=1e-6)
    g1 = jax.grad(lambda w: fused(h, w, y, bias=b).sum())(w)
    g2 = jax.grad(lambda w: fused(h, w, y, bias=b, return_entropy=True)[0].sum())(w)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)
    want = jax.grad(lambda w: materialised(h, w, y, bias=b)[0].sum())(w)
    np.testing.assert_allclose(g1, want, rtol=1e-4, atol=1e-6)


def test_check_grads_reverse_float64(rng):
    h, w, b, y = make(rng, n=5, d=4, v=23)
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(v, jnp.float64) for v in (h, w, b))

        def f(hh, ww, bb):
            lp, ent = fused(
                hh, ww, y, bias=bb, logit_softcap=2.0, temperature=1.3, return_entropy=True,
                chunk_size=8,
            )  # fmt: skip
            return jnp.concatenate([lp, ent])

        check_grads(f, args, order=1, modes=("rev",))


def test_transforms_jit_vmap_checkpoint(rng):
    h, w, b, y = make(rng, n=12)
    hb = np.stack([h, h[::-1]])
    yb = np.stack([y, y[::-1]])

    def f(h, y):
        return fused(h, w, y, bias=b, return_entropy=True, chunk_size=64)

    eager = f(h, y)
    jitted = jax.jit(f)(h, y)
    ckpt = jax.jit(jax.checkpoint(f))(h, y)
    mapped = jax.vmap(f)(hb, yb)
    leading = f(hb, yb)  # leading axes are tokens too
    for k in range(2):
        np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ckpt[k], eager[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mapped[k], leading[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mapped[k][0], eager[k], rtol=1e-6, atol=1e-6)

    def loss(h):
        lp, ent = f(h, y)
        return jnp.sum(lp) + 0.1 * jnp.sum(ent)

    g = jax.grad(loss)(h)
    np.testing.assert_allclose(jax.jit(jax.grad(jax.checkpoint(loss)))(h), g, rtol=1e-5)
    gv = jax.vmap(jax.grad(lambda h, y: jnp.sum(f(h, y)[0])))(hb, yb)
    np.testing.assert_allclose(gv[0], jax.grad(lambda h: jnp.sum(f(h, y)[0]))(h), rtol=1e-5)


def test_bfloat16_inputs_give_float32(rng):
    h, w, b, y = make(rng)
    hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    lp, ent = fused(hb, wb, y, return_entropy=True)
    assert lp.dtype == ent.dtype == jnp.float32
    want_lp, want_h = numpy_reference(
        np.asarray(hb, np.float32), np.asarray(wb, np.float32), None, y
    )
    np.testing.assert_allclose(lp, want_lp, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ent, want_h, rtol=1e-3, atol=1e-3)
    g = jax.grad(lambda w: jnp.sum(fused(hb, w, y, return_entropy=True)[1]))(wb)
    assert g.dtype == jnp.bfloat16


def test_empty_batch(rng):
    _, w, b, _ = make(rng)
    h = np.zeros((0, D), np.float32)
    y = np.zeros((0,), np.int32)
    lp, ent = fused(h, w, y, bias=b, return_entropy=True)
    assert lp.shape == ent.shape == (0,)
    g = jax.grad(lambda w: jnp.sum(fused(h, w, y, return_entropy=True)[1]))(w)
    assert not np.any(np.asarray(g))


def test_nan_in_nan_out_and_ignored_nan_does_not_leak(rng):
    h, w, b, y = make(rng, n=8)
    h[2, 3] = np.nan
    lp, ent = fused(h, w, y, return_entropy=True)
    assert np.isnan(lp[2]) and np.isnan(ent[2])
    assert np.all(np.isfinite(np.delete(np.asarray(lp), 2)))
    y[2] = -100
    lp, ent = fused(h, w, y, ignore_index=-100, return_entropy=True)
    assert lp[2] == 0.0 and ent[2] == 0.0
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(ent))

    def loss(h, w):
        lp, ent = fused(h, w, y, ignore_index=-100, return_entropy=True)
        return jnp.sum(lp + ent)

    gh, gw = jax.grad(loss, argnums=(0, 1))(h, w)
    assert np.all(np.isfinite(gw)) and np.all(np.isfinite(gh))
    assert not np.any(np.asarray(gh)[2])


def test_bad_labels_nan_and_checkify(rng):
    h, w, _, y = make(rng, n=6, v=50)
    y[2], y[4] = 50, -3
    lp, ent = jax.jit(lambda h: fused(h, w, y, return_entropy=True))(h)
    for out in (np.asarray(lp), np.asarray(ent)):
        assert np.isnan(out[2]) and np.isnan(out[4]) and np.all(np.isfinite(out[[0, 1, 3, 5]]))
    checked = checkify.checkify(jax.jit(fused), errors=checkify.user_checks)
    err, _ = checked(h, w, y)
    with pytest.raises(checkify.JaxRuntimeError, match="invalid integer label 50"):
        err.throw()


def test_bad_arguments_raise(rng):
    h, w, b, y = make(rng, n=6, v=50)
    with pytest.raises(ValueError, match="`labels`"):
        fused(h, w, y[:5])
    with pytest.raises(ValueError, match="`hidden`"):
        fused(h[:, :5], w, y)
    with pytest.raises(ValueError, match="`weight`"):
        fused(h, w[None], y)
    with pytest.raises(ValueError, match="`bias`"):
        fused(h, w, y, bias=b[:7])
    with pytest.raises(ValueError, match="`temperature`"):
        fused(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="`temperature`"):
        fused(h, w, y, temperature=np.array([1.0, -1.0, 1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="`temperature`"):
        fused(h, w, y, temperature=np.ones(5))
    with pytest.raises(ValueError, match="`vocab_size`"):
        fused(h, w, y, vocab_size=51)
    with pytest.raises(ValueError, match="`chunk_size`"):
        fused(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="`logit_softcap`"):
        fused(h, w, y, logit_softcap=-1.0)
    # A traced temperature outside the domain gives NaN, as the other fused losses do.
    out = jax.jit(lambda t: fused(h, w, y, temperature=t))(jnp.float32(-1.0))
    assert np.all(np.isnan(out))


def test_temperature_is_not_differentiated(rng):
    h, w, _, y = make(rng, n=6, v=50)
    g = jax.grad(lambda t: jnp.sum(fused(h, w, y, temperature=t, return_entropy=True)[1]))(1.5)
    assert g == 0.0


def test_forward_mode_is_refused_with_advice(rng):
    h, w, _, y = make(rng, n=6, v=50)
    with pytest.raises(TypeError, match=r"linear_log_probs.*softmax_cross_entropy_with_integer"):
        jax.jvp(lambda h: fused(h, w, y), (h,), (h,))


def test_memory_is_o_chunk():
    n, d, v = 2048, 64, 8192
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def loss(h, w, y):
        lp, ent = fused(h, w, y, return_entropy=True, chunk_size=512)
        return jnp.sum(lp) + jnp.sum(ent)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * v * 4 / 4, temp / 2**20  # a quarter of one (N, V) float32 array


def test_fused_divergences_are_exactly_zero_for_identical_inputs():
    """Issue 18: 64 rows of 1000 logits (normal x 3); a student equal to its teacher gives 0."""
    r = np.random.default_rng(7)
    h = r.normal(size=(64, 32)).astype(np.float32)
    w = (r.normal(size=(32, 1000)) * 3 / np.sqrt(32)).astype(np.float32)
    b = r.normal(size=1000).astype(np.float32)
    for t in (1.0, 2.0, 3.0):
        for beta in (0.5, 0.3):
            js = jaxce.linear_js_divergence(
                h, w, h, w, bias=b, target_bias=b, temperature=t, beta=beta
            )
            np.testing.assert_array_equal(np.asarray(js), 0.0)
        kl = jaxce.linear_softmax_kl_divergence(
            h, w, h, w, bias=b, target_bias=b, temperature=t, chunk_size=300
        )
        np.testing.assert_array_equal(np.asarray(kl), 0.0)
    # Never negative, and accurate, for a teacher close to the student.
    w2 = w + 1e-3 * r.normal(size=w.shape).astype(np.float32)
    kl = np.asarray(jaxce.linear_softmax_kl_divergence(h, w, h, w2))
    js = np.asarray(jaxce.linear_js_divergence(h, w, h, w2))
    assert np.all(kl >= 0) and np.all(js >= 0)
    a, c = h.astype(np.float64) @ w, h.astype(np.float64) @ w2
    lp = (
        a
        - np.log(np.exp(a - a.max(1, keepdims=True)).sum(1, keepdims=True))
        - a.max(1, keepdims=True)
    )
    lq = (
        c
        - np.log(np.exp(c - c.max(1, keepdims=True)).sum(1, keepdims=True))
        - c.max(1, keepdims=True)
    )
    exact = (np.exp(lq) * (lq - lp)).sum(1)
    np.testing.assert_allclose(kl, exact, rtol=1e-2)


@pytest.mark.slow
def test_vocab_parallel_shard_map_matches_unsharded():
    words = run_host_devices_script("sharded_log_probs_check.py", 4)
    assert words == ["ok", "4"]

"""Tests for the top-k losses: ``sparse_distillation_loss`` (materialised and fused) and the
sampler-truncated log-probabilities ``truncated_log_probs`` / ``linear_log_probs(top_k=)``.

References: float64 NumPy transcriptions of the docstrings' formulas (the teacher's k ids plus
a tail class holding each side's remaining mass, or both renormalised over the ids; the
top-k-renormalised softmax with ties to the smaller id), the materialised losses for the fused
ones, and ``softmax_kl_divergence`` for a teacher that stores its whole distribution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads, run_host_devices_script
from jax.experimental import checkify

import jaxce

N, D, V, K = 9, 6, 53, 5  # 53 columns: the chunks below do not divide it


def log_softmax64(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def sparse_reference(logits, ids, t, *, temperature=1.0, tail="bucket"):
    """Per-token loss in float64, term by term from the formula (``-inf`` entries skipped)."""
    s_full = log_softmax64(np.asarray(logits, np.float64) / temperature)
    s = np.take_along_axis(s_full, np.asarray(ids), -1)
    t = np.asarray(t, np.float64)
    out = np.zeros(s.shape[:-1])
    for idx in np.ndindex(out.shape):
        live = np.isfinite(t[idx])
        si, ti = s[idx][live], t[idx][live]
        if tail == "renormalize":
            si = si - np.log(np.exp(si).sum())
            ti = ti - np.log(np.exp(ti).sum())
        else:
            si = np.append(si, np.log(1 - np.exp(si).sum()))
            ti = np.append(ti, np.log(max(1 - np.exp(ti).sum(), 0.0)))
        q = np.exp(ti)
        on = q > 0
        out[idx] = np.sum(q[on] * (ti[on] - si[on]))
    return temperature**2 * out


def teacher(rng, n=N, v=V, k=K, scale=2.0):
    """A teacher's top-k ids and log-probabilities, as a distillation dataset stores them."""
    lp = log_softmax64(rng.normal(size=(n, v)) * scale)
    ids = np.argsort(-lp, -1, kind="stable")[:, :k].astype(np.int32)
    return ids, np.take_along_axis(lp, ids, -1)


def test_sparse_float64_matches_numpy(rng):
    z = rng.normal(size=(N, V)) * 1.5
    ids, t = teacher(rng)
    t[1, 3:] = -np.inf  # a teacher that stored fewer ids: padding
    ids[1, 3:] = -1  # ... whose ids are not read
    with jax.enable_x64(True):
        for tail in ("bucket", "renormalize"):
            for temp in (1.0, 2.5):
                got = jaxce.sparse_distillation_loss(z, ids, t, temperature=temp, tail=tail)
                want = sparse_reference(z, ids, t, temperature=temp, tail=tail)
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
                assert np.all(np.asarray(got) >= 0)


def test_sparse_whole_distribution_equals_softmax_kl(rng):
    z, zt = rng.normal(size=(N, V)), rng.normal(size=(N, V)) * 2
    lp = np.asarray(jax.nn.log_softmax(jnp.asarray(zt)))
    ids = np.tile(np.arange(V, dtype=np.int32), (N, 1))
    got = jaxce.sparse_distillation_loss(z, ids, lp, temperature=2.0)
    want = jaxce.softmax_kl_divergence(z, zt * 2.0, temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_sparse_masks_weights_reductions(rng):
    z = rng.normal(size=(N, V)).astype(np.float32)
    ids, t = teacher(rng)
    where = np.ones((N, V), bool)
    where[:, -3:] = False  # padded vocabulary
    ids = np.minimum(ids, V - 4)  # ids of real classes only
    w = rng.uniform(size=N).astype(np.float32)
    got = jaxce.sparse_distillation_loss(z, ids, t, where=where, sample_weights=w)
    want = sparse_reference(z[:, :-3], ids, t) * w
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    total, weight = jaxce.sparse_distillation_loss(
        z, ids, t, where=where, sample_weights=w, reduction="sum_and_weight"
    )
    np.testing.assert_allclose(total, want.sum(), rtol=1e-5)
    np.testing.assert_allclose(weight, w.sum(), rtol=1e-6)
    mean = jaxce.sparse_distillation_loss(z, ids, t, where=where, reduction="mean")
    np.testing.assert_allclose(mean, sparse_reference(z[:, :-3], ids, t).mean(), rtol=1e-5)
    token = np.arange(N) % 3 != 0  # a per-token where drops tokens
    got = jaxce.sparse_distillation_loss(z, ids, t, where=token)
    np.testing.assert_allclose(got, sparse_reference(z, ids, t) * token, rtol=1e-5, atol=1e-6)
    # An id naming a masked class is invalid.
    bad = ids.copy()
    bad[4, 0] = V - 1
    got = jaxce.sparse_distillation_loss(z, bad, t, where=where)
    assert np.isnan(got[4]) and np.all(np.isfinite(np.delete(np.asarray(got), 4)))


def test_sparse_check_grads_with_padding(rng):
    """Padded (``-inf``) entries, both arguments, first order in both modes; second order
    (fwd and rev, both tails) is the conformance matrix's ``sparse_distillation_loss`` cells."""
    z = rng.normal(size=(3, 11))
    ids, t = teacher(rng, n=3, v=11, k=4)
    t[1, 3] = -np.inf
    with jax.enable_x64(True):

        def f(z, t):
            return jaxce.sparse_distillation_loss(z, ids, t, temperature=1.7)

        check_grads(f, (z, t), order=1, modes=("fwd", "rev"))


def test_sparse_gradient_is_student_minus_spread_teacher(rng):
    """dL/dz = T (p - q'), q' the teacher at the ids and its tail spread like the student's."""
    z = rng.normal(size=(N, V))
    ids, t = teacher(rng)
    with jax.enable_x64(True):
        g = jax.grad(lambda z: jaxce.sparse_distillation_loss(z, ids, t, temperature=2.0).sum())(z)
    p = np.exp(log_softmax64(z / 2.0))
    q = np.zeros_like(p)
    rows = np.arange(N)[:, None]
    q_tail = 1 - np.exp(t).sum(-1, keepdims=True)
    p_out = p.copy()
    p_out[rows, ids] = 0
    q = q_tail * p_out / p_out.sum(-1, keepdims=True)
    q[rows, ids] = np.exp(t)
    np.testing.assert_allclose(g, 2.0 * (p - q), rtol=1e-9, atol=1e-12)


def test_sparse_exactly_zero_for_own_top_k_and_never_negative(rng):
    z = jnp.asarray(rng.normal(size=(64, 300)) * 3, jnp.float32)
    for temp in (1.0, 0.7, 2.0):
        own, own_ids = jax.lax.top_k(jax.nn.log_softmax(z / temp), 16)
        for tail in ("bucket", "renormalize"):
            got = jaxce.sparse_distillation_loss(z, own_ids, own, temperature=temp, tail=tail)
            np.testing.assert_array_equal(np.asarray(got), 0.0)
    near = own + 1e-4 * jnp.asarray(rng.normal(size=own.shape), jnp.float32)
    near = jnp.minimum(near, own)  # still a sub-distribution
    for tail in ("bucket", "renormalize"):
        assert np.all(np.asarray(jaxce.sparse_distillation_loss(z, own_ids, near, tail=tail)) >= 0)


def test_sparse_nan_and_bad_values(rng):
    z = rng.normal(size=(6, V)).astype(np.float32)
    ids, t = teacher(rng, n=6)
    z[0, 7] = np.nan  # NaN anywhere in the logits
    t[1, 2] = np.nan  # NaN in a live teacher entry
    ids[2, 1] = V  # out of range
    ids[3, 0] = -2
    t[4] = np.log(np.full(K, 0.3))  # mass 1.5: no tail to hold
    out = np.asarray(jax.jit(jaxce.sparse_distillation_loss)(z, ids, t))
    assert np.all(np.isnan(out[:5])) and np.isfinite(out[5])
    # The renormalised loss needs no normalised teacher.
    ren = np.asarray(jaxce.sparse_distillation_loss(z, ids, t, tail="renormalize"))
    assert np.isfinite(ren[4]) and np.all(np.isnan(ren[:4]))
    # A dropped token drops its NaN; its gradient is 0 and finite elsewhere.
    keep = np.arange(6) == 5
    g = jax.grad(lambda z: jaxce.sparse_distillation_loss(z, ids, t, where=keep).sum())(z)
    assert np.all(np.asarray(g)[:5] == 0) and np.all(np.isfinite(g)) and np.any(g[5])
    checked = checkify.checkify(
        jax.jit(jaxce.sparse_distillation_loss), errors=checkify.user_checks
    )
    err, _ = checked(z, ids, t)
    with pytest.raises(checkify.JaxRuntimeError, match="invalid teacher id at flat token 2"):
        err.throw()


def test_sparse_jit_vmap_empty_half_precision_and_errors(rng):
    z = rng.normal(size=(2, N, V)).astype(np.float32)
    ids, t = teacher(rng, n=2 * N)
    ids, t = ids.reshape(2, N, K), t.reshape(2, N, K)
    f = jaxce.sparse_distillation_loss
    whole = f(z, ids, t, temperature=1.5)
    np.testing.assert_allclose(jax.vmap(lambda a, b, c: f(a, b, c, temperature=1.5))(z, ids, t),
                               whole, rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(jax.jit(f)(z, ids, t, temperature=1.5), whole, rtol=1e-6)
    empty = f(np.zeros((0, V), np.float32), np.zeros((0, K), np.int32), np.zeros((0, K)))
    assert empty.shape == (0,)
    assert f(np.zeros((0, V)), np.zeros((0, K), np.int32), np.zeros((0, K)), reduction="mean") == 0
    half = f(jnp.asarray(z, jnp.bfloat16), ids, jnp.asarray(t, jnp.bfloat16))
    assert half.dtype == jnp.float32
    with pytest.raises(ValueError, match="`teacher_ids`"):
        f(z[0], ids[0, :, None], t[0])
    with pytest.raises(ValueError, match="`teacher_log_probs`"):
        f(z[0], ids[0], t[0, :, :2])
    with pytest.raises(ValueError, match="`tail`"):
        f(z[0], ids[0], t[0], tail="drop")
    with pytest.raises(ValueError, match="`temperature`"):
        f(z[0], ids[0], t[0], temperature=0.0)
    with pytest.raises(TypeError, match="`teacher_ids`"):
        f(z[0], ids[0].astype(np.float32), t[0])
    with pytest.raises(ValueError, match="at least one id"):
        f(z[0], ids[0, :, :0], t[0, :, :0])


# --------------------------------------------------------------------------------- fused


def fused_problem(rng, n=N, d=D, v=V, k=K):
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, v)) * 1.5 / np.sqrt(d)).astype(np.float32)
    b = rng.normal(size=(v,)).astype(np.float32)
    ids, t = teacher(rng, n, v, k)
    return h, w, b, ids, t


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_fused_sparse_matches_materialised_float64(rng, tail):
    h, w, b, ids, t = fused_problem(rng)
    t[2, 2:] = -np.inf
    sw = rng.uniform(size=N)
    sw[3] = 0.0
    cot = rng.normal(size=N)
    with jax.enable_x64(True):
        h, w, b, t, sw, cot = (jnp.asarray(a, jnp.float64) for a in (h, w, b, t, sw, cot))
        for chunk, vocab in ((8, None), (16, V - 4)):
            ids_c = np.minimum(ids, V - 5) if vocab else ids

            def fused(h, w, b, t, chunk=chunk, vocab=vocab, ids=ids_c):
                loss = jaxce.linear_sparse_distillation_loss(
                    h, w, ids, t, bias=b, temperature=1.7, tail=tail, sample_weights=sw,
                    chunk_size=chunk, vocab_size=vocab,
                )  # fmt: skip
                return jnp.sum(cot * loss), loss

            def dense(h, w, b, t, vocab=vocab, ids=ids_c):
                z = (h @ w + b[None, :])[:, :vocab]
                loss = jaxce.sparse_distillation_loss(
                    z, ids, t, temperature=1.7, tail=tail, sample_weights=sw
                )
                return jnp.sum(cot * loss), loss

            (_, got), g_got = jax.value_and_grad(fused, (0, 1, 2, 3), has_aux=True)(h, w, b, t)
            (_, want), g_want = jax.value_and_grad(dense, (0, 1, 2, 3), has_aux=True)(h, w, b, t)
            np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(got, sw * sparse_reference(
                (np.asarray(h) @ np.asarray(w) + np.asarray(b))[:, :vocab], ids_c, np.asarray(t),
                temperature=1.7, tail=tail), rtol=1e-10, atol=1e-13)  # fmt: skip
            for a, c in zip(g_got, g_want, strict=True):
                np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-12)
            if vocab:
                assert not np.any(np.asarray(g_got[1])[:, vocab:])


def test_fused_sparse_exactly_zero_for_own_log_probs(rng):
    h, w, b, _, _ = fused_problem(rng, n=32, v=300)
    z = h @ w + b
    ids = np.argsort(-z, -1, kind="stable")[:, :8].astype(np.int32)
    for temp in (1.0, 2.0):
        own = np.stack(
            [jaxce.linear_log_probs(h, w, ids[:, j], bias=b, temperature=temp, chunk_size=64)
             for j in range(8)], -1)  # fmt: skip
        for tail in ("bucket", "renormalize"):
            got = jaxce.linear_sparse_distillation_loss(
                h, w, ids, own, bias=b, temperature=temp, tail=tail, chunk_size=64
            )
            np.testing.assert_array_equal(np.asarray(got), 0.0)


def test_fused_sparse_transforms_nan_and_errors(rng):
    h, w, b, ids, t = fused_problem(rng, n=12)
    f = jaxce.linear_sparse_distillation_loss

    def loss(h, ids, t):
        return f(h, w, ids, t, bias=b, chunk_size=16)

    eager = loss(h, ids, t)
    np.testing.assert_allclose(jax.jit(loss)(h, ids, t), eager, rtol=1e-6)
    hb, ib, tb = (np.stack([a, a[::-1]]) for a in (h, ids, t))
    np.testing.assert_allclose(jax.vmap(loss)(hb, ib, tb)[1], eager[::-1], rtol=1e-6)
    np.testing.assert_allclose(loss(hb, ib, tb)[0], eager, rtol=1e-6)  # leading token axes
    g = jax.grad(lambda h: loss(h, ids, t).sum())(h)
    gc = jax.jit(jax.grad(jax.checkpoint(lambda h: loss(h, ids, t).sum())))(h)
    np.testing.assert_allclose(gc, g, rtol=1e-5, atol=1e-7)
    empty = f(np.zeros((0, D), np.float32), w, np.zeros((0, K), np.int32), np.zeros((0, K)))
    assert empty.shape == (0,)
    # NaN: in a kept token's hidden state it is NaN; a dropped token's NaN does not leak.
    h2, ids2 = h.copy(), ids.copy()
    h2[1, 0] = np.nan
    ids2[5, 2] = V + 3
    out = np.asarray(f(h2, w, ids2, t))
    assert np.isnan(out[1]) and np.isnan(out[5]) and np.isfinite(np.delete(out, [1, 5])).all()
    keep = np.ones(12, bool)
    keep[[1, 5]] = False
    gh, gw = jax.grad(lambda h, w: f(h, w, ids2, t, where=keep, reduction="sum"), (0, 1))(h2, w)
    gh = np.asarray(gh)
    assert np.isfinite(gw).all() and np.isfinite(gh).all() and not np.any(gh[[1, 5]])
    with pytest.raises(TypeError, match="linear_sparse_distillation_loss.*sparse_distillation"):
        jax.jvp(lambda h: f(h, w, ids, t), (h,), (h,))
    with pytest.raises(ValueError, match="`teacher_ids`"):
        f(h, w, ids[:5], t)
    with pytest.raises(ValueError, match="`vocab_size`"):
        f(h, w, ids, t, vocab_size=V + 1)
    with pytest.raises(ValueError, match="`chunk_size`"):
        f(h, w, ids, t, chunk_size=0)


def test_fused_sparse_memory_is_o_chunk():
    n, d, v, k = 2048, 64, 8192, 32
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n, k), jnp.int32),
        jax.ShapeDtypeStruct((n, k), jnp.float32),
    )

    def loss(h, w, ids, t):
        return jaxce.linear_sparse_distillation_loss(h, w, ids, t, chunk_size=512, reduction="sum")

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * v * 4 / 4, temp / 2**20  # a quarter of one (N, V) float32 array


# ------------------------------------------------------------------------- truncated


def truncated_reference(z, y, k, temperature=1.0):
    """``(log p~_y, H~)`` in float64: softmax over the k largest (ties: smaller ids)."""
    z = np.asarray(z, np.float64) / temperature
    order = np.argsort(-z, -1, kind="stable")[..., :k]
    top = np.take_along_axis(z, order, -1)
    lse = top.max(-1) + np.log(np.exp(top - top.max(-1, keepdims=True)).sum(-1))
    inside = np.any(order == y[..., None], -1)
    lp = np.where(inside, np.take_along_axis(z, y[..., None], -1)[..., 0] - lse, -np.inf)
    p = np.exp(top - lse[..., None])
    return lp, -(p * np.log(p)).sum(-1)


def tied_logits(rng, n=N, v=V):
    """Logits on a coarse grid: many ties at the k-th largest."""
    return np.round(rng.normal(size=(n, v)) * 2) / 2


def test_truncated_matches_numpy_with_ties(rng):
    z = tied_logits(rng)
    y = np.argsort(-z, -1, kind="stable")[:, 4].astype(np.int32)  # at the edge of the top 5
    y[::2] = rng.integers(0, V, size=len(y[::2]))
    with jax.enable_x64(True):
        for k in (1, 4, 5, 6, V):
            lp, h = jaxce.truncated_log_probs(z, y, top_k=k, temperature=0.8, return_entropy=True)
            want_lp, want_h = truncated_reference(z, y, k, 0.8)
            np.testing.assert_array_equal(np.isinf(lp), np.isinf(want_lp))
            np.testing.assert_allclose(lp, want_lp, rtol=1e-12)
            np.testing.assert_allclose(h, want_h, rtol=1e-12, atol=1e-14)
    full = jaxce.truncated_log_probs(z.astype(np.float32), y, top_k=V)
    np.testing.assert_allclose(
        full, -jaxce.softmax_cross_entropy_with_integer_labels(z.astype(np.float32), y), rtol=1e-6
    )


def test_truncated_gradients(rng):
    """Second order (fwd and rev) is the conformance matrix's ``truncated_log_probs`` cell;
    here: first order, and a zero gradient for a label outside the top k."""
    z = rng.normal(size=(4, 9))
    y = np.argsort(-z, -1)[:, 1].astype(np.int32)
    with jax.enable_x64(True):

        def f(z):
            lp, h = jaxce.truncated_log_probs(z, y, top_k=3, return_entropy=True)
            return jnp.concatenate([lp, h])

        check_grads(f, (z,), order=1, modes=("rev",))
        y_out = np.argsort(-z, -1)[:, 6].astype(np.int32)
        g = jax.grad(lambda z: jnp.sum(jaxce.truncated_log_probs(z, y_out, top_k=3) * 0 + 1))(z)
        assert np.all(np.asarray(g) == 0)


def test_truncated_nan_ignore_and_errors(rng):
    z = rng.normal(size=(5, V)).astype(np.float32)
    y = np.argmax(z, -1).astype(np.int32)
    z[0, np.argmin(z[0])] = np.nan  # a NaN outside the top k still makes the row NaN
    y[1], y[2] = V, -100
    lp, h = jaxce.truncated_log_probs(z, y, top_k=3, ignore_index=-100, return_entropy=True)
    assert np.isnan(lp[0]) and np.isnan(h[0]) and np.isnan(lp[1])
    assert lp[2] == 0 and h[2] == 0 and np.isfinite(lp[3:]).all()
    with pytest.raises(ValueError, match="`top_k`"):
        jaxce.truncated_log_probs(z, y, top_k=V + 1)
    with pytest.raises(ValueError, match="`top_k`"):
        jaxce.truncated_log_probs(z, y, top_k=0)
    out = jax.vmap(lambda z, y: jaxce.truncated_log_probs(z, y, top_k=3))(z[None], y[None])
    np.testing.assert_array_equal(np.isnan(out[0]), np.isnan(jaxce.truncated_log_probs(
        z, y, top_k=3)))  # fmt: skip
    assert jaxce.truncated_log_probs(np.zeros((0, V)), np.zeros(0, np.int32), top_k=2).shape == (0,)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_fused_top_k_matches_materialised(rng, k):
    h, w, b, _, _ = fused_problem(rng, n=24)
    w = np.round(w * 4) / 4  # ties
    z = h @ w + b
    y = np.argsort(-z, -1, kind="stable")[:, min(k, V - 1) - 1].astype(np.int32)
    y[::3] = rng.integers(0, V, size=8)
    y[5] = -100
    a, c = rng.normal(size=24), rng.normal(size=24)
    opts = {"temperature": 0.9, "logit_softcap": 4.0, "ignore_index": -100}
    with jax.enable_x64(True):
        h, w, b, a, c = (jnp.asarray(v, jnp.float64) for v in (h, w, b, a, c))

        def objective(fn):
            def f(h, w, b):
                lp, ent = fn(h, w, b)
                return jnp.sum(jnp.where(jnp.isinf(lp), 0, a * lp) + c * ent), (lp, ent)

            return f

        def dense(h, w, b):
            u = 4.0 * jnp.tanh((h @ w + b[None, :]) / 4.0)
            return jaxce.truncated_log_probs(
                u, y, top_k=k, temperature=0.9, ignore_index=-100, return_entropy=True
            )

        for chunk in (8, 64):

            def fused(h, w, b, chunk=chunk):
                return jaxce.linear_log_probs(
                    h, w, y, bias=b, top_k=k, return_entropy=True, chunk_size=chunk, **opts
                )

            (_, got), g1 = jax.value_and_grad(objective(fused), (0, 1, 2), has_aux=True)(h, w, b)
            (_, want), g2 = jax.value_and_grad(objective(dense), (0, 1, 2), has_aux=True)(h, w, b)
            for p, q in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.isinf(p), np.isinf(q))
                np.testing.assert_allclose(p, q, rtol=1e-11, atol=1e-13)
            for p, q in zip(g1, g2, strict=True):
                np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-12)


def test_fused_top_k_padding_nan_and_errors(rng):
    h, w, b, _, _ = fused_problem(rng, n=8)
    z = (h @ w + b)[:, : V - 3]
    y = np.argmax(z, -1).astype(np.int32)
    lp, ent = jaxce.linear_log_probs(
        h, w, y, bias=b, top_k=4, vocab_size=V - 3, return_entropy=True, chunk_size=16
    )
    want_lp, want_h = truncated_reference(z, y, 4)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5)
    np.testing.assert_allclose(ent, want_h, rtol=1e-5)
    h2 = h.copy()
    h2[3, 1] = np.nan
    lp = jaxce.linear_log_probs(h2, w, y, top_k=4)
    assert np.isnan(lp[3]) and not np.isnan(np.delete(np.asarray(lp), 3)).any()
    for bad in (0, V + 1, 2.5):
        with pytest.raises(ValueError, match="`top_k`"):
            jaxce.linear_log_probs(h, w, y, top_k=bad)


def test_fused_top_k_memory_is_o_chunk():
    n, d, v = 2048, 64, 8192
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def loss(h, w, y):
        lp, ent = jaxce.linear_log_probs(h, w, y, top_k=50, return_entropy=True, chunk_size=512)
        return jnp.sum(jnp.where(jnp.isinf(lp), 0, lp)) + jnp.sum(ent)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    temp = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temp < n * v * 4 / 4, temp / 2**20


@pytest.mark.slow
def test_vocab_parallel_shard_map_matches_unsharded():
    words = run_host_devices_script("sharded_topk_check.py", 4)
    assert words == ["ok", "4", "ok", "explicit"]

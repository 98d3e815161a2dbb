"""PyTorch parity of the core families: softmax cross-entropy and NLL, sigmoid BCE and BCE on
probabilities, entropy and KL divergence. Skipped where torch is not installed; the core tests
(``test_softmax.py``, ``test_binary.py``, ``test_divergence.py``) do not need it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    BINARY_SHAPE,
    REDUCTIONS,
    SOFTMAX_SHAPE,
    assert_close,
    binary_data,
    divergence_inputs,
    softmax_data,
)

import jaxce

torch = pytest.importorskip("torch")

C = SOFTMAX_SHAPE[1]


# ----------------------------------------------------------------------------- softmax
def _torch_ce(x, target, **kw):
    xt = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(np.asarray(target))
    if "weight" in kw and kw["weight"] is not None:
        kw["weight"] = torch.tensor(np.asarray(kw["weight"]), dtype=torch.float64)
    out = torch.nn.functional.cross_entropy(xt, tt, **kw)
    out.sum().backward()
    return out.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_torch_parity_class_indices(reduction, weighted, smoothing):
    rng = np.random.default_rng(22)
    x = rng.normal(size=(4, C, 3)).astype(np.float32)  # (N, C, d1)
    y = rng.integers(0, C, size=(4, 3))
    y[0, 1] = y[2, 2] = -100
    cw = rng.uniform(0.5, 2.0, size=C).astype(np.float32) if weighted else None
    want, want_grad = _torch_ce(
        x.astype(np.float64),
        y,
        weight=cw,
        ignore_index=-100,
        reduction=reduction,
        label_smoothing=smoothing,
    )

    @jax.jit
    def f(v):
        return jaxce.softmax_cross_entropy_with_integer_labels(
            v,
            y,
            axis=1,
            ignore_index=-100,
            class_weights=cw,
            label_smoothing=smoothing,
            reduction=reduction,
        )

    np.testing.assert_allclose(f(x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(f(v)))(x), want_grad, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_torch_parity_probability_targets(reduction, weighted, smoothing):
    rng = np.random.default_rng(23)
    x = rng.normal(size=(4, C, 3)).astype(np.float32)
    t = np.moveaxis(rng.dirichlet(np.ones(C), size=(4, 3)), -1, 1).astype(np.float32)
    cw = rng.uniform(0.5, 2.0, size=C).astype(np.float32) if weighted else None
    want, want_grad = _torch_ce(
        x.astype(np.float64),
        t.astype(np.float64),
        weight=cw,
        reduction=reduction,
        label_smoothing=smoothing,
    )

    @jax.jit
    def f(v):
        return jaxce.softmax_cross_entropy(
            v, t, axis=1, class_weights=cw, label_smoothing=smoothing, reduction=reduction
        )

    np.testing.assert_allclose(f(x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.grad(lambda v: jnp.sum(f(v)))(x), want_grad, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_parity_nll_loss(reduction):
    x, y, _, _, cw, _ = softmax_data(24)
    lp = np.asarray(jax.nn.log_softmax(x))
    y = y.copy()
    y[3] = -100
    want = torch.nn.functional.nll_loss(
        torch.tensor(lp),
        torch.tensor(y, dtype=torch.long),
        weight=torch.tensor(cw),
        ignore_index=-100,
        reduction=reduction,
    ).numpy()
    got = jaxce.nll_loss(lp, y, ignore_index=-100, class_weights=cw, reduction=reduction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- binary
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_sigmoid_bce_matches_torch(rng, reduction):
    x, y = binary_data(rng)
    x, y = x.astype(np.float32), y.astype(np.float32)
    w = rng.uniform(size=(1, 4)).astype(np.float32)
    pw = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(x),
        torch.tensor(y),
        weight=torch.tensor(w),
        pos_weight=torch.tensor(pw),
        reduction=reduction,
    ).numpy()
    got = jaxce.sigmoid_binary_cross_entropy(
        x, y, pos_weight=pw, sample_weights=w, reduction=reduction
    )
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sigmoid_bce_pos_weight_broadcasts_like_torch(rng):
    """(N, C, H, W) logits with pos_weight of shape (C, 1, 1)."""
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    y = (rng.uniform(size=x.shape) > 0.5).astype(np.float32)
    pw = np.array([1.0, 2.0, 4.0], np.float32).reshape(3, 1, 1)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(x), torch.tensor(y), pos_weight=torch.tensor(pw), reduction="none"
    ).numpy()
    assert_close(jaxce.sigmoid_binary_cross_entropy(x, y, pos_weight=pw), want, atol=1e-5)


def test_weighted_mean_differs_from_torch_mean_by_documented_formula(rng):
    """Core mean = sum(w l) / sum(w); PyTorch's = mean(w l)."""
    x, y = binary_data(rng)
    x, y = x.astype(np.float32), y.astype(np.float32)
    w = rng.uniform(size=BINARY_SHAPE).astype(np.float32)
    torch_mean = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(x), torch.tensor(y), weight=torch.tensor(w), reduction="mean"
    ).item()
    ours = float(jaxce.sigmoid_binary_cross_entropy(x, y, sample_weights=w, reduction="mean"))
    np.testing.assert_allclose(ours, torch_mean * w.size / w.sum(), rtol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bce_matches_torch(rng, reduction):
    p = rng.uniform(0.0, 1.0, size=BINARY_SHAPE).astype(np.float32)
    p[0, :2] = [0.0, 1.0]  # the clamp at -100
    y = (rng.uniform(size=BINARY_SHAPE) > 0.5).astype(np.float32)
    y[0, :2] = [1.0, 0.0]
    w = rng.uniform(size=BINARY_SHAPE).astype(np.float32)
    want = torch.nn.functional.binary_cross_entropy(
        torch.tensor(p), torch.tensor(y), weight=torch.tensor(w), reduction=reduction
    ).numpy()
    got = jaxce.binary_cross_entropy(p, y, sample_weights=w, reduction=reduction)
    assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_bce_grad_matches_torch_inside(rng):
    p = rng.uniform(0.05, 0.95, size=BINARY_SHAPE).astype(np.float32)
    y = rng.uniform(size=BINARY_SHAPE).astype(np.float32)
    tp = torch.tensor(p, requires_grad=True)
    torch.nn.functional.binary_cross_entropy(tp, torch.tensor(y), reduction="sum").backward()
    got = jax.grad(lambda p: jaxce.binary_cross_entropy(p, y, reduction="sum"))(p)
    assert_close(got, tp.grad.numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- divergences
def _torch_kl(log_q, target, log_target=False):
    """PyTorch's KLDivLoss(reduction="none") summed over the last (class) axis."""
    return (
        torch.nn.functional.kl_div(
            torch.as_tensor(log_q), torch.as_tensor(target), reduction="none", log_target=log_target
        )
        .sum(-1)
        .numpy()
    )


def test_seed_identity_entropy_and_kl_match_torch():
    """SEED_EXAMPLES item 5 with p = (0.9, 0.1), q = (0.6, 0.4): PyTorch's
    KLDivLoss(reduction="none").sum(-1) and Categorical(probs=p).entropy()."""
    p, q = np.array([0.9, 0.1], np.float32), np.array([0.6, 0.4], np.float32)
    h, kl = jaxce.entropy(np.log(p)), jaxce.kl_divergence(np.log(q), p)
    want_h = torch.distributions.Categorical(probs=torch.tensor(p)).entropy().item()
    assert_close(h, want_h, atol=1e-6)
    assert_close(kl, _torch_kl(np.log(q), p), atol=1e-6)


@pytest.mark.parametrize("log_target", [False, True])
def test_kl_matches_torch(rng, log_target):
    a, b = divergence_inputs(rng, "log_probs" if log_target else "probs")
    a, b = a.astype(np.float32), b.astype(np.float32)
    fn = jaxce.kl_divergence_with_log_targets if log_target else jaxce.kl_divergence
    assert_close(fn(a, b), _torch_kl(a, b, log_target=log_target), atol=1e-6)

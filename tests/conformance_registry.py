"""The conformance matrix's registry: every public function of ``jaxce``, ``jaxce.pytorch``
(functions and modules) and ``jaxce.sklearn``, with what it claims to support.

``tests/test_conformance.py`` crosses each entry with the contract's properties (API.md
"Conventions"): ``jit``, ``vmap``, ``grad`` of every reduction, ``checkpoint``, second order,
float64/float32/bfloat16, an empty batch, NaN in each input, identical arguments for the
divergences and out-of-domain hyperparameters. An entry says which of them apply, and lists
what the function does not support, with the reason and the error it documents for it.

Every array argument an entry passes is in ``Entry.inputs(rng, n)``: float64 NumPy arrays
(integer labels int32) for ``n`` examples. ``Entry.call(*arrays, reduction=r, **options)``
calls the public object. ``Entry.reference(*arrays)`` is the float64 NumPy result of
``call(*arrays, reduction=Entry.reductions[0])``, written from the formula in the docstring
(the per-example output where the function has one).

A public name that exists without an entry here fails ``test_every_public_name_has_an_entry``;
entries for names that are announced in the contract but not yet in ``jaxce`` are kept in
``PENDING`` and become cells as soon as the name exists.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from reference import log_softmax, xlogy
from test_ctc import _reference_loss as ctc_reference
from test_ntxent import _reference as ntxent_reference
from test_sklearn import _reference as log_loss_reference

import jaxce
from jaxce import pytorch
from jaxce import sklearn as jsk

C = 5  # classes
D, V = 4, 7  # hidden size and vocabulary of the fused losses
T_CTC, K_CTC, L_CTC = 4, 3, 2  # frames, classes, labels of ctc_loss
N = 3  # examples of the cells; the vmap cell stacks two draws on an extra leading axis

REVERSE_ONLY = "supports reverse-mode differentiation only"  # _api.public's message


@dataclasses.dataclass(frozen=True)
class Unsupported:
    """A combination the function does not support: ``run(entry, arrays)`` must raise
    ``error`` with a message matching ``match``; ``reason`` says why (the docstring's word)."""

    cell: str
    run: Callable[[Entry, tuple], Any]
    error: type[BaseException]
    match: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Entry:
    """One public function (or a variant of it) and the properties it claims.

    Attributes:
      id: the cell-id prefix, e.g. ``"softmax_cross_entropy"`` or ``"pytorch.NLLLoss"``.
      public: the dotted public name it covers (``"jaxce.pytorch.NLLLoss"``).
      inputs: ``(rng, n) -> arrays`` for ``n`` examples (float64 floats, int32 labels).
      call: ``(*arrays, reduction=..., **options) -> output``.
      names: the argument name of each array (NaN cells name them).
      reductions: the reductions ``call`` accepts, the per-example one first (``None``: the
        function has no reduction argument).
      float_args: indices of the differentiable inputs.
      nan_args: indices of the inputs a NaN in which must make the output NaN (default
        ``float_args``).
      batched: indices of the inputs with the example axis first (others, e.g. a fused
        kernel, are shared by the examples).
      reference: float64 NumPy output of ``call(..., reduction=reductions[0])``.
      per_example: ``reductions[0]``'s output has the example axis first.
      empty_reduced: the value of each scalar reduction of an empty batch (``mean`` is ``0``
        in the core, NaN in ``jaxce.pytorch``).
      modes: the autodiff modes the function supports (``("rev",)`` for the fused losses).
      order2: second order is supported (in ``modes``).
      identical: ``array -> arrays`` of a divergence at two equal distributions
        (``identical_options`` the hyperparameters to try), with ``exact`` for exactly 0.0
        (the same array twice) or only ``>= 0`` (two representations of one distribution).
      domains: ``(argument, value)`` pairs outside the documented domain.
      unsupported: the documented non-supported combinations.
      keeps_dtype: the result has the input's dtype for half precision too (helpers that
        are not losses: ``smooth_labels``, ``weighted_mean``); losses give float32.
      eager_checks: a concrete NaN raises eagerly, as the library it mirrors does (the NaN
        cells run it under ``jit``, where values cannot raise).
    """

    id: str
    public: str
    inputs: Callable[[np.random.Generator, int], tuple]
    call: Callable[..., Any]
    names: tuple[str, ...]
    float_args: tuple[int, ...]
    reference: Callable[..., Any]
    reductions: tuple[str | None, ...] = ("none", "sum", "mean", "sum_and_weight")
    nan_args: tuple[int, ...] | None = None
    batched: tuple[int, ...] | None = None
    per_example: bool = True
    empty_reduced: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"sum": 0.0, "mean": 0.0}
    )
    modes: tuple[str, ...] = ("fwd", "rev")
    order2: bool = True
    identical: Callable[[np.ndarray], tuple] | None = None
    identical_options: tuple[dict, ...] = ({},)
    exact: bool = True
    domains: tuple[tuple[str, Any], ...] = ()
    unsupported: tuple[Unsupported, ...] = ()
    needs: str | None = None  # a public name that must exist (pending entries)
    keeps_dtype: bool = False  # not a loss: half precision in, half precision out
    eager_checks: bool = False  # validates concrete values eagerly (as torch, scikit-learn)

    def nan_indices(self) -> tuple[int, ...]:
        return self.float_args if self.nan_args is None else self.nan_args

    def batched_indices(self, count: int) -> tuple[int, ...]:
        return tuple(range(count)) if self.batched is None else self.batched


# --------------------------------------------------------------------------- input makers


def _logits(rng, n, c=C):
    return rng.normal(size=(n, c)) * 1.5


def _probs(rng, n, c=C):
    p = rng.uniform(0.1, 1.0, size=(n, c))
    return p / p.sum(-1, keepdims=True)


def _labels(rng, n, c=C):
    return rng.integers(0, c, size=n).astype(np.int32)


def _weights(rng, n):
    return rng.uniform(0.5, 2.0, size=n)


def _binary(rng, n):
    """Logits ``(n, 4)`` and soft labels in ``(0, 1)``."""
    return rng.normal(size=(n, 4)) * 2, rng.uniform(0.05, 0.95, size=(n, 4))


def _probabilities_and_labels(rng, n):
    """Probabilities bounded away from 0 and 1 (the finite differences of the log terms stay
    accurate) and soft labels, ``(n, 4)``."""
    return rng.uniform(0.1, 0.9, (n, 4)), rng.uniform(0.05, 0.95, (n, 4))


def _softmax(x):
    return np.exp(log_softmax(x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _log_sigmoid(x):
    return -np.logaddexp(0, -x)


# --------------------------------------------------------------------------- references


def _ce_int(x, y, w=None):
    loss = -np.take_along_axis(log_softmax(x), y[:, None].astype(int), -1)[:, 0]
    return loss if w is None else loss * w


def _ce_soft(x, t):
    return -np.sum(xlogy(t, log_softmax(x)), -1)


def _entropy(x):
    lp = log_softmax(x)
    return -np.sum(np.exp(lp) * lp, -1)


def _kl(lq, p):
    return np.sum(xlogy(p, np.log(p)) - p * lq, -1)


def _softmax_kl(s, t, temperature=1.0):
    return temperature**2 * _kl(log_softmax(s / temperature), _softmax(t / temperature))


def _js(a, b, beta=0.5):
    p, q = _softmax(a), _softmax(b)
    m = beta * p + (1 - beta) * q
    return beta * _kl(np.log(m), p) + (1 - beta) * _kl(np.log(m), q)


def _sigmoid_bce(x, y):
    return -(y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x))


def _bce(p, y):
    return -(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log1p(-p), -100))


def _sigmoid_focal(x, y, gamma=2.0, alpha=0.25):
    p = _sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    a_t = alpha * y + (1 - alpha) * (1 - y)
    return a_t * (1 - p_t) ** gamma * _sigmoid_bce(x, y)


def _binary_entropy(x):
    p = _sigmoid(x)
    return -(p * _log_sigmoid(x) + (1 - p) * _log_sigmoid(-x))


def _focal_int(x, y, gamma=2.0):
    lp = np.take_along_axis(log_softmax(x), y[:, None].astype(int), -1)[:, 0]
    return -((1 - np.exp(lp)) ** gamma) * lp


def _poly(x, t, epsilon=2.0):
    return _ce_soft(x, t) + epsilon * np.sum(t * (1 - _softmax(x)), -1)


def _generalized_kl(lq, p):
    return np.sum(xlogy(p, np.log(p)) - p * lq - p + np.exp(lq), -1)


def _linear_logits(h, w, b=None):
    z = h @ w
    return z if b is None else z + b


def _sparse_kl_ref(z, ids, t, temperature=1.0, tail="bucket"):
    """Top-k sparse distillation in float64: the k ids plus a tail class, or renormalised."""
    s = np.take_along_axis(log_softmax(z / temperature), ids.astype(int), -1)
    if tail == "renormalize":
        s = s - np.log(np.exp(s).sum(-1, keepdims=True))
        t = t - np.log(np.exp(t).sum(-1, keepdims=True))
    else:
        s = np.concatenate([s, np.log(1 - np.exp(s).sum(-1, keepdims=True))], -1)
        t = np.concatenate([t, np.log(1 - np.exp(t).sum(-1, keepdims=True))], -1)
    return temperature**2 * np.sum(np.exp(t) * (t - s), -1)


def _teacher_top_k(rng, n, c, k=3):
    """A teacher's top-k ids and log-probabilities (mass well below 1: a tail to hold)."""
    lp = log_softmax(rng.normal(size=(n, c)))
    ids = np.argsort(-lp, -1, kind="stable")[:, :k].astype(np.int32)
    return ids, np.take_along_axis(lp, ids, -1)


def _truncated_ref(z, y, k):
    """``(log p~_y, H~)``: the softmax over the k largest logits (ties: the smaller ids)."""
    order = np.argsort(-z, -1, kind="stable")[:, :k]
    top = np.take_along_axis(z, order, -1)
    lse = np.log(np.exp(top - top.max(-1, keepdims=True)).sum(-1)) + top.max(-1)
    inside = np.any(order == y[:, None], -1)
    lp = np.where(inside, np.take_along_axis(z, y[:, None].astype(int), -1)[:, 0] - lse, -np.inf)
    p = np.exp(top - lse[:, None])
    return lp, -np.sum(p * np.log(p), -1)


def _ctc_inputs(rng, n):
    logits = rng.normal(size=(n, T_CTC, K_CTC)) * 1.5
    logit_paddings = np.zeros((n, T_CTC))
    logit_paddings[::2, -1] = 1.0  # every other sequence one frame shorter
    labels = rng.integers(1, K_CTC, size=(n, L_CTC)).astype(np.int32)
    label_paddings = np.zeros((n, L_CTC))
    label_paddings[1::2, -1] = 1.0
    return logits, logit_paddings, labels, label_paddings


def _ntxent_inputs(rng, n):
    labels = (np.arange(n) % 2).astype(np.int32)  # pairs in every batch of 3 or more
    return rng.normal(size=(n, 3)), labels


# --------------------------------------------------------------------------- helpers


def _no_reduction(f):
    """``call`` for a function without a reduction argument."""

    def call(*arrays, reduction=None, **options):
        assert reduction is None
        return f(*arrays, **options)

    return call


def _reduced(f):
    def call(*arrays, reduction="none", **options):
        return f(*arrays, reduction=reduction, **options)

    return call


def _module(cls):
    """``call`` for a ``jaxce.pytorch`` loss module: the criterion built, then called."""

    def call(*arrays, reduction="mean", **options):
        return cls(reduction=reduction, **options)(*arrays)

    return call


def _jvp_raises(entry: Entry, arrays: tuple) -> Any:
    """``jax.jvp`` of the function w.r.t. its first float input (called directly)."""
    i = entry.float_args[0]
    x = jnp.asarray(arrays[i], jnp.float32)
    rest = [jnp.asarray(a) for a in arrays]

    def f(v):
        rest[i] = v
        return entry.call(*rest, reduction=entry.reductions[0])

    return jax.jvp(f, (x,), (jnp.ones_like(x),))


def _reduction_raises(reduction: str) -> Callable[[Entry, tuple], Any]:
    def run(entry: Entry, arrays: tuple) -> Any:
        return entry.call(*arrays, reduction=reduction)

    return run


_NO_SUM_AND_WEIGHT = Unsupported(
    "reduction-sum_and_weight",
    _reduction_raises("sum_and_weight"),
    ValueError,
    "reduction",
    "PyTorch's reductions only ('none', 'mean', 'sum'); jaxce.pytorch keeps torch's set",
)
_FORWARD_MODE = Unsupported(
    "jvp",
    _jvp_raises,
    TypeError,
    REVERSE_ONLY,
    "a custom_vjp that never materialises the logits: reverse mode only (API.md, Large "
    "vocabularies); jax.jvp names the materialised alternative",
)

_TORCH_REDUCTIONS = ("none", "sum", "mean")
_TORCH_EMPTY = {"sum": 0.0, "mean": float("nan")}


# --------------------------------------------------------------------------- the entries


def _core_entries() -> list[Entry]:
    e: list[Entry] = []
    e.append(
        Entry(
            "softmax_cross_entropy",
            "jaxce.softmax_cross_entropy",
            lambda r, n: (_logits(r, n), _probs(r, n)),
            _reduced(jaxce.softmax_cross_entropy),
            ("logits", "labels"),
            (0, 1),
            _ce_soft,
            domains=(("label_smoothing", 1.5), ("z_loss", -1.0)),
        )
    )
    e.append(
        Entry(
            "softmax_cross_entropy_with_integer_labels",
            "jaxce.softmax_cross_entropy_with_integer_labels",
            lambda r, n: (_logits(r, n), _labels(r, n), _weights(r, n)),
            lambda x, y, w, reduction="none", **o: jaxce.softmax_cross_entropy_with_integer_labels(
                x, y, sample_weights=w, reduction=reduction, **o
            ),
            ("logits", "labels", "sample_weights"),
            (0, 2),
            _ce_int,
            domains=(("label_smoothing", -0.1), ("z_loss", -1.0)),
        )
    )
    e.append(
        Entry(
            "nll_loss",
            "jaxce.nll_loss",
            lambda r, n: (log_softmax(_logits(r, n)), _labels(r, n)),
            _reduced(jaxce.nll_loss),
            ("log_probs", "labels"),
            (0,),
            lambda lp, y: -np.take_along_axis(lp, y[:, None].astype(int), -1)[:, 0],
        )
    )
    e.append(
        Entry(
            "poly_loss_cross_entropy",
            "jaxce.poly_loss_cross_entropy",
            lambda r, n: (_logits(r, n), _probs(r, n)),
            _reduced(jaxce.poly_loss_cross_entropy),
            ("logits", "labels"),
            (0, 1),
            _poly,
        )
    )
    e.append(
        Entry(
            "safe_softmax_cross_entropy",
            "jaxce.safe_softmax_cross_entropy",
            lambda r, n: (_logits(r, n), _probs(r, n)),
            _no_reduction(jaxce.safe_softmax_cross_entropy),
            ("logits", "labels"),
            (0, 1),
            _ce_soft,
            reductions=(None,),
        )
    )
    e.append(
        Entry(
            "smooth_labels",
            "jaxce.smooth_labels",
            lambda r, n: (_probs(r, n),),
            _no_reduction(lambda t, **o: jaxce.smooth_labels(t, o.pop("alpha", 0.1), **o)),
            ("labels",),
            (0,),
            lambda t: 0.9 * t + 0.1 / C,
            reductions=(None,),
            keeps_dtype=True,
            domains=(("alpha", 1.5),),
        )
    )
    e.append(
        Entry(
            "softmax_focal_loss",
            "jaxce.softmax_focal_loss",
            lambda r, n: (_logits(r, n), _labels(r, n)),
            _reduced(jaxce.softmax_focal_loss),
            ("logits", "labels"),
            (0,),
            _focal_int,
            domains=(("gamma", -1.0),),
        )
    )
    e.append(
        Entry(
            "entropy",
            "jaxce.entropy",
            lambda r, n: (_logits(r, n),),
            _reduced(jaxce.entropy),
            ("logits",),
            (0,),
            _entropy,
        )
    )
    e.append(
        Entry(
            "binary_entropy",
            "jaxce.binary_entropy",
            lambda r, n: (_binary(r, n)[0],),
            _reduced(jaxce.binary_entropy),
            ("logits",),
            (0,),
            _binary_entropy,
        )
    )
    e.append(
        Entry(
            "kl_divergence",
            "jaxce.kl_divergence",
            lambda r, n: (log_softmax(_logits(r, n)), _probs(r, n)),
            _reduced(jaxce.kl_divergence),
            ("log_predictions", "targets"),
            (0, 1),
            _kl,
            identical=lambda s: (log_softmax(s), _softmax(s)),
            exact=False,
        )
    )
    e.append(
        Entry(
            "kl_divergence_with_log_targets",
            "jaxce.kl_divergence_with_log_targets",
            lambda r, n: (log_softmax(_logits(r, n)), np.log(_probs(r, n))),
            _reduced(jaxce.kl_divergence_with_log_targets),
            ("log_predictions", "log_targets"),
            (0, 1),
            lambda lq, lp: _kl(lq, np.exp(lp)),
            identical=lambda s: (log_softmax(s), log_softmax(s)),
        )
    )
    e.append(
        Entry(
            "softmax_kl_divergence",
            "jaxce.softmax_kl_divergence",
            lambda r, n: (_logits(r, n), _logits(r, n)),
            lambda s, t, reduction="none", **o: jaxce.softmax_kl_divergence(
                s, t, reduction=reduction, **{"temperature": 2.0, **o}
            ),
            ("logits", "target_logits"),
            (0, 1),
            lambda s, t: _softmax_kl(s, t, 2.0),
            identical=lambda s: (s, s),
            identical_options=({"temperature": 1.0}, {"temperature": 2.0}, {"temperature": 3.0}),
            domains=(("temperature", 0.0),),
        )
    )
    e.append(
        Entry(
            "js_divergence",
            "jaxce.js_divergence",
            lambda r, n: (_logits(r, n), _logits(r, n)),
            lambda a, b, reduction="none", **o: jaxce.js_divergence(
                a, b, reduction=reduction, **{"beta": 0.3, **o}
            ),
            ("logits_p", "logits_q"),
            (0, 1),
            lambda a, b: _js(a, b, 0.3),
            identical=lambda s: (s, s),
            identical_options=({"beta": 0.5}, {"beta": 0.3}),
            domains=(("beta", 1.5),),
        )
    )
    for name in ("generalized_kl_divergence", "convex_kl_divergence"):
        fn = getattr(jaxce, name)
        e.append(
            Entry(
                name,
                f"jaxce.{name}",
                lambda r, n: (log_softmax(_logits(r, n)), _probs(r, n)),
                _no_reduction(fn),
                ("log_predictions", "targets"),
                (0, 1),
                _generalized_kl,
                reductions=(None,),
                identical=lambda s: (log_softmax(s), _softmax(s)),
                exact=False,
            )
        )
    e.append(
        Entry(
            "sigmoid_binary_cross_entropy",
            "jaxce.sigmoid_binary_cross_entropy",
            _binary,
            _reduced(jaxce.sigmoid_binary_cross_entropy),
            ("logits", "labels"),
            (0, 1),
            _sigmoid_bce,
            domains=(("label_smoothing", 1.5),),
        )
    )
    e.append(
        Entry(
            "binary_cross_entropy",
            "jaxce.binary_cross_entropy",
            _probabilities_and_labels,
            _reduced(jaxce.binary_cross_entropy),
            ("probs", "labels"),
            (0, 1),
            _bce,
        )
    )
    e.append(
        Entry(
            "sigmoid_focal_loss",
            "jaxce.sigmoid_focal_loss",
            _binary,
            lambda x, y, reduction="none", **o: jaxce.sigmoid_focal_loss(
                x, y, reduction=reduction, **{"alpha": 0.25, **o}
            ),
            ("logits", "labels"),
            (0, 1),
            _sigmoid_focal,
            domains=(("gamma", -1.0), ("alpha", 1.5)),
        )
    )
    for name in ("ctc_loss", "ctc_loss_with_forward_probs"):
        fn = getattr(jaxce, name)
        e.append(
            Entry(
                name,
                f"jaxce.{name}",
                _ctc_inputs,
                _no_reduction(fn),
                ("logits", "logit_paddings", "labels", "label_paddings"),
                (0,),
                (
                    ctc_reference
                    if name == "ctc_loss"
                    else lambda *a: (ctc_reference(*a), None, None)
                ),
                reductions=(None,),
            )
        )
    e.append(
        Entry(
            "ntxent",
            "jaxce.ntxent",
            _ntxent_inputs,
            _no_reduction(lambda x, y, **o: jaxce.ntxent(x, y, **{"temperature": 0.5, **o})),
            ("embeddings", "labels"),
            (0,),
            lambda x, y: ntxent_reference(x, y, 0.5),
            reductions=(None,),
            per_example=False,
            domains=(("temperature", 0.0),),
        )
    )
    e.append(
        Entry(
            "weighted_mean",
            "jaxce.weighted_mean",
            lambda r, n: (r.normal(size=n), _weights(r, n)),
            _no_reduction(jaxce.weighted_mean),
            ("total", "weight"),
            (0, 1),
            lambda t, w: t / w,
            reductions=(None,),
            keeps_dtype=True,
        )
    )
    return e


def _fused_entries() -> list[Entry]:
    e: list[Entry] = []

    def fused_inputs(r, n):
        return (
            r.normal(size=(n, D)),
            r.normal(size=(D, V)) / 2,
            r.normal(size=V),
            _labels(r, n, V),
        )

    e.append(
        Entry(
            "linear_softmax_cross_entropy",
            "jaxce.linear_softmax_cross_entropy",
            fused_inputs,
            lambda h, w, b, y, reduction="none", **o: jaxce.linear_softmax_cross_entropy(
                h, w, y, bias=b, reduction=reduction, **{"chunk_size": 3, **o}
            ),
            ("hidden", "weight", "bias", "labels"),
            (0, 1, 2),
            lambda h, w, b, y: _ce_int(_linear_logits(h, w, b), y),
            batched=(0, 3),
            modes=("rev",),
            domains=(("label_smoothing", 1.5), ("z_loss", -1.0), ("chunk_size", 0)),
            unsupported=(_FORWARD_MODE,),
        )
    )

    def aux_reference(h, w, b, y):
        z = 3.0 * np.tanh(_linear_logits(h, w, b) / 3.0)
        lse = np.log(np.sum(np.exp(z), -1))
        loss = _ce_int(z, y) + 1e-2 * lse**2
        return loss, (lse, 1e-2 * lse**2, np.argmax(z, -1))

    e.append(
        Entry(
            "linear_softmax_cross_entropy[aux]",
            "jaxce.linear_softmax_cross_entropy",
            fused_inputs,
            lambda h, w, b, y, reduction="none", **o: jaxce.linear_softmax_cross_entropy(
                h,
                w,
                y,
                bias=b,
                reduction=reduction,
                return_aux=True,
                **{"chunk_size": 3, "logit_softcap": 3.0, "z_loss": 1e-2, **o},
            ),  # fmt: skip
            ("hidden", "weight", "bias", "labels"),
            (0, 1, 2),
            aux_reference,
            batched=(0, 3),
            modes=("rev",),
            unsupported=(_FORWARD_MODE,),
        )
    )

    def distill_inputs(r, n):
        return (
            r.normal(size=(n, D)),
            r.normal(size=(D, V)) / 2,
            r.normal(size=(n, D + 1)),
            r.normal(size=(D + 1, V)) / 2,
        )

    e.append(
        Entry(
            "linear_softmax_kl_divergence",
            "jaxce.linear_softmax_kl_divergence",
            distill_inputs,
            lambda h, w, th, tw, reduction="none", **o: jaxce.linear_softmax_kl_divergence(
                h, w, th, tw, reduction=reduction, **{"temperature": 2.0, "chunk_size": 3, **o}
            ),
            ("hidden", "weight", "target_hidden", "target_weight"),
            (0, 1, 2, 3),
            lambda h, w, th, tw: _softmax_kl(h @ w, th @ tw, 2.0),
            batched=(0, 2),
            modes=("rev",),
            identical=lambda s: (s[:, :D], s[:D] / 2, s[:, :D], s[:D] / 2),
            identical_options=({"temperature": 1.0}, {"temperature": 2.0}, {"temperature": 3.0}),
            domains=(("temperature", 0.0), ("chunk_size", 0)),
            unsupported=(_FORWARD_MODE,),
        )
    )
    e.append(
        Entry(
            "linear_js_divergence",
            "jaxce.linear_js_divergence",
            distill_inputs,
            lambda h, w, th, tw, reduction="none", **o: jaxce.linear_js_divergence(
                h, w, th, tw, reduction=reduction, **{"beta": 0.3, "chunk_size": 3, **o}
            ),
            ("hidden", "weight", "target_hidden", "target_weight"),
            (0, 1, 2, 3),
            lambda h, w, th, tw: _js(h @ w, th @ tw, 0.3),
            batched=(0, 2),
            modes=("rev",),
            identical=lambda s: (s[:, :D], s[:D] / 2, s[:, :D], s[:D] / 2),
            identical_options=({"beta": 0.5}, {"beta": 0.3, "temperature": 2.0}),
            domains=(("beta", 1.5), ("temperature", -1.0)),
            unsupported=(_FORWARD_MODE,),
        )
    )

    def sparse_inputs(r, n):
        return (
            r.normal(size=(n, D)),
            r.normal(size=(D, V)) / 2,
            r.normal(size=V),
            *_teacher_top_k(r, n, V),
        )

    e.append(
        Entry(
            "linear_sparse_distillation_loss",
            "jaxce.linear_sparse_distillation_loss",
            sparse_inputs,
            lambda h, w, b, ids, t, reduction="none", **o: jaxce.linear_sparse_distillation_loss(
                h,
                w,
                ids,
                t,
                bias=b,
                reduction=reduction,
                **{"temperature": 1.5, "chunk_size": 3, **o},
            ),  # fmt: skip
            ("hidden", "weight", "bias", "teacher_ids", "teacher_log_probs"),
            (0, 1, 2, 4),
            lambda h, w, b, ids, t: _sparse_kl_ref(_linear_logits(h, w, b), ids, t, 1.5),
            batched=(0, 3, 4),
            modes=("rev",),
            domains=(("temperature", 0.0), ("chunk_size", 0)),
            unsupported=(_FORWARD_MODE,),
        )
    )
    return e


def _pytorch_entries() -> list[Entry]:
    e: list[Entry] = []
    common = dict(reductions=_TORCH_REDUCTIONS, empty_reduced=_TORCH_EMPTY)
    for name, cls in (("cross_entropy", "CrossEntropyLoss"), ("nll_loss", "NLLLoss")):
        log_probs = name == "nll_loss"
        inputs = (
            (lambda r, n: (log_softmax(_logits(r, n)), _labels(r, n)))
            if log_probs
            else (lambda r, n: (_logits(r, n), _labels(r, n)))
        )
        ref = (
            (lambda lp, y: -np.take_along_axis(lp, y[:, None].astype(int), -1)[:, 0])
            if log_probs
            else _ce_int
        )
        domains = () if log_probs else (("label_smoothing", 1.5),)
        for public, call in (
            (name, _reduced(getattr(pytorch, name))),
            (cls, _module(getattr(pytorch, cls))),
        ):
            e.append(
                Entry(
                    f"pytorch.{public}",
                    f"jaxce.pytorch.{public}",
                    inputs,
                    call,
                    ("input", "target"),
                    (0,),
                    ref,
                    domains=domains,
                    unsupported=(_NO_SUM_AND_WEIGHT,),
                    **common,
                )
            )
    for public, call in (
        ("binary_cross_entropy", _reduced(pytorch.binary_cross_entropy)),
        ("BCELoss", _module(pytorch.BCELoss)),
    ):
        e.append(
            Entry(
                f"pytorch.{public}",
                f"jaxce.pytorch.{public}",
                _probabilities_and_labels,
                call,
                ("input", "target"),
                (0, 1),
                _bce,
                unsupported=(_NO_SUM_AND_WEIGHT,),
                eager_checks=True,
                **common,
            )
        )
    for public, call in (
        ("binary_cross_entropy_with_logits", _reduced(pytorch.binary_cross_entropy_with_logits)),
        ("BCEWithLogitsLoss", _module(pytorch.BCEWithLogitsLoss)),
    ):
        e.append(
            Entry(
                f"pytorch.{public}",
                f"jaxce.pytorch.{public}",
                _binary,
                call,
                ("input", "target"),
                (0, 1),
                _sigmoid_bce,
                unsupported=(_NO_SUM_AND_WEIGHT,),
                **common,
            )
        )
    for public, call in (
        ("kl_div", _reduced(pytorch.kl_div)),
        ("KLDivLoss", _module(pytorch.KLDivLoss)),
    ):
        for log_target in (False, True):
            e.append(
                Entry(
                    f"pytorch.{public}[log_target={log_target}]",
                    f"jaxce.pytorch.{public}",
                    (
                        (lambda r, n: (log_softmax(_logits(r, n)), np.log(_probs(r, n))))
                        if log_target
                        else (lambda r, n: (log_softmax(_logits(r, n)), _probs(r, n)))
                    ),
                    (
                        lambda q, p, reduction="mean", _c=call, _lt=log_target, **o: _c(
                            q, p, reduction=reduction, log_target=_lt, **o
                        )
                    ),
                    ("input", "target"),
                    (0, 1),
                    (
                        (lambda lq, lp: np.exp(lp) * (lp - lq))
                        if log_target
                        else (lambda lq, p: xlogy(p, np.log(p)) - p * lq)
                    ),
                    identical=(
                        (lambda s: (log_softmax(s), log_softmax(s)))
                        if log_target
                        else (lambda s: (log_softmax(s), _softmax(s)))
                    ),
                    exact=log_target,
                    reductions=("none", "sum", "mean", "batchmean"),
                    empty_reduced={"sum": 0.0, "mean": float("nan"), "batchmean": float("nan")},
                    unsupported=(_NO_SUM_AND_WEIGHT,),
                )
            )
    return e


def _sklearn_entries() -> list[Entry]:
    def call(y, p, reduction="mean", **o):
        return jsk.log_loss(y, p, normalize=reduction == "mean", labels=tuple(range(C)), **o)

    return [
        Entry(
            "sklearn.log_loss",
            "jaxce.sklearn.log_loss",
            lambda r, n: (_labels(r, n), _probs(r, n)),
            call,
            ("y_true", "y_proba"),
            (1,),
            lambda y, p: log_loss_reference(y, p, np.arange(C)),
            reductions=("mean", "sum"),
            per_example=False,
            empty_reduced={"sum": 0.0, "mean": float("nan")},
            eager_checks=True,
        )
    ]


# --------------------------------------------------------------------------- post-training
# Entries written from API.md "Post-training"; each activates when its name exists in jaxce.


def _pending(name):
    """The public function ``jaxce.<name>`` looked up at call time (it may not exist yet)."""

    def f(*args, **kwargs):
        return getattr(jaxce, name)(*args, **kwargs)

    return f


def _sequence_inputs(rng, n, t=4):
    """Per-token log-probabilities of ``n`` sequences of ``t`` tokens."""
    return -rng.uniform(0.2, 3.0, size=(n, t))


def _token_mask(rng, n, t=4):
    """A boolean token mask; the first sequence keeps all its tokens (the NaN cells put
    their NaN there)."""
    mask = rng.uniform(size=(n, t)) > 0.3
    mask[:1] = True
    return mask


def _posttrain_entries() -> list[Entry]:
    e: list[Entry] = []
    lp_fn = _pending("linear_log_probs")

    def fused_inputs(r, n):
        return (
            r.normal(size=(n, D)),
            r.normal(size=(D, V)) / 2,
            r.normal(size=V),
            _labels(r, n, V),
        )

    e.append(
        Entry(
            "linear_log_probs",
            "jaxce.linear_log_probs",
            fused_inputs,
            _no_reduction(lambda h, w, b, y, **o: lp_fn(h, w, y, bias=b, **{"chunk_size": 3, **o})),
            ("hidden", "weight", "bias", "labels"),
            (0, 1, 2),
            lambda h, w, b, y: -_ce_int(_linear_logits(h, w, b), y),
            reductions=(None,),
            batched=(0, 3),
            modes=("rev",),
            domains=(("temperature", 0.0), ("chunk_size", 0)),
            unsupported=(_FORWARD_MODE,),
            needs="linear_log_probs",
        )
    )

    def entropy_reference(h, w, b, y):
        z = 3.0 * np.tanh(_linear_logits(h, w, b) / 3.0) / 1.5
        return -_ce_int(z, y), _entropy(z)

    e.append(
        Entry(
            "linear_log_probs[entropy]",
            "jaxce.linear_log_probs",
            fused_inputs,
            _no_reduction(
                lambda h, w, b, y, **o: lp_fn(
                    h,
                    w,
                    y,
                    bias=b,
                    return_entropy=True,
                    **{"chunk_size": 3, "temperature": 1.5, "logit_softcap": 3.0, **o},
                )
            ),  # fmt: skip
            ("hidden", "weight", "bias", "labels"),
            (0, 1, 2),
            entropy_reference,
            reductions=(None,),
            batched=(0, 3),
            modes=("rev",),
            unsupported=(_FORWARD_MODE,),
            needs="linear_log_probs",
        )
    )
    skl = _pending("sampled_kl_divergence")
    for est, ref in (
        ("k1", lambda lp, rp: lp - rp),
        ("k2", lambda lp, rp: (rp - lp) ** 2 / 2),
        ("k3", lambda lp, rp: np.expm1(rp - lp) - (rp - lp)),
    ):
        e.append(
            Entry(
                f"sampled_kl_divergence[{est}]",
                "jaxce.sampled_kl_divergence",
                lambda r, n: (_sequence_inputs(r, n), _sequence_inputs(r, n)),
                _no_reduction(lambda lp, rp, _e=est, **o: skl(lp, rp, **{"estimator": _e, **o})),
                ("log_probs", "ref_log_probs"),
                (0, 1),
                ref,
                reductions=(None,),
                identical=lambda s: (log_softmax(s), log_softmax(s)),
                exact=True,
                domains=(("estimator", "k4"),),
                needs="sampled_kl_divergence",
            )
        )
    sr = _pending("sequence_reduce")
    for red in ("sum", "mean"):
        e.append(
            Entry(
                f"sequence_reduce[{red}]",
                "jaxce.sequence_reduce",
                lambda r, n: (_sequence_inputs(r, n), _token_mask(r, n)),
                _no_reduction(lambda v, m, _r=red, **o: sr(v, m, **{"reduction": _r, **o})),
                ("values", "where"),
                (0,),
                (
                    (lambda v, m: np.sum(v * m, -1))
                    if red == "sum"
                    else (lambda v, m: np.sum(v * m, -1) / np.maximum(m.sum(-1), 1))
                ),
                reductions=(None,),
                nan_args=(),
                unsupported=(
                    Unsupported(
                        "reduction-max",
                        lambda e, a: sr(*a, reduction="max"),
                        ValueError,
                        "reduction",
                        "per-sequence sums and token means only (API.md, Post-training)",
                    ),
                ),
                needs="sequence_reduce",
            )
        )

    def pairs(r, n):
        return tuple(_sequence_inputs(r, n, 1)[:, 0] for _ in range(4))

    def dpo_ref(c, rj, rc, rr, beta=0.1, eps=0.0):
        m = beta * ((c - rc) - (rj - rr))
        return -(1 - eps) * _log_sigmoid(m) - eps * _log_sigmoid(-m)

    dpo = _pending("dpo_loss")
    for loss_type, ref in (
        ("sigmoid", lambda c, rj, rc, rr: dpo_ref(c, rj, rc, rr, 0.1, 0.1)),
        ("ipo", lambda c, rj, rc, rr: ((c - rc) - (rj - rr) - 1 / 0.2) ** 2),
    ):
        e.append(
            Entry(
                f"dpo_loss[{loss_type}]",
                "jaxce.dpo_loss",
                pairs,
                lambda c, rj, rc, rr, reduction="none", _t=loss_type, **o: dpo(
                    c,
                    rj,
                    rc,
                    rr,
                    reduction=reduction,
                    **{
                        "beta": 0.1,
                        "loss_type": _t,
                        "label_smoothing": 0.1 * (_t == "sigmoid"),
                        **o,
                    },
                ),  # fmt: skip
                (
                    "chosen_log_probs",
                    "rejected_log_probs",
                    "ref_chosen_log_probs",
                    "ref_rejected_log_probs",
                ),
                (0, 1, 2, 3),
                ref,
                reductions=("none", "sum", "mean"),
                domains=(("beta", 0.0), ("label_smoothing", 1.5), ("loss_type", "nope")),
                needs="dpo_loss",
            )
        )

    def simpo_ref(c, rj):
        m = 2.0 * (c - rj) - 0.5
        return -_log_sigmoid(m)

    e.append(
        Entry(
            "simpo_loss",
            "jaxce.simpo_loss",
            lambda r, n: pairs(r, n)[:2],
            _reduced(_pending("simpo_loss")),
            ("chosen_log_probs", "rejected_log_probs"),
            (0, 1),
            simpo_ref,
            reductions=("none", "sum", "mean"),
            domains=(("beta", 0.0), ("label_smoothing", 1.5)),
            needs="simpo_loss",
        )
    )

    def orpo_ref(c, rj):
        log_odds = (c - rj) - (np.log(-np.expm1(c)) - np.log(-np.expm1(rj)))
        return -0.1 * _log_sigmoid(log_odds)

    e.append(
        Entry(
            "orpo_loss",
            "jaxce.orpo_loss",
            lambda r, n: pairs(r, n)[:2],
            _reduced(_pending("orpo_loss")),
            ("chosen_log_probs", "rejected_log_probs"),
            (0, 1),
            orpo_ref,
            reductions=("none", "sum", "mean"),
            domains=(("beta", 0.0),),
            needs="orpo_loss",
        )
    )
    pg = _pending("policy_gradient_loss")

    def pg_inputs(r, n):
        lp = _sequence_inputs(r, n)
        old = lp + r.normal(size=lp.shape) * 0.1  # ratios inside and outside the clip range
        return lp, old, r.normal(size=n), _token_mask(r, n)

    def pg_ref(lp, old, a, m):
        ratio = np.exp(lp - old)
        adv = a[:, None]
        per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
        return np.where(m, per_token, 0.0)

    e.append(
        Entry(
            "policy_gradient_loss",
            "jaxce.policy_gradient_loss",
            pg_inputs,
            lambda lp, old, a, m, reduction="none", **o: pg(
                lp, old, a, m, aggregation=reduction, **o
            ),
            ("log_probs", "old_log_probs", "advantages", "where"),
            (0, 2),
            pg_ref,
            reductions=("none", "token_mean", "sequence_mean", "sum_and_weight"),
            nan_args=(0, 1, 2),
            domains=(("clip_epsilon", -0.1), ("kl_coef", -1.0)),
            unsupported=(
                Unsupported(
                    "aggregation-max",
                    lambda e, a: pg(*a, aggregation="max"),
                    ValueError,
                    "aggregation",
                    "the five documented aggregations only (API.md, Post-training)",
                ),
            ),
            needs="policy_gradient_loss",
            empty_reduced={"token_mean": 0.0, "sequence_mean": 0.0},
        )
    )

    def sparse_inputs(r, n):
        return (_logits(r, n), *_teacher_top_k(r, n, C))

    def sparse_identical(s):
        ids = np.argsort(-s, -1, kind="stable")[:, :8].astype(np.int32)
        return s, ids, np.take_along_axis(log_softmax(s), ids, -1)

    for tail in ("bucket", "renormalize"):
        e.append(
            Entry(
                f"sparse_distillation_loss[{tail}]",
                "jaxce.sparse_distillation_loss",
                sparse_inputs,
                lambda z, ids, t, reduction="none", tail=tail, **o: jaxce.sparse_distillation_loss(
                    z, ids, t, tail=tail, reduction=reduction, **{"temperature": 2.0, **o}
                ),
                ("logits", "teacher_ids", "teacher_log_probs"),
                (0, 2),
                lambda z, ids, t, tail=tail: _sparse_kl_ref(z, ids, t, 2.0, tail),
                identical=sparse_identical,
                identical_options=({"temperature": 1.0},),
                domains=(("temperature", -1.0),),
                unsupported=(
                    Unsupported(
                        "tail-drop",
                        lambda e, a: jaxce.sparse_distillation_loss(*a, tail="drop"),
                        ValueError,
                        "tail",
                        "the tail mass is kept (bucket) or renormalised away, never dropped",
                    ),
                ),
            )
        )

    def truncated_inputs(r, n):
        z = _logits(r, n)
        return z, np.argsort(-z, -1, kind="stable")[:, 1].astype(np.int32)  # in the top 3

    e.append(
        Entry(
            "truncated_log_probs",
            "jaxce.truncated_log_probs",
            truncated_inputs,
            _no_reduction(
                lambda z, y, **o: jaxce.truncated_log_probs(
                    z, y, return_entropy=True, **{"top_k": 3, **o}
                )
            ),
            ("logits", "labels"),
            (0,),
            lambda z, y: _truncated_ref(z, y, 3),
            reductions=(None,),
            domains=(("top_k", 0), ("temperature", 0.0)),
        )
    )

    def top_k_inputs(r, n):
        h, w, b = r.normal(size=(n, D)), r.normal(size=(D, V)) / 2, r.normal(size=V)
        return h, w, b, np.argmax(_linear_logits(h, w, b), -1).astype(np.int32)

    e.append(
        Entry(
            "linear_log_probs[top_k]",
            "jaxce.linear_log_probs",
            top_k_inputs,
            _no_reduction(
                lambda h, w, b, y, **o: lp_fn(
                    h, w, y, bias=b, return_entropy=True, **{"top_k": 3, "chunk_size": 3, **o}
                )
            ),
            ("hidden", "weight", "bias", "labels"),
            (0, 1, 2),
            lambda h, w, b, y: _truncated_ref(_linear_logits(h, w, b), y, 3),
            reductions=(None,),
            batched=(0, 3),
            modes=("rev",),
            domains=(("top_k", 0),),
            unsupported=(_FORWARD_MODE,),
        )
    )
    return e


ALL_ENTRIES: list[Entry] = (
    _core_entries()
    + _fused_entries()
    + _pytorch_entries()
    + _sklearn_entries()
    + _posttrain_entries()
)
ENTRIES = [e for e in ALL_ENTRIES if e.needs is None or hasattr(jaxce, e.needs)]
PENDING = [e for e in ALL_ENTRIES if e.needs is not None and not hasattr(jaxce, e.needs)]

# Public names that are not functions of arrays: what they are, checked by the matrix.
NOT_FUNCTIONS: dict[str, type] = {
    "jaxce.pytorch": types.ModuleType,
    "jaxce.sklearn": types.ModuleType,
    "jaxce.LinearCrossEntropyAux": type,  # the named tuple return_aux=True gives
    "jaxce.pytorch.InvalidValueError": type,  # the exception eager value checks raise
}


def public_names() -> list[str]:
    """Every public name, read from the modules (``__all__``; the sklearn module's
    ``__all__`` and, should it have none, its names without a leading underscore)."""
    names = [f"jaxce.{n}" for n in jaxce.__all__]
    names += [f"jaxce.pytorch.{n}" for n in pytorch.__all__]
    sk = getattr(jsk, "__all__", None) or [
        n for n in vars(jsk) if not n.startswith("_") and callable(getattr(jsk, n))
    ]
    names += [f"jaxce.sklearn.{n}" for n in sk]
    return names

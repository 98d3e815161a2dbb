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
import math
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
# ``(rng, n) -> arrays`` for ``n`` examples; the draws happen in argument order.


def _logits(rng, n, c=C):
    return rng.normal(size=(n, c)) * 1.5


def _probs(rng, n, c=C):
    p = rng.uniform(0.1, 1.0, size=(n, c))
    return p / p.sum(-1, keepdims=True)


def _labels(rng, n, c=C):
    return rng.integers(0, c, size=n).astype(np.int32)


def _weights(rng, n):
    return rng.uniform(0.5, 2.0, size=n)


def _log_predictions(rng, n):
    return log_softmax(_logits(rng, n))


def _drawn(*makers):
    """The input maker drawing each of ``makers`` in turn."""
    return lambda rng, n: tuple(m(rng, n) for m in makers)


_LOGITS_PROBS = _drawn(_logits, _probs)
_LOGITS_LABELS = _drawn(_logits, _labels)
_LOG_PROBS_LABELS = _drawn(_log_predictions, _labels)
_LOG_PREDICTIONS_PROBS = _drawn(_log_predictions, _probs)
_LOG_PREDICTIONS_LOG_PROBS = _drawn(_log_predictions, lambda r, n: np.log(_probs(r, n)))
_TWO_LOGITS = _drawn(_logits, _logits)


def _binary(rng, n):
    """Logits ``(n, 4)`` and soft labels in ``(0, 1)``."""
    return rng.normal(size=(n, 4)) * 2, rng.uniform(0.05, 0.95, size=(n, 4))


def _probabilities_and_labels(rng, n):
    """Probabilities bounded away from 0 and 1 (the finite differences of the log terms stay
    accurate) and soft labels, ``(n, 4)``."""
    return rng.uniform(0.1, 0.9, (n, 4)), rng.uniform(0.05, 0.95, (n, 4))


def _fused_inputs(rng, n):
    """Hidden states ``(n, D)``, a kernel ``(D, V)``, a bias and labels of the fused losses."""
    return (
        rng.normal(size=(n, D)),
        rng.normal(size=(D, V)) / 2,
        rng.normal(size=V),
        _labels(rng, n, V),
    )


def _distill_inputs(rng, n):
    """Student hidden states and kernel, teacher hidden states and kernel (hidden size D+1)."""
    return (
        rng.normal(size=(n, D)),
        rng.normal(size=(D, V)) / 2,
        rng.normal(size=(n, D + 1)),
        rng.normal(size=(D + 1, V)) / 2,
    )


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


def _sequence_inputs(rng, n, t=4):
    """Per-token log-probabilities of ``n`` sequences of ``t`` tokens."""
    return -rng.uniform(0.2, 3.0, size=(n, t))


def _token_mask(rng, n, t=4):
    """A boolean token mask; the first sequence keeps all its tokens (the NaN cells put
    their NaN there)."""
    mask = rng.uniform(size=(n, t)) > 0.3
    mask[:1] = True
    return mask


def _pairs(rng, n):
    """Sequence log-probabilities: chosen, rejected, reference chosen, reference rejected."""
    return tuple(_sequence_inputs(rng, n, 1)[:, 0] for _ in range(4))


def _kto_inputs(rng, n):
    lp, ref = _pairs(rng, n)[:2]
    return lp, ref, np.arange(n) % 2 == 0  # desirable and undesirable examples


def _bt_inputs(rng, n):
    return rng.normal(size=n) * 2, rng.normal(size=n) * 2, rng.uniform(0, 1, size=n)


def _policy_inputs(rng, n):
    lp = _sequence_inputs(rng, n)
    old = lp + rng.normal(size=lp.shape) * 0.1  # ratios inside and outside the clip range
    return lp, old, rng.normal(size=n), _token_mask(rng, n)


# The ``identical`` makers: the arrays of a divergence at two equal distributions.
def _same_logits(s):
    return s, s


def _log_and_probs(s):
    return log_softmax(s), _softmax(s)


def _log_and_log(s):
    return log_softmax(s), log_softmax(s)


def _same_fused(s):
    """Student and teacher with the same hidden states and kernel."""
    return s[:, :D], s[:D] / 2, s[:, :D], s[:D] / 2


# --------------------------------------------------------------------------- references


def _softmax(x):
    return np.exp(log_softmax(x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _log_sigmoid(x):
    return -np.logaddexp(0, -x)


def _ce_int(x, y, w=None):
    loss = -np.take_along_axis(log_softmax(x), y[:, None].astype(int), -1)[:, 0]
    return loss if w is None else loss * w


def _nll(lp, y):
    return -np.take_along_axis(lp, y[:, None].astype(int), -1)[:, 0]


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


def _sparse_fused_inputs(r, n):
    return (
        r.normal(size=(n, D)),
        r.normal(size=(D, V)) / 2,
        r.normal(size=V),
        *_teacher_top_k(r, n, V),
    )


def _sparse_inputs(r, n):
    return (_logits(r, n), *_teacher_top_k(r, n, C))


def _sparse_identical(s):
    ids = np.argsort(-s, -1, kind="stable")[:, :8].astype(np.int32)
    return s, ids, np.take_along_axis(log_softmax(s), ids, -1)


def _truncated_inputs(r, n):
    z = _logits(r, n)
    return z, np.argsort(-z, -1, kind="stable")[:, 1].astype(np.int32)  # in the top 3


def _top_k_inputs(r, n):
    h, w, b = r.normal(size=(n, D)), r.normal(size=(D, V)) / 2, r.normal(size=V)
    return h, w, b, np.argmax(_linear_logits(h, w, b), -1).astype(np.int32)


def _fused_aux_reference(h, w, b, y):
    z = 3.0 * np.tanh(_linear_logits(h, w, b) / 3.0)
    lse = np.log(np.sum(np.exp(z), -1))
    loss = _ce_int(z, y) + 1e-2 * lse**2
    return loss, (lse, 1e-2 * lse**2, np.argmax(z, -1))


def _fused_entropy_reference(h, w, b, y):
    z = 3.0 * np.tanh(_linear_logits(h, w, b) / 3.0) / 1.5
    return -_ce_int(z, y), _entropy(z)


def _dpo_reference(beta, label_smoothing):
    def ref(c, rj, rc, rr):
        m = beta * ((c - rc) - (rj - rr))
        return -(1 - label_smoothing) * _log_sigmoid(m) - label_smoothing * _log_sigmoid(-m)

    return ref


def _ipo_reference(c, rj, rc, rr, beta=0.1):
    return ((c - rc) - (rj - rr) - 1 / (2 * beta)) ** 2


def _simpo_reference(c, rj):
    return -_log_sigmoid(2.0 * (c - rj) - 0.5)


def _orpo_reference(c, rj):
    log_odds = (c - rj) - (np.log(-np.expm1(c)) - np.log(-np.expm1(rj)))
    return -0.1 * _log_sigmoid(log_odds)


def _dpo_mix_reference(c, rj, rc, rr):
    """0.7 bco_pair + 0.3 discopop on forward-KL scores, beta 0.5, running mean 0.05."""
    sc, sr = -np.exp(-(c - rc)), -np.exp(-(rj - rr))
    z = 0.5 * (sc - sr)
    bco = -_log_sigmoid(0.5 * sc - 0.05) - _log_sigmoid(0.05 - 0.5 * sr)
    mod = 1 / (1 + np.exp(-z / 0.05))
    disco = -_log_sigmoid(z) * (1 - mod) + np.exp(-z) * mod
    return 0.7 * bco + 0.3 * disco


def _kto_reference(lp, ref, desirable):
    x = lp - ref
    return np.where(
        desirable, 1.5 / (1 + np.exp(0.5 * (x - 0.1))), 0.5 / (1 + np.exp(0.5 * (0.1 - x)))
    )


def _bt_reference(c, rj, m):
    return -_log_sigmoid(c - rj - m) + 0.01 * (c + rj) ** 2


def _policy_reference(lp, old, a, m):
    ratio = np.exp(lp - old)
    adv = a[:, None]
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    return np.where(m, per_token, 0.0)


def _sequence_sum(v, m):
    return np.sum(v * m, -1)


def _sequence_mean(v, m):
    return np.sum(v * m, -1) / np.maximum(m.sum(-1), 1)


# --------------------------------------------------------------------------- calls


def _bind(fn, *, keywords=(), reduction_name="reduction", default="none", **defaults):
    """``call`` for ``fn``: the arrays passed by position, except those at the ``(index,
    name)`` pairs of ``keywords``, passed by name; the reduction passed as ``reduction_name``
    (``None``: ``fn`` has no reduction argument and the cells pass ``None``); ``defaults``
    are options the cell's own options override."""
    named = dict(keywords)
    if reduction_name is None:
        default = None

    def call(*arrays, reduction=default, **options):
        args = [a for i, a in enumerate(arrays) if i not in named]
        kwargs = {name: arrays[i] for i, name in named.items()}
        if reduction_name is None:
            assert reduction is None
        else:
            kwargs[reduction_name] = reduction
        return fn(*args, **kwargs, **{**defaults, **options})

    return call


def _no_reduction(fn):
    """``call`` for a function without a reduction argument."""
    return _bind(fn, reduction_name=None)


def _module(cls, **defaults):
    """``call`` for a ``jaxce.pytorch`` loss module: the criterion built, then called."""

    def call(*arrays, reduction="mean", **options):
        return cls(reduction=reduction, **{**defaults, **options})(*arrays)

    return call


def _pending(name):
    """The public function ``jaxce.<name>`` looked up at call time (it may not exist yet)."""

    def f(*args, **kwargs):
        return getattr(jaxce, name)(*args, **kwargs)

    return f


def _entry(
    id: str,
    inputs: Callable,
    names: tuple[str, ...],
    float_args: tuple[int, ...],
    reference: Callable,
    *,
    call: Callable | None = None,
    keywords: tuple[tuple[int, str], ...] = (),
    reduction_name: str | None = "reduction",
    options: dict | None = None,
    **fields: Any,
) -> Entry:
    """The entry of the public name ``jaxce.<id without its [variant]>``. Without ``call``,
    the public object is called through ``_bind`` (a function; ``jaxce.<needs>`` looked up
    at call time) or ``_module`` (a ``jaxce.pytorch`` class) with ``options`` as defaults;
    without a reduction argument, ``reductions`` is ``(None,)``."""
    dotted = id.split("[")[0]
    if call is None:
        if fields.get("needs") is not None:
            obj = _pending(dotted)
        else:
            obj = jaxce
            for part in dotted.split("."):
                obj = getattr(obj, part)
        if isinstance(obj, type):
            call = _module(obj, **(options or {}))
        else:
            call = _bind(obj, keywords=keywords, reduction_name=reduction_name, **(options or {}))
    if reduction_name is None:
        fields.setdefault("reductions", (None,))
    return Entry(id, f"jaxce.{dotted}", inputs, call, names, float_args, reference, **fields)


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


def _direct_raises(name: str, **options: Any) -> Callable[[Entry, tuple], Any]:
    """Calls ``jaxce.<name>(*arrays, **options)`` itself (not through the entry's call)."""
    return lambda entry, arrays: getattr(jaxce, name)(*arrays, **options)


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

_TORCH = {"reductions": ("none", "sum", "mean"), "empty_reduced": {"sum": 0.0, "mean": math.nan}}
_FUSED = {"modes": ("rev",), "unsupported": (_FORWARD_MODE,)}  # reverse mode only
_FUSED_NAMES = ("hidden", "weight", "bias", "labels")
_DISTILL_NAMES = ("hidden", "weight", "target_hidden", "target_weight")
_PAIR_NAMES = (
    "chosen_log_probs",
    "rejected_log_probs",
    "ref_chosen_log_probs",
    "ref_rejected_log_probs",
)


# --------------------------------------------------------------------------- the entries


def _core_entries() -> list[Entry]:
    kl_like = {"identical": _log_and_probs, "exact": False}  # two forms of one distribution
    return [
        _entry(
            "softmax_cross_entropy",
            _LOGITS_PROBS,
            ("logits", "labels"),
            (0, 1),
            _ce_soft,
            domains=(("label_smoothing", 1.5), ("z_loss", -1.0)),
        ),
        _entry(
            "softmax_cross_entropy_with_integer_labels",
            _drawn(_logits, _labels, _weights),
            ("logits", "labels", "sample_weights"),
            (0, 2),
            _ce_int,
            keywords=((2, "sample_weights"),),
            domains=(("label_smoothing", -0.1), ("z_loss", -1.0)),
        ),
        _entry("nll_loss", _LOG_PROBS_LABELS, ("log_probs", "labels"), (0,), _nll),
        _entry("poly_loss_cross_entropy", _LOGITS_PROBS, ("logits", "labels"), (0, 1), _poly),
        _entry(
            "safe_softmax_cross_entropy",
            _LOGITS_PROBS,
            ("logits", "labels"),
            (0, 1),
            _ce_soft,
            reduction_name=None,
        ),
        _entry(
            "smooth_labels",
            _drawn(_probs),
            ("labels",),
            (0,),
            lambda t: 0.9 * t + 0.1 / C,
            reduction_name=None,
            options={"alpha": 0.1},
            keeps_dtype=True,
            domains=(("alpha", 1.5),),
        ),
        _entry(
            "softmax_focal_loss",
            _LOGITS_LABELS,
            ("logits", "labels"),
            (0,),
            _focal_int,
            domains=(("gamma", -1.0),),
        ),
        _entry("entropy", _drawn(_logits), ("logits",), (0,), _entropy),
        _entry(
            "binary_entropy",
            lambda r, n: (_binary(r, n)[0],),
            ("logits",),
            (0,),
            _binary_entropy,
        ),
        _entry(
            "kl_divergence",
            _LOG_PREDICTIONS_PROBS,
            ("log_predictions", "targets"),
            (0, 1),
            _kl,
            **kl_like,
        ),
        _entry(
            "kl_divergence_with_log_targets",
            _LOG_PREDICTIONS_LOG_PROBS,
            ("log_predictions", "log_targets"),
            (0, 1),
            lambda lq, lp: _kl(lq, np.exp(lp)),
            identical=_log_and_log,
        ),
        _entry(
            "softmax_kl_divergence",
            _TWO_LOGITS,
            ("logits", "target_logits"),
            (0, 1),
            lambda s, t: _softmax_kl(s, t, 2.0),
            options={"temperature": 2.0},
            identical=_same_logits,
            identical_options=({"temperature": 1.0}, {"temperature": 2.0}, {"temperature": 3.0}),
            domains=(("temperature", 0.0),),
        ),
        _entry(
            "js_divergence",
            _TWO_LOGITS,
            ("logits_p", "logits_q"),
            (0, 1),
            lambda a, b: _js(a, b, 0.3),
            options={"beta": 0.3},
            identical=_same_logits,
            identical_options=({"beta": 0.5}, {"beta": 0.3}),
            domains=(("beta", 1.5),),
        ),
        *(
            _entry(
                name,
                _LOG_PREDICTIONS_PROBS,
                ("log_predictions", "targets"),
                (0, 1),
                _generalized_kl,
                reduction_name=None,
                **kl_like,
            )
            for name in ("generalized_kl_divergence", "convex_kl_divergence")
        ),
        _entry(
            "sigmoid_binary_cross_entropy",
            _binary,
            ("logits", "labels"),
            (0, 1),
            _sigmoid_bce,
            domains=(("label_smoothing", 1.5),),
        ),
        _entry(
            "binary_cross_entropy", _probabilities_and_labels, ("probs", "labels"), (0, 1), _bce
        ),
        _entry(
            "sigmoid_focal_loss",
            _binary,
            ("logits", "labels"),
            (0, 1),
            _sigmoid_focal,
            options={"alpha": 0.25},
            domains=(("gamma", -1.0), ("alpha", 1.5)),
        ),
        *(
            _entry(
                name,
                _ctc_inputs,
                ("logits", "logit_paddings", "labels", "label_paddings"),
                (0,),
                reference,
                reduction_name=None,
            )
            for name, reference in (
                ("ctc_loss", ctc_reference),
                ("ctc_loss_with_forward_probs", lambda *a: (ctc_reference(*a), None, None)),
            )
        ),
        _entry(
            "ntxent",
            _ntxent_inputs,
            ("embeddings", "labels"),
            (0,),
            lambda x, y: ntxent_reference(x, y, 0.5),
            reduction_name=None,
            options={"temperature": 0.5},
            per_example=False,
            domains=(("temperature", 0.0),),
        ),
        _entry(
            "weighted_mean",
            _drawn(lambda r, n: r.normal(size=n), _weights),
            ("total", "weight"),
            (0, 1),
            lambda t, w: t / w,
            reduction_name=None,
            keeps_dtype=True,
        ),
    ]


def _fused_entries() -> list[Entry]:
    fused = {"keywords": ((2, "bias"),), "batched": (0, 3), **_FUSED}
    distill = {"batched": (0, 2), "identical": _same_fused, **_FUSED}
    return [
        _entry(
            "linear_softmax_cross_entropy",
            _fused_inputs,
            _FUSED_NAMES,
            (0, 1, 2),
            lambda h, w, b, y: _ce_int(_linear_logits(h, w, b), y),
            options={"chunk_size": 3},
            domains=(("label_smoothing", 1.5), ("z_loss", -1.0), ("chunk_size", 0)),
            **fused,
        ),
        _entry(
            "linear_softmax_cross_entropy[aux]",
            _fused_inputs,
            _FUSED_NAMES,
            (0, 1, 2),
            _fused_aux_reference,
            options={"return_aux": True, "chunk_size": 3, "logit_softcap": 3.0, "z_loss": 1e-2},
            **fused,
        ),
        _entry(
            "linear_softmax_kl_divergence",
            _distill_inputs,
            _DISTILL_NAMES,
            (0, 1, 2, 3),
            lambda h, w, th, tw: _softmax_kl(h @ w, th @ tw, 2.0),
            options={"temperature": 2.0, "chunk_size": 3},
            identical_options=({"temperature": 1.0}, {"temperature": 2.0}, {"temperature": 3.0}),
            domains=(("temperature", 0.0), ("chunk_size", 0)),
            **distill,
        ),
        _entry(
            "linear_js_divergence",
            _distill_inputs,
            _DISTILL_NAMES,
            (0, 1, 2, 3),
            lambda h, w, th, tw: _js(h @ w, th @ tw, 0.3),
            options={"beta": 0.3, "chunk_size": 3},
            identical_options=({"beta": 0.5}, {"beta": 0.3, "temperature": 2.0}),
            domains=(("beta", 1.5), ("temperature", -1.0)),
            **distill,
        ),
        Entry(
            "linear_sparse_distillation_loss",
            "jaxce.linear_sparse_distillation_loss",
            _sparse_fused_inputs,
            _bind(
                jaxce.linear_sparse_distillation_loss,
                keywords=((2, "bias"),),
                temperature=1.5,
                chunk_size=3,
            ),
            ("hidden", "weight", "bias", "teacher_ids", "teacher_log_probs"),
            (0, 1, 2, 4),
            lambda h, w, b, ids, t: _sparse_kl_ref(_linear_logits(h, w, b), ids, t, 1.5),
            batched=(0, 3, 4),
            domains=(("temperature", 0.0), ("chunk_size", 0)),
            **_FUSED,
        ),
    ]


def _pytorch_entries() -> list[Entry]:
    torch = {"unsupported": (_NO_SUM_AND_WEIGHT,), **_TORCH}
    e: list[Entry] = []
    for public in ("cross_entropy", "CrossEntropyLoss", "nll_loss", "NLLLoss"):
        log_probs = public in ("nll_loss", "NLLLoss")
        e.append(
            _entry(
                f"pytorch.{public}",
                _LOG_PROBS_LABELS if log_probs else _LOGITS_LABELS,
                ("input", "target"),
                (0,),
                _nll if log_probs else _ce_int,
                domains=() if log_probs else (("label_smoothing", 1.5),),
                **torch,
            )
        )
    for public, inputs, reference, extra in (
        ("binary_cross_entropy", _probabilities_and_labels, _bce, {"eager_checks": True}),
        ("BCELoss", _probabilities_and_labels, _bce, {"eager_checks": True}),
        ("binary_cross_entropy_with_logits", _binary, _sigmoid_bce, {}),
        ("BCEWithLogitsLoss", _binary, _sigmoid_bce, {}),
    ):
        e.append(
            _entry(
                f"pytorch.{public}",
                inputs,
                ("input", "target"),
                (0, 1),
                reference,
                **extra,
                **torch,
            )
        )
    for public in ("kl_div", "KLDivLoss"):
        for log_target in (False, True):
            e.append(
                _entry(
                    f"pytorch.{public}[log_target={log_target}]",
                    _LOG_PREDICTIONS_LOG_PROBS if log_target else _LOG_PREDICTIONS_PROBS,
                    ("input", "target"),
                    (0, 1),
                    (
                        (lambda lq, lp: np.exp(lp) * (lp - lq))
                        if log_target
                        else (lambda lq, p: xlogy(p, np.log(p)) - p * lq)
                    ),
                    options={"log_target": log_target},
                    identical=_log_and_log if log_target else _log_and_probs,
                    exact=log_target,
                    reductions=("none", "sum", "mean", "batchmean"),
                    empty_reduced={"sum": 0.0, "mean": math.nan, "batchmean": math.nan},
                    unsupported=(_NO_SUM_AND_WEIGHT,),
                )
            )
    return e


def _sklearn_entries() -> list[Entry]:
    def call(y, p, reduction="mean", **o):
        return jsk.log_loss(y, p, normalize=reduction == "mean", labels=tuple(range(C)), **o)

    return [
        _entry(
            "sklearn.log_loss",
            _drawn(_labels, _probs),
            ("y_true", "y_proba"),
            (1,),
            lambda y, p: log_loss_reference(y, p, np.arange(C)),
            call=call,
            reductions=("mean", "sum"),
            per_example=False,
            empty_reduced={"sum": 0.0, "mean": math.nan},
            eager_checks=True,
        )
    ]


# --------------------------------------------------------------------------- post-training
# Entries written from API.md "Post-training"; each activates when its name exists in jaxce.


def _posttrain_entries() -> list[Entry]:
    log_probs = {"reduction_name": None, "keywords": ((2, "bias"),), "batched": (0, 3), **_FUSED}
    e = [
        _entry(
            "linear_log_probs",
            _fused_inputs,
            _FUSED_NAMES,
            (0, 1, 2),
            lambda h, w, b, y: -_ce_int(_linear_logits(h, w, b), y),
            options={"chunk_size": 3},
            domains=(("temperature", 0.0), ("chunk_size", 0)),
            needs="linear_log_probs",
            **log_probs,
        ),
        _entry(
            "linear_log_probs[entropy]",
            _fused_inputs,
            _FUSED_NAMES,
            (0, 1, 2),
            _fused_entropy_reference,
            options={
                "return_entropy": True,
                "chunk_size": 3,
                "temperature": 1.5,
                "logit_softcap": 3.0,
            },
            needs="linear_log_probs",
            **log_probs,
        ),
    ]
    for estimator, reference in (
        ("k1", lambda lp, rp: lp - rp),
        ("k2", lambda lp, rp: (rp - lp) ** 2 / 2),
        ("k3", lambda lp, rp: np.expm1(rp - lp) - (rp - lp)),
    ):
        e.append(
            _entry(
                f"sampled_kl_divergence[{estimator}]",
                _drawn(_sequence_inputs, _sequence_inputs),
                ("log_probs", "ref_log_probs"),
                (0, 1),
                reference,
                reduction_name=None,
                options={"estimator": estimator},
                identical=_log_and_log,
                domains=(("estimator", "k4"),),
                needs="sampled_kl_divergence",
            )
        )
    for reduction, reference in (("sum", _sequence_sum), ("mean", _sequence_mean)):
        e.append(
            _entry(
                f"sequence_reduce[{reduction}]",
                _drawn(_sequence_inputs, _token_mask),
                ("values", "where"),
                (0,),
                reference,
                reduction_name=None,
                options={"reduction": reduction},
                nan_args=(),
                unsupported=(
                    Unsupported(
                        "reduction-max",
                        _direct_raises("sequence_reduce", reduction="max"),
                        ValueError,
                        "reduction",
                        "per-sequence sums and token means only (API.md, Post-training)",
                    ),
                ),
                needs="sequence_reduce",
            )
        )
    for loss_type, label_smoothing, reference in (
        ("sigmoid", 0.1, _dpo_reference(0.1, 0.1)),
        ("ipo", 0.0, _ipo_reference),
    ):
        e.append(
            _entry(
                f"dpo_loss[{loss_type}]",
                _pairs,
                _PAIR_NAMES,
                (0, 1, 2, 3),
                reference,
                options={"beta": 0.1, "loss_type": loss_type, "label_smoothing": label_smoothing},
                domains=(("beta", 0.0), ("label_smoothing", 1.5), ("loss_type", "nope")),
                needs="dpo_loss",
            )
        )
    for name, reference, domains in (
        ("simpo_loss", _simpo_reference, (("beta", 0.0), ("label_smoothing", 1.5))),
        ("orpo_loss", _orpo_reference, (("beta", 0.0),)),
    ):
        e.append(
            _entry(
                name,
                lambda r, n: _pairs(r, n)[:2],
                _PAIR_NAMES[:2],
                (0, 1),
                reference,
                domains=domains,
                needs=name,
            )
        )
    # the weighted list of types and an f-divergence score (aot sorts over the batch, so
    # it is not per-example: tested in test_preference_families.py)
    e.append(
        _entry(
            "dpo_loss[bco_pair+discopop,forward_kl]",
            _pairs,
            _PAIR_NAMES,
            (0, 1, 2, 3),
            _dpo_mix_reference,
            options={
                "beta": 0.5,
                "loss_type": ("bco_pair", "discopop"),
                "loss_weights": (0.7, 0.3),
                "f_divergence": "forward_kl",
                "bco_running_mean": 0.05,
            },
            domains=(("discopop_tau", 0.0), ("f_divergence", "nope"), ("loss_weights", (1.0,))),
            needs="dpo_loss",
        )
    )
    e.append(
        _entry(
            "kto_loss",
            _kto_inputs,
            ("log_probs", "ref_log_probs", "desirable"),
            (0, 1),
            _kto_reference,
            options={"kl": 0.1, "beta": 0.5, "desirable_weight": 1.5, "undesirable_weight": 0.5},
            domains=(("beta", 0.0), ("undesirable_weight", -1.0), ("loss_type", "nope")),
            needs="kto_loss",
        )
    )
    e.append(
        _entry(
            "bradley_terry_loss",
            _bt_inputs,
            ("chosen_rewards", "rejected_rewards", "margin"),
            (0, 1, 2),
            _bt_reference,
            keywords=((2, "margin"),),
            options={"center_coef": 0.01},
            domains=(("center_coef", -0.1),),
            needs="bradley_terry_loss",
        )
    )
    e.append(
        _entry(
            "policy_gradient_loss",
            _policy_inputs,
            ("log_probs", "old_log_probs", "advantages", "where"),
            (0, 2),
            _policy_reference,
            reduction_name="aggregation",
            reductions=("none", "token_mean", "sequence_mean", "sum_and_weight"),
            nan_args=(0, 1, 2),
            domains=(("clip_epsilon", -0.1), ("kl_coef", -1.0)),
            unsupported=(
                Unsupported(
                    "aggregation-max",
                    _direct_raises("policy_gradient_loss", aggregation="max"),
                    ValueError,
                    "aggregation",
                    "the five documented aggregations only (API.md, Post-training)",
                ),
            ),
            needs="policy_gradient_loss",
            empty_reduced={"token_mean": 0.0, "sequence_mean": 0.0},
        )
    )
    e += _policy_correction_entries(_pending("policy_gradient_loss"), _policy_inputs)
    return e


def _policy_correction_entries(pg, pg_inputs) -> list[Entry]:
    """The safe surrogates of ``policy_gradient_loss`` and the rollout corrections (API.md,
    "Policy optimisation"). The corrections are constants under ``grad`` (their inputs are
    ``stop_gradient``-ed), so they claim no autodiff mode (``modes=()``: their zero gradients
    are checked in ``test_policy_corrections.py``); the two masks are boolean and are compared
    here as float masks of the input's dtype (``keeps_dtype``)."""
    e: list[Entry] = []

    def weighted_inputs(r, n):
        return (*pg_inputs(r, n), r.uniform(0.0, 2.0, size=(n, 4)))

    def dual_ref(lp, old, a, m, w):
        ratio = np.exp(lp - old)
        adv = a[:, None]
        per_token = -np.minimum(np.minimum(ratio, 1.15) * adv, np.clip(ratio, 0.95, 1.05) * adv)
        per_token = np.where(adv < 0, np.minimum(-1.1 * adv, per_token), per_token)
        return np.where(m, per_token * w, 0.0)

    def sapo_ref(lp, old, a, m, w):
        mean = np.where(m, lp - old, 0).sum(-1, keepdims=True) / np.maximum(
            m.sum(-1, keepdims=True), 1
        )
        adv = a[:, None]
        tau = np.where(adv > 0, 1.0, 1.05)
        return np.where(m, -4 / tau / (1 + np.exp(-tau * (np.exp(mean) - 1))) * adv * w, 0.0)

    for name, options, ref in (
        ("dual_clip", {"clip_epsilon": 0.05, "dual_clip": 1.1, "ratio_cap": 1.15}, dual_ref),
        ("sapo", {"loss_type": "sapo", "importance_sampling": "sequence"}, sapo_ref),
    ):
        e.append(
            Entry(
                f"policy_gradient_loss[{name}]",
                "jaxce.policy_gradient_loss",
                weighted_inputs,
                lambda lp, old, a, m, w, reduction="none", _o=options, **o: pg(
                    lp, old, a, m, token_weights=w, aggregation=reduction, **{**_o, **o}
                ),
                ("log_probs", "old_log_probs", "advantages", "where", "token_weights"),
                (0, 2),
                ref,
                reductions=("none", "token_mean", "sequence_mean", "sum_and_weight"),
                nan_args=(0, 1, 2, 4),
                domains=(("dual_clip", 1.0), ("max_log_ratio", 0.0), ("ratio_cap", 1.0)),
                needs="policy_gradient_loss",
                empty_reduced={"token_mean": 0.0, "sequence_mean": 0.0},
            )
        )

    riw = _pending("rollout_importance_weights")

    def rollout_inputs(r, n):
        old = _sequence_inputs(r, n)
        return old, old + r.normal(size=old.shape) * 0.5, _token_mask(r, n)

    def rollout_ref(old, rollout, m):
        log_rho = np.where(m, old - rollout, 0).sum(-1, keepdims=True)
        return np.where(m & (log_rho <= np.log(3.0)), np.exp(log_rho), 0.0)

    e.append(
        Entry(
            "rollout_importance_weights",
            "jaxce.rollout_importance_weights",
            rollout_inputs,
            _no_reduction(lambda o, r, m, **kw: riw(o, r, m, **kw)),
            ("old_log_probs", "rollout_log_probs", "where"),
            (0, 1),
            rollout_ref,
            reductions=(None,),
            modes=(),
            order2=False,
            domains=(("bounds", (2.0, 1.0)), ("level", "tok"), ("mode", "clip")),
            needs="rollout_importance_weights",
        )
    )
    opm = _pending("off_policy_sequence_mask")

    def opm_inputs(r, n):
        lp = _sequence_inputs(r, n)
        return lp, lp + r.normal(size=lp.shape) * 0.3, r.normal(size=n), _token_mask(r, n)

    def opm_ref(lp, rollout, a, m):
        mean = np.where(m, rollout - lp, 0).sum(-1) / np.maximum(m.sum(-1), 1)
        return (m & ((a >= 0) | (mean <= 0.05))[:, None]).astype(float)

    e.append(
        Entry(
            "off_policy_sequence_mask",
            "jaxce.off_policy_sequence_mask",
            opm_inputs,
            _no_reduction(
                lambda lp, r, a, m, **kw: opm(lp, r, a, m, **{"threshold": 0.05, **kw}).astype(
                    lp.dtype
                )
            ),
            ("log_probs", "rollout_log_probs", "advantages", "where"),
            (0, 1, 2),
            opm_ref,
            reductions=(None,),
            nan_args=(),
            modes=(),
            order2=False,
            keeps_dtype=True,
            needs="off_policy_sequence_mask",
        )
    )
    tem = _pending("top_entropy_mask")

    def entropy_inputs(r, n):
        return r.uniform(0.0, 3.0, size=(n, 4)), _token_mask(r, n)

    def entropy_ref(h, m):
        if not m.any():
            return np.zeros(h.shape)
        return (m & (h >= np.quantile(h[m], 0.6))).astype(float)

    e.append(
        Entry(
            "top_entropy_mask",
            "jaxce.top_entropy_mask",
            entropy_inputs,
            _no_reduction(lambda h, m, **kw: tem(h, m, **{"fraction": 0.4, **kw}).astype(h.dtype)),
            ("entropy", "where"),
            (0,),
            entropy_ref,
            reductions=(None,),
            nan_args=(),
            modes=(),
            order2=False,
            keeps_dtype=True,
            domains=(("fraction", 1.5),),
            needs="top_entropy_mask",
        )
    )
    e += _sparse_entries()
    return e


def _sparse_entries() -> list[Entry]:
    """Top-k sparse distillation and the sampler-truncated log-probabilities."""
    e = []
    for tail in ("bucket", "renormalize"):
        e.append(
            Entry(
                f"sparse_distillation_loss[{tail}]",
                "jaxce.sparse_distillation_loss",
                _sparse_inputs,
                _bind(jaxce.sparse_distillation_loss, tail=tail, temperature=2.0),
                ("logits", "teacher_ids", "teacher_log_probs"),
                (0, 2),
                lambda z, ids, t, tail=tail: _sparse_kl_ref(z, ids, t, 2.0, tail),
                identical=_sparse_identical,
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
    e.append(
        Entry(
            "truncated_log_probs",
            "jaxce.truncated_log_probs",
            _truncated_inputs,
            _bind(jaxce.truncated_log_probs, reduction_name=None, return_entropy=True, top_k=3),
            ("logits", "labels"),
            (0,),
            lambda z, y: _truncated_ref(z, y, 3),
            reductions=(None,),
            domains=(("top_k", 0), ("temperature", 0.0)),
        )
    )
    e.append(
        Entry(
            "linear_log_probs[top_k]",
            "jaxce.linear_log_probs",
            _top_k_inputs,
            _bind(
                jaxce.linear_log_probs,
                keywords=((2, "bias"),),
                reduction_name=None,
                return_entropy=True,
                top_k=3,
                chunk_size=3,
            ),
            ("hidden", "weight", "bias", "labels"),
            (0, 1, 2),
            lambda h, w, b, y: _truncated_ref(_linear_logits(h, w, b), y, 3),
            reductions=(None,),
            batched=(0, 3),
            **_FUSED,
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

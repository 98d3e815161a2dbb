r"""Preference and reward losses on per-sequence log-probabilities: DPO and its variants,
SimPO, ORPO, KTO and the Bradley-Terry reward-model loss.

Each is a short formula of the log-probabilities that the policy (and, for DPO, a frozen
reference) gives a chosen and a rejected completion; the caller forms those with
:func:`jaxce.sequence_reduce` from per-token log-probabilities (sums for DPO, token means for
SimPO, ORPO and IPO). Every :math:`-\log\sigma(\cdot)` is a ``softplus`` and label smoothing
enters through the identity :math:`\log\sigma(z) - \log\sigma(-z) = z`, so

.. math::
  -(1 - \varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)
  = \operatorname{softplus}(-z) + \varepsilon z ,

which neither overflows nor loses the exact value :math:`\log 2` at :math:`z = 0`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, TypeAlias, overload

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _api, _checks, _numerics, _reduce
from jaxce._checks import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, Domain, Reduction

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Loss: TypeAlias = Array | tuple[Array, Array]

DPOLossType: TypeAlias = Literal[
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
]
FDivergence: TypeAlias = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
KTOLossType: TypeAlias = Literal["kto", "apo_zero_unpaired"]

_ROBUST = Domain(0.0, 0.5, False, "in [0, 0.5) for loss_type='robust'", open_high=True)
_EXO = Domain(0.0, 1.0, True, "in (0, 1) for loss_type='exo_pair'", open_high=True)
_UNUSED = Domain(
    0.0,
    0.0,
    False,
    "0: only loss_type 'sigmoid', 'robust', 'exo_pair', 'aot' and 'aot_unpaired' use it",
)
# The domain of ``label_smoothing`` for each loss type (``_UNUSED``: the type ignores it).
DPO_LABEL_SMOOTHING: dict[str, Domain] = {
    "sigmoid": UNIT_INTERVAL,
    "robust": _ROBUST,
    "exo_pair": _EXO,
    "aot": UNIT_INTERVAL,
    "aot_unpaired": UNIT_INTERVAL,
    "hinge": _UNUSED,
    "ipo": _UNUSED,
    "nca_pair": _UNUSED,
    "bco_pair": _UNUSED,
    "sppo_hard": _UNUSED,
    "apo_zero": _UNUSED,
    "apo_down": _UNUSED,
    "discopop": _UNUSED,
}
# Below |f_alpha - 1| of this the alpha-divergence is its limit, the reverse KL (as TRL).
_ALPHA_AT_ONE = 1e-6


def _pair_inputs(arrays: dict[str, ArrayLike]) -> tuple[list[Array], jnp.dtype]:
    """Floating arrays of the first one's shape (the pairs), upcast to one compute dtype."""
    xs = {name: _checks.as_floating(x, name) for name, x in arrays.items()}
    first, *_ = xs
    shape = xs[first].shape
    dtype = _reduce.compute_dtype(*(x.dtype for x in xs.values()))
    out = [
        _checks.broadcastable(x, name, shape, f"one per pair of `{first}`").astype(dtype)
        for name, x in xs.items()
    ]
    return out, dtype


def _reduce_pairs(loss: Array, reduction: str) -> Loss:
    weights = _reduce.example_weights(loss.shape, loss.dtype)
    return _reduce.weigh_and_reduce(loss, weights, reduction)


def _zero(x: Array) -> Array:
    return jnp.zeros((), x.dtype)


def _scaled_margin(beta: Array, *differences: tuple[Array, Array]) -> Array:
    r"""``beta * sum(a - b for a, b in differences)`` without overflow where it is representable.

    Each term is scaled by ``1 / (2 k)`` (an exact power of two for ``k`` in 1, 2) before it
    is subtracted, so no partial sum of log-probabilities down to ``-f32max`` overflows; the
    product is scaled back after ``beta``. Bit for bit ``beta * (sum)`` wherever that does not
    overflow (scaling by a power of two is exact away from subnormals).
    """
    scale = 2.0 * len(differences)
    total = sum(a / scale - b / scale for a, b in differences)
    assert isinstance(total, jax.Array)
    return scale * (beta * total)


def _scaled_exp(u: Array, scale: Array) -> Array:
    """``scale * exp(u)`` (``scale > 0``), finite wherever the exact value is representable."""
    limit = math.log(float(jnp.finfo(u.dtype).max)) - 1.0
    big = u > limit
    near = scale * jnp.exp(jnp.where(big, _zero(u), u))
    far = jnp.exp(jnp.where(big, u, _zero(u)) + jnp.log(scale))
    return jnp.where(big, far, near)


def _scaled_exp_difference(u: Array, v: Array, scale: Array) -> Array:
    """``scale * (exp(u) - exp(v))`` (``scale > 0``): finite wherever the exact value is.

    Where ``exp`` would overflow the difference is taken in log space,
    ``sign(u - v) exp(max(u, v) + log scale + log(1 - exp(-|u - v|)))``; each branch is fed
    harmless values where it is not used, so no derivative is NaN for finite ``u``, ``v``.
    """
    limit = math.log(float(jnp.finfo(u.dtype).max)) - 1.0
    big = jnp.maximum(u, v) > limit
    near = scale * (jnp.exp(jnp.where(big, _zero(u), u)) - jnp.exp(jnp.where(big, _zero(v), v)))
    d = u - v
    live = big & (d != 0)
    gap = jnp.where(live, jnp.abs(d), jnp.ones((), d.dtype))
    top = jnp.where(live, jnp.maximum(u, v), _zero(u))
    far = jnp.sign(d) * jnp.exp(top + jnp.log(scale) + _numerics.log_one_minus_exp(-gap))
    return jnp.where(big, jnp.where(live, far, _zero(far)), near)


class _Scores(NamedTuple):
    """The f-divergence scores of the chosen and rejected log-ratios and what is built on them.

    ``chosen``/``rejected``: the scores (TRL's ``chosen_scores``, ``rejected_scores``);
    ``beta_chosen``/``beta_rejected``: ``beta`` times them; ``z``: ``beta`` times their
    difference; ``delta``: the difference (reverse KL only, for IPO). Each is computed so that
    it overflows only where its exact value does.
    """

    chosen: Array
    rejected: Array
    beta_chosen: Array
    beta_rejected: Array
    z: Array
    delta: Array | None


def _reverse_kl(logs: tuple[Array, Array, Array, Array], c: Array, r: Array, beta: Array):
    pc, pr, rc, rr = logs
    z = _scaled_margin(beta, (pc, rc), (rr, pr))
    delta = _scaled_margin(jnp.ones((), c.dtype), (pc, rc), (rr, pr))
    return _Scores(c, r, beta * c, beta * r, z, delta)


def _scores(
    f_divergence: str,
    logs: tuple[Array, Array, Array, Array],
    c: Array,
    r: Array,
    beta: Array,
    f_alpha: Array | None,
) -> _Scores:
    """The scores of ``f_divergence``; where a score overflows, its value as a constant.

    Where a log-ratio is infinite, or its exponential score (or ``beta`` times it) overflows,
    the value is still right (``inf``, ``-inf``, or the finite margin taken in log space), but
    the chain rule would multiply a zero by an infinite derivative: there the scores and the
    margin are constants (zero derivatives), never NaN.
    """
    if f_divergence == "reverse_kl":
        return _reverse_kl(logs, c, r, beta)
    inf_c, inf_r = (
        _overflows(f_divergence, c, beta, f_alpha),
        _overflows(f_divergence, r, beta, f_alpha),
    )
    finite = _f_scores(
        f_divergence,
        logs,
        jnp.where(inf_c, _zero(c), c),
        jnp.where(inf_r, _zero(r), r),
        beta,
        f_alpha,
    )
    limit = jax.lax.stop_gradient(_f_scores(f_divergence, logs, c, r, beta, f_alpha))
    either = inf_c | inf_r
    return _Scores(
        jnp.where(inf_c, limit.chosen, finite.chosen),
        jnp.where(inf_r, limit.rejected, finite.rejected),
        jnp.where(inf_c, limit.beta_chosen, finite.beta_chosen),
        jnp.where(inf_r, limit.beta_rejected, finite.beta_rejected),
        jnp.where(either, limit.z, finite.z),
        None,
    )


def _overflows(f_divergence: str, x: Array, beta: Array, f_alpha: Array | None) -> Array:
    """Where the score of the log-ratio ``x`` (or ``beta`` times it) is, or may be, infinite."""
    infinite = jnp.isinf(x)
    if f_divergence == "js_divergence":
        return infinite  # log sigmoid: never overflows, derivative at most 1
    limit = math.log(float(jnp.finfo(x.dtype).max)) - 1.0
    grow = jnp.maximum(jnp.log(beta), _zero(x))
    if f_divergence == "forward_kl":
        return infinite | (grow - x > limit)
    assert f_alpha is not None
    a = f_alpha - 1
    at_one = jnp.abs(a) < _ALPHA_AT_ONE
    a = jnp.where(at_one, jnp.ones((), a.dtype), a)
    big = a * jnp.where(infinite, _zero(x), x) + grow - jnp.log(jnp.abs(a)) > limit
    return infinite | (big & ~at_one)


def _f_scores(
    f_divergence: str,
    logs: tuple[Array, Array, Array, Array],
    c: Array,
    r: Array,
    beta: Array,
    f_alpha: Array | None,
) -> _Scores:
    if f_divergence == "forward_kl":
        # f'(t) = 1 - 1/t without its constant: -exp(-log-ratio)
        return _Scores(
            -jnp.exp(-c),
            -jnp.exp(-r),
            -_scaled_exp(-c, beta),
            -_scaled_exp(-r, beta),
            _scaled_exp_difference(-r, -c, beta),
            None,
        )
    if f_divergence == "js_divergence":
        # f'(t) = log(2t / (t + 1)) without log 2: log sigmoid(log-ratio)
        sc, sr = -jax.nn.softplus(-c), -jax.nn.softplus(-r)
        return _Scores(sc, sr, beta * sc, beta * sr, beta * (sc - sr), None)
    assert f_divergence == "alpha_divergence" and f_alpha is not None
    # f'(t) = (t**(alpha - 1) - 1) / (alpha - 1) without its constant: exp(a x) / a, a =
    # alpha - 1; the reverse KL (its limit) where |a| < 1e-6, as TRL. No clamp: an overflow
    # gives inf.
    a = f_alpha - 1
    at_one = jnp.abs(a) < _ALPHA_AT_ONE
    a = jnp.where(at_one, jnp.ones((), a.dtype), a)
    ca = jnp.where(at_one, _zero(c), a * c)
    ra = jnp.where(at_one, _zero(r), a * r)
    sign, scale = jnp.sign(a), beta / jnp.abs(a)
    alpha = _Scores(
        jnp.exp(ca) / a,
        jnp.exp(ra) / a,
        sign * _scaled_exp(ca, scale),
        sign * _scaled_exp(ra, scale),
        sign * _scaled_exp_difference(ca, ra, scale),
        None,
    )
    reverse = _reverse_kl(logs, c, r, beta)
    pick = functools.partial(jnp.where, at_one)
    return _Scores(
        pick(reverse.chosen, alpha.chosen),
        pick(reverse.rejected, alpha.rejected),
        pick(reverse.beta_chosen, alpha.beta_chosen),
        pick(reverse.beta_rejected, alpha.beta_rejected),
        pick(reverse.z, alpha.z),
        None,
    )


def _smoothed_logistic(z: Array, eps: Array | None) -> Array:
    r""":math:`-(1 - \varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`, stably.

    As ``softplus(-z) + eps z`` (exactly ``log 2`` at ``z = 0``); at an infinite ``z`` as
    ``(1 - eps) softplus(-z) + eps softplus(z)`` with ``0 * inf = 0``: its limit (``inf``,
    or ``0`` where the infinite side has no weight) instead of ``inf - inf``.
    """
    loss = jax.nn.softplus(-z)
    if eps is None:
        return loss
    infinite = jnp.isinf(z)
    zf = jnp.where(infinite, _zero(z), z)
    finite = jax.nn.softplus(-zf) + eps * zf
    wsp = _numerics.weighted_softplus
    return jnp.where(infinite, wsp(1 - eps, -z) + wsp(eps, z), finite)


def _robust(z: Array, eps: Array | None) -> Array:
    r""":math:`(-(1-\varepsilon)\log\sigma(z) + \varepsilon\log\sigma(-z)) / (1 - 2\varepsilon)`."""
    loss = jax.nn.softplus(-z)
    if eps is None:
        return loss
    infinite = jnp.isinf(z)
    zf = jnp.where(infinite, _zero(z), z)
    finite = jax.nn.softplus(-zf) - eps * zf / (1 - 2 * eps)
    wsp = _numerics.weighted_softplus
    return jnp.where(infinite, (wsp(1 - eps, -z) - wsp(eps, z)) / (1 - 2 * eps), finite)


def _exo_pair(z: Array, eps: Array | None, dtype) -> Array:
    """KL(Bernoulli(sigmoid(z)) || Bernoulli(1 - eps)), with ``0 log 0 = 0`` at infinite z."""
    # A zero eps (a JAX array, which is not checked eagerly) is outside the domain (0, 1): NaN.
    if eps is None:
        eps = jnp.full((), jnp.nan, dtype)
    tl = _numerics.times_log
    return tl(jax.nn.sigmoid(z), -jax.nn.softplus(-z) - jnp.log1p(-eps)) + tl(
        jax.nn.sigmoid(-z), -jax.nn.softplus(z) - jnp.log(eps)
    )


def _discopop(z: Array, tau: Array) -> Array:
    r"""DiscoPOP's log-ratio modulated loss: :math:`(1 - \sigma(z/\tau))\,\mathrm{softplus}(-z)
    + \sigma(z/\tau) e^{-z}`, with :math:`\sigma(s) e^{-z} = e^{-z - \mathrm{softplus}(-s)}`
    (0, not ``inf * 0``, where :math:`e^{-z}` overflows) and the limits at infinite ``z``
    (``0`` at ``+inf``; ``inf``, with the derivative ``-1`` of ``-z``, at ``-inf``).
    """
    infinite = jnp.isinf(z)
    zf = jnp.where(infinite, _zero(z), z)
    s = zf / tau
    finite = jax.nn.softplus(-zf) * jax.nn.sigmoid(-s) + jnp.exp(-zf - jax.nn.softplus(-s))
    return jnp.where(z == -jnp.inf, -z, jnp.where(infinite, _zero(z), finite))


def _sorted_margin(beta: Array, a: Array, b: Array, c: Array, d: Array) -> Array:
    """``beta (sort(a - b) - sort(c - d))``, sorted along the leading (pair) axis as TRL's
    ``torch.sort(dim=0)``, without intermediate overflow (quartered, as ``_scaled_margin``).

    A NaN anywhere along the pair axis makes every rank NaN: sorting moves it, so no rank
    can be said to be free of it.
    """
    q = 4.0
    x, y = a / q - b / q, c / q - d / q
    if x.ndim == 0:
        return q * (beta * (x - y))
    spec = _explicit_spec(x)
    if spec is not None:  # an Explicit mesh shards the pair axis: sort the global array
        unsharded = jax.sharding.PartitionSpec(None, *spec[1:])
        x, y = _reduce.reshard(x, unsharded), _reduce.reshard(y, unsharded)
    x, y = jnp.sort(x, axis=0), jnp.sort(y, axis=0)
    # NaN sorts last: the last rank says whether the column holds one
    poisoned = jnp.isnan(x[-1:]) | jnp.isnan(y[-1:])
    margin = q * (beta * (x - y))
    margin = jnp.where(poisoned, jnp.full((), jnp.nan, margin.dtype), margin)
    return margin if spec is None else _reduce.reshard(margin, spec)


def _explicit_spec(x: Array) -> Any:
    """The partition spec of ``x`` if its leading axis is sharded over an Explicit mesh axis."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec if spec is not None and len(spec) and spec[0] is not None else None


def _one_loss(
    loss_type: str,
    s: _Scores,
    logs: tuple[Array, Array, Array, Array],
    c: Array,
    r: Array,
    beta: Array,
    eps: Array | None,
    bco_mean: Array | None,
    tau: Array,
    dtype,
) -> Array:
    softplus, sigmoid = jax.nn.softplus, jax.nn.sigmoid
    pc, pr, rc, rr = logs
    if loss_type == "sigmoid":
        return _smoothed_logistic(s.z, eps)
    if loss_type == "robust":
        return _robust(s.z, eps)
    if loss_type == "hinge":
        return jax.nn.relu(1 - s.z)
    if loss_type == "ipo":
        assert s.delta is not None
        return jnp.square(s.delta - 1 / (2 * beta))
    if loss_type == "exo_pair":
        return _exo_pair(s.z, eps, dtype)
    if loss_type == "nca_pair":
        return (
            softplus(-s.beta_chosen)
            + 0.5 * softplus(s.beta_chosen)
            + 0.5 * softplus(s.beta_rejected)
        )
    if loss_type == "bco_pair":
        shift = _zero(c) if bco_mean is None else jax.lax.stop_gradient(bco_mean)
        return softplus(shift - s.beta_chosen) + softplus(s.beta_rejected - shift)
    if loss_type == "sppo_hard":
        half = 0.5 / beta
        return jnp.square(s.chosen - half) + jnp.square(s.rejected + half)
    if loss_type == "aot":
        # the policy's and the reference's chosen-minus-rejected log-ratios, each sorted over
        # the batch (raw log-probabilities: TRL applies no f-divergence here)
        return _smoothed_logistic(_sorted_margin(beta, pc, pr, rc, rr), eps)
    if loss_type == "aot_unpaired":
        return _smoothed_logistic(_sorted_margin(beta, pc, rc, pr, rr), eps)
    if loss_type == "apo_zero":  # on the log-ratios, not the f-divergence scores (as TRL)
        return sigmoid(-beta * c) + sigmoid(beta * r)
    if loss_type == "apo_down":  # its chosen term on the log-ratio, its margin on the scores
        return sigmoid(beta * c) + sigmoid(-s.z)
    assert loss_type == "discopop"
    return _discopop(s.z, tau)


def _loss_types(loss_type: Any) -> tuple[str, ...]:
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(types, tuple) or not types:
        raise ValueError(
            f"`loss_type` must be one of {tuple(DPO_LABEL_SMOOTHING)} or a non-empty tuple of "
            f"them, got {loss_type!r}."
        )
    for t in types:
        if t not in DPO_LABEL_SMOOTHING:
            raise ValueError(
                f"`loss_type` must be one of {tuple(DPO_LABEL_SMOOTHING)} (or a tuple of them), "
                f"got {t!r}."
            )
    if len(set(types)) != len(types):
        raise ValueError(f"`loss_type` {loss_type!r} repeats a type.")
    return types


def smoothing_domain(types: tuple[str, ...]) -> Domain:
    """The domain of ``label_smoothing`` for these types: the intersection of the domains of
    those that use it (``0`` if none does).
    """
    used = [DPO_LABEL_SMOOTHING[t] for t in types if DPO_LABEL_SMOOTHING[t] is not _UNUSED]
    if not used:
        return _UNUSED
    if len(used) == 1:
        return used[0]
    low = max(d.low for d in used)
    high = min(d.high for d in used)
    open_low = any(d.open_low and d.low == low for d in used)
    open_high = any(d.open_high and d.high == high for d in used)
    text = (
        f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'} for "
        f"loss_type {types!r}"
    )
    return Domain(low, high, open_low, text, open_high=open_high)


@overload
def dpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    ref_chosen_log_probs: ArrayLike,
    ref_rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    loss_type: DPOLossType | Sequence[DPOLossType] = "sigmoid",
    label_smoothing: float | ArrayLike = 0.0,
    loss_weights: Sequence[float] | ArrayLike | None = None,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha: float | ArrayLike = 0.5,
    discopop_tau: float | ArrayLike = 0.05,
    bco_running_mean: float | ArrayLike = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def dpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    ref_chosen_log_probs: ArrayLike,
    ref_rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    loss_type: DPOLossType | Sequence[DPOLossType] = "sigmoid",
    label_smoothing: float | ArrayLike = 0.0,
    loss_weights: Sequence[float] | ArrayLike | None = None,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha: float | ArrayLike = 0.5,
    discopop_tau: float | ArrayLike = 0.05,
    bco_running_mean: float | ArrayLike = 0.0,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


def dpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    ref_chosen_log_probs: ArrayLike,
    ref_rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    loss_type: DPOLossType | Sequence[DPOLossType] = "sigmoid",
    label_smoothing: float | ArrayLike = 0.0,
    loss_weights: Sequence[float] | ArrayLike | None = None,
    f_divergence: FDivergence = "reverse_kl",
    f_alpha: float | ArrayLike = 0.5,
    discopop_tau: float | ArrayLike = 0.05,
    bco_running_mean: float | ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> Loss:
    r"""Direct preference optimisation and its variants, as TRL's ``DPOTrainer`` defines them.

    With the log-ratios :math:`c = \log\pi(y_w) - \log\pi_{\mathrm{ref}}(y_w)` (chosen) and
    :math:`r = \log\pi(y_l) - \log\pi_{\mathrm{ref}}(y_l)` (rejected), their scores
    :math:`s_c = f(c)`, :math:`s_r = f(r)` (``f_divergence``, below; :math:`f(x) = x` by
    default), the margin :math:`\Delta = s_c - s_r`, :math:`z = \beta\Delta` and
    :math:`\varepsilon` = ``label_smoothing``, ``loss_type`` is

    .. math::
      \begin{array}{ll}
      \mathtt{sigmoid} & -(1-\varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)
        \quad\text{(DPO; cDPO when } \varepsilon > 0)\\
      \mathtt{robust} & \big(-(1-\varepsilon)\log\sigma(z) + \varepsilon\log\sigma(-z)\big)
        / (1 - 2\varepsilon)\\
      \mathtt{hinge} & \max(0, 1 - z) \quad\text{(SLiC)}\\
      \mathtt{ipo} & (\Delta - 1/(2\beta))^2\\
      \mathtt{exo\_pair} & \sigma(z)\big(\log\sigma(z) - \log(1-\varepsilon)\big)
        + \sigma(-z)\big(\log\sigma(-z) - \log\varepsilon\big)\\
      \mathtt{nca\_pair} & -\log\sigma(\beta s_c) - \tfrac12\log\sigma(-\beta s_c)
        - \tfrac12\log\sigma(-\beta s_r)\\
      \mathtt{bco\_pair} & -\log\sigma(\beta s_c - \delta) - \log\sigma(\delta - \beta s_r)\\
      \mathtt{sppo\_hard} & (s_c - 1/(2\beta))^2 + (s_r + 1/(2\beta))^2\\
      \mathtt{aot} & \text{sigmoid's formula at } z_i = \beta\big(\mathrm{sort}(\log\pi(y_w)
        - \log\pi(y_l))_i - \mathrm{sort}(\log\pi_{\mathrm{ref}}(y_w)
        - \log\pi_{\mathrm{ref}}(y_l))_i\big)\\
      \mathtt{aot\_unpaired} & \text{sigmoid's formula at }
        z_i = \beta\big(\mathrm{sort}(c)_i - \mathrm{sort}(r)_i\big)\\
      \mathtt{apo\_zero} & 1 - \sigma(\beta c) + \sigma(\beta r)\\
      \mathtt{apo\_down} & \sigma(\beta c) + 1 - \sigma(z)\\
      \mathtt{discopop} & \big(1 - \sigma(z/\tau)\big)\big(-\log\sigma(z)\big)
        + \sigma(z/\tau)\, e^{-z}
      \end{array}

    ``beta`` is applied once, here (not also by the caller).

    **AOT** sorts over the leading (pair) axis of the inputs, as TRL's ``torch.sort(dim=0)``:
    the ``i``-th output is the loss at the ``i``-th smallest margins, not at pair ``i`` (the
    sum and mean are the same as TRL's). It is the one type whose result depends on the whole
    batch: under ``jit`` on a mesh the sort is over the global array (XLA inserts the
    collective); inside ``shard_map`` it would be per shard. The other types are elementwise.
    AOT and APO use the log-ratios themselves and ``apo_down``'s first term too, whatever the
    ``f_divergence`` (as TRL).

    **BCO** (pairwise): :math:`\delta` = ``bco_running_mean`` (a constant:
    ``stop_gradient``), the running mean of the implicit rewards :math:`\beta c, \beta r`
    that the BCO paper and TRL up to its DPO refactor kept with ``RunningMoments`` (the mean
    over every chosen and rejected reward seen so far). The default ``0`` is TRL's current
    ``bco_pair``, which dropped it; a caller who keeps it passes it here.

    **Weighted lists** (MPO): a tuple ``loss_type`` gives
    :math:`\sum_k w_k \ell_k` per pair with ``loss_weights`` :math:`w_k` (default all ``1``),
    TRL's ``sum_k w_k mean(loss_k)`` under ``reduction="mean"``. A zero weight drops its term
    exactly (also where that term is infinite). ``label_smoothing`` is used by the types of
    the list that use it and must lie in the intersection of their domains.

    **f-divergences** (Wang et al. 2023), TRL's ``f_divergence_type``: the scores replace the
    log-ratios, :math:`f(x) = x` (``"reverse_kl"``, DPO), :math:`-e^{-x}` (``"forward_kl"``),
    :math:`\log\sigma(x)` (``"js_divergence"``), :math:`e^{(\alpha - 1)x}/(\alpha - 1)`
    (``"alpha_divergence"``, :math:`\alpha` = ``f_alpha``; the reverse KL, its limit, where
    :math:`|\alpha - 1| < 10^{-6}`, as TRL). Unlike TRL, which clamps the exponent of the
    alpha-divergence at 80, nothing is clamped: an exponential that overflows gives ``inf``
    (and a loss of ``inf`` or ``0``), never a silently changed value and never NaN; the margin
    :math:`\beta(s_c - s_r)` is taken in log space where the two exponentials overflow, so
    it is finite wherever it is representable. ``"ipo"`` takes the reverse KL only (below).

    **Length-normalised types.** Inputs are per-sequence log-probabilities: sums over the
    completion's tokens (as TRL), except for ``"ipo"``, whose TRL form divides each log-ratio
    by its completion's token count: pass per-token means (``sequence_reduce(...,
    reduction="mean")``) for all four. TRL's ``"sigmoid_norm"`` is ``"sigmoid"`` on such
    token means. (TRL divides the f-divergence score of the summed log-ratio by the length,
    which is not the score of the mean: with another ``f_divergence`` than the reverse KL,
    ``"ipo"`` raises rather than differ silently, and ``"sigmoid"`` on token means matches
    ``"sigmoid_norm"`` for the reverse KL only.)

    **Exact values and limits.** With a policy equal to its reference (:math:`c = r = 0`)
    ``"sigmoid"`` and ``"robust"`` are exactly ``log 2`` in the compute dtype, whatever
    :math:`\varepsilon` (smoothing enters as :math:`\operatorname{softplus}(-z) +
    \varepsilon z`, an exact rearrangement that vanishes at :math:`z = 0`). Margins are
    formed without intermediate overflow (log-probabilities down to ``-f32max`` give
    :math:`z = \beta\cdot 2\,\mathrm{f32max}`, finite for :math:`\beta \le 1/2`). A ``-inf``
    log-probability gives the formula's limit, never NaN: a ``-inf`` chosen log-probability
    makes ``"sigmoid"`` ``inf``, a ``-inf`` rejected one makes it ``0`` (``inf`` with label
    smoothing, whose flipped label then has probability 0). Only a log-ratio that is itself
    undefined (``-inf - (-inf)``) or a margin between two such infinities is NaN.
    Half-precision inputs are computed in float32.

    Args:
      chosen_log_probs: ``(...)`` policy log-probabilities of the chosen completions.
      rejected_log_probs: of the rejected completions, broadcastable to the chosen ones.
      ref_chosen_log_probs: reference log-probabilities of the chosen completions.
      ref_rejected_log_probs: reference log-probabilities of the rejected completions.
      beta: :math:`\beta > 0`, the inverse temperature (IPO's :math:`\tau`).
      loss_type: one of the names above, or a tuple of them (a weighted sum).
      label_smoothing: :math:`\varepsilon`; in ``[0, 1]`` for ``"sigmoid"``, ``"aot"`` and
        ``"aot_unpaired"``, ``[0, 0.5)`` for ``"robust"``, ``(0, 1)`` for ``"exo_pair"`` (it
        is infinite at 0 and 1; TRL also rejects 0), and ``0`` for the types that do not use
        it (a non-zero value raises rather than being ignored).
      loss_weights: one weight per entry of a tuple ``loss_type`` (TRL's ``loss_weights``);
        ``None``: all ``1``.
      f_divergence: ``"reverse_kl"`` (DPO), ``"forward_kl"``, ``"js_divergence"`` or
        ``"alpha_divergence"``.
      f_alpha: :math:`\alpha` of ``"alpha_divergence"`` (TRL's ``f_alpha_divergence_coef``,
        default 0.5); unused otherwise.
      discopop_tau: :math:`\tau > 0` of ``"discopop"`` (TRL's default 0.05).
      bco_running_mean: :math:`\delta` of ``"bco_pair"``, broadcastable to the pairs; ``0``
        for the other types (a non-zero value raises).
      reduction: ``"none"`` (per pair), ``"sum"``, ``"mean"`` (over pairs) or
        ``"sum_and_weight"`` (the sum and the number of pairs).

    Returns:
      Per-pair losses ``(...)`` or a scalar; float32 for half-precision inputs, else their
      dtype. A NaN input gives NaN for its pair (for ``"aot"``, for the batch); a traced
      ``beta`` or ``label_smoothing`` outside its domain gives NaN (loss and gradients).

    Raises:
      ValueError: an unknown ``loss_type``, ``f_divergence`` or ``reduction``, a
        ``loss_weights`` of the wrong length, ``"ipo"`` with an f-divergence other than the
        reverse KL, shapes that do not broadcast, or a concrete ``beta``,
        ``label_smoothing``, ``discopop_tau`` or ``bco_running_mean`` outside its domain.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> chosen, rejected = jnp.array([-10.0, -12.0]), jnp.array([-11.0, -11.0])
      >>> ref_chosen, ref_rejected = jnp.array([-10.5, -12.0]), jnp.array([-10.5, -11.0])
      >>> jaxce.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
      Array([0.4741, 0.6931], dtype=float32)
      >>> round(float(jaxce.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5,
      ...                            loss_type="ipo", reduction="mean")), 4)
      0.5
      >>> jaxce.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5,
      ...                loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2))
      Array([0.6096, 0.8318], dtype=float32)

    References:
      R. Rafailov et al., "Direct Preference Optimization", 2023,
      https://arxiv.org/abs/2305.18290; E. Mitchell, "A note on DPO with noisy preferences"
      (cDPO), 2023; S. R. Chowdhury et al., "Provably Robust DPO", 2024,
      https://arxiv.org/abs/2403.00409; M. G. Azar et al., "A General Theoretical Paradigm to
      Understand Learning from Human Preferences" (IPO), 2023, https://arxiv.org/abs/2310.12036;
      H. Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment" (EXO),
      2024, https://arxiv.org/abs/2402.00856; H. Chen et al., "Noise Contrastive Alignment"
      (NCA), 2024, https://arxiv.org/abs/2402.05369; S. Jung et al., "Binary Classifier
      Optimization for Large Language Model Alignment" (BCO), 2024,
      https://arxiv.org/abs/2404.04656; Y. Wu et al., "Self-Play Preference Optimization"
      (SPPO), 2024, https://arxiv.org/abs/2405.00675; I. Melnyk et al., "Distributional
      Preference Alignment of LLMs via Optimal Transport" (AOT), 2024,
      https://arxiv.org/abs/2406.05882; K. D'Oosterlinck et al., "Anchored Preference
      Optimization" (APO), 2024, https://arxiv.org/abs/2408.06266; C. Chan et al.,
      "Discovering Preference Optimization Algorithms with and for Large Language Models"
      (DiscoPOP), 2024, https://arxiv.org/abs/2406.08414; C. Wang et al., "Beyond Reverse KL:
      Generalizing Direct Preference Optimization with Diverse Divergence Constraints", 2023,
      https://arxiv.org/abs/2309.16240.
    """
    types = _loss_types(_checks.static_option(loss_type, "loss_type"))
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"`f_divergence` must be one of {F_DIVERGENCES}, got {f_divergence!r}.")
    if "ipo" in types and f_divergence != "reverse_kl":
        raise ValueError(
            "loss_type 'ipo' takes per-token mean log-ratios, whose f-divergence score is not "
            "TRL's (the score of the summed log-ratio over the length): use "
            f"f_divergence='reverse_kl', got {f_divergence!r}."
        )
    if loss_weights is not None:
        if isinstance(loss_weights, (list, tuple)):
            loss_weights = tuple(loss_weights)
            shape = (len(loss_weights),)
        else:
            shape = np.shape(loss_weights)  # type: ignore[arg-type]
        if shape != (len(types),):
            raise ValueError(
                f"`loss_weights` must hold one weight per loss type ({len(types)} for "
                f"{types!r}), got {loss_weights!r}."
            )
    _checks.check_concrete_domain(label_smoothing, "label_smoothing", smoothing_domain(types))
    if "bco_pair" not in types:
        _checks.check_concrete_domain(
            bco_running_mean, "bco_running_mean", Domain(0.0, 0.0, False, "0 unless 'bco_pair'")
        )
    return _dpo_loss(
        chosen_log_probs,
        rejected_log_probs,
        ref_chosen_log_probs,
        ref_rejected_log_probs,
        beta=beta,
        loss_type=types,
        label_smoothing=label_smoothing,
        loss_weights=loss_weights,
        f_divergence=f_divergence,
        f_alpha=f_alpha if f_divergence == "alpha_divergence" else None,
        discopop_tau=discopop_tau if "discopop" in types else None,
        bco_running_mean=bco_running_mean if "bco_pair" in types else 0.0,
        reduction=reduction,
    )


@_api.public(
    static=("loss_type", "f_divergence", "reduction"),
    optional=("label_smoothing", "bco_running_mean"),
    domains={"beta": POSITIVE, "discopop_tau": POSITIVE},
)
def _dpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    ref_chosen_log_probs: ArrayLike,
    ref_rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike,
    loss_type: tuple[str, ...],
    label_smoothing: float | ArrayLike | None,
    loss_weights: Any,
    f_divergence: str,
    f_alpha: float | ArrayLike | None,
    discopop_tau: float | ArrayLike | None,
    bco_running_mean: float | ArrayLike | None,
    reduction: str,
) -> Loss:
    _checks.reduction(reduction)
    logs, dtype = _pair_inputs(
        {
            "chosen_log_probs": chosen_log_probs,
            "rejected_log_probs": rejected_log_probs,
            "ref_chosen_log_probs": ref_chosen_log_probs,
            "ref_rejected_log_probs": ref_rejected_log_probs,
        }
    )
    pc, pr, rc, rr = logs
    beta = _checks.nan_outside_domain(beta, "beta", dtype, POSITIVE)
    domain = smoothing_domain(loss_type)
    eps = None
    if label_smoothing is not None:
        eps = _checks.nan_outside_domain(label_smoothing, "label_smoothing", dtype, domain)
    tau = jnp.ones((), dtype)
    if discopop_tau is not None:
        tau = _checks.nan_outside_domain(discopop_tau, "discopop_tau", dtype, POSITIVE)
    alpha = None if f_alpha is None else _checks.as_hyperparameter(f_alpha, "f_alpha", dtype)
    bco_mean = None
    if bco_running_mean is not None:
        bco_mean = _checks.float_array_like(
            bco_running_mean, "bco_running_mean", pc.shape, dtype, "one per pair, or a scalar"
        )
    weights = None
    if loss_weights is not None:
        weights = _checks.as_hyperparameter(loss_weights, "loss_weights", dtype)
    c = pc - rc
    r = pr - rr
    scores = _scores(f_divergence, (pc, pr, rc, rr), c, r, beta, alpha)
    total = None
    for k, t in enumerate(loss_type):

        def term(t=t):
            return _one_loss(t, scores, (pc, pr, rc, rr), c, r, beta, eps, bco_mean, tau, dtype)

        if weights is None:
            loss = term()
        else:
            # A zero weight drops its term exactly, value and derivatives, also where the term
            # or its derivative is infinite (a select would give 0 * inf = NaN in the
            # gradient); a cond also skips its work.
            w = weights[k]
            loss = jax.lax.cond(
                w == 0, lambda: jnp.zeros_like(pc), lambda w=w, term=term: w * term()
            )
        total = loss if total is None else total + loss
    assert total is not None
    if eps is not None and domain is _UNUSED:
        # A traced non-zero value (outside the domain {0}) is NaN: so are the loss and its
        # gradients (in the domain the factor is exactly 1).
        total = total * (1 + 0 * eps)
    return _reduce_pairs(total, reduction)


@overload
def simpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 2.0,
    gamma: float | ArrayLike = 0.5,
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def simpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 2.0,
    gamma: float | ArrayLike = 0.5,
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(
    static=("reduction",),
    optional=("label_smoothing",),
    domains={"beta": POSITIVE, "gamma": NON_NEGATIVE, "label_smoothing": UNIT_INTERVAL},
)
def simpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 2.0,
    gamma: float | ArrayLike = 0.5,
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> Loss:
    r"""SimPO: a reference-free margin loss on length-normalised log-probabilities.

    With the per-token average log-probabilities :math:`\bar c` (chosen) and :math:`\bar r`
    (rejected), :math:`m = \beta(\bar c - \bar r) - \gamma` and :math:`\varepsilon` =
    ``label_smoothing``:

    .. math::
      \ell = -(1 - \varepsilon)\log\sigma(m) - \varepsilon\log\sigma(-m)
           = \operatorname{softplus}(-m) + \varepsilon m

    as TRL's ``CPOTrainer(loss_type="simpo")`` (whose ``simpo_gamma`` is this :math:`\gamma`:
    it subtracts :math:`\gamma/\beta` before multiplying by :math:`\beta`). CPO's
    behaviour-cloning NLL term and the optional SFT term are the caller's cross-entropy.

    Args:
      chosen_log_probs: ``(...)`` average per-token log-probabilities of the chosen
        completions (``sequence_reduce(..., reduction="mean")``).
      rejected_log_probs: of the rejected ones, broadcastable to the chosen ones.
      beta: :math:`\beta > 0` (the paper uses 2.0 to 2.5).
      gamma: the target margin :math:`\gamma \ge 0`.
      label_smoothing: :math:`\varepsilon \in [0, 1]`.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (over pairs) or ``"sum_and_weight"``.

    Returns:
      Per-pair losses ``(...)`` or a scalar; float32 for half-precision inputs, else their
      dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> jaxce.simpo_loss(jnp.array([-0.8, -1.5]), jnp.array([-1.2, -1.0]))
      Array([0.5544, 1.7014], dtype=float32)

    References:
      Y. Meng, M. Xia, D. Chen, "SimPO: Simple Preference Optimization with a Reference-Free
      Reward", 2024, https://arxiv.org/abs/2405.14734; H. Xu et al., "Contrastive Preference
      Optimization" (CPO), 2024, https://arxiv.org/abs/2401.08417.
    """
    (c, r), dtype = _pair_inputs(
        {"chosen_log_probs": chosen_log_probs, "rejected_log_probs": rejected_log_probs}
    )
    beta = _checks.nan_outside_domain(beta, "beta", dtype, POSITIVE)
    gamma = _checks.nan_outside_domain(gamma, "gamma", dtype, NON_NEGATIVE)
    eps = None
    if label_smoothing is not None:
        eps = _checks.nan_outside_domain(label_smoothing, "label_smoothing", dtype, UNIT_INTERVAL)
    margin = _scaled_margin(beta, (c, r)) - gamma
    return _reduce_pairs(_smoothed_logistic(margin, eps), reduction)


@overload
def orpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def orpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(static=("reduction",), domains={"beta": POSITIVE})
def orpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    reduction: Reduction = "none",
) -> Loss:
    r"""ORPO's odds-ratio term: :math:`-\beta\log\sigma` of the log odds ratio.

    With the per-token average log-probabilities :math:`\bar c` (chosen) and :math:`\bar r`
    (rejected) and :math:`\operatorname{odds}(p) = p / (1 - p)`:

    .. math::
      \log\frac{\operatorname{odds}(e^{\bar c})}{\operatorname{odds}(e^{\bar r})}
        = (\bar c - \bar r) - \big(\log(1 - e^{\bar c}) - \log(1 - e^{\bar r})\big),
      \qquad \ell = -\beta \log\sigma(\cdot) = \beta\operatorname{softplus}(-\cdot)

    :math:`\log(1 - e^x)` is computed as ``log(-expm1(x))``, exact near :math:`x = 0` where
    the literal ``log1p(-exp(x))`` cancels; at :math:`x = 0` it is :math:`-\infty` with a zero
    derivative (a completion of probability 1 has infinite odds: the loss is 0). A positive
    "log-probability" gives NaN. ORPO's full objective adds the chosen completions' NLL, the
    caller's cross-entropy: ``nll - orpo_loss`` in TRL's sign convention is ``nll +
    orpo_loss`` here.

    Args:
      chosen_log_probs: ``(...)`` average per-token log-probabilities of the chosen
        completions (``<= 0``).
      rejected_log_probs: of the rejected ones, broadcastable to the chosen ones.
      beta: :math:`\beta > 0`, ORPO's :math:`\lambda`.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (over pairs) or ``"sum_and_weight"``.

    Returns:
      Per-pair losses ``(...)`` or a scalar; float32 for half-precision inputs, else their
      dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> jaxce.orpo_loss(jnp.array([-0.5, -2.0]), jnp.array([-1.0, -1.0]))
      Array([0.032 , 0.1551], dtype=float32)

    References:
      J. Hong, N. Lee, J. Thorne, "ORPO: Monolithic Preference Optimization without Reference
      Model", 2024, https://arxiv.org/abs/2403.07691.
    """
    (c, r), dtype = _pair_inputs(
        {"chosen_log_probs": chosen_log_probs, "rejected_log_probs": rejected_log_probs}
    )
    beta = _checks.nan_outside_domain(beta, "beta", dtype, POSITIVE)
    l1me = _numerics.log_one_minus_exp
    log_odds = (c - r) - (l1me(c) - l1me(r))
    return _reduce_pairs(beta * jax.nn.softplus(-log_odds), reduction)


@overload
def kto_loss(
    log_probs: ArrayLike,
    ref_log_probs: ArrayLike,
    desirable: ArrayLike,
    *,
    kl: ArrayLike | None,
    beta: float | ArrayLike = 0.1,
    desirable_weight: float | ArrayLike = 1.0,
    undesirable_weight: float | ArrayLike = 1.0,
    loss_type: KTOLossType = "kto",
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def kto_loss(
    log_probs: ArrayLike,
    ref_log_probs: ArrayLike,
    desirable: ArrayLike,
    *,
    kl: ArrayLike | None,
    beta: float | ArrayLike = 0.1,
    desirable_weight: float | ArrayLike = 1.0,
    undesirable_weight: float | ArrayLike = 1.0,
    loss_type: KTOLossType = "kto",
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


def kto_loss(
    log_probs: ArrayLike,
    ref_log_probs: ArrayLike,
    desirable: ArrayLike,
    *,
    kl: ArrayLike | None,
    beta: float | ArrayLike = 0.1,
    desirable_weight: float | ArrayLike = 1.0,
    undesirable_weight: float | ArrayLike = 1.0,
    loss_type: KTOLossType = "kto",
    reduction: Reduction = "none",
) -> Loss:
    r"""KTO: a loss on unpaired completions labelled desirable or not (TRL's ``KTOTrainer``).

    With the log-ratio :math:`x = \log\pi(y) - \log\pi_{\mathrm{ref}}(y)` of each completion
    (a per-sequence sum, as TRL) and the batch's reference point :math:`z_0` = ``kl``:

    .. math::
      \ell = \begin{cases}
        w_d\,\big(1 - \sigma(\beta(x - z_0))\big) & \text{desirable}\\
        w_u\,\big(1 - \sigma(\beta(z_0 - x))\big) & \text{undesirable}
      \end{cases}
      \qquad \texttt{"apo\_zero\_unpaired"}: \quad
      w_d\,\big(1 - \sigma(\beta x)\big) \;/\; w_u\,\sigma(\beta x).

    :math:`z_0` is a constant (``stop_gradient``), formed by the caller as TRL does: the mean
    over the batch (over every process) of the log-ratios of mismatched prompt-completion
    pairs, clamped at 0, ``jnp.maximum(jnp.mean(kl_log_probs - kl_ref_log_probs), 0)``. It is
    not clamped here. ``"apo_zero_unpaired"`` does not use it (``kl=None`` is accepted).
    ``reduction="mean"`` divides by the number of completions, desirable and undesirable
    together, as TRL (which also skips NaN losses, ``nanmean``; here a NaN stays NaN). Each
    :math:`1 - \sigma(u)` is computed as :math:`\sigma(-u)`; the margin is formed without
    intermediate overflow, so no input gives NaN except a NaN or an undefined log-ratio
    (``-inf - (-inf)``).

    Args:
      log_probs: ``(...)`` policy log-probabilities of the completions.
      ref_log_probs: reference log-probabilities, broadcastable to ``log_probs``.
      desirable: boolean, broadcastable to ``log_probs``: the completion is desirable (a
        thumbs-up, TRL's ``label``).
      kl: the reference point :math:`z_0`, a scalar or broadcastable to ``log_probs``;
        required for ``"kto"``.
      beta: :math:`\beta > 0`.
      desirable_weight: :math:`w_d \ge 0` (TRL's ``desirable_weight``).
      undesirable_weight: :math:`w_u \ge 0`.
      loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` or ``"sum_and_weight"`` (the sum and the
        number of completions).

    Returns:
      Per-completion losses ``(...)`` or a scalar; float32 for half-precision inputs, else
      their dtype.

    Raises:
      ValueError: an unknown ``loss_type`` or ``reduction``, ``kl=None`` for ``"kto"``, shapes
        that do not broadcast, or a concrete hyperparameter outside its domain.
      TypeError: a ``desirable`` that is not boolean.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> lp, ref = jnp.array([-10.0, -12.0, -9.0]), jnp.array([-11.0, -11.0, -9.5])
      >>> desirable = jnp.array([True, False, True])
      >>> jaxce.kto_loss(lp, ref, desirable, kl=0.2, beta=1.0)
      Array([0.31  , 0.2315, 0.4256], dtype=float32)

    References:
      K. Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", 2024,
      https://arxiv.org/abs/2402.01306; K. D'Oosterlinck et al., "Anchored Preference
      Optimization" (APO), 2024, https://arxiv.org/abs/2408.06266.
    """
    if loss_type not in ("kto", "apo_zero_unpaired"):
        raise ValueError(
            f"`loss_type` must be one of ('kto', 'apo_zero_unpaired'), got {loss_type!r}."
        )
    if loss_type == "kto" and kl is None:
        raise ValueError("`kl` (the batch's reference point z0) is required for loss_type='kto'.")
    return _kto_loss(
        log_probs,
        ref_log_probs,
        desirable,
        kl=kl if loss_type == "kto" else None,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        reduction=reduction,
    )


@_api.public(
    static=("reduction",),
    domains={
        "beta": POSITIVE,
        "desirable_weight": NON_NEGATIVE,
        "undesirable_weight": NON_NEGATIVE,
    },
)
def _kto_loss(
    log_probs: ArrayLike,
    ref_log_probs: ArrayLike,
    desirable: ArrayLike,
    *,
    kl: ArrayLike | None,
    beta: float | ArrayLike,
    desirable_weight: float | ArrayLike,
    undesirable_weight: float | ArrayLike,
    reduction: str,
) -> Loss:
    _checks.reduction(reduction)
    (lp, ref), dtype = _pair_inputs({"log_probs": log_probs, "ref_log_probs": ref_log_probs})
    good = _checks.broadcastable(
        _checks.as_mask(desirable, "desirable"), "desirable", lp.shape, "one per completion"
    )
    beta = _checks.nan_outside_domain(beta, "beta", dtype, POSITIVE)
    w_d = _checks.nan_outside_domain(desirable_weight, "desirable_weight", dtype, NON_NEGATIVE)
    w_u = _checks.nan_outside_domain(undesirable_weight, "undesirable_weight", dtype, NON_NEGATIVE)
    if kl is None:
        margin = _scaled_margin(beta, (lp, ref))
    else:
        z0 = jax.lax.stop_gradient(
            _checks.float_array_like(kl, "kl", lp.shape, dtype, "a scalar or one per completion")
        )
        margin = _scaled_margin(beta, (lp, ref), (_zero(z0), z0))
    # 1 - sigmoid(margin) for the desirable, 1 - sigmoid(-margin) for the undesirable
    loss = jax.nn.sigmoid(jnp.where(good, -margin, margin)) * jnp.where(good, w_d, w_u)
    return _reduce_pairs(loss, reduction)


@overload
def bradley_terry_loss(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    *,
    margin: ArrayLike | None = None,
    center_coef: float | ArrayLike = 0.0,
    reduction: Literal["none", "sum", "mean"] = "none",
) -> Array: ...


@overload
def bradley_terry_loss(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    *,
    margin: ArrayLike | None = None,
    center_coef: float | ArrayLike = 0.0,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


@_api.public(
    static=("reduction",), optional=("center_coef",), domains={"center_coef": NON_NEGATIVE}
)
def bradley_terry_loss(
    chosen_rewards: ArrayLike,
    rejected_rewards: ArrayLike,
    *,
    margin: ArrayLike | None = None,
    center_coef: float | ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> Loss:
    r"""The Bradley-Terry reward-model loss (TRL's ``RewardTrainer``).

    With the scalar rewards :math:`r_c`, :math:`r_r` that the reward model gives the chosen
    and the rejected completion of a pair, an optional margin :math:`m` (Llama 2's) and
    :math:`\lambda` = ``center_coef`` (TRL's ``center_rewards_coefficient``, Eisenstein et
    al.'s auxiliary loss that centres the rewards on 0):

    .. math::
      \ell = -\log\sigma(r_c - r_r - m) + \lambda\,(r_c + r_r)^2
           = \operatorname{softplus}(r_r + m - r_c) + \lambda\,(r_c + r_r)^2 .

    The difference is formed without intermediate overflow, so the loss is finite for every
    finite reward whose exact loss is representable (``0`` for a margin beyond
    ``f32max``, not ``inf - inf``); ``reduction="mean"`` is TRL's loss.

    Args:
      chosen_rewards: ``(...)`` rewards of the chosen completions.
      rejected_rewards: of the rejected ones, broadcastable to the chosen ones.
      margin: ``None`` or the margins :math:`m`, broadcastable to the pairs.
      center_coef: :math:`\lambda \ge 0`.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (over pairs) or ``"sum_and_weight"``.

    Returns:
      Per-pair losses ``(...)`` or a scalar; float32 for half-precision inputs, else their
      dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> jaxce.bradley_terry_loss(jnp.array([1.5, -0.2]), jnp.array([0.5, 0.3]))
      Array([0.3133, 0.9741], dtype=float32)
      >>> jaxce.bradley_terry_loss(jnp.array([1.5, -0.2]), jnp.array([0.5, 0.3]),
      ...                          margin=jnp.array([1.0, 0.0]), center_coef=0.01)
      Array([0.7331, 0.9742], dtype=float32)

    References:
      R. A. Bradley, M. E. Terry, "Rank Analysis of Incomplete Block Designs", 1952;
      L. Ouyang et al., "Training language models to follow instructions with human
      feedback", 2022, https://arxiv.org/abs/2203.02155; H. Touvron et al., "Llama 2", 2023,
      https://arxiv.org/abs/2307.09288; J. Eisenstein et al., "Helping or Herding? Reward
      Model Ensembles Mitigate but do not Eliminate Reward Hacking", 2023,
      https://arxiv.org/abs/2312.09244.
    """
    _checks.reduction(reduction)
    arrays = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    if margin is not None:
        arrays["margin"] = margin
    xs, dtype = _pair_inputs(arrays)
    rc, rj = xs[0], xs[1]
    terms = [(rc, rj)] if margin is None else [(rc, rj), (_zero(rc), xs[2])]
    loss = jax.nn.softplus(-_scaled_margin(jnp.ones((), dtype), *terms))
    if center_coef is not None:
        lam = _checks.nan_outside_domain(center_coef, "center_coef", dtype, NON_NEGATIVE)
        loss = loss + lam * jnp.square(rc + rj)
    return _reduce_pairs(loss, reduction)

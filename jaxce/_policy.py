r"""Policy-gradient losses of RL fine-tuning: sampled KL estimators and the clipped surrogate.

Both work on per-token log-probabilities of *sampled* tokens (``linear_log_probs`` computes
them without materialising the logits). The per-sequence bookkeeping (masks, packed
sequences, token counts) is ``_sequence``'s, so the padded and the packed layouts give the
same numbers.
"""

from __future__ import annotations

import math
from typing import Literal, TypeAlias, overload

import jax
import jax.numpy as jnp
import numpy as np

from jaxce import _api, _checks, _reduce, _sequence
from jaxce._checks import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike

KLEstimator: TypeAlias = Literal["k1", "k2", "k3", "k1+", "k3+"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "k1+", "k3+")
Aggregation: TypeAlias = Literal[
    "token_mean", "sequence_mean", "sequence_sum", "none", "sum_and_weight"
]
AGGREGATIONS: tuple[str, ...] = (
    "token_mean",
    "sequence_mean",
    "sequence_sum",
    "none",
    "sum_and_weight",
)

# ``exp(d) - 1 - d = d**2 * sum_k d**k / (k + 2)!`` is summed as a series for ``|d| < 1``,
# where ``expm1(d) - d`` cancels (relative error ~ 2 eps / |d|). Terms are enough that the
# first one left out is below half an ulp of the result at ``|d| = 1``: ``2 / (n + 2)!``.
_SERIES_LIMIT = 1.0
_SERIES_TERMS = {2: 8, 4: 10, 8: 18}  # by the dtype's size in bytes


@jax.custom_jvp
def _exp_minus_one_minus(d: Array) -> Array:
    r"""``exp(d) - 1 - d``, accurate to a few ulps for every ``d`` (``+inf`` at ``+inf``).

    Its derivative is ``expm1(d)`` (a ``custom_jvp``: exact, and the series is not
    differentiated term by term, which made second-order derivatives slow to compile).
    """
    small = jnp.abs(d) < _SERIES_LIMIT
    ds = jnp.where(small, d, jnp.zeros((), d.dtype))  # double where: no overflow off-branch
    terms = _SERIES_TERMS[jnp.dtype(d.dtype).itemsize]
    poly = jnp.full((), 1.0 / math.factorial(terms + 1), d.dtype)
    for k in range(terms - 1, -1, -1):
        poly = poly * ds + 1.0 / math.factorial(k + 2)
    series = ds * ds * poly
    dl = jnp.where(small | (d == jnp.inf), jnp.ones((), d.dtype), d)
    large = jnp.where(d == jnp.inf, jnp.full((), jnp.inf, d.dtype), jnp.expm1(dl) - dl)
    return jnp.where(small, series, large)


@_exp_minus_one_minus.defjvp
def _exp_minus_one_minus_jvp(primals, tangents):
    (d,), (t,) = primals, tangents
    return _exp_minus_one_minus(d), jnp.expm1(d) * t


def clamp(x: Array, bound: Array | None) -> Array:
    """``x`` clamped to ``[-bound, bound]`` (``None``: unchanged); the gradient is exactly 0
    where the clamp is active, and a NaN bound gives NaN.
    """
    if bound is None:
        return x
    return jnp.clip(x, -bound, bound)


def kl_estimate(
    log_probs: Array, ref_log_probs: Array, estimator: str, max_log_ratio: Array | None = None
) -> Array:
    """The per-token estimator on arrays of one dtype and shape (no checks).

    ``max_log_ratio`` clamps ``d = ref - log_probs`` where it enters an ``exp`` (``"k3"``,
    ``"k3+"``: value and straight-through gradient alike).
    """
    both_inf = (log_probs == ref_log_probs) & jnp.isinf(log_probs)
    zero = jnp.zeros((), log_probs.dtype)
    lp = jnp.where(both_inf, zero, log_probs)
    ref = jnp.where(both_inf, zero, ref_log_probs)
    if estimator == "k1":
        return lp - ref
    d = ref - lp
    if estimator == "k2":
        return d * d / 2
    if estimator in ("k3", "k3+"):
        d = clamp(d, max_log_ratio)
    if estimator == "k3":
        return _exp_minus_one_minus(d)
    if estimator not in ("k1+", "k3+"):
        raise ValueError(f"`estimator` must be one of {KL_ESTIMATORS}, got {estimator!r}.")
    # Straight through: the value of k1 / k3 exactly (``k2 - sg(k2)`` is an exact 0), the
    # gradient of k2.
    value = -d if estimator == "k1+" else _exp_minus_one_minus(d)
    k2 = d * d / 2
    return jax.lax.stop_gradient(value) + (k2 - jax.lax.stop_gradient(k2))


def _check_estimator(value: str, name: str) -> None:
    if value not in KL_ESTIMATORS:
        raise ValueError(f"`{name}` must be one of {KL_ESTIMATORS}, got {value!r}.")


@_api.public(static=("estimator",))
def sampled_kl_divergence(
    log_probs: ArrayLike, ref_log_probs: ArrayLike, *, estimator: KLEstimator = "k3"
) -> Array:
    r"""Per-token sampled estimate of :math:`\mathrm{KL}(\pi \,\|\, \pi_{\mathrm{ref}})`.

    For a token :math:`x \sim \pi` with ``log_probs`` :math:`\log \pi(x)` and
    ``ref_log_probs`` :math:`\log \pi_{\mathrm{ref}}(x)`, let
    :math:`d = \log \pi_{\mathrm{ref}}(x) - \log \pi(x)` (so :math:`e^d` is the ratio
    :math:`\pi_{\mathrm{ref}} / \pi`). Schulman's estimators are

    .. math::
      k_1 = -d, \qquad k_2 = \tfrac{1}{2} d^2, \qquad k_3 = e^{d} - 1 - d .

    :math:`k_1` and :math:`k_3` are unbiased, :math:`\mathbb{E}_{x \sim \pi}[k] =
    \mathrm{KL}(\pi \| \pi_{\mathrm{ref}})`; :math:`k_3 \ge 0` has low variance (the GRPO
    penalty); :math:`k_2 \ge 0` is biased (second order in :math:`d`).

    **Gradients** are the formulas' own with the samples held fixed (no score-function term).
    Their expectations under :math:`x \sim \pi`, as a loss minimised with respect to the
    policy's parameters :math:`\theta`:

    * :math:`k_1`: :math:`\nabla k_1 = \nabla \log \pi(x)`, whose expectation
      :math:`\sum_x \nabla \pi(x)` is **zero**: as a loss it does not regularise (use it as a
      reward penalty, or use :math:`k_2`/:math:`k_3`);
    * :math:`k_2`: :math:`\mathbb{E}[-d\,\nabla \log \pi] =
      \nabla_\theta \mathrm{KL}(\pi \| \pi_{\mathrm{ref}})`, the **reverse** KL's gradient;
    * :math:`k_3`: :math:`\mathbb{E}[(1 - e^{d})\nabla \log \pi] =
      -\mathbb{E}_{\pi_{\mathrm{ref}}}[\nabla \log \pi] =
      \nabla_\theta \mathrm{KL}(\pi_{\mathrm{ref}} \| \pi)`, the **forward** KL's gradient,
      although its value estimates the reverse KL;
    * ``"k1+"`` and ``"k3+"`` (verl's straight-through forms): the **value** of :math:`k_1`
      (resp. :math:`k_3`) and the **gradient** of :math:`k_2`,
      :math:`k_2 + \mathrm{sg}(k - k_2)`, so the value estimates the reverse KL without bias
      and the gradient is the reverse KL's (on-policy). The value is exactly :math:`k_1`'s
      (resp. :math:`k_3`'s), not a rounding of it.

    Numerics: :math:`k_3` is computed without the cancellation of the literal formula (a
    series for :math:`|d| < 1`, ``expm1(d) - d`` beyond), to a few ulps of its exact value
    for every :math:`d`, including tiny ones where ``expm1(d) - d`` loses all digits. Every
    estimator is exactly ``0.0`` where the two log-probabilities are equal (also where both
    are ``-inf``, with a zero gradient there); :math:`k_2` and :math:`k_3` are never
    negative; a NaN in either input gives NaN.

    Args:
      log_probs: ``(...)`` log-probabilities of the sampled tokens under the policy.
      ref_log_probs: the same tokens' log-probabilities under the reference, broadcastable to
        ``log_probs``.
      estimator: ``"k1"``, ``"k2"``, ``"k3"`` (default, as TRL's GRPO and verl's
        ``low_var_kl``), ``"k1+"`` or ``"k3+"``.

    Returns:
      Per-token estimates of ``log_probs``'s shape; float32 for half-precision inputs, else
      their dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> log_probs = jnp.array([-1.0, -2.0, -0.5])
      >>> ref_log_probs = jnp.array([-1.0, -1.5, -1.5])
      >>> jaxce.sampled_kl_divergence(log_probs, ref_log_probs)
      Array([0.    , 0.1487, 0.3679], dtype=float32)
      >>> jaxce.sampled_kl_divergence(log_probs, ref_log_probs, estimator="k1")
      Array([ 0. , -0.5,  1. ], dtype=float32)

      ``"k3+"``: the value of k3, the gradient of k2 (``log_probs - ref_log_probs``):

      >>> import jax
      >>> k3_plus = lambda x: jaxce.sampled_kl_divergence(x, ref_log_probs, estimator="k3+")
      >>> jax.grad(lambda x: k3_plus(x).sum())(log_probs) + 0.0  # + 0.0: no "-0."
      Array([ 0. , -0.5,  1. ], dtype=float32)

    References:
      J. Schulman, "Approximating KL Divergence", 2020,
      http://joschu.net/blog/kl-approx.html; Z. Shao et al., "DeepSeekMath" (GRPO), 2024,
      https://arxiv.org/abs/2402.03300.
    """
    _check_estimator(estimator, "estimator")
    lp = _checks.as_floating(log_probs, "log_probs")
    ref = _checks.as_floating(ref_log_probs, "ref_log_probs")
    dtype = _reduce.compute_dtype(lp.dtype, ref.dtype)
    ref = _checks.broadcastable(ref, "ref_log_probs", lp.shape, "one per token of `log_probs`")
    return kl_estimate(lp.astype(dtype), ref.astype(dtype), estimator)


def _per_token(x: Array, lay: _sequence.Layout, name: str) -> Array:
    """Per-token values: given per token, or per sequence and broadcast to its tokens."""
    if x.shape == lay.token_shape:
        return x
    if x.shape == lay.sequence_shape:
        return lay.to_tokens(x)
    per_sequence = "(..., num_segments)" if lay.packed else "the token shape minus its last axis"
    return _checks.broadcastable(
        x,
        name,
        lay.token_shape,
        f"one per token, or {lay.sequence_shape}: one per sequence, {per_sequence}",
    )


LossType: TypeAlias = Literal["clip", "cispo", "sapo"]
LOSS_TYPES: tuple[str, ...] = ("clip", "cispo", "sapo")
ImportanceSampling: TypeAlias = Literal["token", "sequence", "sequence_token"]
IMPORTANCE_SAMPLING: tuple[str, ...] = ("token", "sequence", "sequence_token")
ABOVE_ONE = _checks.Domain(1.0, math.inf, True, "> 1")


@overload
def policy_gradient_loss(
    log_probs: ArrayLike,
    old_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None = None,
    *,
    clip_epsilon: float | ArrayLike | None = 0.2,
    clip_epsilon_high: float | ArrayLike | None = None,
    importance_sampling: ImportanceSampling = "token",
    ref_log_probs: ArrayLike | None = None,
    kl_coef: float | ArrayLike = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Literal["token_mean", "sequence_mean", "sequence_sum", "none"] = "token_mean",
    max_length: int | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
    max_log_ratio: float | ArrayLike | None = 20.0,
    dual_clip: float | ArrayLike | None = None,
    ratio_cap: float | ArrayLike | None = None,
    loss_type: LossType = "clip",
    sapo_temperatures: tuple[float | ArrayLike, float | ArrayLike] = (1.0, 1.05),
    kl_importance_weighted: bool = False,
    token_weights: ArrayLike | None = None,
    return_sum_and_weight: Literal[False] = False,
) -> Array: ...


@overload
def policy_gradient_loss(
    log_probs: ArrayLike,
    old_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None = None,
    *,
    clip_epsilon: float | ArrayLike | None = 0.2,
    clip_epsilon_high: float | ArrayLike | None = None,
    importance_sampling: ImportanceSampling = "token",
    ref_log_probs: ArrayLike | None = None,
    kl_coef: float | ArrayLike = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Literal["sum_and_weight"],
    max_length: int | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
    max_log_ratio: float | ArrayLike | None = 20.0,
    dual_clip: float | ArrayLike | None = None,
    ratio_cap: float | ArrayLike | None = None,
    loss_type: LossType = "clip",
    sapo_temperatures: tuple[float | ArrayLike, float | ArrayLike] = (1.0, 1.05),
    kl_importance_weighted: bool = False,
    token_weights: ArrayLike | None = None,
    return_sum_and_weight: bool = False,
) -> tuple[Array, Array]: ...


@overload
def policy_gradient_loss(
    log_probs: ArrayLike,
    old_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None = None,
    *,
    clip_epsilon: float | ArrayLike | None = 0.2,
    clip_epsilon_high: float | ArrayLike | None = None,
    importance_sampling: ImportanceSampling = "token",
    ref_log_probs: ArrayLike | None = None,
    kl_coef: float | ArrayLike = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Aggregation = "token_mean",
    max_length: int | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
    max_log_ratio: float | ArrayLike | None = 20.0,
    dual_clip: float | ArrayLike | None = None,
    ratio_cap: float | ArrayLike | None = None,
    loss_type: LossType = "clip",
    sapo_temperatures: tuple[float | ArrayLike, float | ArrayLike] = (1.0, 1.05),
    kl_importance_weighted: bool = False,
    token_weights: ArrayLike | None = None,
    return_sum_and_weight: Literal[True],
) -> tuple[Array, Array]: ...


def policy_gradient_loss(
    log_probs: ArrayLike,
    old_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None = None,
    *,
    clip_epsilon: float | ArrayLike | None = 0.2,
    clip_epsilon_high: float | ArrayLike | None = None,
    importance_sampling: ImportanceSampling = "token",
    ref_log_probs: ArrayLike | None = None,
    kl_coef: float | ArrayLike = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Aggregation = "token_mean",
    max_length: int | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
    max_log_ratio: float | ArrayLike | None = 20.0,
    dual_clip: float | ArrayLike | None = None,
    ratio_cap: float | ArrayLike | None = None,
    loss_type: LossType = "clip",
    sapo_temperatures: tuple[float | ArrayLike, float | ArrayLike] = (1.0, 1.05),
    kl_importance_weighted: bool = False,
    token_weights: ArrayLike | None = None,
    return_sum_and_weight: bool = False,
) -> Array | tuple[Array, Array]:
    r"""The policy-gradient surrogates of PPO and the GRPO family (DAPO, GSPO, CISPO, SAPO).

    On the per-token log-probabilities of sampled tokens under the current policy
    (``log_probs``, differentiated) and under the policy that sampled them (``old_log_probs``,
    a constant: ``stop_gradient``), with advantages :math:`A_t`, the importance ratio is

    .. math::
      r_t = e^{c(\log\pi_t - \log\pi^{\mathrm{old}}_t)} \quad (\texttt{"token"}), \qquad
      r_t = e^{c(\bar\delta_s)},\
      \bar\delta_s = \frac{1}{|K_s|}\sum_{u \in K_s} (\log\pi_u - \log\pi^{\mathrm{old}}_u)
      \quad (\texttt{"sequence"}, \text{GSPO})

    (:math:`K_s` the kept tokens of :math:`t`'s sequence, :math:`c` the clamp to
    :math:`[-m, m]`, :math:`m` = ``max_log_ratio``, applied where the log-ratio enters the
    ``exp``: a token's own for ``"token"``, the sequence mean for the sequence levels, whose
    tokens are not clamped before the mean), or GSPO-token's
    :math:`r_t = \mathrm{sg}(e^{c(\bar\delta_s)})\, e^{\log\pi_t - \mathrm{sg}(\log\pi_t)}`
    (``"sequence_token"``: the sequence ratio's value with a per-token gradient, 0 for every
    token of a sequence whose mean is clamped). The per-token policy term
    :math:`\ell_t` depends on ``loss_type``:

    * ``"clip"`` (default; PPO, GRPO, DAPO, GSPO):
      :math:`\ell_t = -\min\big(\min(r_t, \delta) A_t,\
      \operatorname{clip}(r_t, 1 - \epsilon_{lo}, 1 + \epsilon_{hi}) A_t\big)` with
      :math:`\delta` = ``ratio_cap`` (TRL's two-sided ``delta``; :math:`\infty` by default);
      with ``dual_clip`` :math:`c_d > 1` (verl's ``clip_ratio_c``, Ye et al. 2020),
      :math:`\ell_t \leftarrow \min(-c_d A_t, \ell_t)` for :math:`A_t < 0`;
    * ``"cispo"`` (MiniMax-M1): :math:`\ell_t = -\mathrm{sg}(\min(r_t, 1 + \epsilon_{hi}))
      A_t \log\pi_t`, the clipped ratio a constant weight of the REINFORCE term (TRL's
      ``epsilon_high=5.0`` is ``clip_epsilon_high=4.0`` here; ``clip_epsilon=None``: no cap);
    * ``"sapo"`` (Qwen): :math:`\ell_t = -\frac{4}{\tau_t}\sigma(\tau_t (r_t - 1)) A_t`,
      :math:`\tau_t` = ``sapo_temperatures[0]`` where :math:`A_t > 0` and ``[1]`` elsewhere.

    The per-token loss is :math:`w_t \ell_t + \beta\, k_t (\cdot\, r_t)`: ``token_weights``
    :math:`w_t \ge 0` (constants: rollout importance weights, off-policy and entropy masks, as
    TRL multiplies them in) scale the policy term only; :math:`k_t` is the sampled KL estimator
    ``kl_estimator`` (:func:`sampled_kl_divergence`, its log-ratio clamped to :math:`[-m, m]`
    for the ``exp`` of ``"k3"``/``"k3+"``), :math:`\beta` = ``kl_coef``, and with
    ``kl_importance_weighted=True`` it is multiplied by :math:`r_t` (clamped, differentiated,
    not capped: TRL's ``use_bias_correction_kl``).

    The ``min`` of ``"clip"`` is taken of the two products, not of the ratios, so for a
    negative advantage the *lower* clip is the active one: the gradient vanishes where
    :math:`r_t A_t` is the larger product, i.e. :math:`r_t > 1 + \epsilon_{hi}` for
    :math:`A_t > 0` and :math:`r_t < 1 - \epsilon_{lo}` for :math:`A_t < 0`. At a tie (in
    particular :math:`r_t = 1`) the unclipped product is taken, so at ``log_probs ==
    old_log_probs`` every ``loss_type`` has exactly the REINFORCE gradient
    :math:`-A_t \nabla\log\pi_t` (times :math:`w_t` and the aggregation's weight, plus the KL
    term's).

    **Safe at any ratio.** For finite inputs the loss and every gradient are finite and never
    NaN (a log-ratio of 100 with the clamp off overflows: ``max_log_ratio=None`` restores the
    unclamped formula). Where the clamp, a clip, the cap or the dual clip is active the
    gradient through the ratio is exactly 0 (CISPO's clipped weight is a constant by design:
    its REINFORCE term keeps a gradient at every token). ``"cispo"``, ``"sequence_token"`` and
    the ``"k1+"``/``"k3+"`` estimators have, by design, gradients that are not their values'
    derivatives (a ``stop_gradient`` in the formula).

    ``aggregation`` (with :math:`M` the kept tokens of the batch, :math:`S` its sequences):

    * ``"token_mean"`` (default): :math:`\sum_{t \in M} \ell_t / |M|` (DAPO, BNPO; TRL's
      ``"bnpo"``, and ``"dapo"``/``"cispo"`` once the count is global: use
      ``return_sum_and_weight``);
    * ``"sequence_mean"``: :math:`\frac{1}{|S|}\sum_s \frac{1}{|K_s|}\sum_{t\in K_s}\ell_t`
      (GRPO; TRL's ``"grpo"`` and ``"sapo"``);
    * ``"sequence_sum"``: :math:`\sum_{t \in M} \ell_t / (|S| \cdot \texttt{max\_length})`
      (Dr. GRPO; TRL's ``"dr_grpo"`` with ``max_length = max_completion_length``);
      ``max_length`` is required (a ``ValueError`` otherwise): it is the generation limit, not
      the padded length of one batch, which would change the normaliser from batch to batch;
    * ``"none"``: :math:`\ell_t` per token, ``0.0`` on dropped tokens;
    * ``"sum_and_weight"``: the pair :math:`(\sum_{t \in M} \ell_t, |M|)` (``"token_mean"``'s).

    ``return_sum_and_weight=True`` returns any averaging aggregation as its (numerator,
    denominator) pair: ``"token_mean"`` :math:`(\sum \ell_t, |M|)`, ``"sequence_mean"``
    (the sum of the sequence means, :math:`|S|`), ``"sequence_sum"``
    :math:`(\sum \ell_t, |S| \cdot \texttt{max\_length})`. Summing both over micro-batches (or
    ``jax.lax.psum`` over devices) and dividing (:func:`weighted_mean`) gives exactly the full
    batch's loss.

    :math:`|S|` counts every row in the padded layout (a row with no kept token counts, as
    TRL's batch size does; its contribution is 0), and in the packed layout every segment id
    that occurs in its row (whether or not ``where`` keeps its tokens). A sequence with no
    kept token has token mean 0 and an empty batch gives 0, with zero gradients.

    **Layouts.** Padded: ``log_probs`` ``(..., T)``, one sequence per row, ``where`` the
    boolean completion mask. Packed: ``segment_ids`` ``(..., T)`` (``0`` = padding,
    ``1..num_segments`` = the sequences of the row) and a static ``num_segments``; ``where``
    may drop further tokens. The same sequences give the same loss in both layouts.
    ``advantages`` and ``token_weights`` are per sequence (padded: shape ``(...)``, as TRL's
    ``(B,)``; packed: ``(..., num_segments)``, entry ``j`` for segment id ``j + 1``) or per
    token (the token shape; when ``num_segments == T`` that shape is read as per token). Any
    other shape that broadcasts to the token shape is broadcast to it (e.g. TRL's ``(B, 1)``).

    Dropped tokens (``where`` False, segment id 0) are selected away before any arithmetic: a
    NaN or infinity there reaches neither the loss nor a gradient. A NaN in a kept token's
    inputs (or its sequence's advantage or weight) makes its loss NaN and every aggregation
    over it. A traced hyperparameter outside its domain makes the loss NaN.

    Args:
      log_probs: ``(..., T)`` per-token log-probabilities under the current policy.
      old_log_probs: ``(..., T)`` under the sampling policy (not differentiated).
      advantages: per sequence or per token, see above.
      where: optional boolean token mask ``(..., T)``.
      clip_epsilon: :math:`\epsilon_{lo} \ge 0` (default 0.2); ``None`` disables clipping
        (the surrogate is then :math:`-r_t A_t`; CISPO's weight is not capped).
      clip_epsilon_high: :math:`\epsilon_{hi} \ge 0`, DAPO's clip-higher (CISPO's cap is
        :math:`1 + \epsilon_{hi}`); ``None`` means :math:`\epsilon_{lo}`.
      importance_sampling: ``"token"`` (PPO, GRPO), ``"sequence"`` (GSPO) or
        ``"sequence_token"`` (GSPO-token).
      ref_log_probs: ``(..., T)`` under the reference policy, for the KL penalty.
      kl_coef: :math:`\beta \ge 0`; a non-zero value needs ``ref_log_probs``.
      kl_estimator: ``"k1"``, ``"k2"``, ``"k3"`` (default, as TRL), ``"k1+"`` or ``"k3+"``.
      aggregation: see above.
      max_length: static ``int >= 1``, the normaliser's length for ``"sequence_sum"``
        (unused by the other aggregations).
      segment_ids: optional ``(..., T)`` integer segment ids (packed layout).
      num_segments: static ``int >= 1`` with ``segment_ids``.
      max_log_ratio: :math:`m > 0` (default 20, verl's), the clamp of every log-ratio before
        its ``exp``; ``None`` turns it off.
      dual_clip: :math:`c_d > 1` or ``None`` (``loss_type="clip"`` only).
      ratio_cap: :math:`\delta > 1 + \epsilon_{hi}` or ``None`` (``loss_type="clip"`` only).
      loss_type: ``"clip"``, ``"cispo"`` or ``"sapo"``.
      sapo_temperatures: :math:`(\tau_+, \tau_-)`, both :math:`> 0` (default ``(1.0, 1.05)``,
        TRL's ``sapo_temperature_pos``/``_neg``).
      kl_importance_weighted: static bool, multiply the KL term by :math:`r_t`.
      token_weights: optional non-negative weights of the policy term, per token or per
        sequence (floating or boolean; not differentiated).
      return_sum_and_weight: static bool, return the (numerator, denominator) pair of an
        averaging aggregation.

    Returns:
      A scalar; ``(..., T)`` per-token losses for ``"none"``; a pair of scalars for
      ``"sum_and_weight"`` or ``return_sum_and_weight=True``. Float32 for half-precision
      inputs, else their dtype.

    Raises:
      ValueError: shapes, unknown options, a concrete hyperparameter outside its domain,
        ``"sequence_sum"`` without ``max_length``, a non-zero ``kl_coef`` without
        ``ref_log_probs``, ``clip_epsilon_high`` with ``clip_epsilon=None``, ``dual_clip`` or
        ``ratio_cap`` with another ``loss_type`` than ``"clip"``, ``return_sum_and_weight``
        with ``aggregation="none"``.

    Examples:
      Two completions of a GRPO group, one advantage each:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> log_probs = jnp.array([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
      >>> mask = jnp.array([[True, True, True], [True, True, False]])
      >>> advantages = jnp.array([1.0, -1.0])
      >>> old = log_probs  # the first step on fresh samples: ratio 1
      >>> float(jaxce.policy_gradient_loss(log_probs, old, advantages, mask))
      -0.2
      >>> jax.grad(jaxce.policy_gradient_loss)(log_probs, old, advantages, mask)
      Array([[-0.2, -0.2, -0.2],
             [ 0.2,  0.2,  0. ]], dtype=float32)

      A stale token (log-ratio 100) with a negative advantage: clamped, bounded by the dual
      clip, a zero gradient:

      >>> stale = old.at[1, 0].add(-100.0)
      >>> per_token = jaxce.policy_gradient_loss(
      ...     log_probs, stale, advantages, mask, dual_clip=3.0, aggregation="none")
      >>> per_token[1]
      Array([3., 1., 0.], dtype=float32)

    References:
      J. Schulman et al., "Proximal Policy Optimization Algorithms", 2017,
      https://arxiv.org/abs/1707.06347; Z. Shao et al., "DeepSeekMath" (GRPO), 2024,
      https://arxiv.org/abs/2402.03300; Q. Yu et al., "DAPO", 2025,
      https://arxiv.org/abs/2503.14476; Z. Liu et al., "Understanding R1-Zero-Like Training"
      (Dr. GRPO), 2025, https://arxiv.org/abs/2503.20783; C. Zheng et al., "Group Sequence
      Policy Optimization" (GSPO), 2025, https://arxiv.org/abs/2507.18071; D. Ye et al.,
      "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning" (dual clip),
      2020, https://arxiv.org/abs/1912.09729; MiniMax, "MiniMax-M1" (CISPO), 2025,
      https://arxiv.org/abs/2506.13585; C. Gao et al., "Soft Adaptive Policy Optimization"
      (SAPO), 2025, https://arxiv.org/abs/2511.20347.
    """
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(
            f"`importance_sampling` must be one of {IMPORTANCE_SAMPLING}, got "
            f"{importance_sampling!r}."
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"`loss_type` must be one of {LOSS_TYPES}, got {loss_type!r}.")
    _check_estimator(kl_estimator, "kl_estimator")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}.")
    max_length = _checks.static_option(max_length, "max_length")
    if aggregation == "sequence_sum" and max_length is None:
        raise ValueError(
            "`aggregation='sequence_sum'` (Dr. GRPO) needs `max_length`: the generation limit "
            "(TRL's `max_completion_length`) that the normaliser multiplies by."
        )
    if max_length is not None and (not _checks.is_int(max_length) or max_length < 1):
        raise ValueError(f"`max_length` must be an int >= 1, got {max_length!r}.")
    if clip_epsilon is None and clip_epsilon_high is not None:
        raise ValueError(
            "`clip_epsilon_high` is given but `clip_epsilon=None` disables clipping; pass both "
            "bounds to clip."
        )
    if ref_log_probs is None and not _checks.is_off(kl_coef):
        raise ValueError(
            "`kl_coef` is non-zero (or traced) but `ref_log_probs` is not given: the KL penalty "
            "needs the reference policy's log-probabilities."
        )
    for name, value in (("dual_clip", dual_clip), ("ratio_cap", ratio_cap)):
        if value is not None and loss_type != "clip":
            raise ValueError(
                f"`{name}` bounds the clipped surrogate (`loss_type='clip'`), got "
                f"`loss_type={loss_type!r}`."
            )
    _check_ratio_cap(ratio_cap, clip_epsilon, clip_epsilon_high)
    _check_concrete_weights(token_weights, "token_weights")
    if not isinstance(sapo_temperatures, (tuple, list)) or len(sapo_temperatures) != 2:
        raise ValueError(
            "`sapo_temperatures` must be a pair (positive advantages, the others), got "
            f"{sapo_temperatures!r}."
        )
    if return_sum_and_weight and aggregation == "none":
        raise ValueError(
            "`return_sum_and_weight=True` needs an averaging `aggregation` (not 'none')."
        )
    return _policy_gradient_loss(
        log_probs,
        old_log_probs,
        advantages,
        where,
        clip_epsilon=clip_epsilon,
        clip_epsilon_high=clip_epsilon_high,
        importance_sampling=importance_sampling,
        ref_log_probs=ref_log_probs,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        aggregation=aggregation,
        max_length=max_length,
        segment_ids=segment_ids,
        num_segments=num_segments,
        max_log_ratio=max_log_ratio,
        dual_clip=dual_clip,
        ratio_cap=ratio_cap,
        loss_type=loss_type,
        sapo_temperatures=(sapo_temperatures[0], sapo_temperatures[1]),
        kl_importance_weighted=bool(kl_importance_weighted),
        token_weights=token_weights,
        return_sum_and_weight=bool(return_sum_and_weight),
    )


def _is_concrete(value) -> bool:
    return value is not None and not isinstance(value, jax.Array)


def _check_concrete_weights(weights, name: str) -> None:
    """A concrete (NumPy or Python) weight below 0 raises; NaN is data and stays NaN."""
    if weights is None or isinstance(weights, jax.Array):
        return
    values = np.asarray(weights)
    if values.dtype != np.bool_ and np.any(values < 0):
        raise ValueError(f"`{name}` must be >= 0, got a minimum of {np.nanmin(values)}.")


def _check_ratio_cap(ratio_cap, clip_epsilon, clip_epsilon_high) -> None:
    """A concrete ``ratio_cap`` must exceed ``1 + eps_high`` (else it caps inside the clip)."""
    if not _is_concrete(ratio_cap):
        return
    _checks.check_concrete_domain(ratio_cap, "ratio_cap", ABOVE_ONE)
    high = clip_epsilon if clip_epsilon_high is None else clip_epsilon_high
    if _is_concrete(high) and not float(ratio_cap) > 1 + float(high):  # type: ignore[arg-type]
        raise ValueError(
            f"`ratio_cap` must be > 1 + clip_epsilon_high = {1 + float(high)}, got "  # type: ignore[arg-type]
            f"{ratio_cap!r}."
        )


def _ratio(
    lp: Array, old: Array, lay: _sequence.Layout, level: str, bound: Array | None, dtype
) -> Array:
    """The importance ratio per token (0 or 1 on dropped tokens; the loss masks them)."""
    log_ratio = lp - old
    if level == "token":
        return jnp.exp(clamp(log_ratio, bound))
    mean = _reduce.divide_or(lay.sums(log_ratio), lay.counts(dtype), 0.0)
    sequence_ratio = lay.to_tokens(jnp.exp(clamp(mean, bound)))
    if level == "sequence":
        return sequence_ratio
    # GSPO-token: the sequence ratio's value, each token's own gradient (none where clamped).
    live = lay.to_tokens(clamp(mean, bound) == mean) if bound is not None else lay.keep
    own = jnp.where(live, lp - jax.lax.stop_gradient(lp), jnp.zeros((), dtype))
    return jax.lax.stop_gradient(sequence_ratio) * jnp.exp(own)


def _policy_term(
    ratio: Array,
    lp: Array,
    adv: Array,
    *,
    loss_type: str,
    low: Array | None,
    high: Array | None,
    dual: Array | None,
    cap: Array | None,
    temperatures: tuple[Array, ...] | None,
) -> Array:
    """The per-token policy loss ``l_t`` of ``loss_type``."""
    if loss_type == "cispo":
        weight = ratio if high is None else jnp.minimum(ratio, 1 + high)
        return -jax.lax.stop_gradient(weight) * adv * lp
    if loss_type == "sapo":
        assert temperatures is not None
        tau = jnp.where(adv > 0, temperatures[0], temperatures[1])
        return -jax.nn.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    unclipped = ratio if cap is None else jnp.minimum(ratio, cap)
    surrogate = unclipped * adv
    if low is not None and high is not None:
        clipped = jnp.clip(ratio, 1 - low, 1 + high) * adv
        # The smaller product; a tie takes the unclipped one (its gradient is REINFORCE's).
        # NaN bounds (a traced epsilon out of its domain) give NaN through ``clipped``.
        surrogate = jnp.where(surrogate <= clipped, surrogate, clipped)
    loss = -surrogate
    if dual is not None:
        bounded = -dual * adv
        loss = jnp.where((adv < 0) & (bounded < loss), bounded, loss)
    # A NaN bound (traced, out of its domain) loses to the comparisons above: put it back.
    for bound in (cap, dual):
        if bound is not None:
            loss = jnp.where(jnp.isnan(bound), jnp.full((), jnp.nan, loss.dtype), loss)
    return loss


@_api.public(
    static=(
        "importance_sampling",
        "kl_estimator",
        "aggregation",
        "max_length",
        "num_segments",
        "loss_type",
        "kl_importance_weighted",
        "return_sum_and_weight",
    ),
    optional=("kl_coef",),
    domains={
        "clip_epsilon": NON_NEGATIVE,
        "clip_epsilon_high": NON_NEGATIVE,
        "kl_coef": NON_NEGATIVE,
        "max_log_ratio": POSITIVE,
        "dual_clip": ABOVE_ONE,
        "ratio_cap": ABOVE_ONE,
        "sapo_temperatures": POSITIVE,
    },
)
def _policy_gradient_loss(
    log_probs: ArrayLike,
    old_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None,
    *,
    clip_epsilon: float | ArrayLike | None,
    clip_epsilon_high: float | ArrayLike | None,
    importance_sampling: str,
    ref_log_probs: ArrayLike | None,
    kl_coef: float | ArrayLike | None,
    kl_estimator: str,
    aggregation: str,
    max_length: int | None,
    segment_ids: ArrayLike | None,
    num_segments: int | None,
    max_log_ratio: float | ArrayLike | None,
    dual_clip: float | ArrayLike | None,
    ratio_cap: float | ArrayLike | None,
    loss_type: str,
    sapo_temperatures: tuple[float | ArrayLike, float | ArrayLike],
    kl_importance_weighted: bool,
    token_weights: ArrayLike | None,
    return_sum_and_weight: bool,
) -> Array | tuple[Array, Array]:
    lp = _checks.as_floating(log_probs, "log_probs")
    old = _checks.as_floating(old_log_probs, "old_log_probs")
    adv = _checks.as_floating(advantages, "advantages")
    ref = None if ref_log_probs is None else _checks.as_floating(ref_log_probs, "ref_log_probs")
    tw = None if token_weights is None else _checks.as_weights(token_weights, "token_weights")
    dtypes = [x.dtype for x in (lp, old, adv, ref) if x is not None]
    if tw is not None and tw.dtype != jnp.bool_:
        dtypes.append(tw.dtype)
    dtype = _reduce.compute_dtype(*dtypes)
    lay = _sequence.layout(lp.shape, where, segment_ids, num_segments, "log_probs")
    _checks.same_shape(old, "old_log_probs", lp.shape, "one per token of `log_probs`")
    if ref is not None:
        _checks.same_shape(ref, "ref_log_probs", lp.shape, "one per token of `log_probs`")

    def hyper(value, name, domain):
        return None if value is None else _checks.nan_outside_domain(value, name, dtype, domain)

    bound = hyper(max_log_ratio, "max_log_ratio", POSITIVE)
    low = hyper(clip_epsilon, "clip_epsilon", NON_NEGATIVE)
    high = (
        low
        if clip_epsilon_high is None
        else hyper(clip_epsilon_high, "clip_epsilon_high", NON_NEGATIVE)
    )
    cap = hyper(ratio_cap, "ratio_cap", ABOVE_ONE)
    if cap is not None and high is not None:
        cap = jnp.where(cap > 1 + high, cap, jnp.full((), jnp.nan, dtype))
    temperatures = None
    if loss_type == "sapo":
        temperatures = tuple(
            _checks.nan_outside_domain(t, "sapo_temperatures", dtype, POSITIVE)
            for t in sapo_temperatures
        )

    # Dropped tokens are replaced before any arithmetic (the double-where trick).
    lp = lay.masked(lp.astype(dtype))
    old = lay.masked(jax.lax.stop_gradient(old.astype(dtype)))
    adv = lay.masked(_per_token(adv.astype(dtype), lay, "advantages"))

    ratio = _ratio(lp, old, lay, importance_sampling, bound, dtype)
    loss = _policy_term(
        ratio,
        lp,
        adv,
        loss_type=loss_type,
        low=low,
        high=high,
        dual=hyper(dual_clip, "dual_clip", ABOVE_ONE),
        cap=cap,
        temperatures=temperatures,
    )
    if tw is not None:
        weights = _per_token(jax.lax.stop_gradient(tw.astype(dtype)), lay, "token_weights")
        negative = weights < 0  # NaN weights stay NaN (data, not a bad hyperparameter)
        _checks.value_check(~jnp.any(negative), "`token_weights` must be >= 0.")
        weights = jnp.where(negative, jnp.full((), jnp.nan, dtype), weights)
        loss = loss * lay.masked(weights)
    if ref is not None and kl_coef is not None:
        coef = _checks.nan_outside_domain(kl_coef, "kl_coef", dtype, NON_NEGATIVE)
        ref = lay.masked(ref.astype(dtype))
        kl = kl_estimate(lp, ref, kl_estimator, bound)
        if kl_importance_weighted:
            kl = kl * ratio
        loss = loss + coef * kl
    loss = lay.masked(loss)
    return _aggregate(loss, lay, aggregation, max_length, return_sum_and_weight, dtype)


def _aggregate(
    loss: Array,
    lay: _sequence.Layout,
    aggregation: str,
    max_length: int | None,
    pair: bool,
    dtype,
) -> Array | tuple[Array, Array]:
    """The aggregation's value, or its (numerator, denominator) pair."""
    if aggregation == "none":
        return loss
    if aggregation in ("token_mean", "sum_and_weight"):
        total = jnp.sum(loss)
        count = jnp.sum(lay.keep).astype(dtype)
        pair = pair or aggregation == "sum_and_weight"
    elif aggregation == "sequence_mean":
        total = jnp.sum(_reduce.divide_or(lay.sums(loss), lay.counts(dtype), 0.0))
        count = lay.num_sequences(dtype)
    else:
        assert aggregation == "sequence_sum" and max_length is not None
        total = jnp.sum(loss)
        count = lay.num_sequences(dtype) * max_length
    if pair:
        return total, count
    return _reduce.divide_or(total, count, 0.0)


# ------------------------------------------------------------- rollout corrections and masks

RolloutLevel: TypeAlias = Literal["token", "sequence"]
RolloutMode: TypeAlias = Literal["truncate", "mask"]


def rollout_importance_weights(
    old_log_probs: ArrayLike,
    rollout_log_probs: ArrayLike,
    where: ArrayLike | None = None,
    *,
    level: RolloutLevel = "sequence",
    mode: RolloutMode = "mask",
    bounds: tuple[float | ArrayLike | None, float | ArrayLike | None] = (None, 3.0),
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> Array:
    r"""Importance weights that correct for an inference engine's sampling log-probabilities.

    The tokens were sampled by an engine (vLLM, SGLang) whose log-probabilities
    ``rollout_log_probs`` differ from the trainer's ``old_log_probs`` for the same policy
    (kernels, precision, quantisation). The weight of a token is

    .. math::
      \log\rho_t = \log\pi^{\mathrm{old}}_t - \log\pi^{\mathrm{rollout}}_t
      \quad (\texttt{"token"}), \qquad
      \log\rho_t = \sum_{u \in K_s} (\log\pi^{\mathrm{old}}_u - \log\pi^{\mathrm{rollout}}_u)
      \quad (\texttt{"sequence"})

    (the sequence's **sum** of kept log-ratios broadcast to its tokens, as TRL), then with
    ``bounds`` :math:`(lo, hi)` (``None`` = unbounded): ``mode="truncate"`` (TIS)
    :math:`\operatorname{clip}(\rho_t, lo, hi)`; ``mode="mask"`` (MIS) :math:`\rho_t` where
    :math:`lo \le \rho_t \le hi`, else 0. TRL's ``vllm_importance_sampling_mode``
    ``"sequence_mask"`` (its default, cap 3.0) is ``level="sequence", mode="mask",
    bounds=(None, 3.0)`` (these defaults); ``vllm_importance_sampling_clip_min/max`` are
    ``bounds``. Pass the result as ``token_weights`` of :func:`policy_gradient_loss`: it
    multiplies the policy term only, as TRL's.

    Computed in log space: a sequence log-ratio of 1e4 gives weight 0 or ``hi``, never inf
    or NaN (with ``hi=None`` the weight is :math:`e^{\log\rho}` itself, which overflows to
    inf beyond the dtype's range, as the formula). Weights are constants under ``grad``
    (both inputs are ``stop_gradient``-ed). Dropped tokens (``where`` False, segment id 0)
    get weight 0 and do not enter the sequence sum; a NaN in a kept token makes its weight
    (``"token"``) or its sequence's weights (``"sequence"``) NaN.

    Args:
      old_log_probs: ``(..., T)`` the trainer's log-probabilities of the sampled tokens under
        the sampling policy.
      rollout_log_probs: ``(..., T)`` the engine's log-probabilities of the same tokens.
      where: optional boolean token mask ``(..., T)``.
      level: ``"sequence"`` (default) or ``"token"``.
      mode: ``"mask"`` (default) or ``"truncate"``.
      bounds: ``(lo, hi)``, ``0 <= lo <= hi``, ``hi > 0``, either ``None``.
      segment_ids: optional ``(..., T)`` segment ids (packed layout, as
        :func:`sequence_reduce`).
      num_segments: static ``int >= 1`` with ``segment_ids``.

    Returns:
      ``(..., T)`` weights, 0 on dropped tokens; float32 for half-precision inputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> old = jnp.array([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]])
      >>> rollout = jnp.array([[-1.1, -0.6, -2.0], [-0.3, -3.0, -0.7]])
      >>> jaxce.rollout_importance_weights(old, rollout)  # second sequence: rho = e^1.8
      Array([[1.2214, 1.2214, 1.2214],
             [0.    , 0.    , 0.    ]], dtype=float32)
      >>> jaxce.rollout_importance_weights(old, rollout, level="token", mode="truncate")
      Array([[1.1052, 1.1052, 1.    ],
             [1.    , 3.    , 1.    ]], dtype=float32)

    References:
      F. Yao et al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL
      Training" (TIS), 2025, https://fengyao.notion.site/off-policy-rl; TRL's ``GRPOConfig``
      (``vllm_importance_sampling_*``).
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"`level` must be 'token' or 'sequence', got {level!r}.")
    if mode not in ("truncate", "mask"):
        raise ValueError(f"`mode` must be 'truncate' or 'mask', got {mode!r}.")
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(
            f"`bounds` must be a pair (lo, hi), each None or a number, got {bounds!r}."
        )
    lo, hi = bounds
    _checks.check_concrete_domain(lo, "bounds", NON_NEGATIVE)
    _checks.check_concrete_domain(hi, "bounds", POSITIVE)
    if _is_concrete(lo) and _is_concrete(hi) and not float(lo) <= float(hi):  # type: ignore[arg-type]
        raise ValueError(f"`bounds` must have lo <= hi, got {bounds!r}.")
    return _rollout_importance_weights(
        old_log_probs,
        rollout_log_probs,
        where,
        level=level,
        mode=mode,
        bounds=(lo, hi),
        segment_ids=segment_ids,
        num_segments=num_segments,
    )


@_api.public(static=("level", "mode", "num_segments"))
def _rollout_importance_weights(
    old_log_probs: ArrayLike,
    rollout_log_probs: ArrayLike,
    where: ArrayLike | None,
    *,
    level: str,
    mode: str,
    bounds: tuple,
    segment_ids: ArrayLike | None,
    num_segments: int | None,
) -> Array:
    old = _checks.as_floating(old_log_probs, "old_log_probs")
    rollout = _checks.as_floating(rollout_log_probs, "rollout_log_probs")
    dtype = _reduce.compute_dtype(old.dtype, rollout.dtype)
    lay = _sequence.layout(old.shape, where, segment_ids, num_segments, "old_log_probs")
    _checks.same_shape(rollout, "rollout_log_probs", old.shape, "one per token")
    diff = lay.masked(
        jax.lax.stop_gradient(old.astype(dtype)) - jax.lax.stop_gradient(rollout.astype(dtype))
    )
    log_rho = diff if level == "token" else lay.to_tokens(lay.sums(diff))
    nan = jnp.full((), jnp.nan, dtype)
    log_lo = log_hi = None
    if bounds[0] is not None:
        log_lo = jnp.log(_checks.nan_outside_domain(bounds[0], "bounds", dtype, NON_NEGATIVE))
    if bounds[1] is not None:
        log_hi = jnp.log(_checks.nan_outside_domain(bounds[1], "bounds", dtype, POSITIVE))
    if mode == "truncate":
        clipped = log_rho
        if log_lo is not None:
            clipped = jnp.maximum(clipped, log_lo)
        if log_hi is not None:
            clipped = jnp.minimum(clipped, log_hi)
        weights = jnp.exp(clipped)
    else:
        inside = ~jnp.isnan(log_rho)
        bad_bounds = jnp.zeros((), bool)
        if log_lo is not None:
            inside &= log_rho >= log_lo
            bad_bounds |= jnp.isnan(log_lo)
        if log_hi is not None:
            inside &= log_rho <= log_hi
            bad_bounds |= jnp.isnan(log_hi)
        zero = jnp.zeros((), dtype)
        weights = jnp.where(inside, jnp.exp(jnp.where(inside, log_rho, zero)), zero)
        weights = jnp.where(jnp.isnan(log_rho) | bad_bounds, nan, weights)
    return lay.masked(weights)


@_api.public(static=("num_segments",))
def off_policy_sequence_mask(
    log_probs: ArrayLike,
    rollout_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None = None,
    *,
    threshold: float | ArrayLike,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> Array:
    r"""DeepSeek-V3.2's off-policy sequence mask (TRL's ``off_policy_mask_threshold``).

    Drops a sequence whose advantage is negative **and** whose policy has drifted too far
    from the samples: with :math:`K_s` its kept tokens,

    .. math::
      \mathrm{keep}_s = (A_s \ge 0) \lor \Big(\frac{1}{|K_s|} \sum_{t \in K_s}
      \big(\log\pi^{\mathrm{rollout}}_t - \mathrm{sg}(\log\pi_t)\big) \le \texttt{threshold}\Big)

    (the mean, 0 for a sequence with no kept token, is a sampled estimate of
    :math:`\mathrm{KL}(\pi^{\mathrm{rollout}} \| \pi)`). ``rollout_log_probs`` are the
    sampler's log-probabilities (TRL uses the engine's, or ``old_log_probs`` without one).
    Pass the result as (a factor of) ``token_weights`` of :func:`policy_gradient_loss`.

    ``advantages`` are per sequence (padded ``(...)``, packed ``(..., num_segments)``) or per
    token (then the sign test is per token, as TRL's for ``(B, T)`` advantages). The
    comparisons are TRL's: a NaN statistic or advantage is neither ``>= 0`` nor ``<=
    threshold``, so it drops the token.

    Args:
      log_probs: ``(..., T)`` the current policy's log-probabilities (not differentiated).
      rollout_log_probs: ``(..., T)`` the sampler's.
      advantages: per sequence or per token.
      where: optional boolean token mask ``(..., T)``.
      threshold: the KL threshold :math:`\delta` (a float, may be traced).
      segment_ids: optional ``(..., T)`` segment ids (packed layout).
      num_segments: static ``int >= 1`` with ``segment_ids``.

    Returns:
      ``(..., T)`` boolean, ``False`` on dropped tokens.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> log_probs = jnp.array([[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]])
      >>> rollout = jnp.array([[-0.5, -1.5], [-0.5, -1.5], [-1.0, -2.0]])
      >>> jaxce.off_policy_sequence_mask(
      ...     log_probs, rollout, jnp.array([1.0, -1.0, -1.0]), threshold=0.1)
      Array([[ True,  True],
             [False, False],
             [ True,  True]], dtype=bool)

    References:
      DeepSeek-AI, "DeepSeek-V3.2", 2025, https://arxiv.org/abs/2512.02556.
    """
    lp = _checks.as_floating(log_probs, "log_probs")
    rollout = _checks.as_floating(rollout_log_probs, "rollout_log_probs")
    adv = _checks.as_floating(advantages, "advantages")
    dtype = _reduce.compute_dtype(lp.dtype, rollout.dtype, adv.dtype)
    lay = _sequence.layout(lp.shape, where, segment_ids, num_segments, "log_probs")
    _checks.same_shape(rollout, "rollout_log_probs", lp.shape, "one per token of `log_probs`")
    drift = lay.masked(
        jax.lax.stop_gradient(rollout.astype(dtype)) - jax.lax.stop_gradient(lp.astype(dtype))
    )
    mean = lay.to_tokens(_reduce.divide_or(lay.sums(drift), lay.counts(dtype), 0.0))
    adv = _per_token(jax.lax.stop_gradient(adv.astype(dtype)), lay, "advantages")
    limit = _checks.as_hyperparameter(threshold, "threshold", dtype)
    return lay.keep & ((adv >= 0) | (mean <= limit))


@_api.public(static=("axis_name",), domains={"fraction": UNIT_INTERVAL})
def top_entropy_mask(
    entropy: ArrayLike,
    where: ArrayLike | None = None,
    *,
    fraction: float | ArrayLike,
    axis_name: str | tuple[str, ...] | None = None,
) -> Array:
    r"""The high-entropy "forking" tokens: the top ``fraction`` of the kept tokens by entropy.

    Keeps the tokens whose ``entropy`` is ``>=`` the :math:`(1 - \texttt{fraction})` quantile
    of the kept tokens' entropies (linear interpolation, as ``numpy.quantile``'s default):
    "Beyond the 80/20 rule" trains on the top 20% (``fraction=0.2``), TRL's
    ``top_entropy_quantile``. ``fraction=1`` keeps every kept token, ``fraction=0`` those at
    the maximum.

    The quantile is **global**: over the whole array (under ``jit`` on a mesh, with the
    array sharded over the batch, and for a global ``jax.Array`` spanning processes, the
    partitioner gathers what it needs); inside ``shard_map`` pass ``axis_name`` (a name or a
    tuple of names): the kept entropies are gathered over it (``all_gather``) and the
    quantile is taken over every device's tokens, as TRL gathers over processes. Under
    ``vmap`` each mapped slice has its own quantile.

    The mask is a constant under ``grad``. No kept token gives all ``False``; a NaN among the
    kept entropies makes the quantile NaN (as ``numpy.quantile``) and the mask all
    ``False``, as does a traced ``fraction`` outside ``[0, 1]`` (a concrete one raises).
    Positions are computed in the entropy's float dtype (float32 for half precision), so for
    millions of tokens the interpolation weight is rounded to about ``1e-7 * count``.

    Args:
      entropy: ``(...)`` per-token entropies (e.g. from ``linear_log_probs(...,
        return_entropy=True)``).
      where: optional boolean mask of the same shape, the tokens that count.
      fraction: in ``[0, 1]``, the share of the kept tokens to keep (may be traced).
      axis_name: the ``shard_map`` axis (or axes) the tokens are sharded over.

    Returns:
      A boolean mask of ``entropy``'s shape, ``False`` on dropped tokens.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> entropy = jnp.array([[0.1, 2.0, 0.5, 1.5], [0.3, 0.0, 3.0, 9.0]])
      >>> mask = jnp.array([[True, True, True, True], [True, True, True, False]])
      >>> jaxce.top_entropy_mask(entropy, mask, fraction=0.5)  # the median of 7 is 0.5
      Array([[False,  True,  True,  True],
             [False, False,  True, False]], dtype=bool)

    References:
      S. Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
      Reinforcement Learning for LLM Reasoning", 2025, https://arxiv.org/abs/2506.01939.
    """
    h = _reduce.upcast(_checks.as_floating(entropy, "entropy"))
    h = jax.lax.stop_gradient(h)
    keep = jnp.ones(h.shape, bool)
    if where is not None:
        keep = _checks.as_mask(where, "where")
        _checks.same_shape(keep, "where", h.shape, "a mask of `entropy`")
    level = 1 - _checks.nan_outside_domain(fraction, "fraction", h.dtype, UNIT_INTERVAL)
    kept = jnp.where(keep, h, jnp.full((), jnp.inf, h.dtype)).reshape(-1)
    count = jnp.sum(keep, dtype=jnp.int32)
    if axis_name is not None:
        kept = jax.lax.all_gather(kept, axis_name, tiled=True)
        count = jax.lax.psum(count, axis_name)
    threshold = _kept_quantile(kept, count, level)
    return keep & (h >= threshold) & (count > 0)


def _kept_quantile(values: Array, count: Array, level: Array) -> Array:
    """``numpy.quantile(kept, level)`` (linear) of the ``count`` kept ``values`` (the others
    are ``+inf``, sorted after them); NaN if a kept value is NaN.
    """
    if values.size == 0:  # no token at all: nothing is kept
        return jnp.full((), jnp.inf, values.dtype)
    ordered = jnp.sort(_reduce.replicated(values))  # a sort needs its whole axis
    last = jnp.maximum(count - 1, 0)
    position = level * last.astype(values.dtype)
    below = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, last)
    above = jnp.minimum(below + 1, last)
    weight = position - below.astype(values.dtype)
    a, b = ordered[below], ordered[above]
    interpolated = jnp.where((weight == 0) | (a == b), a, a + (b - a) * weight)
    return jnp.where(jnp.any(jnp.isnan(values)), jnp.full((), jnp.nan, values.dtype), interpolated)

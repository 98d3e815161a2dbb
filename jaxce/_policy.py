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

from jaxce import _api, _checks, _reduce, _sequence
from jaxce._checks import NON_NEGATIVE

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike

KLEstimator: TypeAlias = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
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


def kl_estimate(log_probs: Array, ref_log_probs: Array, estimator: str) -> Array:
    """The per-token estimator on arrays of one dtype and shape (no checks)."""
    both_inf = (log_probs == ref_log_probs) & jnp.isinf(log_probs)
    zero = jnp.zeros((), log_probs.dtype)
    lp = jnp.where(both_inf, zero, log_probs)
    ref = jnp.where(both_inf, zero, ref_log_probs)
    if estimator == "k1":
        return lp - ref
    d = ref - lp
    if estimator == "k2":
        return d * d / 2
    if estimator == "k3":
        return _exp_minus_one_minus(d)
    raise ValueError(f"`estimator` must be one of {KL_ESTIMATORS}, got {estimator!r}.")


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
      although its value estimates the reverse KL.

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
      estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (default, as TRL's GRPO and verl's
        ``low_var_kl``).

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


def _advantages_to_tokens(adv: Array, lay: _sequence.Layout) -> Array:
    """Per-token advantages: given per token, or per sequence and broadcast to its tokens."""
    if adv.shape == lay.token_shape:
        return adv
    if adv.shape == lay.sequence_shape:
        return lay.to_tokens(adv)
    per_sequence = "(..., num_segments)" if lay.packed else "the token shape minus its last axis"
    return _checks.broadcastable(
        adv,
        "advantages",
        lay.token_shape,
        f"one per token, or {lay.sequence_shape}: one per sequence, {per_sequence}",
    )


@overload
def policy_gradient_loss(
    log_probs: ArrayLike,
    old_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None = None,
    *,
    clip_epsilon: float | ArrayLike | None = 0.2,
    clip_epsilon_high: float | ArrayLike | None = None,
    importance_sampling: Literal["token", "sequence"] = "token",
    ref_log_probs: ArrayLike | None = None,
    kl_coef: float | ArrayLike = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Literal["token_mean", "sequence_mean", "sequence_sum", "none"] = "token_mean",
    max_length: int | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
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
    importance_sampling: Literal["token", "sequence"] = "token",
    ref_log_probs: ArrayLike | None = None,
    kl_coef: float | ArrayLike = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Literal["sum_and_weight"],
    max_length: int | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> tuple[Array, Array]: ...


def policy_gradient_loss(
    log_probs: ArrayLike,
    old_log_probs: ArrayLike,
    advantages: ArrayLike,
    where: ArrayLike | None = None,
    *,
    clip_epsilon: float | ArrayLike | None = 0.2,
    clip_epsilon_high: float | ArrayLike | None = None,
    importance_sampling: Literal["token", "sequence"] = "token",
    ref_log_probs: ArrayLike | None = None,
    kl_coef: float | ArrayLike = 0.0,
    kl_estimator: KLEstimator = "k3",
    aggregation: Aggregation = "token_mean",
    max_length: int | None = None,
    segment_ids: ArrayLike | None = None,
    num_segments: int | None = None,
) -> Array | tuple[Array, Array]:
    r"""The clipped policy-gradient surrogate of PPO and the GRPO family (DAPO, GSPO and others).

    On the per-token log-probabilities of sampled tokens under the current policy
    (``log_probs``, differentiated) and under the policy that sampled them (``old_log_probs``,
    a constant: ``stop_gradient``), with advantages :math:`A_t`, the importance ratio is

    .. math::
      r_t = \exp(\log\pi_t - \log\pi^{\mathrm{old}}_t) \quad (\texttt{"token"}), \qquad
      r_t = \exp\Big(\frac{1}{|K_s|}\sum_{u \in K_s} (\log\pi_u - \log\pi^{\mathrm{old}}_u)\Big)
      \quad (\texttt{"sequence"}, \text{GSPO})

    (:math:`K_s` the kept tokens of :math:`t`'s sequence), and the per-token loss

    .. math::
      \ell_t = -\min\big(r_t A_t,\ \operatorname{clip}(r_t, 1 - \epsilon_{lo}, 1 + \epsilon_{hi})
      A_t\big) + \beta\, k(\log\pi_t, \log\pi^{\mathrm{ref}}_t)

    with :math:`k` the sampled KL estimator ``kl_estimator`` (see
    :func:`sampled_kl_divergence`) and :math:`\beta` = ``kl_coef``. The ``min`` is taken of
    the two products, not of the ratios, so for a negative advantage the *lower* clip is the
    active one (the "sign-flipped clip" that some implementations get wrong): the gradient
    vanishes where :math:`r_t A_t` is the larger product, i.e. :math:`r_t > 1 + \epsilon_{hi}`
    for :math:`A_t > 0` and :math:`r_t < 1 - \epsilon_{lo}` for :math:`A_t < 0`. At a tie
    (in particular :math:`r_t = 1`) the unclipped product is taken, so at
    ``log_probs == old_log_probs`` the gradient is exactly the REINFORCE gradient
    :math:`-A_t \nabla\log\pi_t` (times the aggregation's weight, plus the KL term's).

    ``aggregation`` (with :math:`M` the kept tokens of the batch, :math:`S` its sequences):

    * ``"token_mean"`` (default): :math:`\sum_{t \in M} \ell_t / |M|` (DAPO, BNPO; TRL's
      ``"bnpo"``, and ``"dapo"`` once the count is global: use ``"sum_and_weight"``);
    * ``"sequence_mean"``: :math:`\frac{1}{|S|}\sum_s \frac{1}{|K_s|}\sum_{t\in K_s}\ell_t`
      (GRPO; TRL's ``"grpo"``);
    * ``"sequence_sum"``: :math:`\sum_{t \in M} \ell_t / (|S| \cdot \texttt{max\_length})`
      (Dr. GRPO; TRL's ``"dr_grpo"`` with ``max_length = max_completion_length``);
      ``max_length`` is required (a ``ValueError`` otherwise): it is the generation limit, not
      the padded length of one batch, which would change the normaliser from batch to batch;
    * ``"none"``: :math:`\ell_t` per token, ``0.0`` on dropped tokens;
    * ``"sum_and_weight"``: the pair :math:`(\sum_{t \in M} \ell_t, |M|)`. Summing both over
      micro-batches (or ``jax.lax.psum`` over devices) and dividing
      (:func:`weighted_mean`) gives exactly the full batch's ``"token_mean"``.

    :math:`|S|` counts every row in the padded layout (a row with no kept token counts, as
    TRL's batch size does; its contribution is 0), and in the packed layout every segment id
    that occurs in its row (whether or not ``where`` keeps its tokens). A sequence with no
    kept token has token mean 0 and an empty batch gives 0, with zero gradients.

    **Layouts.** Padded: ``log_probs`` ``(..., T)``, one sequence per row, ``where`` the
    boolean completion mask. Packed: ``segment_ids`` ``(..., T)`` (``0`` = padding,
    ``1..num_segments`` = the sequences of the row) and a static ``num_segments``; ``where``
    may drop further tokens. The same sequences give the same loss in both layouts.
    ``advantages`` are per sequence (padded: shape ``(...)``, as TRL's ``(B,)``; packed:
    ``(..., num_segments)``, entry ``j`` for segment id ``j + 1``) or per token (the token
    shape; when ``num_segments == T`` that shape is read as per token). Any other shape that
    broadcasts to the token shape is broadcast to it (e.g. TRL's ``(B, 1)``).

    Dropped tokens (``where`` False, segment id 0) are selected away before any arithmetic: a
    NaN or infinity there reaches neither the loss nor a gradient. A NaN in a kept token's
    inputs (or its sequence's advantage) makes its loss NaN and every aggregation over it. A
    traced hyperparameter outside its domain makes the loss NaN.

    Args:
      log_probs: ``(..., T)`` per-token log-probabilities under the current policy.
      old_log_probs: ``(..., T)`` under the sampling policy (not differentiated).
      advantages: per sequence or per token, see above.
      where: optional boolean token mask ``(..., T)``.
      clip_epsilon: :math:`\epsilon_{lo} \ge 0` (default 0.2); ``None`` disables clipping
        (the surrogate is then :math:`-r_t A_t`).
      clip_epsilon_high: :math:`\epsilon_{hi} \ge 0`, DAPO's clip-higher; ``None`` means
        :math:`\epsilon_{lo}`.
      importance_sampling: ``"token"`` (PPO, GRPO) or ``"sequence"`` (GSPO).
      ref_log_probs: ``(..., T)`` under the reference policy, for the KL penalty.
      kl_coef: :math:`\beta \ge 0`; a non-zero value needs ``ref_log_probs``.
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (default, as TRL).
      aggregation: see above.
      max_length: static ``int >= 1``, the normaliser's length for ``"sequence_sum"``
        (unused by the other aggregations).
      segment_ids: optional ``(..., T)`` integer segment ids (packed layout).
      num_segments: static ``int >= 1`` with ``segment_ids``.

    Returns:
      A scalar; ``(..., T)`` per-token losses for ``"none"``; a pair of scalars for
      ``"sum_and_weight"``. Float32 for half-precision inputs, else their dtype.

    Raises:
      ValueError: shapes, unknown options, a concrete hyperparameter outside its domain,
        ``"sequence_sum"`` without ``max_length``, a non-zero ``kl_coef`` without
        ``ref_log_probs``, ``clip_epsilon_high`` with ``clip_epsilon=None``.

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

    References:
      J. Schulman et al., "Proximal Policy Optimization Algorithms", 2017,
      https://arxiv.org/abs/1707.06347; Z. Shao et al., "DeepSeekMath" (GRPO), 2024,
      https://arxiv.org/abs/2402.03300; Q. Yu et al., "DAPO", 2025,
      https://arxiv.org/abs/2503.14476; Z. Liu et al., "Understanding R1-Zero-Like Training"
      (Dr. GRPO), 2025, https://arxiv.org/abs/2503.20783; C. Zheng et al., "Group Sequence
      Policy Optimization" (GSPO), 2025, https://arxiv.org/abs/2507.18071.
    """
    if importance_sampling not in ("token", "sequence"):
        raise ValueError(
            f"`importance_sampling` must be 'token' or 'sequence', got {importance_sampling!r}."
        )
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
    )


@_api.public(
    static=(
        "importance_sampling",
        "kl_estimator",
        "aggregation",
        "max_length",
        "num_segments",
    ),
    optional=("kl_coef",),
    domains={
        "clip_epsilon": NON_NEGATIVE,
        "clip_epsilon_high": NON_NEGATIVE,
        "kl_coef": NON_NEGATIVE,
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
) -> Array | tuple[Array, Array]:
    lp = _checks.as_floating(log_probs, "log_probs")
    old = _checks.as_floating(old_log_probs, "old_log_probs")
    adv = _checks.as_floating(advantages, "advantages")
    ref = None if ref_log_probs is None else _checks.as_floating(ref_log_probs, "ref_log_probs")
    dtypes = [x.dtype for x in (lp, old, adv, ref) if x is not None]
    dtype = _reduce.compute_dtype(*dtypes)
    lay = _sequence.layout(lp.shape, where, segment_ids, num_segments, "log_probs")
    _checks.same_shape(old, "old_log_probs", lp.shape, "one per token of `log_probs`")
    if ref is not None:
        _checks.same_shape(ref, "ref_log_probs", lp.shape, "one per token of `log_probs`")

    # Dropped tokens are replaced before any arithmetic (the double-where trick).
    lp = lay.masked(lp.astype(dtype))
    old = lay.masked(jax.lax.stop_gradient(old.astype(dtype)))
    adv = lay.masked(_advantages_to_tokens(adv.astype(dtype), lay))

    log_ratio = lp - old
    if importance_sampling == "sequence":
        mean = _reduce.divide_or(lay.sums(log_ratio), lay.counts(dtype), 0.0)
        log_ratio = lay.to_tokens(mean)
    ratio = jnp.exp(log_ratio)
    surrogate = ratio * adv
    if clip_epsilon is not None:
        low = _checks.nan_outside_domain(clip_epsilon, "clip_epsilon", dtype, NON_NEGATIVE)
        high = low
        if clip_epsilon_high is not None:
            high = _checks.nan_outside_domain(
                clip_epsilon_high, "clip_epsilon_high", dtype, NON_NEGATIVE
            )
        clipped = jnp.clip(ratio, 1 - low, 1 + high) * adv
        # The smaller product; a tie takes the unclipped one (its gradient is REINFORCE's).
        # NaN bounds (a traced epsilon out of its domain) give NaN through ``clipped``.
        surrogate = jnp.where(surrogate <= clipped, surrogate, clipped)
    loss = -surrogate
    if ref is not None and kl_coef is not None:
        coef = _checks.nan_outside_domain(kl_coef, "kl_coef", dtype, NON_NEGATIVE)
        ref = lay.masked(ref.astype(dtype))
        loss = loss + coef * kl_estimate(lp, ref, kl_estimator)
    loss = lay.masked(loss)

    if aggregation == "none":
        return loss
    if aggregation in ("token_mean", "sum_and_weight"):
        total = jnp.sum(loss)
        count = jnp.sum(lay.keep).astype(dtype)
        if aggregation == "sum_and_weight":
            return total, count
        return _reduce.divide_or(total, count, 0.0)
    num_sequences = lay.num_sequences(dtype)
    if aggregation == "sequence_mean":
        means = _reduce.divide_or(lay.sums(loss), lay.counts(dtype), 0.0)
        return _reduce.divide_or(jnp.sum(means), num_sequences, 0.0)
    assert aggregation == "sequence_sum" and max_length is not None
    return _reduce.divide_or(jnp.sum(loss), num_sequences * max_length, 0.0)

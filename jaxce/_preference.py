r"""Preference losses on per-sequence log-probabilities: DPO and its variants, SimPO, ORPO.

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

from typing import Literal, TypeAlias, overload

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _numerics, _reduce
from jaxce._checks import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, Domain, Reduction

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Loss: TypeAlias = Array | tuple[Array, Array]

DPOLossType: TypeAlias = Literal[
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down"
]
_ROBUST = Domain(0.0, 0.5, False, "in [0, 0.5) for loss_type='robust'", open_high=True)
_EXO = Domain(0.0, 1.0, True, "in (0, 1) for loss_type='exo_pair'", open_high=True)
_UNUSED = Domain(0.0, 0.0, False, "0: only loss_type 'sigmoid', 'robust' and 'exo_pair' use it")
# The domain of ``label_smoothing`` for each loss type.
DPO_LABEL_SMOOTHING: dict[str, Domain] = {
    "sigmoid": UNIT_INTERVAL,
    "robust": _ROBUST,
    "exo_pair": _EXO,
    "hinge": _UNUSED,
    "ipo": _UNUSED,
    "nca_pair": _UNUSED,
    "sppo_hard": _UNUSED,
    "apo_zero": _UNUSED,
    "apo_down": _UNUSED,
}


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


def _smoothed_logistic(z: Array, eps: Array | None) -> Array:
    r""":math:`-(1 - \varepsilon)\log\sigma(z) - \varepsilon\log\sigma(-z)`, stably."""
    loss = jax.nn.softplus(-z)
    return loss if eps is None else loss + eps * z


def _reduce_pairs(loss: Array, reduction: str) -> Loss:
    weights = _reduce.example_weights(loss.shape, loss.dtype)
    return _reduce.weigh_and_reduce(loss, weights, reduction)


@overload
def dpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    ref_chosen_log_probs: ArrayLike,
    ref_rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float | ArrayLike = 0.0,
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
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Literal["sum_and_weight"],
) -> tuple[Array, Array]: ...


def dpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    ref_chosen_log_probs: ArrayLike,
    ref_rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float | ArrayLike = 0.0,
    reduction: Reduction = "none",
) -> Loss:
    r"""Direct preference optimisation and its variants, as TRL's ``DPOTrainer`` defines them.

    With the log-ratios :math:`c = \log\pi(y_w) - \log\pi_{\mathrm{ref}}(y_w)` (chosen) and
    :math:`r = \log\pi(y_l) - \log\pi_{\mathrm{ref}}(y_l)` (rejected), the margin
    :math:`\Delta = c - r`, :math:`z = \beta\Delta` and :math:`\varepsilon` =
    ``label_smoothing``, ``loss_type`` is

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
      \mathtt{nca\_pair} & -\log\sigma(\beta c) - \tfrac12\log\sigma(-\beta c)
        - \tfrac12\log\sigma(-\beta r)\\
      \mathtt{sppo\_hard} & (c - 1/(2\beta))^2 + (r + 1/(2\beta))^2\\
      \mathtt{apo\_zero} & 1 - \sigma(\beta c) + \sigma(\beta r)\\
      \mathtt{apo\_down} & \sigma(\beta c) + 1 - \sigma(z)
      \end{array}

    ``beta`` is applied once, here (not also by the caller). With a policy equal to its
    reference (:math:`c = r = 0`) the ``"sigmoid"`` and ``"robust"`` losses are exactly
    ``log 2`` in the compute dtype (``jnp.log(2.0)`` rounded to it), whatever
    :math:`\varepsilon`: smoothing enters as :math:`\operatorname{softplus}(-z) +
    \varepsilon z` (and :math:`\operatorname{softplus}(-z) - \varepsilon z / (1 -
    2\varepsilon)` for ``"robust"``), exact rearrangements that vanish at :math:`z = 0`.

    Inputs are per-sequence log-probabilities: sums over the completion's tokens (as TRL),
    except for ``"ipo"``, whose TRL form divides each log-ratio by its completion's token
    count: pass per-token means (``sequence_reduce(..., reduction="mean")``) for all four.

    Args:
      chosen_log_probs: ``(...)`` policy log-probabilities of the chosen completions.
      rejected_log_probs: of the rejected completions, broadcastable to the chosen ones.
      ref_chosen_log_probs: reference log-probabilities of the chosen completions.
      ref_rejected_log_probs: reference log-probabilities of the rejected completions.
      beta: :math:`\beta > 0`, the inverse temperature (IPO's :math:`\tau`).
      loss_type: one of the names above.
      label_smoothing: :math:`\varepsilon`; in ``[0, 1]`` for ``"sigmoid"``, ``[0, 0.5)`` for
        ``"robust"``, ``(0, 1)`` for ``"exo_pair"`` (it is infinite at 0 and 1; TRL also
        rejects 0), and ``0`` for the types that do not use it (a non-zero value raises rather
        than being ignored).
      reduction: ``"none"`` (per pair), ``"sum"``, ``"mean"`` (over pairs) or
        ``"sum_and_weight"`` (the sum and the number of pairs).

    Returns:
      Per-pair losses ``(...)`` or a scalar; float32 for half-precision inputs, else their
      dtype. A NaN input gives NaN for its pair; a traced ``beta`` or ``label_smoothing``
      outside its domain gives NaN (loss and gradients).

    Raises:
      ValueError: an unknown ``loss_type`` or ``reduction``, shapes that do not broadcast, or
        a concrete ``beta``/``label_smoothing`` outside its domain.

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

    References:
      R. Rafailov et al., "Direct Preference Optimization", 2023,
      https://arxiv.org/abs/2305.18290; E. Mitchell, "A note on DPO with noisy preferences"
      (cDPO), 2023; S. R. Chowdhury et al., "Provably Robust DPO", 2024,
      https://arxiv.org/abs/2403.00409; M. G. Azar et al., "A General Theoretical Paradigm to
      Understand Learning from Human Preferences" (IPO), 2023, https://arxiv.org/abs/2310.12036;
      H. Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment" (EXO),
      2024, https://arxiv.org/abs/2402.00856; H. Chen et al., "Noise Contrastive Alignment"
      (NCA), 2024, https://arxiv.org/abs/2402.05369; Y. Wu et al., "Self-Play Preference
      Optimization" (SPPO), 2024, https://arxiv.org/abs/2405.00675; K. D'Oosterlinck et al.,
      "Anchored Preference Optimization" (APO), 2024, https://arxiv.org/abs/2408.06266.
    """
    if loss_type not in DPO_LABEL_SMOOTHING:
        raise ValueError(
            f"`loss_type` must be one of {tuple(DPO_LABEL_SMOOTHING)}, got {loss_type!r}."
        )
    _checks.check_concrete_domain(
        label_smoothing, "label_smoothing", DPO_LABEL_SMOOTHING[loss_type]
    )
    return _dpo_loss(
        chosen_log_probs,
        rejected_log_probs,
        ref_chosen_log_probs,
        ref_rejected_log_probs,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


@_api.public(
    static=("loss_type", "reduction"), optional=("label_smoothing",), domains={"beta": POSITIVE}
)
def _dpo_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    ref_chosen_log_probs: ArrayLike,
    ref_rejected_log_probs: ArrayLike,
    *,
    beta: float | ArrayLike,
    loss_type: str,
    label_smoothing: float | ArrayLike | None,
    reduction: str,
) -> Loss:
    _checks.reduction(reduction)
    (pc, pr, rc, rr), dtype = _pair_inputs(
        {
            "chosen_log_probs": chosen_log_probs,
            "rejected_log_probs": rejected_log_probs,
            "ref_chosen_log_probs": ref_chosen_log_probs,
            "ref_rejected_log_probs": ref_rejected_log_probs,
        }
    )
    beta = _checks.nan_outside_domain(beta, "beta", dtype, POSITIVE)
    eps = None
    if label_smoothing is not None:
        eps = _checks.nan_outside_domain(
            label_smoothing, "label_smoothing", dtype, DPO_LABEL_SMOOTHING[loss_type]
        )
    c = pc - rc
    r = pr - rr
    delta = c - r
    z = beta * delta
    softplus, sigmoid = jax.nn.softplus, jax.nn.sigmoid
    if loss_type == "sigmoid":
        loss = _smoothed_logistic(z, eps)
    elif loss_type == "robust":
        loss = softplus(-z)
        if eps is not None:
            loss = loss - eps * z / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = jax.nn.relu(1 - z)
    elif loss_type == "ipo":
        loss = jnp.square(delta - 1 / (2 * beta))
    elif loss_type == "exo_pair":
        # KL(Bernoulli(sigmoid(z)) || Bernoulli(1 - eps)). A zero eps (a JAX array, which is
        # not checked eagerly) is outside the domain (0, 1): NaN.
        if eps is None:
            eps = jnp.full((), jnp.nan, dtype)
        loss = sigmoid(z) * (-softplus(-z) - jnp.log1p(-eps)) + sigmoid(-z) * (
            -softplus(z) - jnp.log(eps)
        )
    elif loss_type == "nca_pair":
        bc, br = beta * c, beta * r
        loss = softplus(-bc) + 0.5 * softplus(bc) + 0.5 * softplus(br)
    elif loss_type == "sppo_hard":
        half = 0.5 / beta
        loss = jnp.square(c - half) + jnp.square(r + half)
    elif loss_type == "apo_zero":
        loss = sigmoid(-beta * c) + sigmoid(beta * r)
    else:
        assert loss_type == "apo_down"
        loss = sigmoid(beta * c) + sigmoid(-z)
    if eps is not None and loss_type not in ("sigmoid", "robust", "exo_pair"):
        # A traced non-zero value (outside the domain {0}) is NaN: so are the loss and its
        # gradients (in the domain the factor is exactly 1).
        loss = loss * (1 + 0 * eps)
    return _reduce_pairs(loss, reduction)


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
    return _reduce_pairs(_smoothed_logistic(beta * (c - r) - gamma, eps), reduction)


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

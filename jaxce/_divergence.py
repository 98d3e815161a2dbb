"""Information-theoretic losses: entropies, KL divergences (plain, log-target, distillation), JSD.

Every function here is its formula plus calls into ``_reduce``: the class axis, ``where``,
``sample_weights``, reductions and the dtype policy work as in the softmax family. All sums
of the form :math:`\\sum_c p_c (\\log p_c - \\log q_c)` go through ``_xlog_ratio``, which
makes ``0 \\log 0 = 0`` hold in the value and in every gradient.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxce import _checks, _reduce
from jaxce._binary import _weighted_softplus
from jaxce._softmax import _log_normalizer, _log_softmax, _Logits, _prepare

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _live(w: Array, class_mask: Array | None) -> Array:
    live = w > 0
    return live if class_mask is None else live & class_mask


def _xlog_ratio(w: Array, log_a: Array, log_b: Array, live: Array) -> Array:
    r"""``sum_c w_c (log_a_c - log_b_c)`` over ``live`` entries (where ``w > 0``).

    Entries that are not live contribute exactly 0 to the value and to every gradient (the
    double-where trick): a zero weight next to an infinite log never makes a NaN.
    """
    zero = jnp.zeros((), w.dtype)
    diff = jnp.where(live, log_a, zero) - jnp.where(live, log_b, zero)
    return jnp.sum(jnp.where(live, w * diff, zero), axis=-1)


def _log_probs(lg: _Logits, scale=None) -> Array:
    """``log_softmax`` over the classes ``where`` leaves in; masked classes are ``-inf``."""
    x = lg.x if scale is None else lg.x / scale
    m, log_s = _log_normalizer(x, lg.class_mask)
    log_p = _log_softmax(x, m, log_s)
    if lg.class_mask is not None:
        log_p = jnp.where(lg.class_mask, log_p, jnp.full((), -jnp.inf, log_p.dtype))
    return log_p


def _second(values: ArrayLike, name: str, lg: _Logits, first: str) -> Array:
    """A second array over the same classes as ``lg`` (targets), in ``lg``'s layout."""
    values = _checks.as_floating(values, name)
    values = _checks.broadcastable(values, name, lg.shape, f"the shape of `{first}`")
    values = lg.layout.to_last(_reduce.upcast(values).astype(lg.x.dtype))
    if lg.keep is not None:  # dropped rows: neutral values, so no NaN reaches the gradient
        values = jnp.where(lg.keep[..., None], values, jnp.zeros((), values.dtype))
    return values


def _start(logits, axis, where, sample_weights, name):
    lg = _prepare(logits, axis, where, name)
    info = _reduce.examples(lg.batch_shape, lg.x.dtype, keep=lg.keep, sample_weights=sample_weights)
    return lg.neutralised(lg.keep), info


def entropy(
    logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
    r"""Shannon entropy of the softmax distribution, in nats.

    .. math::
      H(p) = -\sum_c p_c \log p_c, \qquad p = \operatorname{softmax}(x)

    over the classes ``where`` leaves in, with :math:`0 \log 0 = 0`: a ``-inf`` logit is a
    class of probability 0 and contributes nothing (no NaN in the value or the gradient).
    :math:`0 \le H \le \log C`, the maximum at the uniform distribution.

    Args:
      logits: ``(..., C, ...)`` float array; classes on ``axis``.
      axis: the class axis or a tuple of axes (flattened).
      where: class mask of ``logits``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example entropies (``logits``'s shape without the class axes) or a scalar; float32
      for half precision, else the logits' dtype.

    Examples:
      With :func:`kl_divergence`, cross-entropy splits as :math:`H(p, q) = H(p) + KL(p \| q)`:

      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> p, q = jnp.array([0.9, 0.1]), jnp.array([0.6, 0.4])
      >>> h = jaxce.entropy(jnp.log(p))
      >>> kl = jaxce.kl_divergence(jnp.log(q), p)
      >>> ce = jaxce.softmax_cross_entropy(jnp.log(q), p)
      >>> [round(float(v), 4) for v in (h, kl, h + kl, ce)]
      [0.3251, 0.2263, 0.5514, 0.5514]
      >>> jaxce.entropy(jnp.array([[0.0, 0.0], [0.0, -jnp.inf]]))
      Array([0.6931, 0.    ], dtype=float32)
    """
    lg, info = _start(logits, axis, where, sample_weights, "logits")
    log_p = _log_probs(lg)
    p = jnp.exp(log_p)
    h = _xlog_ratio(p, jnp.zeros((), p.dtype), log_p, _live(p, lg.class_mask))
    return _reduce.finish(h, info, reduction)


def binary_entropy(
    logits: ArrayLike,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
    r"""Entropy of Bernoulli(sigmoid(logits)), elementwise, in nats.

    .. math::
      H = -p \log p - (1 - p)\log(1 - p)
        = p \operatorname{softplus}(-x) + (1 - p)\operatorname{softplus}(x),
      \qquad p = \sigma(x)

    Computed from ``softplus`` (no ``log`` of a rounded probability): accurate for large
    :math:`|x|`, and 0 with a zero gradient at ``x = +-inf``.

    Args:
      logits: float array of any shape.
      sample_weights: broadcastable to ``logits``.
      reduction: ``"none"`` (per element), ``"sum"``, ``"mean"`` or ``"sum_and_weight"``.

    Returns:
      Per-element entropies of ``logits``'s shape or a scalar; float32 for half precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> jaxce.binary_entropy(jnp.array([0.0, 2.0, -jnp.inf]))
      Array([0.6931, 0.3653, 0.    ], dtype=float32)
    """
    logits = _checks.as_floating(logits, "logits")
    x = _reduce.upcast(logits)
    h = _weighted_softplus(jax.nn.sigmoid(x), -x) + _weighted_softplus(jax.nn.sigmoid(-x), x)
    info = _reduce.examples(x.shape, x.dtype, sample_weights=sample_weights)
    return _reduce.finish(h, info, reduction)


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
    r"""Kullback-Leibler divergence :math:`KL(p \| q)` of predictions from targets (optax order).

    .. math::
      KL(p \| q) = \sum_c p_c \big(\log p_c - \log q_c\big)

    with ``log_predictions`` :math:`\log q` and ``targets`` :math:`p`, both used as given (not
    renormalised), over the classes ``where`` leaves in. A class with :math:`p_c = 0`
    contributes exactly 0 to the value and to every gradient: the loss and its gradient w.r.t.
    ``log_predictions`` stay finite even where :math:`\log q_c = -\infty` (optax and PyTorch
    give NaN there), and the gradient w.r.t. a target of exactly 0 is 0 (the one-sided
    derivative :math:`\log p_c + 1 - \log q_c` is :math:`-\infty`; we never return NaN).
    :math:`p_c > 0` with :math:`q_c = 0` gives ``+inf``. ``reduction="mean"`` averages the
    per-example divergences (PyTorch's ``kl_div`` ``"mean"`` averages over every element; see
    ``jaxce.pytorch.kl_div`` for that and ``"batchmean"``).

    Args:
      log_predictions: ``(..., C, ...)`` log-probabilities :math:`\log q`; classes on ``axis``.
      targets: probabilities :math:`p`, broadcastable to ``log_predictions``.
      axis: the class axis or a tuple of axes.
      where: class mask of ``log_predictions``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example divergences (``log_predictions``'s shape without the class axes) or a scalar;
      float32 for half precision. A negative target (on a class ``where`` leaves in) is
      invalid: that example's divergence is NaN, never a silent finite value (as in PyTorch).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> p = jnp.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
      >>> log_q = jnp.log(jnp.array([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]))
      >>> jaxce.kl_divergence(log_q, p)
      Array([0.6931, 0.    ], dtype=float32)

    References:
      Kullback and Leibler, *On Information and Sufficiency*, 1951.
    """
    lg, info = _start(log_predictions, axis, where, sample_weights, "log_predictions")
    p = _second(targets, "targets", lg, "log_predictions")
    live = _live(p, lg.class_mask)
    log_p = jnp.log(jnp.where(live, p, jnp.ones((), p.dtype)))
    negative = p < 0 if lg.class_mask is None else (p < 0) & lg.class_mask
    info = dataclasses.replace(info, bad=info.keep & jnp.any(negative, axis=-1))
    return _reduce.finish(_xlog_ratio(p, log_p, lg.x, live), info, reduction)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    *,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
    r"""Kullback-Leibler divergence :math:`KL(p \| q)` with the targets in log space.

    .. math::
      KL(p \| q) = \sum_c e^{\log p_c} \big(\log p_c - \log q_c\big)

    As :func:`kl_divergence` (PyTorch's ``kl_div(..., log_target=True)`` summed over classes),
    but ``log_targets`` may hold ``-inf`` (probability 0): such a class contributes exactly 0,
    with zero gradients, even where ``log_predictions`` is ``-inf`` too.

    Args:
      log_predictions: ``(..., C, ...)`` log-probabilities :math:`\log q`; classes on ``axis``.
      log_targets: log-probabilities :math:`\log p`, broadcastable to ``log_predictions``.
      axis: the class axis or a tuple of axes.
      where: class mask of ``log_predictions``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example divergences or a scalar; float32 for half precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> log_p = jnp.log(jnp.array([0.5, 0.5, 0.0]))
      >>> log_q = jnp.log(jnp.array([0.25, 0.25, 0.5]))
      >>> jaxce.kl_divergence_with_log_targets(log_q, log_p)
      Array(0.6931, dtype=float32)
    """
    lg, info = _start(log_predictions, axis, where, sample_weights, "log_predictions")
    log_p = _second(log_targets, "log_targets", lg, "log_predictions")
    p = jnp.exp(log_p)
    live = _live(p, lg.class_mask)
    return _reduce.finish(_xlog_ratio(p, log_p, lg.x, live), info, reduction)


def softmax_kl_divergence(
    logits: ArrayLike,
    target_logits: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    temperature: float = 1.0,
    where: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
    r"""Distillation loss: temperature-scaled KL of the student's softmax from the teacher's.

    .. math::
      \ell = T^2 \, KL\big(\operatorname{softmax}(t / T) \,\|\, \operatorname{softmax}(s / T)\big)
           = T^2 \sum_c p_c (\log p_c - \log q_c)

    with student ``logits`` :math:`s`, teacher ``target_logits`` :math:`t` and temperature
    :math:`T` (Hinton et al.; the :math:`T^2` keeps gradient magnitudes comparable across
    temperatures). Both softmaxes run over the classes ``where`` leaves in, in log space, so
    logits up to the dtype's limit and ``-inf`` logits are fine (a class the teacher gives
    probability 0 contributes 0; one the student gives 0 but the teacher does not gives
    ``+inf``).

    The gradient flows into **both** arguments (this is a plain function of two arrays, as
    for mutual learning). For a frozen teacher pass
    ``jax.lax.stop_gradient(target_logits)``, or differentiate w.r.t. ``logits`` only.

    Args:
      logits: ``(..., C, ...)`` student logits; classes on ``axis``.
      target_logits: teacher logits, broadcastable to ``logits``.
      axis: the class axis or a tuple of axes.
      temperature: :math:`T > 0`.
      where: class mask of ``logits``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example loss.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example losses (``logits``'s shape without the class axes) or a scalar; float32 for
      half precision.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> student = jnp.array([1.0, 2.0, 3.0])
      >>> jaxce.softmax_kl_divergence(student, student)
      Array(0., dtype=float32)
      >>> teacher = jnp.array([3.0, 2.0, 1.0])
      >>> round(float(jaxce.softmax_kl_divergence(student, teacher, temperature=2.0)), 4)
      1.2806

    References:
      Hinton, Vinyals and Dean, *Distilling the Knowledge in a Neural Network*, 2015.
    """
    lg, info = _start(logits, axis, where, sample_weights, "logits")
    t = _second(target_logits, "target_logits", lg, "logits")
    temperature = jnp.asarray(temperature, lg.x.dtype)
    log_p = _log_probs(_Logits(t, lg.class_mask, lg.keep, lg.layout, lg.shape), temperature)
    p = jnp.exp(log_p)
    live = _live(p, lg.class_mask)
    # -log q_c = log_s + (m - s_c) with m - s_c >= 0; halving before subtracting keeps
    # m - s_c finite for logits of opposite signs near the dtype's limit.
    s = lg.x / temperature
    m, log_s = _log_normalizer(s, lg.class_mask)
    zero = jnp.zeros((), p.dtype)
    half_gap = jnp.where(live, m[..., None] / 2 - s / 2, zero)  # inf off the support
    terms = p * jnp.where(live, log_p, zero) + p * log_s[..., None] + 2 * (p * half_gap)
    kl = jnp.sum(jnp.where(live, terms, zero), axis=-1)
    return _reduce.finish(jnp.square(temperature) * kl, info, reduction)


def _safe_log_scalar(w: Array) -> Array:
    pos = w > 0
    return jnp.where(
        pos, jnp.log(jnp.where(pos, w, jnp.ones((), w.dtype))), jnp.full((), -jnp.inf, w.dtype)
    )


def js_divergence(
    logits_p: ArrayLike,
    logits_q: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    *,
    beta: float = 0.5,
    where: ArrayLike | None = None,
    sample_weights: ArrayLike | None = None,
    reduction: str = "none",
):
    r"""Generalised Jensen-Shannon divergence of two softmax distributions, in nats.

    .. math::
      JS_\beta(P, Q) = \beta\, KL(P \| M) + (1 - \beta)\, KL(Q \| M), \qquad
      M = \beta P + (1 - \beta) Q

    with :math:`P = \operatorname{softmax}(x_p)`, :math:`Q = \operatorname{softmax}(x_q)`
    over the classes ``where`` leaves in. :math:`\log M` is a log-sum-exp of
    :math:`\log\beta + \log P` and :math:`\log(1 - \beta) + \log Q`, so everything stays in
    log space. It is finite for all inputs, bounded by the binary entropy of :math:`\beta`
    (:math:`\log 2` at :math:`\beta = 1/2`, where it is symmetric) and 0 iff :math:`P = Q`
    (or :math:`\beta \in \{0, 1\}`).

    Args:
      logits_p: ``(..., C, ...)`` logits of :math:`P`; classes on ``axis``.
      logits_q: logits of :math:`Q`, broadcastable to ``logits_p``.
      axis: the class axis or a tuple of axes.
      beta: mixing weight :math:`\beta \in [0, 1]`.
      where: class mask of ``logits_p``'s rank, or example mask without the class axes.
      sample_weights: broadcastable to the per-example result.
      reduction: ``"none"``, ``"sum"``, ``"mean"`` (weighted mean) or ``"sum_and_weight"``.

    Returns:
      Per-example divergences (``logits_p``'s shape without the class axes) or a scalar;
      float32 for half precision.

    Examples:
      Disjoint distributions reach the bound :math:`\log 2`:

      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> x_p = jnp.array([0.0, -jnp.inf])
      >>> x_q = jnp.array([-jnp.inf, 0.0])
      >>> round(float(jaxce.js_divergence(x_p, x_q)), 4)
      0.6931
      >>> a, b = jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 1.0, 0.0])
      >>> [round(float(jaxce.js_divergence(u, v)), 4) for u, v in ((a, b), (b, a))]
      [0.3532, 0.3532]

    References:
      Lin, *Divergence Measures Based on the Shannon Entropy*, 1991.
    """
    lg, info = _start(logits_p, axis, where, sample_weights, "logits_p")
    xq = _second(logits_q, "logits_q", lg, "logits_p")
    log_p = _log_probs(lg)
    log_q = _log_probs(_Logits(xq, lg.class_mask, lg.keep, lg.layout, lg.shape))
    beta = jnp.asarray(beta, lg.x.dtype)
    a = _safe_log_scalar(beta) + log_p
    b = _safe_log_scalar(1 - beta) + log_q
    empty = (a == -jnp.inf) & (b == -jnp.inf)  # classes neither side (or weight) reaches
    zero = jnp.zeros((), a.dtype)
    log_m = jnp.logaddexp(jnp.where(empty, zero, a), jnp.where(empty, zero, b))
    wp, wq = beta * jnp.exp(log_p), (1 - beta) * jnp.exp(log_q)
    js = _xlog_ratio(wp, log_p, log_m, _live(wp, lg.class_mask)) + _xlog_ratio(
        wq, log_q, log_m, _live(wq, lg.class_mask)
    )
    return _reduce.finish(js, info, reduction)

r"""Contrastive losses: the softmax cross-entropy over similarities of a batch of embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxce import _api, _checks, _reduce
from jaxce._checks import POSITIVE

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _unit_rows(x: Array) -> Array:
    """Rows scaled to unit norm; a norm below ``sqrt(eps)`` is taken as ``sqrt(eps)`` (optax's
    ``cosine_similarity(epsilon=eps)``, so a zero embedding has similarity 0 to everything).

    Each row is first divided by its largest absolute component (a constant under
    ``stop_gradient``: ``x / |x|`` does not depend on it, so the derivative is exact), so the
    squared norm neither overflows for components up to the dtype's maximum nor underflows
    for tiny ones. The division goes through the square root of that component twice: XLA
    may divide by multiplying with a reciprocal, and ``1 / max`` is subnormal (flushed to 0).
    """
    one = jnp.ones((), x.dtype)
    floor = jnp.sqrt(jnp.finfo(x.dtype).eps)
    scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    empty = scale == 0
    root = jnp.sqrt(jnp.where(empty, one, scale))
    scaled = x / root / root  # largest component +-1 (NaN stays NaN)
    squared = jnp.sum(jnp.square(scaled), axis=-1, keepdims=True)  # in [1, D] unless empty
    norm = jnp.sqrt(jnp.where(empty, one, squared))
    small = empty | (scale < floor / norm)  # |x| = scale * norm below the floor
    return jnp.where(small, x / floor, scaled / norm)


@_api.public(domains={"temperature": POSITIVE})
def ntxent(embeddings: ArrayLike, labels: ArrayLike, temperature: ArrayLike = 0.07) -> Array:
    r"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (optax's signature).

    With cosine similarities :math:`s_{ij} = \langle u_i, u_j \rangle / \tau` of the
    unit-normalised embeddings, positive pairs :math:`P = \{(i, j): i \ne j,\ y_i = y_j\}` and
    the negatives of :math:`i`, :math:`N(i) = \{k: y_k \ne y_i\}`:

    .. math::
      \mathcal{L} = \frac{1}{|P|} \sum_{(i, j) \in P}
          -\log \frac{e^{s_{ij}}}{e^{s_{ij}} + \sum_{k \in N(i)} e^{s_{ik}}}

    each term a softmax cross-entropy of the positive against the anchor's negatives, computed
    in log space. An anchor without negatives contributes 0 for each of its pairs.

    Args:
      embeddings: ``(N, D)`` floating embeddings.
      labels: ``(N,)`` integer group labels: equal labels mark positive pairs, e.g.
        ``[0, 0, 1, 1]`` for two augmented views each of two images.
      temperature: :math:`\tau > 0` (a concrete value outside raises ``ValueError``; a
        traced one gives NaN).

    Returns:
      A scalar, float32 for half-precision ``embeddings``, else their dtype. With no positive
      pair (including an empty batch) the mean over no pairs is ``0`` with a zero gradient
      (jaxce's rule; optax gives NaN).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jaxce
      >>> embeddings = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
      >>> round(float(jaxce.ntxent(embeddings, jnp.array([0, 0, 1, 1]), temperature=0.5)), 4)
      0.4302

    References:
      T. Chen, S. Kornblith, M. Norouzi and G. Hinton, "A Simple Framework for Contrastive
      Learning of Visual Representations", ICML 2020.
    """
    embeddings = _checks.as_floating(embeddings, "embeddings")
    labels = _checks.as_integer(labels, "labels")
    if embeddings.ndim != 2:
        raise ValueError(f"`embeddings` must have shape (N, D), got {embeddings.shape}.")
    _checks.same_shape(labels, "labels", embeddings.shape[:1], "one label per embedding")
    dtype = _reduce.compute_dtype(embeddings.dtype)
    temperature, bad = _checks.hyperparameter(temperature, "temperature", dtype, POSITIVE)
    units = _unit_rows(embeddings.astype(dtype))
    # Every anchor meets every embedding: the keys are whole on each device (on an Explicit
    # mesh an all-gather; the anchors stay where they are).
    keys, key_labels = _reduce.replicated(units), _reduce.replicated(labels)
    similarity = units @ keys.T / temperature
    same = labels[:, None] == key_labels[None, :]
    positive = same & ~jnp.eye(labels.shape[0], dtype=bool)
    negatives_lse = jax.nn.logsumexp(similarity, axis=1, where=~same, keepdims=True)
    pair_loss = jnp.logaddexp(similarity, negatives_lse) - similarity
    total = jnp.sum(jnp.where(positive, pair_loss, jnp.zeros((), dtype)))
    loss = _reduce.weighted_mean(total, jnp.sum(positive).astype(dtype))
    return jnp.where(bad, jnp.full((), jnp.nan, dtype), loss)

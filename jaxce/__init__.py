"""jaxce: cross-entropy-family losses for JAX.

Every loss is a pure function of arrays that works under ``jax.jit``, ``jax.vmap``,
``jax.grad``/``jax.jvp`` (to second order) and ``jax.checkpoint``. Losses return one value per
example by default (``reduction="none"``); see ``README.md`` for the shared conventions.
"""

from jaxce._reduce import weighted_mean as weighted_mean
from jaxce._softmax import nll_loss as nll_loss
from jaxce._softmax import poly_loss_cross_entropy as poly_loss_cross_entropy
from jaxce._softmax import smooth_labels as smooth_labels
from jaxce._softmax import softmax_cross_entropy as softmax_cross_entropy
from jaxce._softmax import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jaxce._softmax import softmax_focal_loss as softmax_focal_loss

__version__ = "0.1.0"

__all__ = [
    "nll_loss",
    "poly_loss_cross_entropy",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
    "weighted_mean",
]

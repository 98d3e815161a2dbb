"""jaxce: cross-entropy-family losses for JAX.

Every loss is a pure function of arrays that works under ``jax.jit``, ``jax.vmap``,
``jax.grad``/``jax.jvp`` (to second order) and ``jax.checkpoint``; the one exception is the
fused ``linear_softmax_cross_entropy``, which supports reverse mode only. Losses return one
value per example by default (``reduction="none"``); see ``README.md`` for the conventions.
"""

from jaxce import pytorch as pytorch  # PyTorch semantics, a submodule: jaxce.pytorch
from jaxce import sklearn as sklearn  # scikit-learn semantics, a submodule: jaxce.sklearn
from jaxce._binary import binary_cross_entropy as binary_cross_entropy
from jaxce._binary import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from jaxce._binary import sigmoid_focal_loss as sigmoid_focal_loss
from jaxce._contrastive import ntxent as ntxent
from jaxce._ctc import ctc_loss as ctc_loss
from jaxce._ctc import ctc_loss_with_forward_probs as ctc_loss_with_forward_probs
from jaxce._divergence import binary_entropy as binary_entropy
from jaxce._divergence import convex_kl_divergence as convex_kl_divergence
from jaxce._divergence import entropy as entropy
from jaxce._divergence import generalized_kl_divergence as generalized_kl_divergence
from jaxce._divergence import js_divergence as js_divergence
from jaxce._divergence import kl_divergence as kl_divergence
from jaxce._divergence import (
    kl_divergence_with_log_targets as kl_divergence_with_log_targets,
)
from jaxce._divergence import softmax_kl_divergence as softmax_kl_divergence
from jaxce._linear import LinearCrossEntropyAux as LinearCrossEntropyAux
from jaxce._linear import linear_softmax_cross_entropy as linear_softmax_cross_entropy
from jaxce._linear_distill import linear_js_divergence as linear_js_divergence
from jaxce._linear_distill import (
    linear_softmax_kl_divergence as linear_softmax_kl_divergence,
)
from jaxce._linear_log_probs import linear_log_probs as linear_log_probs
from jaxce._policy import off_policy_sequence_mask as off_policy_sequence_mask
from jaxce._policy import policy_gradient_loss as policy_gradient_loss
from jaxce._policy import rollout_importance_weights as rollout_importance_weights
from jaxce._policy import sampled_kl_divergence as sampled_kl_divergence
from jaxce._policy import top_entropy_mask as top_entropy_mask
from jaxce._preference import bradley_terry_loss as bradley_terry_loss
from jaxce._preference import dpo_loss as dpo_loss
from jaxce._preference import kto_loss as kto_loss
from jaxce._preference import orpo_loss as orpo_loss
from jaxce._preference import simpo_loss as simpo_loss
from jaxce._reduce import weighted_mean as weighted_mean
from jaxce._sequence import sequence_reduce as sequence_reduce
from jaxce._softmax import nll_loss as nll_loss
from jaxce._softmax import poly_loss_cross_entropy as poly_loss_cross_entropy
from jaxce._softmax import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from jaxce._softmax import smooth_labels as smooth_labels
from jaxce._softmax import softmax_cross_entropy as softmax_cross_entropy
from jaxce._softmax import (
    softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from jaxce._softmax import softmax_focal_loss as softmax_focal_loss
from jaxce._topk import (
    linear_sparse_distillation_loss as linear_sparse_distillation_loss,
)
from jaxce._topk import sparse_distillation_loss as sparse_distillation_loss
from jaxce._topk import truncated_log_probs as truncated_log_probs

__version__ = "0.2.0"

__all__ = [
    "LinearCrossEntropyAux",
    "binary_cross_entropy",
    "bradley_terry_loss",
    "binary_entropy",
    "convex_kl_divergence",
    "ctc_loss",
    "ctc_loss_with_forward_probs",
    "dpo_loss",
    "entropy",
    "generalized_kl_divergence",
    "js_divergence",
    "kto_loss",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_js_divergence",
    "linear_log_probs",
    "linear_softmax_cross_entropy",
    "linear_softmax_kl_divergence",
    "linear_sparse_distillation_loss",
    "nll_loss",
    "ntxent",
    "off_policy_sequence_mask",
    "orpo_loss",
    "policy_gradient_loss",
    "poly_loss_cross_entropy",
    "pytorch",
    "rollout_importance_weights",
    "safe_softmax_cross_entropy",
    "sampled_kl_divergence",
    "sequence_reduce",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "simpo_loss",
    "sklearn",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_focal_loss",
    "softmax_kl_divergence",
    "top_entropy_mask",
    "sparse_distillation_loss",
    "truncated_log_probs",
    "weighted_mean",
]

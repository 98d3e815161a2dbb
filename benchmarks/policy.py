"""A whole GRPO step's loss, fused against materialised logits (not a test).

The loss of one policy-optimisation step as a trainer writes it: the policy's per-token
log-probabilities and entropies of the sampled completions, the rollout correction for an
inference engine's mismatch (``rollout_importance_weights``, TRL's default), the off-policy
sequence mask and the top-20% entropy mask as ``token_weights``, the clipped surrogate with a
dual clip and a k3 penalty against a reference (``policy_gradient_loss``), minus an entropy
bonus over the same tokens. Value and gradients w.r.t. the hidden states and the output kernel
(``jax.value_and_grad``), median of ``--reps`` runs interleaved after a warm-up each, and the
compiled temporaries (``memory_analysis().temp_size_in_bytes``). The two methods differ only in
where the log-probabilities and entropies come from:

* ``materialised``: ``z = h @ W`` in float32, ``log_softmax(z)`` gathered at the sampled
  tokens and the entropy of ``softmax(z)`` (``(tokens, V)`` temporaries);
* ``fused``: ``jaxce.linear_log_probs(h, W, y, return_entropy=True)`` (vocabulary blocks,
  never the ``(tokens, V)`` logits).

The old, reference and rollout log-probabilities are inputs (computed before the step, as in a
trainer). Ratios are against the materialised path measured in the same run.

    python benchmarks/policy.py [--reps 3] [--dtype float32] [--shape N,D,V ...] [--memory-only]

``N`` is the number of completion tokens (``--seq`` tokens per completion). On an
accelerator: ``python benchmarks/policy.py --dtype bfloat16 --shape 16384,4096,151936``.
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np
from linear_ce import (  # this folder's fused cross-entropy benchmark
    add_common_arguments,
    interleaved_times,
    jax_step,
    machine,
    problem,
)
from linear_log_probs import dense_pair

import jaxce

SHAPES = [(4096, 1024, 32768), (2048, 1024, 131072)]


def step_inputs(rng, n, seq, h, w, y):
    """Per-sequence advantages and the constants of the step, shaped ``(n // seq, seq)``."""
    b = n // seq
    lp, _ = dense_pair(h, w, y)
    lp = np.asarray(lp).reshape(b, seq)
    old = lp + 0.05 * rng.normal(size=lp.shape)  # one update since sampling
    ref = lp + 0.1 * rng.normal(size=lp.shape)
    rollout = old + 0.02 * rng.normal(size=lp.shape)  # the engine's numerics
    lengths = rng.integers(seq // 4, seq + 1, size=b)
    mask = np.arange(seq)[None] < lengths[:, None]
    adv = rng.normal(size=b)
    floats = (jnp.asarray(x, jnp.float32) for x in (old, ref, rollout, adv))
    return (*floats, jnp.asarray(mask))


def grpo_objective(log_probs_and_entropy):
    """The step's loss from a ``(h, W, y) -> (log_probs, entropy)`` function (flat tokens)."""

    def loss(h, w, y, old, ref, rollout, adv, mask):
        lp, ent = log_probs_and_entropy(h, w, y)
        lp, ent = lp.reshape(mask.shape), ent.reshape(mask.shape)
        kept = mask & jaxce.top_entropy_mask(ent, mask, fraction=0.2)
        weights = jaxce.rollout_importance_weights(old, rollout, mask) * kept
        weights = weights * jaxce.off_policy_sequence_mask(lp, rollout, adv, mask, threshold=0.5)
        policy = jaxce.policy_gradient_loss(
            lp, old, adv, mask, token_weights=weights, dual_clip=3.0, ref_log_probs=ref,
            kl_coef=0.04, aggregation="token_mean",
        )  # fmt: skip
        bonus = jaxce.weighted_mean(jnp.sum(jnp.where(kept, ent, 0.0)), jnp.sum(kept))
        return policy - 0.01 * bonus

    return loss


def fused_pair(h, w, y):
    return jaxce.linear_log_probs(h, w, y, return_entropy=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--seq", type=int, default=512, help="tokens per completion")
    parser.add_argument(
        "--memory-only", action="store_true", help="compiled temporaries only, no timing"
    )
    opts = parser.parse_args()
    dtype = jnp.dtype(opts.dtype)
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, {machine()}, dtype={dtype.name}, median of "
        f"{opts.reps} interleaved after a warm-up, {opts.seq} tokens per completion, "
        f"load average {os.getloadavg()}"
    )
    rng = np.random.default_rng(0)
    for n, d, v in opts.shape or SHAPES:
        h, w, y = problem(rng, n, d, v, dtype)
        args = (h, w, y, *step_inputs(rng, n, opts.seq, h, w, y))
        steps, temps = {}, {}
        for name, pair in (("materialised", dense_pair), ("fused", fused_pair)):
            steps[name], temps[name] = jax_step(grpo_objective(pair), args)
        if opts.memory_only:
            print(f"N={n} D={d} V={v}  compiled temporaries: " + ", ".join(
                f"{k} {t / 2**20:.1f} MiB ({t / temps['materialised']:.3f} of mat)"
                for k, t in temps.items()
            ), flush=True)  # fmt: skip
            continue
        times = interleaved_times(steps, opts.reps)
        med = {name: float(np.median(ts)) for name, ts in times.items()}
        digits = 2 if med["materialised"] >= 1 else 4  # an accelerator's times are ms
        print(f"N={n} D={d} V={v}  load average {os.getloadavg()}")
        for name, ts in times.items():
            runs = " ".join(f"{t:.{digits}f}" for t in ts)
            mem = (
                f"{temps[name] / 2**20:9.1f} MiB ({temps[name] / temps['materialised']:.3f} of mat)"
            )
            print(
                f"  {name:>12}: {med[name]:7.{digits}f} s "
                f"({med[name] / med['materialised']:.2f}x mat) [{runs}]  temp {mem}"
            )
        print(flush=True)


if __name__ == "__main__":
    main()

"""Fused ``linear_log_probs`` (log-probabilities and entropy) against the materialised logits
and against token-chunked recomputation (not a test).

For each shape, value and gradients w.r.t. hidden and weight of ``sum(a * log_probs + c *
entropy)`` (random per-token ``a``, ``c``: the cotangents a policy-gradient loss with an
entropy bonus sends back), median of ``--reps`` runs interleaved across the methods after a
warm-up each, and the compiled temporaries (``memory_analysis().temp_size_in_bytes``). Ratios
are against the methods measured in the same run. Methods:

* ``materialised``: ``z = h @ W`` in float32, ``log_softmax(z)`` gathered at the labels and
  the entropy of ``softmax(z)``: three ``(N, D, V)`` matmuls, ``(N, V)`` temporaries;
* ``chunked``: the token-chunked approach of JAX post-training code: a ``lax.scan`` over
  chunks of ``--chunk-tokens`` tokens with ``jax.checkpoint`` on the body, full-vocabulary
  logits per chunk (the logits recomputed in the backward pass: four matmuls);
* ``fused``: ``jaxce.linear_log_probs(..., return_entropy=True)`` (vocabulary blocks, the
  logits recomputed in the backward pass: four matmuls, ``O(chunk)`` temporaries).

    python benchmarks/linear_log_probs.py [--reps 3] [--dtype float32] [--shape N,D,V ...]

On an accelerator: ``python benchmarks/linear_log_probs.py --dtype bfloat16 --shape
8192,4096,128256``.
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

import jaxce

SHAPES = [(4096, 1024, 32768), (2048, 1024, 131072)]


def dense_pair(h, w, y):
    """Per-token ``(log p_y, H)`` from the full ``(tokens, V)`` float32 logits."""
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(z, axis=-1)
    lp = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    return lp, -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def materialised_loss(h, w, y, a, c):
    lp, ent = dense_pair(h, w, y)
    return jnp.sum(a * lp + c * ent)


def chunked_loss(chunk_tokens):
    def loss(h, w, y, a, c):
        n = h.shape[0]
        k = max(1, min(chunk_tokens, n))
        count = -(-n // k)
        pad = count * k - n
        hp = jnp.pad(h, ((0, pad), (0, 0)))
        yp, ap, cp = (jnp.pad(v, (0, pad)) for v in (y, a, c))  # padded rows: a = c = 0

        @jax.checkpoint
        def body(total, xs):
            hc, yc, ac, cc = xs
            lp, ent = dense_pair(hc, w, yc)
            return total + jnp.sum(ac * lp + cc * ent), None

        xs = (hp.reshape(count, k, -1), yp.reshape(count, k), ap.reshape(count, k),
              cp.reshape(count, k))  # fmt: skip
        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
        return total

    return loss


def fused_loss(h, w, y, a, c):
    lp, ent = jaxce.linear_log_probs(h, w, y, return_entropy=True)
    return jnp.sum(a * lp + c * ent)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--chunk-tokens", type=int, default=512)
    opts = parser.parse_args()
    dtype = jnp.dtype(opts.dtype)
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}, {machine()}, dtype={dtype.name}, median of "
        f"{opts.reps} interleaved after a warm-up, chunked over {opts.chunk_tokens} tokens, "
        f"load average {os.getloadavg()}"
    )
    rng = np.random.default_rng(0)
    for n, d, v in opts.shape or SHAPES:
        h, w, y = problem(rng, n, d, v, dtype)
        a = jnp.asarray(rng.normal(size=n), jnp.float32)
        c = jnp.asarray(rng.normal(size=n) * 0.01, jnp.float32)
        args = (h, w, y, a, c)
        steps, temps = {}, {}
        for name, loss in (
            ("materialised", materialised_loss),
            ("chunked", chunked_loss(opts.chunk_tokens)),
            ("fused", fused_loss),
        ):
            steps[name], temps[name] = jax_step(loss, args)
        times = interleaved_times(steps, opts.reps)
        med = {name: float(np.median(ts)) for name, ts in times.items()}
        digits = 2 if med["materialised"] >= 1 else 4  # an accelerator's times are ms
        print(f"N={n} D={d} V={v}  load average {os.getloadavg()}")
        for name, ts in times.items():
            runs = " ".join(f"{t:.{digits}f}" for t in ts)
            ratios = (
                f"{med[name] / med['materialised']:.2f}x mat, "
                f"{med[name] / med['chunked']:.2f}x chunked"
            )
            mem = (
                f"{temps[name] / 2**20:9.1f} MiB ({temps[name] / temps['materialised']:.3f} of mat)"
            )
            print(f"  {name:>12}: {med[name]:7.{digits}f} s ({ratios}) [{runs}]  temp {mem}")
        print(flush=True)


if __name__ == "__main__":
    main()

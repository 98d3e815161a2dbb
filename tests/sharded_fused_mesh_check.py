"""The fused losses under plain ``jax.jit`` on 8 host devices: data and vocabulary parallel.

Run as a script (``tests/test_linear_mesh.py`` does, in a subprocess, because the device
count must be fixed before JAX starts)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_fused_mesh_check.py \
        [explicit] [auto]

On a ``(data=2, model=4)`` mesh of Explicit axes (under ``jax.set_mesh``) and of Auto axes,
with the hidden states, labels and per-token arrays sharded over ``data``, and the kernels
replicated (data parallel), sharded over the vocabulary ``P(None, "model")`` (on the Auto
mesh with ``vocab_axis="model"``) or over ``D`` (``P("model", None)``, FSDP), for
``linear_softmax_cross_entropy`` (a scalar and a per-token reduction, with ``return_aux``),
``linear_log_probs`` with the entropy, ``linear_softmax_kl_divergence`` and
``linear_js_divergence``:

* the value and every gradient equal the unsharded call;
* on the Explicit mesh every gradient has its input's sharding; on the Auto mesh the kernels'
  gradients are vocabulary-sharded when the vocabulary is;
* per-token outputs keep the tokens' sharding; data parallel, they compile with no
  collective at all;
* no all-gather anywhere (value and gradients) has as many elements as a kernel;
* a vocabulary that does not divide the shard count is padded (Auto ``vocab_axis``, FSDP);
* at N=2048, D=512, V=65536 the per-device temporaries of value-and-grad of the
  vocabulary-parallel cross-entropy and log-probabilities are at most half of the
  materialised ``hidden @ weight`` loss on the same mesh (compiled only, not run).

Prints ``ok <what>`` per check; any mismatch raises.
"""

from __future__ import annotations

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxce

P = jax.sharding.PartitionSpec
N, D, DT, V = 32, 16, 8, 96
TOL = {"rtol": 2e-5, "atol": 2e-6}
CE = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 5.0}
COLLECTIVE = re.compile(
    r"= (.+?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
)


def data(vocab=V):
    r = np.random.default_rng(0)
    arrays = {
        "h": r.normal(size=(N, D)),
        "w": r.normal(size=(D, vocab)) / 3,
        "b": r.normal(size=vocab),
        "cw": r.uniform(0.5, 2.0, size=vocab),
        "ht": r.normal(size=(N, DT)),
        "wt": r.normal(size=(DT, vocab)) / 3,
        "g": np.cos(np.arange(N)),  # per-token cotangents and weights
        "t": np.linspace(0.5, 2.0, N),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    y = r.integers(0, vocab, size=N).astype(np.int32)
    y[::5] = -100
    arrays["y"] = y
    return arrays


# A case: the differentiated arguments (kernels marked), the other arguments, the forward
# (per-token outputs, or the scalar) and the scalar objective built on it.
def ce_forward(h, w, b, cw, y, g, *, vocab_axis=None):
    loss, aux = jaxce.linear_softmax_cross_entropy(
        h, w, y, bias=b, class_weights=cw, return_aux=True, vocab_axis=vocab_axis,
        chunk_size=16, **CE,
    )  # fmt: skip
    mean = jaxce.linear_softmax_cross_entropy(
        h, w, y, bias=b, class_weights=cw, reduction="mean", sample_weights=jnp.abs(g),
        vocab_axis=vocab_axis, **CE,
    )  # fmt: skip
    return mean, loss, aux.lse, aux.argmax


def ce_objective(*args, vocab_axis=None):
    outputs = ce_forward(*args, vocab_axis=vocab_axis)
    mean, loss, lse, _ = outputs
    return mean + jnp.sum(args[5] * loss) + jnp.sum(jnp.sin(lse)), outputs


def lp_forward(h, w, b, y, t, *, vocab_axis=None):
    return jaxce.linear_log_probs(
        h, w, y, bias=b, temperature=t, ignore_index=-100, return_entropy=True,
        vocab_axis=vocab_axis, chunk_size=16,
    )  # fmt: skip


def lp_objective(*args, vocab_axis=None):
    lp, ent = outputs = lp_forward(*args, vocab_axis=vocab_axis)
    return jnp.sum(jnp.cos(args[-1]) * lp + jnp.sin(ent)), outputs


def kl_forward(h, w, b, ht, wt, g, *, vocab_axis=None):
    per_token = jaxce.linear_softmax_kl_divergence(
        h, w, ht, wt, bias=b, temperature=1.5, vocab_axis=vocab_axis, chunk_size=16
    )
    mean = jaxce.linear_softmax_kl_divergence(
        h, w, ht, wt, bias=b, sample_weights=jnp.abs(g), reduction="mean", vocab_axis=vocab_axis
    )
    return mean, per_token


def kl_objective(*args, vocab_axis=None):
    mean, per_token = outputs = kl_forward(*args, vocab_axis=vocab_axis)
    return mean + jnp.sum(args[-1] * per_token), outputs


def js_forward(h, w, b, ht, wt, g, *, vocab_axis=None):
    return jaxce.linear_js_divergence(
        h, w, ht, wt, bias=b, beta=0.3, sample_weights=jnp.abs(g), vocab_axis=vocab_axis,
        chunk_size=16,
    )  # fmt: skip


def js_objective(*args, vocab_axis=None):
    outputs = js_forward(*args, vocab_axis=vocab_axis)
    return jnp.sum(args[-1] * outputs), outputs


ROW, TOK = ("data", None), ("data",)
# name: (forward, objective, argument names, their roles, number differentiated)
CASES = {
    "ce": (ce_forward, ce_objective, ("h", "w", "b", "cw", "y", "g"), "rkcctt", 4),
    "log_probs": (lp_forward, lp_objective, ("h", "w", "b", "y", "t"), "rkctt", 3),
    "kl": (kl_forward, kl_objective, ("h", "w", "b", "ht", "wt", "g"), "rkcrkt", 5),
    "js": (js_forward, js_objective, ("h", "w", "b", "ht", "wt", "g"), "rkcrkt", 5),
}
LAYOUTS = {  # kernel spec, column spec
    "data": (P(None, None), P(None)),
    "vocab": (P(None, "model"), P("model")),
    "fsdp": (P("model", None), P(None)),
}


def spec_of(role, layout):
    kernel, column = LAYOUTS[layout]
    return {"r": P(*ROW), "t": P(*TOK), "k": kernel, "c": column}[role]


def collectives(compiled) -> list[tuple[str, int]]:
    """``(kind, elements of its largest output)`` of every collective in compiled HLO."""
    found = []
    for line in compiled.as_text().splitlines():
        m = COLLECTIVE.search(line)
        if m:
            sizes = [
                int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
                for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            ]
            found.append((m.group(2), max(sizes, default=1)))
    return found


def assert_close(got, want, what):
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), err_msg=what, **TOL)


def spec_tuple(sharding, ndim):
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def check(kind, mesh, name, layout, arrays, wants):
    _, objective, names, roles, count = CASES[name]
    vocab_axis = "model" if kind == "auto" and layout != "data" else None
    specs = [spec_of(r, layout) for r in roles]
    with jax.set_mesh(mesh):
        args = [
            jax.device_put(arrays[n], jax.NamedSharding(mesh, s))
            for n, s in zip(names, specs, strict=True)
        ]
        argnums = tuple(range(count))
        grad_fn = (
            jax.jit(
                jax.value_and_grad(
                    lambda *a: objective(*a, vocab_axis=vocab_axis), argnums, has_aux=True
                )
            )
            .lower(*args)
            .compile()
        )
        (value, outs), grads = grad_fn(*args)
        got = (value, grads)
        what = f"{kind} {name} {layout}"
        assert_close(got, wants[name][0], what + " value and gradients")
        assert_close(outs, wants[name][1], what + " outputs")
        # Gradients keep their inputs' shardings (Explicit), vocabulary-sharded kernels.
        for n, role, spec, grad in zip(names, roles, specs, grads, strict=False):
            have = spec_tuple(grad.sharding, grad.ndim)
            if kind == "explicit":
                assert have == spec_tuple(jax.NamedSharding(mesh, spec), grad.ndim), (what, n, have)
            elif role == "k" and layout != "data":
                assert have == (None, "model"), (what, n, have)
            elif role == "r":
                assert have == ROW, (what, n, have)
        for out in jax.tree.leaves(outs):
            if out.ndim:
                assert spec_tuple(out.sharding, 1) == TOK, (what, out.sharding)
        kernel_size = D * V
        for op, size in collectives(grad_fn):
            assert not (op == "all-gather" and size >= kernel_size // 2), (what, op, size)
    print("ok", kind, name, layout, flush=True)


def per_token_only(kind, mesh, arrays):
    """Data parallel, the per-token outputs of every fused loss compile with no collective."""
    with jax.set_mesh(mesh):
        put = {"h": ROW, "ht": ROW, "y": TOK, "t": TOK, "w": (), "wt": ()}
        h, ht, y, t, w, wt = (jax.device_put(arrays[n], P(*s)) for n, s in put.items())

        def f(h, ht, y, t, w, wt):
            ce, aux = jaxce.linear_softmax_cross_entropy(h, w, y, return_aux=True, **CE)
            lp = jaxce.linear_log_probs(h, w, y, temperature=t, return_entropy=True)
            kl = jaxce.linear_softmax_kl_divergence(h, w, ht, wt, temperature=2.0)
            js = jaxce.linear_js_divergence(h, w, ht, wt, beta=0.3)
            return ce, aux, lp, kl, js

        assert collectives(jax.jit(f).lower(h, ht, y, t, w, wt).compile()) == [], kind
    print("ok", kind, "per-token no collective", flush=True)


def padded(kind, mesh):
    """A vocabulary of 90 columns over 4 shards, the kernel FSDP-sharded: padded, then
    re-laid out over the vocabulary (Explicit automatically, Auto with ``vocab_axis``)."""
    arrays = data(90)
    args = [arrays[n] for n in ("h", "w", "b", "cw", "y", "g")]
    want = jax.value_and_grad(lambda *a: ce_objective(*a)[0], (0, 1, 2, 3))(*args)
    with jax.set_mesh(mesh):
        specs = (P(*ROW), P("model", None))  # 90 columns cannot be sharded over 4 devices
        placed = [jax.device_put(a, s) for a, s in zip(args[:2], specs, strict=True)] + args[2:]
        vocab_axis = "model" if kind == "auto" else None
        got = jax.jit(
            jax.value_and_grad(lambda *a: ce_objective(*a, vocab_axis=vocab_axis)[0], (0, 1, 2, 3))
        )(*placed)
    assert_close(got, want, f"{kind} padded vocabulary")
    print("ok", kind, "padded vocabulary", flush=True)


def memory(kind, mesh):
    """Per-device temporaries of value-and-grad: fused vocab-parallel vs materialised."""
    n, d, v = 2048, 512, 65536
    vocab_axis = "model" if kind == "auto" else None
    h = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=jax.NamedSharding(mesh, P(*ROW)))
    w = jax.ShapeDtypeStruct(
        (d, v), jnp.float32, sharding=jax.NamedSharding(mesh, P(None, "model"))
    )
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=jax.NamedSharding(mesh, P(*TOK)))

    def materialised(h, w, y):  # the logits, then the loss by hand (elementwise label pick)
        z = h @ w
        picked = jnp.sum(jnp.where(jnp.arange(v) == y[:, None], z, 0.0), axis=-1)
        return jnp.mean(jax.nn.logsumexp(z, axis=-1) - picked)

    def fused_mean(h, w, y):
        return jaxce.linear_softmax_cross_entropy(h, w, y, reduction="mean", vocab_axis=vocab_axis)

    def fused_none(h, w, y):
        loss = jaxce.linear_softmax_cross_entropy(h, w, y, vocab_axis=vocab_axis)
        return jnp.mean(loss)

    def log_probs(h, w, y):
        lp, ent = jaxce.linear_log_probs(h, w, y, return_entropy=True, vocab_axis=vocab_axis)
        return jnp.mean(lp + 0.01 * ent)

    def temp(f):
        compiled = jax.jit(jax.value_and_grad(f, (0, 1))).lower(h, w, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    with jax.set_mesh(mesh):
        base = temp(materialised)
        sizes = {f.__name__: temp(f) for f in (fused_mean, fused_none, log_probs)}
    mib = {k: round(s / 2**20, 1) for k, s in sizes.items()}
    print("memory", kind, "materialised MiB", round(base / 2**20, 1), "fused MiB", mib)
    for f, size in sizes.items():
        assert size <= base / 2, (kind, f, size, base)
        assert size <= 64 * 2**20, (kind, f, size)  # O(chunk): tiles, not (N, V) logits
    print("ok", kind, "memory", flush=True)


def main():
    assert len(jax.devices()) == 8, jax.devices()
    arrays = data()
    wants = {}
    for name, (_, objective, names, _, count) in CASES.items():
        args = [arrays[n] for n in names]
        (value, outputs), grads = jax.jit(
            jax.value_and_grad(objective, tuple(range(count)), has_aux=True)
        )(*args)
        wants[name] = ((value, grads), outputs)
    kinds = {"explicit": jax.sharding.AxisType.Explicit, "auto": jax.sharding.AxisType.Auto}
    for kind in sys.argv[1:] or kinds:
        axis = kinds[kind]
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis, axis))
        for name in CASES:
            for layout in LAYOUTS:
                if layout == "fsdp" and name != "ce":
                    continue  # the same dispatch as the cross-entropy's
                check(kind, mesh, name, layout, arrays, wants)
        per_token_only(kind, mesh, arrays)
        padded(kind, mesh)
        memory(kind, mesh)


if __name__ == "__main__":
    main()

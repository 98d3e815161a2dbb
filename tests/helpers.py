"""JAX-side test machinery shared by the test modules: gradient checks, tolerances, transforms,
and the inputs that a family's core tests and its parity tests draw alike.

The float64 references themselves live in ``reference.py``, which imports only NumPy.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from reference import log_softmax

# ----------------------------------------------------------------------------- checks

# XLA:CPU flags that cut compile time 2-6x: LLVM unoptimised, and the elemental emitters in
# place of the MLIR fusion emitters. The HLO passes (the partitioner's collectives, buffer
# assignment) are unchanged, and so are the values to within last bits. Compile is most of a
# test's time: the root ``conftest.py`` sets these for the suite (``JAXCE_TEST_CODEGEN=default``
# leaves XLA's defaults, as CI's second pass over the numerical-rule tests does), and
# ``host_devices_env`` for the sharding check scripts.
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)


def _numerical_jvp(f, args, tangents, eps):
    plus = f(*jax.tree.map(lambda a, t: a + eps * t, args, tangents))
    minus = f(*jax.tree.map(lambda a, t: a - eps * t, args, tangents))
    return jax.tree.map(lambda p, m: (p - m) * (0.5 / eps), plus, minus)


def _inner(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _gradient_checks(f, args, order, modes, eps, rng):
    """``jax.test_util.check_grads``'s recursion, traced: ``[(what, got, want)]``.

    At each order, ``"fwd"``: the JVP's primal equals ``f``, its tangent the central
    difference along a random tangent; ``"rev"``: the VJP's primal equals ``f``, and the
    VJP of a random cotangent dotted with a random tangent equals the cotangent dotted with
    the central difference. The next order checks ``(x, t) -> jvp(f, x, t)`` at ``(x, x)``
    and ``x -> vjp(f, x)(f(x))`` the same way.
    """

    def rand_like(tree):
        return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), x.dtype), tree)

    checks = []

    def recurse(f, args, order, what):
        if "fwd" in modes:
            name = f"JVP of {what}" if what else "JVP"
            tangent = rand_like(args)
            primal, tangent_out = jax.jvp(f, args, tangent)
            checks.append((f"{name} primal", primal, f(*args)))
            checks.append((name, tangent_out, _numerical_jvp(f, args, tangent, eps)))
            if order > 1:
                recurse(functools.partial(jax.jvp, f), (args, args), order - 1, name)
        if "rev" in modes:
            name = f"VJP of {what}" if what else "VJP"
            primal, vjp = jax.vjp(f, *args)
            checks.append((f"{name} primal", primal, f(*args)))
            tangent = rand_like(args)
            cotangent = rand_like(primal)
            numeric = _inner(_numerical_jvp(f, args, tangent, eps), cotangent)
            checks.append((name, numeric, _inner(tangent, vjp(cotangent))))
            if order > 1:

                def f_vjp(*args):
                    primal, vjp = jax.vjp(f, *args)
                    return vjp(primal)

                recurse(f_vjp, args, order - 1, name)

    recurse(f, tuple(args), order, "")
    return checks


def check_grads(f, args, order, modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5):
    """``jax.test_util.check_grads(f, args, order, modes, ...)``: the same checks in the same
    recursion, traced into one program.

    ``jax.test_util.check_grads`` runs each derivative eagerly, compiling a program for every
    JVP, VJP and difference of every order; here they are one ``jit``, and the comparisons
    run on its outputs. ``args`` are JAX arrays (use ``jax.enable_x64`` for float64).
    """
    names = []

    def run(*args):
        checks = _gradient_checks(f, args, order, modes, eps, np.random.RandomState(0))
        names[:] = [name for name, _, _ in checks]
        return [(got, want) for _, got, want in checks]

    results = jax.jit(run)(*args)
    for name, (got, want) in zip(names, results, strict=True):
        got, want = jax.tree.leaves(got), jax.tree.leaves(want)
        assert len(got) == len(want), name
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype, f"{name}: dtype {g.dtype}, expected {w.dtype}"
            np.testing.assert_allclose(
                np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=name
            )


def check_grads_2(f, args, eps=1e-4, atol=1e-5, rtol=1e-5):
    """``check_grads`` to order 2 in forward and reverse mode, in float64.

    ``args`` are NumPy arrays; they are converted to float64 JAX arrays inside ``enable_x64``.
    """
    with jax.enable_x64(True):
        jargs = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in args)
        check_grads(f, jargs, order=2, modes=("fwd", "rev"), eps=eps, atol=atol, rtol=rtol)


def check_half_precision_policy(f, a, b, dtype, rtol, atol):
    """``f(a, b)`` on ``dtype`` inputs: a float32 result equal to ``f`` on the same values in
    float32, and a gradient with respect to ``a`` in ``dtype`` (the contract's precision rule).
    """
    ah, bh = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    got = f(ah, bh)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, f(np.asarray(ah, np.float32), np.asarray(bh, np.float32)), rtol=rtol, atol=atol
    )
    assert jax.grad(lambda v: jnp.sum(f(v, bh)))(ah).dtype == dtype


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    """``assert_allclose`` for an array or for matching tuples of arrays."""
    if isinstance(want, tuple):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)
    else:
        np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)


def assert_transforms_match_eager(f, *args, rtol=1e-5, atol=1e-6):
    """``f(*args)`` under one ``jit`` equals the eager call, plain, vmapped over the leading
    axis, vmapped over axis 1 and under ``checkpoint``."""
    eager = np.asarray(f(*args))
    transformed = jax.jit(
        lambda *args: (
            f(*args),
            jax.vmap(f)(*args),
            jax.vmap(f, in_axes=1, out_axes=1)(*args),
            jax.checkpoint(f)(*args),
        )
    )(*args)
    for got in transformed:
        assert_close(got, eager, rtol=rtol, atol=atol)


def derivatives(f):
    """One jitted function returning, for ``f(x, *params)``, the value, the reverse-mode
    gradient of ``sum(f)``, the forward-mode derivative of ``f`` along ones, and their
    derivatives along ones (fwd over rev, fwd over fwd), all w.r.t. ``x``. Parameters are
    traced, so parametrized cases share one compile."""

    def run(x, *params):
        g = lambda x: f(x, *params)
        ones = jnp.ones_like(x)
        rev = jax.grad(lambda x: jnp.sum(g(x)))
        fwd = lambda x: jax.jvp(g, (x,), (ones,))[1]
        return (
            g(x),
            rev(x),
            fwd(x),
            jax.jvp(rev, (x,), (ones,))[1],
            jax.jvp(fwd, (x,), (ones,))[1],
        )

    return jax.jit(run)


# ----------------------------------------------------------------------------- shared inputs
REDUCTIONS = ("none", "sum", "mean")

SOFTMAX_SHAPE = (6, 5)  # (examples, classes)


def softmax_data(seed=0, n=SOFTMAX_SHAPE[0], c=SOFTMAX_SHAPE[1], scale=2.0):
    """Logits, integer labels, probability targets, a class mask keeping each label, class
    weights and sample weights for the softmax family, float32."""
    rng = np.random.default_rng(seed)
    x = (scale * rng.normal(size=(n, c))).astype(np.float32)
    y = rng.integers(0, c, size=n).astype(np.int32)
    t = rng.dirichlet(np.ones(c), size=n).astype(np.float32)
    mask = rng.uniform(size=(n, c)) > 0.3
    mask[np.arange(n), y] = True
    cw = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    sw = rng.uniform(0.0, 2.0, size=n).astype(np.float32)
    return x, y, t, mask, cw, sw


BINARY_SHAPE = (3, 4)  # also the divergence tests' shape: eagerly compiled primitives are shared


def binary_data(rng, soft=True):
    """Logits (scale 3) and soft or hard {0, 1} labels of ``BINARY_SHAPE``, float64."""
    x = rng.normal(size=BINARY_SHAPE) * 3
    y = (
        rng.uniform(size=BINARY_SHAPE)
        if soft
        else (rng.uniform(size=BINARY_SHAPE) > 0.5).astype(float)
    )
    return x, y


BINARY_FOCAL_OPTIONS = [
    {"gamma": 2.0},
    {"gamma": 0.0},
    {"gamma": 1.5, "alpha": 0.25},
    {"gamma": 2.0, "alpha": np.array([[0.1, 0.5, 0.75, 0.9]])},
]


def probability_targets(rng, shape):
    """Rows of a probability distribution bounded away from 0."""
    p = rng.uniform(0.1, 1.0, size=shape)
    return p / p.sum(-1, keepdims=True)


def divergence_inputs(rng, kind, shape=BINARY_SHAPE):
    """A first argument (log-predictions when ``kind`` is "probs" or "log_probs", else logits)
    and a second of ``kind``: None (unused), "logits", "probs" or "log_probs"; float64."""
    a = rng.normal(size=shape) * 2
    if kind in ("probs", "log_probs"):
        a = log_softmax(a)  # log-predictions
    b = {
        None: rng.normal(size=shape),
        "logits": rng.normal(size=shape) * 2,
        "probs": probability_targets(rng, shape),
        "log_probs": np.log(probability_targets(rng, shape)),
    }[kind]
    return a, b


# ------------------------------------------------------------- scripts on several host devices

TESTS_DIR = pathlib.Path(__file__).resolve().parent


def script_env(xla_flags: str | None) -> dict[str, str]:
    """The environment of a script run as a subprocess: this one's, with the checkout's
    ``jaxce`` first on the path (where the checkout has none, as in CI's installed-wheel step,
    the installed one is used) and ``XLA_FLAGS`` set to ``xla_flags`` (left out for ``None``)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    root = str(TESTS_DIR.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


def host_devices_env(count: int) -> dict[str, str]:
    """The environment of a check script that needs ``count`` CPU devices, compiling with
    ``FAST_COMPILE_FLAGS`` (the device count is fixed when JAX starts, so such checks run as
    subprocesses)."""
    flags = (f"--xla_force_host_platform_device_count={count}", *FAST_COMPILE_FLAGS)
    return dict(script_env(" ".join(flags)), JAX_PLATFORMS="cpu")


def run_host_devices_script(name: str, count: int, timeout_s: float = 600) -> list[str]:
    """Runs ``tests/<name>`` on ``count`` host devices: asserts it exits 0, returns its words."""
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / name)],
        env=host_devices_env(count),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split()


# ----------------------------------------------------------------------------- the examples

EXAMPLES_DIR = TESTS_DIR.parent / "examples"


def load_example(name: str):
    """``examples/<name>.py`` loaded from its file (the scripts are not a package), with
    ``examples/`` on ``sys.path`` for their shared ``_training_support``, as ``python
    examples/<name>.py`` has it."""
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

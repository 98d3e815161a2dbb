"""``helpers.check_grads``, the one-program twin of ``jax.test_util.check_grads`` that the
gradient tests use: it passes where the derivatives are right and fails, as
``jax.test_util.check_grads`` does, on a wrong first derivative, a wrong second derivative
(forward or reverse) and a JVP rule whose primal disagrees with the function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_grads
from jax.test_util import check_grads as jax_check_grads


def _with_derivative(derivative, primal_shift=0.0):
    """``sin`` with the JVP rule ``derivative(x) * t`` (its primal shifted by ``primal_shift``)."""

    @jax.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        return jnp.sin(x) + primal_shift, derivative(x) * t

    return f


@jax.custom_jvp
def _cos_with_wrong_derivative(x):
    return jnp.cos(x)


_cos_with_wrong_derivative.defjvp(lambda p, t: (jnp.cos(p[0]), jnp.sin(p[0]) * t[0]))

CASES = {
    "right": (_with_derivative(jnp.cos), None),
    # what the failure's message names: the check that failed (assert_allclose's err_msg line)
    "wrong first derivative": (_with_derivative(lambda x: 1.1 * jnp.cos(x)), r"\n(JVP|VJP)\n"),
    "wrong second derivative": (
        _with_derivative(_cos_with_wrong_derivative),
        "(JVP|VJP) of (JVP|VJP)",
    ),
    "wrong primal": (_with_derivative(jnp.cos, primal_shift=1e-3), "primal"),
}


@pytest.mark.parametrize("modes", [("fwd",), ("rev",), ("fwd", "rev")], ids="+".join)
@pytest.mark.parametrize("case", CASES)
def test_check_grads_agrees_with_jax(case, modes):
    f, failure = CASES[case]
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)))
        g = lambda x: f(x) * x  # a product, so reverse mode transposes through the rule
        if failure is None:
            check_grads(g, (x,), order=2, modes=modes)
            jax_check_grads(g, (x,), order=2, modes=modes)
            return
        with pytest.raises(AssertionError, match=failure):
            check_grads(g, (x,), order=2, modes=modes)
        with pytest.raises(AssertionError):
            jax_check_grads(g, (x,), order=2, modes=modes)

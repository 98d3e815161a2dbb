"""Public losses are jit-compiled functions, as ``jax.nn``'s are.

``public`` wraps a loss in ``jax.jit`` so that an eager call costs one dispatch of a cached
executable, not a trace. Before the call it does the few things only Python can do:

* options that shape the computation (``axis``, ``reduction``, ``ignore_index``, sizes) are
  static and brought to a hashable canonical form (NumPy ints become ``int``, lists tuples);
* float hyperparameters stay traced, so a schedule under an outer ``jit`` never recompiles,
  but a concrete (Python or NumPy) value outside its domain raises ``ValueError`` here;
* an ``optional`` hyperparameter that is a concrete ``0`` is passed as ``None``, so that the
  loss compiles without its term (``_checks.is_off``) instead of adding a traced zero;
* a call with concrete arrays dispatches an executable without ``checkify`` value checks
  (they slow every dispatch; checkify cannot see such a call anyway), a traced call (under
  an outer ``jit``, ``grad`` or ``checkify``) traces the loss with them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import ParamSpec, TypeVar

import jax
from jax import core

from jaxce import _checks

P = ParamSpec("P")
R = TypeVar("R")


def public(
    *,
    static: Sequence[str] = (),
    optional: Sequence[str] = (),
    domains: Mapping[str, _checks.Domain] | None = None,
    reverse_mode_only: str | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: ``jax.jit`` with static ``static`` options and eager parameter checks.

    ``reverse_mode_only`` (the fused losses, whose core is a ``custom_vjp``) names the
    materialised alternative: forward-mode differentiation fails with a message naming the
    function and it.
    """
    static = tuple(static)
    optional = tuple(optional)
    domains = dict(domains or {})

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(fn)
        compiled = {emit: _compile(fn, static, emit) for emit in (True, False)}

        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            bound = signature.bind(*args, **kwargs)
            given = bound.arguments
            for name in static:
                if name in given:
                    given[name] = _checks.static_option(given[name], name)
            for name, domain in domains.items():
                if name in given:
                    _checks.check_concrete_domain(given[name], name, domain)
            for name in optional:
                if name in given and _checks.is_zero(given[name]):
                    given[name] = None
            traced = any(isinstance(v, core.Tracer) for v in jax.tree.leaves(given))
            if reverse_mode_only is None:
                return compiled[traced](**given)
            try:
                return compiled[traced](**given)
            except TypeError as err:
                if "forward-mode" not in str(err) and "jvp" not in str(err):
                    raise
                raise TypeError(
                    f"jaxce.{fn.__name__} supports reverse-mode differentiation only "
                    "(jax.grad, jax.value_and_grad, jax.vjp, under jit, vmap and checkpoint); "
                    f"for jax.jvp or jax.jacfwd use the materialised {reverse_mode_only}."
                ) from err

        return call

    return decorate


def _compile(fn: Callable, static: tuple[str, ...], emit_value_checks: bool) -> Callable:
    """``jax.jit(fn)`` whose trace emits ``checkify`` value checks or not (see ``_checks``)."""

    @functools.wraps(fn)
    def traced(**arguments):
        with _checks.value_checks(emit_value_checks):
            return fn(**arguments)

    return jax.jit(traced, static_argnames=static)

"""``jaxce.pytorch``'s signatures are torch 2.13's, and the deprecated arguments map as there.

Signatures are compared with ``inspect.signature`` of torch's own functions and module
constructors (names, kinds, defaults, order; not annotations). The legacy
``size_average``/``reduce`` mapping and its warning are compared with what torch does on the
same call.
"""

from __future__ import annotations

import inspect
import itertools
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxce import pytorch

torch = pytest.importorskip("torch")

FUNCTIONS = [
    "cross_entropy",
    "nll_loss",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
]
MODULES = ["CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss", "KLDivLoss"]


def _parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_functional_signature_is_torchs(name):
    assert _parameters(getattr(pytorch, name)) == _parameters(getattr(torch.nn.functional, name))


@pytest.mark.parametrize("name", MODULES)
def test_module_constructor_signature_is_torchs(name):
    assert _parameters(getattr(pytorch, name)) == _parameters(getattr(torch.nn, name))


@pytest.mark.parametrize("name", MODULES)
def test_module_call_takes_input_and_target(name):
    ours = [p.name for p in inspect.signature(getattr(pytorch, name).forward).parameters.values()]
    theirs = [
        p.name for p in inspect.signature(getattr(torch.nn, name).forward).parameters.values()
    ]
    assert ours == theirs == ["self", "input", "target"]


def _inputs(name, rng):
    """``(input, target)`` as NumPy float32/int64 arrays suited to the functional ``name``."""
    x = rng.normal(size=(4, 3)).astype(np.float32)
    if name in ("cross_entropy", "nll_loss"):
        if name == "nll_loss":
            x = x - np.log(np.exp(x).sum(1, keepdims=True))
        return x, rng.integers(0, 3, size=4)
    if name == "binary_cross_entropy":
        return 1 / (1 + np.exp(-x)), rng.random((4, 3)).astype(np.float32)
    if name == "binary_cross_entropy_with_logits":
        return x, rng.random((4, 3)).astype(np.float32)
    p = rng.random((4, 3)).astype(np.float32)
    return np.log(1 / (1 + np.exp(-x))), p / p.sum(1, keepdims=True)


def _run(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [(w.category, str(w.message)) for w in caught]


LEGACY = list(itertools.product([None, True, False], [None, True, False]))


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize(("size_average", "reduce"), LEGACY)
def test_legacy_arguments_map_to_reduction_as_in_torch(name, size_average, reduce, rng):
    x, t = _inputs(name, rng)
    # A `reduction` that the legacy arguments must override whenever one of them is given.
    kwargs = dict(size_average=size_average, reduce=reduce, reduction="sum")
    want, torch_warnings = _run(
        getattr(torch.nn.functional, name), torch.from_numpy(x), torch.from_numpy(t), **kwargs
    )
    got, our_warnings = _run(getattr(pytorch, name), jnp.asarray(x), jnp.asarray(t), **kwargs)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=2e-5, atol=2e-6)
    # kl_div's "mean" warns about itself in torch; only the deprecation warning is compared.
    torch_warnings = [w for w in torch_warnings if "deprecated" in w[1]]
    assert [w[0] for w in our_warnings] == [w[0] for w in torch_warnings]
    if size_average is None and reduce is None:
        assert our_warnings == []
    else:
        assert our_warnings[0][0] is UserWarning and "deprecated" in our_warnings[0][1]


@pytest.mark.parametrize("name", MODULES)
def test_module_legacy_arguments_warn_at_construction_as_in_torch(name):
    with pytest.warns(UserWarning, match="deprecated"):
        criterion = getattr(pytorch, name)(size_average=False)
    with pytest.warns(UserWarning):
        reference = getattr(torch.nn, name)(size_average=False)
    assert criterion.reduction == reference.reduction == "sum"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(pytorch, name)(reduction="none").reduction == "none"


def test_positional_call_reads_ignore_index_where_torch_does(rng):
    x = rng.normal(size=(5, 3)).astype(np.float32)
    t = np.array([0, 1, 2, 0, 1])
    w = np.array([1.0, 2.0, 0.5], np.float32)
    want = torch.nn.functional.cross_entropy(
        torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(w), None, 0
    )
    got = pytorch.cross_entropy(jnp.asarray(x), jnp.asarray(t), jnp.asarray(w), None, 0)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=2e-5)
    # ignore_index=0 really took effect: the result differs from the default ignore_index.
    assert not np.isclose(float(got), float(pytorch.cross_entropy(x, t, w)))


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("cross_entropy", (None, None, -100, None, "sum", 0.1)),
        ("nll_loss", (None, None, 1, None, "none")),
        ("binary_cross_entropy", (None, None, None, "sum")),
        ("binary_cross_entropy_with_logits", (None, None, None, "none", None)),
        ("kl_div", (None, None, "batchmean", False)),
    ],
)
def test_every_positional_argument_lands_where_torch_puts_it(name, args, rng):
    x, t = _inputs(name, rng)
    want = getattr(torch.nn.functional, name)(torch.from_numpy(x), torch.from_numpy(t), *args)
    got = getattr(pytorch, name)(jnp.asarray(x), jnp.asarray(t), *args)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=2e-5, atol=2e-6)

"""optax's own test classes for the names jaxce adds, run with jaxce in optax's place.

The test modules ship in the installed optax wheel (``optax/losses/*_test.py``); nothing of
them is copied here. They call the losses through the module objects
``optax.losses._classification`` and ``optax.losses._self_supervised``; each test below
replaces those attributes with jaxce's functions (wrapped to count calls, so the test proves
that jaxce ran), runs the classes with unittest's loader and asserts that every test ran and
none failed, errored or was skipped.
"""

from __future__ import annotations

import functools
import importlib
import io
import unittest

import pytest

import jaxce

pytest.importorskip("optax")
pytest.importorskip("absl")

CLASSIFICATION = "optax.losses._classification_test"
SELF_SUPERVISED = "optax.losses._self_supervised_test"

CASES = [
    (CLASSIFICATION, "SafeSoftmaxCrossEntropyTest", ["safe_softmax_cross_entropy"]),
    (
        CLASSIFICATION,
        "GeneralizedKLDivergenceTest",
        ["generalized_kl_divergence", "convex_kl_divergence"],
    ),
    (CLASSIFICATION, "CTCTest", ["ctc_loss", "ctc_loss_with_forward_probs"]),
    (SELF_SUPERVISED, "NtxentTest", ["ntxent"]),
]


def _counting(fn, calls, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize(("module_name", "class_name", "names"), CASES)
def test_optax_test_class_passes_with_jaxce(module_name, class_name, names, monkeypatch):
    test_module = importlib.import_module(module_name)
    # The module object the tests call through (`_classification.ctc_loss(...)`).
    loss_module = getattr(test_module, module_name.rsplit(".", 1)[1].removesuffix("_test"))
    calls: dict[str, int] = {}
    for name in names:
        assert hasattr(loss_module, name), f"optax has no {name}; the test would not cover it"
        monkeypatch.setattr(loss_module, name, _counting(getattr(jaxce, name), calls, name))
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(getattr(test_module, class_name))
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
    problems = [f"{test}: {trace}" for test, trace in result.failures + result.errors]
    assert not problems, "\n".join(problems)
    assert result.testsRun == suite.countTestCases() > 0
    assert not result.skipped and not result.expectedFailures
    # Every substituted name was called: jaxce, not optax, produced the results checked.
    assert sorted(calls) == sorted(names), calls

"""Session-wide test settings: how XLA compiles, the doctests' print precision, the order the
tests run in, and which tests check numerical rules."""

import os
import re

import numpy as np
import pytest
from helpers import FAST_COMPILE_FLAGS

# Compile is most of the suite's time, and XLA:CPU's default code generation (LLVM at -O2,
# the MLIR fusion emitters) most of compile. The suite compiles with ``FAST_COMPILE_FLAGS``
# (about half the time; every test passes either way). Users' programs compile with the
# defaults, so the tests of numerical rules (``numerics`` below) run a second time with
# ``JAXCE_TEST_CODEGEN=default`` in CI (``.ci/run``). XLA reads ``XLA_FLAGS`` when JAX starts
# its backend, which no test has done when this runs.
CODEGEN = os.environ.get("JAXCE_TEST_CODEGEN", "fast")
if CODEGEN not in ("fast", "default"):
    raise ValueError(f"JAXCE_TEST_CODEGEN must be 'fast' or 'default', not {CODEGEN!r}")
if CODEGEN == "fast":
    os.environ["XLA_FLAGS"] = " ".join((os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE_FLAGS))

# The tests of numerical rules, by the words of their names: NaN propagation, infinities and
# extreme values, exact zeros, overflow, memory bounds, bad input; and the conformance
# matrix's cells of those rules (dtypes, empty batches, NaN, identity, jit against eager).
NUMERICS_WORDS = {
    "nan", "inf", "infinite", "infinities", "extreme", "extremes", "limit", "limits",
    "huge", "large", "exact", "exactly", "identical", "overflow", "finite", "memory",
    "max", "bad",
}  # fmt: skip
NUMERICS_CELLS = {"nan", "identical", "float64", "float32", "bfloat16", "empty", "jit"}


def _is_numerics(item) -> bool:
    if "test_bad_input.py" in item.nodeid:
        return True
    if "test_docs.py" in item.nodeid:  # the guides' code, not rules
        return False
    words = set(re.split(r"[_\-\[\]:.]+", item.nodeid.split("::", 1)[-1]))
    if "test_conformance.py::test_cell" in item.nodeid:
        return bool(words & NUMERICS_CELLS)
    return bool(words & NUMERICS_WORDS)


@pytest.fixture(autouse=True)
def _doctest_print_precision(request):
    if isinstance(request.node, pytest.DoctestItem):
        with np.printoptions(precision=4, suppress=True):
            yield
    else:
        yield


def pytest_collection_modifyitems(items):
    """Marks the ``numerics`` tests. Puts the slow tests first: under ``-n 2 --dist
    worksteal`` a worker that runs out of tests takes the other's remaining ones from the end,
    so the long tests must not be left there."""
    for item in items:
        if _is_numerics(item):
            item.add_marker("numerics")
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

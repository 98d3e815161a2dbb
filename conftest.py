"""Session-wide test settings: the doctests' print precision, and the order the tests run in."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_print_precision(request):
    if isinstance(request.node, pytest.DoctestItem):
        with np.printoptions(precision=4, suppress=True):
            yield
    else:
        yield


def pytest_collection_modifyitems(items):
    """The slow tests first: under ``-n 2 --dist worksteal`` a worker that runs out of tests
    takes the other's remaining ones from the end, so the long tests must not be left there."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

"""Session-wide test settings: the doctests' print precision, and how ``pytest -n 2 --dist
loadgroup`` shares the work between its workers."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_print_precision(request):
    if isinstance(request.node, pytest.DoctestItem):
        with np.printoptions(precision=4, suppress=True):
            yield
    else:
        yield


def _work_group(item: pytest.Item) -> str:
    """The tests that share compiled functions: a module's doctests, the cells of one
    conformance-matrix entry, the parametrisations of one test function."""
    module = item.nodeid.split("::")[0]
    if isinstance(item, pytest.DoctestItem):
        return module
    entry = getattr(getattr(item, "callspec", None), "params", {}).get("entry")
    if entry is not None and hasattr(entry, "id"):
        return f"{module}::{entry.id}"
    return f"{module}::{getattr(item, 'originalname', item.name)}"


@pytest.hookimpl(tryfirst=True)  # before xdist names the groups
def pytest_collection_modifyitems(config, items):
    """The slow tests first, so that neither worker is left with one at the end; under
    ``--dist loadgroup`` each worker takes whole groups (``_work_group``), so a compile that
    several tests share happens in one worker, once."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if getattr(config.option, "loadgroup", False):
        for item in items:
            if item.get_closest_marker("xdist_group") is None:
                item.add_marker(pytest.mark.xdist_group(_work_group(item)))

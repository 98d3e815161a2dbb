"""Doctest settings: arrays print with 4 decimals, as the docstrings show them."""

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_print_precision(request):
    if isinstance(request.node, pytest.DoctestItem):
        with np.printoptions(precision=4, suppress=True):
            yield
    else:
        yield

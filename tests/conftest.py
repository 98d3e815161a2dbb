"""Shared test settings: implicit rank promotion is an error, so library code broadcasts
explicitly and works for users who run with ``jax_numpy_rank_promotion="raise"``."""

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    return np.random.default_rng(0)

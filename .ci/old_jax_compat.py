"""pytest plugin for the oldest-jax run: the tests spell names that older jax has elsewhere.

The library itself needs none of this; only the test files use ``jax.enable_x64`` (a top-level
name since jax 0.8; ``jax.experimental.enable_x64`` before).
"""

import jax

if not hasattr(jax, "enable_x64"):
    from jax.experimental import enable_x64

    jax.enable_x64 = enable_x64

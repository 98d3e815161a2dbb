"""The conformance matrix's mesh cells: every public function data-parallel on a mesh.

``mesh_check.py`` runs every registry entry (``conformance_registry.ENTRIES``: core,
post-training, fused, ``jaxce.pytorch`` functions and modules, ``jaxce.sklearn``) under plain
``jax.jit`` on Explicit and Auto meshes of 4 and 8 host devices, in one subprocess (the device
count is fixed when JAX starts) run once per test session, and writes one result per cell.
Each test here is one cell, ``<entry>-mesh-<explicit|auto><devices>``: values and gradients
equal to the unsharded call, gradients with their input's sharding, per-example outputs
sharded over the batch, and no collective in the compiled per-example program (all-reduces
only for the scalar reductions and the gradients). See ``mesh_check.py`` for the details.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import filelock
import mesh_check
import pytest
from helpers import TESTS_DIR, host_devices_env

DEVICES = 8


def _run(out) -> dict:
    env = host_devices_env(DEVICES)
    proc = subprocess.run(
        [sys.executable, str(TESTS_DIR / "mesh_check.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if not out.exists():
        raise RuntimeError(f"mesh_check.py wrote no results:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def mesh_results(tmp_path_factory) -> dict:
    """The cells' results: one subprocess per session, shared by the xdist workers."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _run(tmp_path_factory.mktemp("mesh") / "cells.json")["cells"]
    shared = tmp_path_factory.getbasetemp().parent / "mesh_cells.json"
    with filelock.FileLock(str(shared) + ".lock"):
        if not shared.exists():
            _run(shared)
        return json.loads(shared.read_text())["cells"]


@pytest.mark.slow
@pytest.mark.parametrize("cell", mesh_check.cell_ids())
def test_mesh(cell, mesh_results):
    assert cell in mesh_results, f"{cell}: no result from mesh_check.py"
    result = mesh_results[cell]["result"]
    assert result == "ok", f"{cell}: {result}"

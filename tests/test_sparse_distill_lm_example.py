"""Smoke test for ``examples/sparse_distill_lm.py``: a few steps, the students move towards
the teacher, files are written."""

import importlib.util
import json
import pathlib
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sparse_distill_lm.py"

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def load_example():
    if str(EXAMPLE.parent) not in sys.path:  # for the shared _training_support
        sys.path.insert(0, str(EXAMPLE.parent))
    spec = importlib.util.spec_from_file_location("examples_sparse_distill_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sparse_distill_lm_smoke(tmp_path):
    args = ["--steps", "10", "--batch-size", "8", "--seq-len", "24", "--eval-every", "5"]
    args += ["--k", "4", "--pool", "32", "--student-dim", "16", "--teacher-dim", "32"]
    metrics = load_example().main([*args, "--no-progress", "--out", str(tmp_path)])
    assert metrics["steps"] == 10 and metrics["teacher_steps"] == 20 and metrics["k"] == 4
    for method in ("sparse_bucket", "sparse_renormalize", "full_kl"):
        assert metrics[f"{method}_last_loss"] < metrics[f"{method}_first_loss"], metrics
        assert metrics[f"{method}_val_kl"] < metrics[f"{method}_initial_val_kl"], metrics
    assert 0 < metrics["stored_mass"] <= 1.01
    assert metrics["stored_bytes_per_token"] < metrics["full_bytes_per_token"]
    png = tmp_path / "sparse_distill_lm.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "sparse_distill_lm.json").read_text())
    assert saved["sparse_bucket_val_ce"] == pytest.approx(metrics["sparse_bucket_val_ce"])

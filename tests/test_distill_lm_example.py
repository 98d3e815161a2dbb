"""Smoke test for ``examples/distill_lm.py``: a few steps, the losses fall, files are written."""

import json

import pytest
from helpers import load_example

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


@pytest.mark.slow
def test_distill_lm_smoke(tmp_path):
    args = ["--steps", "12", "--batch-size", "8", "--seq-len", "32", "--eval-every", "6"]
    metrics = load_example("distill_lm").main([*args, "--no-progress", "--out", str(tmp_path)])
    assert metrics["steps"] == 12 and metrics["teacher_steps"] == 24
    assert metrics["last_loss"] < metrics["first_loss"], metrics  # the distillation KL fell
    assert metrics["teacher_last_loss"] < metrics["teacher_first_loss"], metrics
    assert metrics["distilled_val_kl"] < metrics["initial_val_kl"], metrics
    assert metrics["student_params"] < metrics["teacher_params"]
    png = tmp_path / "distill_lm.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "distill_lm.json").read_text())
    assert saved["last_loss"] == pytest.approx(metrics["last_loss"])
    assert saved["distilled_val_ce"] == pytest.approx(metrics["distilled_val_ce"])

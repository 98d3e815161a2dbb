"""Tests for ``examples/dpo_tiny_lm.py``: its option parsing, and a short offline DPO run that
learns the preference."""

import importlib.util
import json
import math
import pathlib
import re
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "dpo_tiny_lm.py"

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("optax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

# Small enough for seconds of compute (most of it compilation); at this learning rate the
# held-out accuracy and the sampled reward rise within 30 steps (seed 0).
SMALL = (
    "--pretrain-steps 40 --steps 30 --pairs 64 --group-size 6 --prompt-len 8 "
    "--completion-len 10 --dim 16 --layers 1 --lr 3e-3 --beta 0.5 --eval-every 10 "
    "--batch-size 16 --no-progress"
)
SUMMARY = re.compile(
    r"dpo_tiny_lm: backend=\w+ steps=(?P<steps>\d+) "
    r"accuracy (?P<a0>\d\.\d{3}) -> (?P<a1>\d\.\d{3}) "
    r"reward (?P<r0>\d\.\d{3}) -> (?P<r1>\d\.\d{3}) "
    r"\(\d+ pairs, loss_type [\w,]+, target '.'\) time=\d+\.\ds"
)


def load_example():
    if str(EXAMPLE.parent) not in sys.path:  # for _training_support and grpo_tiny_lm
        sys.path.insert(0, str(EXAMPLE.parent))
    spec = importlib.util.spec_from_file_location("examples_dpo_tiny_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_become_dpo_loss_arguments():
    example = load_example()
    args = example.parse_args(["--loss-type", "sigmoid,bco_pair", "--loss-weights", "0.8,0.2"])
    assert example.dpo_options(args) == {
        "beta": 0.1,
        "loss_type": ("sigmoid", "bco_pair"),
        "loss_weights": (0.8, 0.2),
    }
    args = example.parse_args(["--loss-type", "exo_pair", "--f-divergence", "js_divergence"])
    options = example.dpo_options(args)
    assert options["loss_type"] == "exo_pair" and options["label_smoothing"] > 0
    assert options["f_divergence"] == "js_divergence"


@pytest.mark.slow
def test_dpo_smoke_learns_the_preference(tmp_path, capsys):
    metrics = load_example().main([*SMALL.split(), "--out", str(tmp_path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = SUMMARY.fullmatch(line)
    assert match, line
    assert float(match["a0"]) == pytest.approx(metrics["first_accuracy"], abs=5e-4)
    assert float(match["r1"]) == pytest.approx(metrics["reward_after"], abs=5e-4)
    history = metrics["history"]
    assert len(history["loss"]) == metrics["steps"] == 30
    assert all(math.isfinite(v) for v in history["loss"])
    # the first step is at the reference: DPO's sigmoid loss is log 2 there (up to the
    # rounding between the reference's and the policy's log-prob computations)
    assert history["loss"][0] == pytest.approx(math.log(2), abs=1e-3)
    # it learns the preference: held-out pairs ranked right, and the policy's own samples
    assert metrics["last_accuracy"] >= metrics["first_accuracy"] + 0.2, history["accuracy"]
    assert metrics["last_margin"] > metrics["first_margin"]
    assert metrics["reward_after"] > metrics["reward_before"] + 0.05
    png = tmp_path / "dpo_tiny_lm.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "dpo_tiny_lm.json").read_text())
    assert saved["history"]["accuracy"] == pytest.approx(history["accuracy"])

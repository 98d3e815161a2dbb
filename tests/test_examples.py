"""Smoke tests for the training scripts in ``examples/``.

The scripts are not a package: each is loaded from its file with ``importlib``. Every smoke
test runs a few steps and checks that the loss fell and that the metrics and figures were
written; ``test_classify_digits_default_run`` trains the main demo with its default settings
and checks the held-out accuracy it promises.
"""

import importlib.util
import json
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_outputs(metrics: dict, out: pathlib.Path, name: str) -> None:
    assert metrics["last_loss"] < metrics["first_loss"], metrics
    png = out / f"{name}.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["last_loss"] == pytest.approx(metrics["last_loss"])


@pytest.mark.slow
def test_classify_digits_smoke(tmp_path):
    example = load_example("classify_digits")
    args = ["--steps", "40", "--batch-size", "64", "--eval-every", "20", "--no-progress"]
    metrics = example.main([*args, "--out", str(tmp_path)])
    check_outputs(metrics, tmp_path, "classify_digits")
    assert metrics["steps"] == 40
    again = example.main([*args, "--out", str(tmp_path)])
    assert again["last_loss"] == metrics["last_loss"]  # deterministic for a seed
    assert again["test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.slow
def test_classify_digits_default_run(tmp_path):
    """The README promises >= 97% held-out accuracy for the default run."""
    metrics = load_example("classify_digits").main(["--no-progress", "--out", str(tmp_path)])
    check_outputs(metrics, tmp_path, "classify_digits")
    assert metrics["test_accuracy"] >= 0.97, metrics


@pytest.mark.slow
def test_segment_shapes_smoke(tmp_path):
    example = load_example("segment_shapes")
    metrics = example.main(
        [
            "--steps",
            "30",
            "--batch-size",
            "16",
            "--num-test",
            "16",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    check_outputs(metrics, tmp_path, "segment_shapes")
    assert set(metrics["iou"]) == set(example.CLASSES)
    assert 0.0 < metrics["ignored_fraction"] < 0.5
    assert metrics["class_weights"]["background"] == pytest.approx(1.0)
    assert min(metrics["class_weights"].values()) == pytest.approx(1.0)  # rare classes weigh more


def test_segment_shapes_data():
    example = load_example("segment_shapes")
    import numpy as np

    images, labels = example.make_shapes(np.random.default_rng(0), 8)
    assert images.shape == (8, example.SIZE, example.SIZE, 1)
    assert labels.shape == (8, example.SIZE, example.SIZE)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, example.IGNORE}
    assert np.all(np.any(labels == example.IGNORE, axis=(1, 2)))  # every image has a shape


@pytest.mark.slow
def test_distill_smoke(tmp_path):
    example = load_example("distill")
    metrics = example.main(
        ["--steps", "30", "--eval-every", "15", "--no-progress", "--out", str(tmp_path)]
    )
    check_outputs(metrics, tmp_path, "distill")
    assert metrics["teacher_last_loss"] < metrics["teacher_first_loss"]
    assert metrics["student_params"] < metrics["teacher_params"] // 10
    for key in ("teacher_accuracy", "student_accuracy", "baseline_student_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0


@pytest.mark.slow
def test_tiny_lm_smoke(tmp_path):
    example = load_example("tiny_lm")
    metrics = example.main(
        [
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--eval-every",
            "15",
            "--generate",
            "20",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    check_outputs(metrics, tmp_path, "tiny_lm")
    assert metrics["val_perplexity"] < metrics["initial_val_perplexity"]
    assert metrics["sample"].startswith("def ") and len(metrics["sample"]) == 24


def test_tiny_lm_padding_is_ignored():
    example = load_example("tiny_lm")
    import numpy as np

    data = np.arange(1, 500, dtype=np.int32) % 90 + 1
    inputs, labels = example.sample_batch(np.random.default_rng(0), data, 16, 32)
    padded = inputs == example.PAD
    assert padded.any()
    np.testing.assert_array_equal(padded, labels == example.IGNORE)

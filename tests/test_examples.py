"""Smoke tests for the training scripts in ``examples/``.

The scripts are not a package: each is loaded from its file with ``importlib``, with
``examples/`` on ``sys.path`` for their shared ``_training_support`` module, as ``python
examples/<script>.py`` has it. Every smoke test runs a few steps and checks that the loss
fell, that the metrics and figure were written and that the summary line was printed;
``test_classify_digits_default_run`` trains the main demo with its default settings and
checks the held-out accuracy it promises.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import load_example, script_env

nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ("classify_digits", "segment_shapes", "distill", "tiny_lm", "grpo_tiny_lm")

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def run_example(name: str, options: str, out: pathlib.Path, capsys) -> tuple[dict, str]:
    """Runs ``examples/<name>.py <options>`` in-process; checks its outputs and summary line.

    Returns the metrics ``main`` returned and the summary line it printed last.
    """
    metrics = load_example(name).main([*options.split(), "--no-progress", "--out", str(out)])
    line = check_run(name, metrics, out, capsys.readouterr().out)
    return metrics, line


def check_run(name: str, metrics: dict, out: pathlib.Path, printed: str) -> str:
    """A run's outputs: the loss fell, the figure and ``<name>.json`` (with ``metrics``'s last
    loss) were written, and the last line printed is the summary, which is returned."""
    assert metrics["last_loss"] < metrics["first_loss"], metrics
    png = out / f"{name}.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["last_loss"] == pytest.approx(metrics["last_loss"])
    line = printed.strip().splitlines()[-1]
    assert re.fullmatch(rf"{name}: backend=\w+ steps=\d+ .+ time=\d+\.\ds", line), line
    return line


@pytest.mark.slow
def test_classify_digits_smoke(tmp_path, capsys):
    options = "--steps 40 --batch-size 64 --eval-every 20"
    metrics, line = run_example("classify_digits", options, tmp_path, capsys)
    assert re.search(r" loss \d\.\d{3} -> \d\.\d{3} test_acc=\d+\.\d\d% \(450 held out\)", line)
    assert metrics["steps"] == 40
    again, _ = run_example("classify_digits", options, tmp_path, capsys)
    assert again["last_loss"] == metrics["last_loss"]  # deterministic for a seed
    assert again["test_accuracy"] == metrics["test_accuracy"]


@pytest.mark.slow
def test_classify_digits_default_run(tmp_path):
    """The README's demo command, ``python examples/classify_digits.py``, as a user runs it
    (a subprocess, XLA's default codegen: the run is compute-bound, and the suite's fast
    compile flags would make it slower): >= 97% held-out accuracy, as the README promises."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "classify_digits.py"), "--no-progress",
         "--out", str(tmp_path)],
        env=script_env(None), capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = json.loads((tmp_path / "classify_digits.json").read_text())
    check_run("classify_digits", metrics, tmp_path, done.stdout)
    assert metrics["test_accuracy"] >= 0.97, metrics


@pytest.mark.slow
def test_segment_shapes_smoke(tmp_path, capsys):
    options = "--steps 30 --batch-size 16 --num-test 16"
    metrics, line = run_example("segment_shapes", options, tmp_path, capsys)
    assert re.search(r" mIoU=\d\.\d{3} pixel_acc=\d+\.\d\d%", line)
    assert 0.0 <= metrics["pixel_accuracy"] <= 1.0
    assert set(metrics["iou"]) == set(load_example("segment_shapes").CLASSES)
    assert 0.0 < metrics["ignored_fraction"] < 0.5
    assert metrics["class_weights"]["background"] == pytest.approx(1.0)
    assert min(metrics["class_weights"].values()) == pytest.approx(1.0)  # rare classes weigh more


def test_segment_shapes_data():
    example = load_example("segment_shapes")
    images, labels = example.make_shapes(np.random.default_rng(0), 8)
    assert images.shape == (8, example.SIZE, example.SIZE, 1)
    assert labels.shape == (8, example.SIZE, example.SIZE)
    assert set(np.unique(labels)) <= {0, 1, 2, 3, example.IGNORE}
    assert np.all(np.any(labels == example.IGNORE, axis=(1, 2)))  # every image has a shape


@pytest.mark.slow
def test_distill_smoke(tmp_path, capsys):
    metrics, line = run_example("distill", "--steps 30 --eval-every 15", tmp_path, capsys)
    assert re.search(r" teacher_acc=\S+% \(\d+ params\) student_acc=\S+% \(\d+ params; ", line)
    assert metrics["teacher_last_loss"] < metrics["teacher_first_loss"]
    assert metrics["student_params"] < metrics["teacher_params"] // 10
    for key in ("teacher_accuracy", "student_accuracy", "baseline_student_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0


@pytest.mark.slow
def test_tiny_lm_smoke(tmp_path, capsys):
    options = "--steps 30 --batch-size 8 --eval-every 15 --generate 20"
    metrics, line = run_example("tiny_lm", options, tmp_path, capsys)
    assert re.search(r" val_ppl \d+\.\d -> \d+\.\d\d \(\d+ params, vocab 97\)", line)
    assert metrics["val_perplexity"] < metrics["initial_val_perplexity"]
    assert metrics["sample"].startswith("def ") and len(metrics["sample"]) == 24


def test_tiny_lm_padding_is_ignored():
    example = load_example("tiny_lm")
    data = np.arange(1, 500, dtype=np.int32) % 90 + 1
    inputs, labels = example.sample_batch(np.random.default_rng(0), data, 16, 32)
    padded = inputs == example.PAD
    assert padded.any()
    np.testing.assert_array_equal(padded, labels == example.IGNORE)


COMMON_OPTIONS = (
    "--steps",
    "--batch-size",
    "--seed",
    "--lr",
    "--log-every",
    "--out",
    "--no-progress",
)
OWN_OPTIONS = {
    "classify_digits": ("--eval-every", "--label-smoothing"),
    "segment_shapes": ("--num-test",),
    "distill": ("--eval-every", "--temperature", "--alpha", "--student-hidden"),
    "tiny_lm": (
        "--eval-every",
        "--seq-len",
        "--dim",
        "--heads",
        "--layers",
        "--z-loss",
        "--prompt",
        "--generate",
        "--temperature",
    ),
    "grpo_tiny_lm": (
        "--method",
        "--pretrain-steps",
        "--pretrain-lr",
        "--group-size",
        "--prompt-len",
        "--completion-len",
        "--dim",
        "--layers",
        "--target",
        "--temperature",
        "--kl-coef",
        "--clip-epsilon",
        "--beta",
        "--engine-noise",
        "--updates-per-batch",
    ),
}
DEFAULT_STEPS = {
    "classify_digits": 500,
    "segment_shapes": 400,
    "distill": 400,
    "tiny_lm": 500,
    "grpo_tiny_lm": 60,
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_lists_every_option_with_its_default(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).main(["--help"])
    assert exit_info.value.code == 0
    # One block per option: its line in the listing and any wrapped continuation lines.
    listing = capsys.readouterr().out.split("options:", 1)[1]
    blocks = re.split(r"\n(?=  -)", listing)[1:]
    described = {re.findall(r"--[\w-]+", block)[0]: block for block in blocks}
    assert set(described) == {"--help", *COMMON_OPTIONS, *OWN_OPTIONS[name]}
    for option, block in described.items():
        if option != "--help":  # the option, its metavar, a help text, then the default
            assert re.match(rf"\s*{option}(?: [A-Z_]+)?\s{{2,}}\w.*\(default: .+\)", block, re.S), (
                block
            )
    assert f"(default: {DEFAULT_STEPS[name]})" in described["--steps"]


def test_demo_runs_from_its_file_at_the_repo_root():
    """README's ``python examples/classify_digits.py`` finds the shared module beside it."""
    done = subprocess.run(
        [sys.executable, "examples/classify_digits.py", "--help"],
        cwd=ROOT,
        env=script_env(os.environ.get("XLA_FLAGS")),  # this checkout's jaxce
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: classify_digits.py")
    assert "Classify 8x8 handwritten digits" in done.stdout


def losses_and_trace_count(monkeypatch, example, loss_name, model, train_step, values):
    """The loss of one ``train_step(model, optimizer, metrics, value)`` for each value, on an
    optimizer with learning rate 0 (the model stays as it is), and how often the loss traced.

    nnx.jit's cache is per model and optimizer object, as in a script's training loop.
    """
    traces = []
    loss_fn = getattr(example, loss_name)
    monkeypatch.setattr(example, loss_name, lambda *args: traces.append(1) or loss_fn(*args))
    optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))  # ignores logits and labels
    losses = []
    for value in values:
        train_step(model, optimizer, metrics, value)
        losses.append(float(metrics.compute()["loss"]))
        metrics.reset()
    return losses, len(traces)


def test_label_smoothing_is_traced_not_static(monkeypatch):
    example = load_example("classify_digits")
    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    labels = np.arange(4, dtype=np.int32)

    def train_step(model, optimizer, metrics, label_smoothing):
        example.train_step(model, optimizer, metrics, images, labels, label_smoothing)

    model = example.CNN(rngs=nnx.Rngs(0))
    losses, traces = losses_and_trace_count(
        monkeypatch, example, "loss_fn", model, train_step, [0.0, 0.1, 0.3]
    )
    assert traces == 1
    assert len(set(losses)) == 3, losses  # each value reached the loss


def test_distillation_temperature_and_alpha_are_traced_not_static(monkeypatch):
    example = load_example("distill")
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 8, 8, 1)).astype(np.float32)
    labels = np.arange(4, dtype=np.int32)
    teacher_logits = rng.normal(size=(4, 10)).astype(np.float32)

    def train_step(model, optimizer, metrics, temperature_and_alpha):
        batch = (images, labels, teacher_logits)
        example.distill_step(model, optimizer, metrics, *batch, *temperature_and_alpha)

    model = example.Student(4, rngs=nnx.Rngs(0))
    values = [(2.0, 0.5), (4.0, 0.5), (2.0, 0.9)]
    losses, traces = losses_and_trace_count(
        monkeypatch, example, "distill_loss", model, train_step, values
    )
    assert traces == 1
    assert len(set(losses)) == 3, losses


def test_z_loss_is_traced_not_static(monkeypatch):
    example = load_example("tiny_lm")
    inputs = np.arange(1, 17, dtype=np.int32).reshape(2, 8)
    labels = np.where(np.arange(8) < 6, inputs + 1, example.IGNORE).astype(np.int32)

    def train_step(model, optimizer, metrics, z_loss):
        example.train_step(model, optimizer, metrics, inputs, labels, z_loss)

    model = example.TinyLM(97, 8, 8, 2, 1, rngs=nnx.Rngs(0))
    losses, traces = losses_and_trace_count(
        monkeypatch, example, "loss_fn", model, train_step, [0.0, 1e-4, 1e-1]
    )
    assert traces == 1
    assert len(set(losses)) == 3, losses


def test_shuffled_batches_take_full_batches_from_each_permutation():
    support = load_example("_training_support")
    batches = support.shuffled_batches(np.random.default_rng(7), 10, 4)
    taken = [next(batches) for _ in range(5)]
    reference = np.random.default_rng(7)
    first, second = reference.permutation(10), reference.permutation(10)
    expected = [first[:4], first[4:8], second[:4], second[4:8], reference.permutation(10)[:4]]
    for batch, want in zip(taken, expected, strict=True):
        np.testing.assert_array_equal(batch, want)


def test_metric_history_records_computed_values_and_resets():
    support = load_example("_training_support")
    metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
    history = support.MetricHistory()
    metrics.update(loss=np.float32(3.0))
    metrics.update(loss=np.float32(1.0))
    assert history.record(10, metrics) == {"loss": 2.0}
    assert np.isnan(metrics.compute()["loss"])  # reset: the next window starts empty
    metrics.update(loss=np.float32(0.5))
    history.record(20, metrics)
    assert history.steps == [10, 20]
    assert history["loss"] == [2.0, 0.5]
    assert (history.first("loss"), history.last("loss")) == (2.0, 0.5)
    assert history.latest("train_") == {"train_loss": 0.5}

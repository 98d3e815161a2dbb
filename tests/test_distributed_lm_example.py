"""Smoke test for ``examples/distributed_lm.py``: a few steps on 8 host devices that the script
sets up itself; the loss falls and the head's gradient stays sharded over the vocabulary."""

import json
import pathlib
import re
import subprocess
import sys

import pytest
from helpers import FAST_COMPILE_FLAGS, script_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "distributed_lm.py"
TIMEOUT_S = 900  # a loaded 2-core machine; about 30 s of CPU time

pytest.importorskip("flax")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


@pytest.mark.slow
@pytest.mark.parametrize(("axis_type", "mesh"), [("explicit", (2, 4)), ("auto", (4, 2))])
def test_distributed_lm_learns_with_a_vocab_sharded_head(tmp_path, axis_type, mesh):
    # No device count in XLA_FLAGS: the script must ask for its 8 CPU devices itself, before
    # JAX starts. The flags are the suite's fast-compile ones (half the run's time).
    env = dict(script_env(" ".join(FAST_COMPILE_FLAGS)), JAX_PLATFORMS="cpu")
    options = "--steps 16 --batch-size 8 --seq-len 16 --dim 32 --layers 1 --eval-every 8"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), *options.split(), "--axis-type", axis_type,
         "--mesh", ",".join(map(str, mesh)), "--no-progress", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "distributed_lm.json").read_text())
    assert report["mesh"] == {"data": mesh[0], "model": mesh[1]}
    assert report["last_loss"] < report["first_loss"], report
    assert report["val_perplexity"] < report["initial_val_perplexity"], report
    # The head's (D, V) gradient lives where the head does: columns over "model", one
    # (D, V / model) block a device, never the whole (D, V) matrix.
    assert report["head_sharding"] == report["head_grad_sharding"] == "P(None, 'model')"
    assert report["head_grad_shard_shapes"] == [[32, report["vocab_size"] // mesh[1]]]
    line = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"distributed_lm: backend=cpu steps=16 mesh .+ time=\d+\.\ds", line), line
    assert (tmp_path / "distributed_lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Two real processes, one global mesh: the vocab-parallel fused loss under
``jax.distributed`` (see ``multiprocess_linear_check.py``)."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import pytest
from helpers import host_devices_env

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_linear_check.py")
NUM_PROCESSES = 2
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process():
    port = free_port()
    env = host_devices_env(2)
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), str(i), str(NUM_PROCESSES), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for proc in procs:  # only the processes this test started
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    report = "\n".join(f"--- process {i}:\n{out}" for i, out in enumerate(outputs))
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, report
        assert f"ok {i}" in outputs[i].split("\n"), report

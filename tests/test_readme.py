"""README.md's Python blocks run as written, each on its own, against the installed jaxce."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return _BLOCK.findall(text)


def test_readme_has_python_blocks():
    assert len(python_blocks(README.read_text())) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_block_runs(index):
    code = python_blocks(README.read_text())[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_test_command_is_the_ci_command():
    """The command on the line after README's ``# The tests (what CI runs)`` is a line of
    ``.ci/run``, word for word."""
    found = re.search(
        r"^# The tests \(what CI runs\)\n.*&& (python -m pytest .+)$", README.read_text(), re.M
    )
    assert found, "README.md gives no test command"
    command = found.group(1)
    assert "--durations=" in command  # CI's log lists the slowest tests
    ci = (README.parent / ".ci" / "run").read_text()
    assert re.search(rf"^{re.escape(command)}$", ci, re.M), "README's test command not in .ci/run"

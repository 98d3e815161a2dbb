"""The documentation lists every public name, names only real ones, and its code runs."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import subprocess
import sys
import typing

import pytest

import jaxce

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.rst"))


def documented_names() -> dict[str, set[str]]:
    """``{module: names}`` from the ``autosummary`` blocks of the API pages.

    A name belongs to the module of the ``currentmodule`` directive above its block; a module
    documented with ``automodule`` counts as documented itself.
    """
    names: dict[str, set[str]] = {}
    for page in API_PAGES:
        module = "jaxce"
        in_block = False
        for line in page.read_text().splitlines():
            directive = re.match(r"\.\. (currentmodule|module|automodule):: (\S+)", line)
            if directive:
                kind, target = directive.groups()
                if kind == "automodule":
                    parent, _, child = target.rpartition(".")
                    names.setdefault(parent, set()).add(child)
                else:
                    module = target
                in_block = False
            elif line.startswith(".. autosummary::"):
                in_block = True
            elif in_block and re.match(r"   [A-Za-z_]\w*$", line):
                names.setdefault(module, set()).add(line.strip())
            elif in_block and line and not line.startswith(" "):
                in_block = False
    return names


def public_modules():
    modules = [jaxce, jaxce.pytorch]
    try:
        modules.append(importlib.import_module("jaxce.sklearn"))
    except ImportError:
        pass
    return modules


@pytest.mark.parametrize("module", public_modules(), ids=lambda m: m.__name__)
def test_every_public_name_is_on_an_api_page(module):
    listed = documented_names().get(module.__name__, set())
    missing = sorted(set(module.__all__) - listed)
    assert not missing, f"{module.__name__} names missing from docs/api/*.rst: {missing}"


def test_api_pages_name_only_public_names():
    for module_name, names in documented_names().items():
        module = importlib.import_module(module_name)
        unknown = sorted(n for n in names if n not in getattr(module, "__all__", ()))
        assert not unknown, f"docs/api lists names {module_name} does not export: {unknown}"


def test_every_api_page_is_in_the_api_toctree():
    index = (DOCS / "api" / "index.rst").read_text()
    for page in API_PAGES:
        if page.stem != "index":
            assert re.search(rf"^   {page.stem}$", index, re.M), page.name


GUIDES = [
    "getting_started",
    "conventions",
    "pytorch_migration",
    "large_vocabulary",
    "post_training",
]
_CODE = re.compile(r"^\.\. code-block:: python\n\n((?:   .*\n|\n)+)", re.M)


def code_blocks(page: str) -> list[str]:
    blocks = _CODE.findall((DOCS / f"{page}.rst").read_text())
    return ["\n".join(line[3:] for line in block.splitlines()) for block in blocks]


@pytest.mark.parametrize("page", GUIDES)
def test_guide_code_runs_in_order(page):
    namespace = {"__name__": f"__docs_{page}__"}
    for i, block in enumerate(code_blocks(page)):
        exec(compile(block, f"docs/{page}.rst python block {i}", "exec"), namespace)


def test_guides_have_code():
    assert all(code_blocks(page) for page in GUIDES if page != "conventions")


# The post-training guide's tables name every option of these parameters.
POST_TRAINING_OPTIONS = [
    ("sampled_kl_divergence", "estimator"),
    ("sequence_reduce", "reduction"),
    ("dpo_loss", "loss_type"),
    ("dpo_loss", "f_divergence"),
    ("kto_loss", "loss_type"),
    ("policy_gradient_loss", "importance_sampling"),
    ("policy_gradient_loss", "kl_estimator"),
    ("policy_gradient_loss", "aggregation"),
    ("policy_gradient_loss", "loss_type"),
    ("rollout_importance_weights", "level"),
    ("rollout_importance_weights", "mode"),
]


def _strings(hint) -> set[str]:
    """The strings of a ``Literal``, also inside a union or a ``Sequence[Literal[...]]``."""
    out = set()
    for arg in typing.get_args(hint):
        out |= {arg} if isinstance(arg, str) else _strings(arg)
    return out


def literal_options(function, parameter: str) -> set[str]:
    """The strings of the ``Literal`` annotations of ``parameter``, over every overload."""
    options = set()
    for variant in [*typing.get_overloads(function), inspect.unwrap(function)]:
        options |= _strings(typing.get_type_hints(variant).get(parameter))
    return options


@pytest.mark.parametrize(("name", "parameter"), POST_TRAINING_OPTIONS)
def test_post_training_guide_names_every_option(name, parameter):
    options = literal_options(getattr(jaxce, name), parameter)
    assert len(options) >= 2, (name, parameter, options)
    guide = (DOCS / "post_training.rst").read_text()
    missing = sorted(option for option in options if f'"{option}"' not in guide)
    assert not missing, f"docs/post_training.rst does not name {name}'s {parameter} {missing}"


_PRINTED = re.compile(r"print\(.*#\s*(.+)$")


@pytest.mark.slow
def test_distributed_guide_code_runs_on_eight_devices():
    """docs/distributed.rst's blocks, in order, in a subprocess with 8 host devices.

    Its meshes are ``(2, 4)``, and the device count is fixed when JAX starts, so the page runs
    in its own process. Every line it prints must be what a ``print(...)  # ...`` comment on the
    page says it prints. The multi-host ``train.py`` block (a ``code-block`` with a caption)
    is a program for several machines; the pattern of :func:`code_blocks` does not match it,
    and ``tests/test_linear_multiprocess.py`` covers that path.
    """
    from helpers import host_devices_env

    program = "\n\n".join(code_blocks("distributed"))
    done = subprocess.run(
        [sys.executable, "-c", program],
        env=host_devices_env(8),
        capture_output=True,
        text=True,
        timeout=900,  # a loaded 2-core machine; about 20 s of CPU time
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    promised = [m.group(1) for m in map(_PRINTED.search, program.splitlines()) if m]
    printed = done.stdout.strip().splitlines()
    assert len(printed) >= len(promised) > 5
    for line in printed:
        assert any(comment.startswith(line.strip()) for comment in promised), (line, promised)

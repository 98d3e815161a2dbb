"""Package metadata agrees with itself: version, dependencies, license, oldest tested jax."""

from __future__ import annotations

import pathlib
import re
import tomllib

import jaxce

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_runtime_dependencies_are_jax_jaxlib_numpy_without_upper_caps():
    names = [re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in PYPROJECT["dependencies"]]
    assert names == ["jax", "jaxlib", "numpy"]
    assert not [d for d in PYPROJECT["dependencies"] if "<" in d or "==" in d]


def test_jax_lower_bound_is_the_version_ci_tests():
    bounds = {re.match(r"(\w+)>=([\d.]+)$", d).groups() for d in PYPROJECT["dependencies"]}
    bounds = dict(bounds)
    ci_min = re.search(r'^MIN_JAX="([\d.]+)"$', (ROOT / ".ci" / "run").read_text(), re.M)
    assert ci_min, ".ci/run sets no MIN_JAX"
    tested = ci_min.group(1)
    assert bounds["jax"] == bounds["jaxlib"]
    assert tested in (bounds["jax"], bounds["jax"] + ".0")


def test_version_is_the_newest_changelog_release():
    releases = re.findall(
        r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", (ROOT / "CHANGELOG.md").read_text(), re.M
    )
    assert releases, "CHANGELOG.md has no dated release section"
    assert jaxce.__version__ == releases[0]


def test_license_is_apache_2_in_repo_and_metadata():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert PYPROJECT["license"] == "Apache-2.0"
    assert PYPROJECT["license-files"] == ["LICENSE"]


def test_package_is_typed():
    assert (pathlib.Path(jaxce.__file__).parent / "py.typed").is_file()


def test_every_public_name_resolves():
    for module in (jaxce, jaxce.pytorch):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"

"""The package metadata as pyproject.toml declares it (tools/check_wheel.sh, run by CI, builds
and installs the real wheel; these are the quick checks of what it relies on)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fastxent

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_is_an_spdx_expression_with_its_text():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text(encoding="utf-8")[:200]
    # PEP 639 metadata needs setuptools 77 or newer to build.
    (requirement,) = PYPROJECT["build-system"]["requires"]
    assert int(re.fullmatch(r"setuptools>=(\d+)", requirement).group(1)) >= 77


def test_the_version_has_one_source():
    assert "version" not in PYPROJECT["project"]
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastxent.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", fastxent.__version__)
    assert f"## [{fastxent.__version__}]" in (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")


def test_type_hints_and_cuda_source_are_package_data():
    data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["fastxent"] and (ROOT / "fastxent" / "py.typed").is_file()
    assert "*.cu" in data["fastxent.gpu"] and (ROOT / "fastxent" / "gpu" / "xent.cu").is_file()


def test_the_docs_extra_builds_the_site_and_the_tests_install_it():
    extras = PYPROJECT["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ;]", requirement)[0] for requirement in extras["docs"]}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= names
    assert "fastxent[docs]" in extras["test"]

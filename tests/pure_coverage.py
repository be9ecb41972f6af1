"""Every line of the pure modules runs in the test suite; exit status 1 when one does not.

The pure modules do no I/O of their own (bytes and events in, decisions and bytes out), so a
test needs no socket to reach any line of them. ``make test`` runs this right after pytest,
from the coverage data pytest left in ``.coverage``::

    .venv/bin/python -m tests.pure_coverage

A new pure module goes on ``PURE_MODULES``. A line that no test can reach is deleted from the
product, not excluded here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

import coverage

ROOT: Final = Path(__file__).resolve().parents[1]

#: Globs, relative to the repository root.
PURE_MODULES: Final = (
    "shared/*.py",
    "broker_node/core/*.py",
    "broker_node/admission.py",
    "broker_node/status.py",
    "broker_node/config.py",
    "broker_node/errors.py",
    "broker_node/frame_scanner.py",
    "broker_node/outbox.py",
    "broker_node/auth/handshake.py",
    "broker_node/auth/identity.py",
    "broker_node/auth/policy.py",
    "broker_node/auth/tokens.py",
    "broker_node/cluster/base.py",
    "broker_node/cluster/endpoint.py",
    "broker_node/cluster/keys.py",
    "broker_node/cluster/resp.py",
    "client/backoff.py",
    "client/errors.py",
    "client/session.py",
    "client/bench/histogram.py",
    "client/bench/pacing.py",
    "client/bench/plan.py",
    "client/bench/results.py",
    "client/bench/sequence.py",
    "client/bench/wire.py",
)

#: Lines no test can reach, until the product change that deletes them (a count per module,
#: so that any other line left unrun still fails). Each names the change it waits for.
AWAITING_DELETION: Final[dict[str, int]] = {
    # BrokerCore.message: a local recipient is always connected while its channel is known
    # (disconnect drops its channels first), so "recipient gone" cannot happen there; and
    # _may_open: every connection registered under authentication has its grants.
    "broker_node/core/broker.py": 2,
}


def unrun_lines(data: coverage.Coverage, path: Path) -> list[int]:
    _, _, _, missing, _ = data.analysis2(str(path))
    return sorted(missing)


def ranges(lines: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    spans: list[list[int]] = []
    for line in lines:
        if spans and line == spans[-1][1] + 1:
            spans[-1][1] = line
        else:
            spans.append([line, line])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def main() -> int:
    data = coverage.Coverage(config_file=str(ROOT / "pyproject.toml"))
    data.load()
    failures: list[str] = []
    checked = 0
    for pattern in PURE_MODULES:
        paths = sorted(ROOT.glob(pattern))
        if not paths:
            failures.append(f"{pattern}: no such module")
        for path in paths:
            checked += 1
            name = path.relative_to(ROOT).as_posix()
            unrun = unrun_lines(data, path)
            allowed = AWAITING_DELETION.get(name, 0)
            if len(unrun) > allowed:
                failures.append(f"{name}: lines not run by any test: {ranges(unrun)}")
            elif len(unrun) < allowed:
                print(f"{name}: {allowed - len(unrun)} line(s) fewer to await; lower the count")
    if failures:
        print("pure modules not fully covered:", *failures, sep="\n  ")
        return 1
    print(f"pure modules: every line of {checked} modules runs in the tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())

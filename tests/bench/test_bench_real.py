"""``broker-bench throughput`` for ~2 s against a real broker-node process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec

from client.bench.results import Report
from tests.support.nodes import NodeProcess

BROKER_BENCH = str(Path(sys.executable).parent / "broker-bench")


def test_a_short_paced_run_is_verified_clean() -> None:
    with NodeProcess(extra_args=["--log-level", "warning"]) as node:
        args = [
            BROKER_BENCH, "throughput",
            "--url", node.url,
            "--pairs", "4",
            "--processes", "2",
            "--idle", "10",
            "--rate", "2000",
            "--duration", "2",
            "--warmup", "0.5",
            "--broker-pid", str(node.pid),
            "--json",
            "--quiet",
        ]  # fmt: skip
        run = subprocess.run(args, capture_output=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr.decode() + run.stdout.decode()
    assert b"warning" not in run.stderr
    report = msgspec.json.decode(run.stdout, type=Report)
    assert report.ok
    assert (report.lost, report.duplicates, report.reordered) == (0, 0, 0)
    assert (report.errors, report.failed, report.unconfirmed, report.corrupt) == (0, 0, 0, 0)
    assert report.sent_total > 0
    assert report.delivered > 0
    assert report.confirmed > 0
    assert report.idle_connections == 10
    assert report.processes == 2
    assert report.broker_cpu_us_per_message is not None
    assert report.confirm_latency_us.p99 > 0


def test_a_pid_that_is_not_the_brokers_is_warned_about() -> None:
    with NodeProcess(extra_args=["--log-level", "warning"]) as node:
        args = [
            BROKER_BENCH, "idle",
            "--url", node.url,
            "--connections", "2",
            "--settle", "0",
            "--broker-pid", str(os.getpid()),
            "--quiet",
        ]  # fmt: skip
        run = subprocess.run(args, capture_output=True, timeout=60, check=False)
    stderr = run.stderr.decode()
    assert f"warning: process {os.getpid()} listens on none of the --url ports" in stderr

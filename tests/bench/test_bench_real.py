"""``broker-bench throughput`` for ~2 s against a real broker-node process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec

from client.bench.results import Report
from tests.support.nodes import NodeProcess
from tests.support.redis_server import RedisServer

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


def run_bench(*args: str) -> Report:
    command = [BROKER_BENCH, "throughput", *args, "--json", "--quiet"]
    run = subprocess.run(command, capture_output=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr.decode() + run.stdout.decode()
    return msgspec.json.decode(run.stdout, type=Report)


def test_resumable_sessions_across_nodes_are_acknowledged_and_write_nothing_to_redis() -> None:
    with (
        RedisServer() as redis,
        NodeProcess(redis_url=redis.url, extra_args=["--log-level", "warning"]) as first,
        NodeProcess(redis_url=redis.url, extra_args=["--log-level", "warning"]) as second,
    ):
        report = run_bench(
            "--url", first.url,
            "--url", second.url,
            "--placement", "cross-node",
            "--pairs", "4",
            "--rate", "2000",
            "--duration", "2",
            "--warmup", "0.5",
            "--redis-url", redis.url,
            "--resume",
        )  # fmt: skip
    assert report.ok
    assert report.resume is not None
    assert report.resume.detached is False
    assert report.resume.unacknowledged == 0
    assert report.resume.acks_sent > 0
    assert report.resume.channel_acked > 0
    assert report.resume.held == report.resume.replayed == 0
    assert report.redis_commands is not None
    assert report.redis_commands.get("publish", 0) > 0
    # The nodes' own periodic work (heartbeats, peer checks) may fall in the window; nothing
    # per message does.
    others = sum(n for name, n in report.redis_commands.items() if name != "publish")
    assert others < 20 < report.delivered


def test_receivers_away_for_the_run_resume_and_get_every_held_message() -> None:
    bound = [
        "--resume-max-frames", "20000",
        "--resume-max-bytes", str(16 * 2**20),
        "--max-outbound-buffer", str(16 * 2**20),  # a resume replays into it
    ]  # fmt: skip
    with NodeProcess(extra_args=["--log-level", "warning", *bound]) as node:
        report = run_bench(
            "--url", node.url,
            "--pairs", "4",
            "--rate", "1000",
            "--duration", "1.5",
            "--warmup", "0.5",
            "--broker-pid", str(node.pid),
            "--resume",
            "--detached",
        )  # fmt: skip
    assert report.ok
    assert report.resume is not None
    assert report.resume.detached is True
    assert report.delivered == 0  # in the window, nobody was there to deliver to
    assert report.resume.held > 0
    assert report.confirmed == report.resume.held
    # Every message of the run was held, and replayed on resume (none lost, none twice).
    assert report.resume.replayed == report.sent_total
    assert (report.lost, report.duplicates, report.reordered) == (0, 0, 0)
    assert report.resume.unacknowledged == 0
    assert report.resume.broker_cpu_us_per_replayed is not None


def test_detached_needs_resume() -> None:
    run = subprocess.run(
        [BROKER_BENCH, "throughput", "--detached", "--quiet"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert b"--detached needs --resume" in run.stderr


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

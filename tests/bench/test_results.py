from __future__ import annotations

import msgspec
import pytest

from client.bench.histogram import Histogram
from client.bench.results import (
    BrokerCpu,
    HistogramData,
    WorkerResult,
    build_report,
    command_calls,
    command_delta,
    merge_results,
)


def result(values: list[int], **overrides: object) -> WorkerResult:
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    fields: dict[str, object] = {
        "pairs": 5,
        "idle_connections": 0,
        "window_seconds": 10.0,
        "sent_window": 1000,
        "confirmed_window": 1000,
        "delivered_window": 1000,
        "sent_total": 1200,
        "confirmed_total": 1200,
        "delivered_total": 1200,
        "failed": 0,
        "unconfirmed": 0,
        "lost": 0,
        "duplicates": 0,
        "reordered": 0,
        "corrupt": 0,
        "errors": [],
        "confirm_latency": HistogramData.of(histogram),
        "delivery_latency": HistogramData.of(histogram),
        "generator_cpu_seconds": 2.0,
    }
    fields.update(overrides)
    return msgspec.convert(fields, WorkerResult)


def test_merge_adds_counts_and_histograms() -> None:
    a = result(list(range(1, 51)), idle_connections=100, errors=["x"], lost=1)
    b = result(list(range(51, 101)), window_seconds=10.5, errors=["x", "y"], failed=2)
    merged = merge_results([a, b])
    assert merged.pairs == 10
    assert merged.idle_connections == 100
    assert merged.window_seconds == 10.5
    assert merged.delivered_window == 2000
    assert merged.sent_total == 2400
    assert (merged.lost, merged.failed) == (1, 2)
    assert merged.errors == ["x", "y"]
    assert merged.generator_cpu_seconds == 4.0
    confirm = merged.confirm_latency.histogram()
    assert confirm.count == 100
    assert confirm.percentile(50) == 50
    assert confirm.max == 100


def test_merge_of_one_is_itself_and_of_none_is_an_error() -> None:
    one = result([7, 8])
    assert merge_results([one]) == one
    with pytest.raises(ValueError, match="no results"):
        merge_results([])


def test_results_survive_the_pipe_as_json() -> None:
    one = result([1, 500, 90_000])
    again = msgspec.json.decode(msgspec.json.encode(one), type=WorkerResult)
    assert again == one


def test_report_derives_cpu_per_message_and_rates() -> None:
    report = build_report(
        result([100, 200]),
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=100.0,
        processes=1,
        broker_cpu=[BrokerCpu(pid=1, cpu_seconds=0.5), BrokerCpu(pid=2, cpu_seconds=0.25)],
    )
    assert report.messages_per_second == 100.0
    assert report.rate_met is True
    assert report.broker_cpu_us_per_message == 750.0  # 0.75 s / 1000 messages
    assert report.broker_cpu_percent == 7.5
    assert report.generator_cpu_us_per_message == 2000.0
    assert report.generator_cpu_percent == 20.0
    assert report.generator_bound is False
    assert report.ok is True
    assert report.confirm_latency_us.p99 == 200


def test_report_flags_errors_unmet_rate_and_a_busy_generator() -> None:
    merged = result([1], unconfirmed=3, reordered=1, generator_cpu_seconds=9.5)
    report = build_report(
        merged,
        placement="cross-node",
        urls=["ws://127.0.0.1:1", "ws://127.0.0.1:2"],
        window=64,
        payload_size=100,
        target_rate=5000.0,
        processes=1,
        broker_cpu=[],
    )
    assert report.ok is False
    assert report.errors == 3
    assert report.rate_met is False
    assert report.broker_cpu_us_per_message is None
    assert report.broker_cpu_percent is None
    assert report.generator_bound is True


def test_report_of_an_unpaced_empty_run() -> None:
    merged = result([], delivered_window=0, sent_total=0, window_seconds=0.0)
    report = build_report(
        merged,
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=0.0,
        processes=2,
        broker_cpu=[BrokerCpu(pid=1, cpu_seconds=0.5)],
    )
    assert report.rate_met is None
    assert report.ok is False  # nothing was sent: not a passing run
    assert report.messages_per_second == 0.0
    assert report.broker_cpu_us_per_message is None
    assert report.generator_cpu_percent == 0.0
    assert report.generator_bound is False


def test_merge_adds_the_resume_counts() -> None:
    a = result([1], held_window=10, held_total=12, acks_sent=3, replayed=12, resume_seconds=0.5)
    b = result([2], held_window=5, channel_acked=4, unacknowledged=1, resume_seconds=0.75)
    merged = merge_results([a, b])
    assert (merged.held_window, merged.held_total, merged.acks_sent) == (15, 12, 3)
    assert (merged.channel_acked, merged.unacknowledged, merged.replayed) == (4, 1, 12)
    assert merged.resume_seconds == 0.75  # the workers resume at once: the longest


def test_a_run_without_resume_has_no_resume_figures() -> None:
    report = build_report(
        result([1]),
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=100.0,
        processes=1,
        broker_cpu=[BrokerCpu(pid=1, cpu_seconds=0.5)],
    )
    assert report.resume is None
    assert report.redis_commands is None


def test_a_detached_run_counts_the_messages_held_and_the_replay_apart() -> None:
    merged = result([1], delivered_window=0, held_window=800, replayed=1200, resume_seconds=0.3)
    report = build_report(
        merged,
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=80.0,
        processes=1,
        broker_cpu=[BrokerCpu(pid=1, cpu_seconds=0.4)],
        resume=True,
        detached=True,
        broker_cpu_resume_seconds=0.06,
    )
    assert report.messages_per_second == 80.0  # 800 held in 10 s
    assert report.rate_met is True
    assert report.broker_cpu_us_per_message == 500.0  # 0.4 s / 800 held
    assert report.delivered == 0
    assert report.resume is not None
    assert report.resume.detached is True
    assert (report.resume.held, report.resume.replayed) == (800, 1200)
    assert report.resume.broker_cpu_us_per_replayed == 50.0  # 0.06 s / 1200
    assert report.ok is True


def test_messages_never_acknowledged_fail_a_resume_run() -> None:
    report = build_report(
        result([1], unacknowledged=2),
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=100.0,
        processes=1,
        broker_cpu=[],
        resume=True,
    )
    assert report.ok is False
    assert report.resume is not None
    assert report.resume.unacknowledged == 2
    assert report.resume.broker_cpu_us_per_replayed is None


def test_redis_command_calls_and_their_difference() -> None:
    stats = {
        "cmdstat_publish": {"calls": 10, "usec": 5},
        "cmdstat_client|setinfo": {"calls": 2},
        "errorstat_ERR": {"count": 1},
    }
    assert command_calls(stats) == {"publish": 10, "client|setinfo": 2}
    before = {"publish": 10, "info": 4, "set": 1}
    after = {"publish": 25, "info": 6, "set": 1, "evalsha": 1}
    assert command_delta(before, after, ours={"info": 2}) == {"evalsha": 1, "publish": 15}

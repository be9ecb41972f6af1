from __future__ import annotations

from client.bench.coordinator import IdleReport
from client.bench.histogram import Histogram
from client.bench.report import format_idle, format_throughput
from client.bench.results import BrokerCpu, HistogramData, WorkerResult, build_report


def merged(**overrides: int | float) -> WorkerResult:
    histogram = Histogram()
    for value in (100, 200, 3000):
        histogram.record(value)
    data = HistogramData.of(histogram)
    fields: dict[str, int | float] = {
        "pairs": 10,
        "idle_connections": 5000,
        "window_seconds": 10.0,
        "sent_window": 50_000,
        "confirmed_window": 50_000,
        "delivered_window": 50_000,
        "sent_total": 60_000,
        "confirmed_total": 60_000,
        "delivered_total": 60_000,
        "failed": 0,
        "unconfirmed": 0,
        "lost": 0,
        "duplicates": 0,
        "reordered": 0,
        "corrupt": 0,
        "generator_cpu_seconds": 4.0,
    }
    fields.update(overrides)
    return WorkerResult(
        errors=["sample error"] if fields["failed"] else [],
        confirm_latency=data,
        delivery_latency=data,
        **fields,  # type: ignore[arg-type]
    )


def test_throughput_table_shows_the_headline_figures() -> None:
    report = build_report(
        merged(),
        placement="cross-node",
        urls=["ws://127.0.0.1:1", "ws://127.0.0.1:2"],
        window=64,
        payload_size=100,
        target_rate=5000.0,
        processes=1,
        broker_cpu=[BrokerCpu(pid=11, cpu_seconds=2.5), BrokerCpu(pid=12, cpu_seconds=2.5)],
        redis_cpu_seconds=0.5,
    )
    text = format_throughput(report)
    assert "5,000.0" in text
    assert "(offered rate met)" in text
    assert "100.0 µs/message" in text  # 5 s of broker CPU / 50,000 messages
    assert "Redis CPU" in text
    assert "10.0 µs/message" in text
    assert "OK" in text
    assert "3,000" in text  # the max latency
    assert report.redis_cpu_us_per_message == 10.0


def test_throughput_table_shows_failures_and_missing_figures() -> None:
    report = build_report(
        merged(failed=3, delivered_window=1000, generator_cpu_seconds=9.8),
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=5000.0,
        processes=1,
        broker_cpu=[],
    )
    text = format_throughput(report)
    assert "FAILED" in text
    assert "OFFERED RATE NOT MET" in text
    assert "give --broker-pid" in text
    assert "GENERATOR-BOUND" in text
    assert "sample error" in text
    unpaced = build_report(
        merged(delivered_window=0),
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=0.0,
        processes=1,
        broker_cpu=[],
    )
    text = format_throughput(unpaced)
    assert "rate unpaced" in text
    assert "offered rate" not in text


def test_throughput_table_shows_redis_commands_and_resume() -> None:
    report = build_report(
        merged(held_window=40_000, acks_sent=3_000, channel_acked=1_500, replayed=48_000),
        placement="cross-node",
        urls=["ws://127.0.0.1:1", "ws://127.0.0.1:2"],
        window=64,
        payload_size=100,
        target_rate=4000.0,
        processes=1,
        broker_cpu=[BrokerCpu(pid=11, cpu_seconds=2.0)],
        redis_cpu_seconds=0.4,
        redis_commands={"publish": 1_234, "set": 2},
        resume=True,
        detached=True,
        broker_cpu_resume_seconds=0.24,
    )
    text = format_throughput(report)
    assert "resumable sessions (receivers detached)" in text
    assert "messages/s held" in text
    assert "50.0 µs/message" in text  # 2 s / 40,000 held
    assert "publish 1,234, set 2" in text
    assert "3,000 acks sent, 1,500 channel_acked received" in text
    assert "48,000 messages" in text
    assert "5.0 µs/message" in text  # 0.24 s / 48,000 replayed
    attached = build_report(
        merged(),
        placement="same-node",
        urls=["ws://127.0.0.1:1"],
        window=64,
        payload_size=100,
        target_rate=5000.0,
        processes=1,
        broker_cpu=[],
        redis_commands={},
        resume=True,
    )
    text = format_throughput(attached)
    assert "resumable sessions" in text
    assert "detached" not in text
    assert "replay" not in text
    assert "in the window: none" in text


def test_idle_table() -> None:
    report = IdleReport(
        mode="idle",
        urls=["ws://127.0.0.1:1"],
        connections=5000,
        registered=5000,
        errors=0,
        connect_seconds=2.5,
        connects_per_second=2000.0,
        broker_rss_before=[50 * 2**20],
        broker_rss_after=[100 * 2**20],
        bytes_per_connection=10_485.8,
        broker_pids=[11],
        error_samples=[],
    )
    text = format_idle(report)
    assert "10.2 KiB" in text
    assert "2,000 /s" in text
    bare = IdleReport(
        mode="idle",
        urls=["ws://127.0.0.1:1"],
        connections=2,
        registered=1,
        errors=1,
        connect_seconds=0.1,
        connects_per_second=10.0,
        broker_rss_before=[],
        broker_rss_after=[],
        bytes_per_connection=None,
        broker_pids=[],
        error_samples=["ConnectionLost: refused"],
    )
    text = format_idle(bare)
    assert "give --broker-pid" in text
    assert "ConnectionLost: refused" in text

"""One generator process's counts, merged across processes, and the figures derived (pure).

A worker measures over the window ``[start, end)`` that the coordinator gave every worker
(CLOCK_MONOTONIC is shared by the processes of a machine). Counts named ``*_window`` and the
latency histograms cover that window only; the verification counts (lost, duplicates,
reordered, unconfirmed, failed) cover the whole run, warm-up and drain included, because a
message lost during warm-up is still a lost message.

With ``--resume`` the counts of session resume come along (:class:`ResumeFigures`); with
``--detached`` the receivers are away during the window, so the figures per message count the
messages the node *held* for them in the window, and the replay after it is measured apart.
"""

from __future__ import annotations

from typing import Any

import msgspec

from client.bench.histogram import Histogram

__all__ = [
    "BrokerCpu",
    "HistogramData",
    "LatencySummary",
    "Report",
    "ResumeFigures",
    "WorkerResult",
    "build_report",
    "command_calls",
    "command_delta",
    "merge_results",
]


class HistogramData(msgspec.Struct, frozen=True):
    """A histogram in transit (pipe, JSON)."""

    pairs: list[tuple[int, int]]
    total: int
    max: int

    @classmethod
    def of(cls, histogram: Histogram) -> HistogramData:
        return cls(pairs=histogram.to_pairs(), total=histogram.total, max=histogram.max)

    def histogram(self) -> Histogram:
        return Histogram.from_pairs(self.pairs, total=self.total, maximum=self.max)


class WorkerResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one generator process measured."""

    pairs: int
    idle_connections: int
    window_seconds: float
    sent_window: int
    confirmed_window: int
    delivered_window: int
    sent_total: int
    confirmed_total: int
    delivered_total: int
    failed: int
    unconfirmed: int
    lost: int
    duplicates: int
    reordered: int
    corrupt: int
    errors: list[str]
    confirm_latency: HistogramData
    delivery_latency: HistogramData
    generator_cpu_seconds: float
    # Session resume (issue 14); zero without --resume.
    #: Confirmations with ``held: true`` (the recipient was detached), in the window and in all.
    held_window: int = 0
    held_total: int = 0
    #: ``ack`` frames sent, and ``channel_acked`` frames received, over the whole run.
    acks_sent: int = 0
    channel_acked: int = 0
    #: Messages that no ``channel_acked`` covered by the end of the drain.
    unacknowledged: int = 0
    #: Messages the receivers got replayed when they resumed, and the wall time that took.
    replayed: int = 0
    resume_seconds: float = 0.0


def merge_results(results: list[WorkerResult]) -> WorkerResult:
    """Add up the results of several generator processes (their windows coincide)."""
    if not results:
        raise ValueError("no results to merge")
    confirm = Histogram()
    delivery = Histogram()
    for result in results:
        confirm.merge(result.confirm_latency.histogram())
        delivery.merge(result.delivery_latency.histogram())
    errors: list[str] = []
    for result in results:
        errors.extend(e for e in result.errors if e not in errors)
    return WorkerResult(
        pairs=sum(r.pairs for r in results),
        idle_connections=sum(r.idle_connections for r in results),
        window_seconds=max(r.window_seconds for r in results),
        sent_window=sum(r.sent_window for r in results),
        confirmed_window=sum(r.confirmed_window for r in results),
        delivered_window=sum(r.delivered_window for r in results),
        sent_total=sum(r.sent_total for r in results),
        confirmed_total=sum(r.confirmed_total for r in results),
        delivered_total=sum(r.delivered_total for r in results),
        failed=sum(r.failed for r in results),
        unconfirmed=sum(r.unconfirmed for r in results),
        lost=sum(r.lost for r in results),
        duplicates=sum(r.duplicates for r in results),
        reordered=sum(r.reordered for r in results),
        corrupt=sum(r.corrupt for r in results),
        errors=errors[:20],
        confirm_latency=HistogramData.of(confirm),
        delivery_latency=HistogramData.of(delivery),
        generator_cpu_seconds=sum(r.generator_cpu_seconds for r in results),
        held_window=sum(r.held_window for r in results),
        held_total=sum(r.held_total for r in results),
        acks_sent=sum(r.acks_sent for r in results),
        channel_acked=sum(r.channel_acked for r in results),
        unacknowledged=sum(r.unacknowledged for r in results),
        replayed=sum(r.replayed for r in results),
        resume_seconds=max(r.resume_seconds for r in results),
    )


def command_calls(commandstats: dict[str, Any]) -> dict[str, int]:
    """Calls per command from redis-py's parse of ``INFO commandstats``
    (``{"cmdstat_publish": {"calls": 12, ...}, ...}`` -> ``{"publish": 12, ...}``)."""
    return {
        name.removeprefix("cmdstat_"): int(fields["calls"])
        for name, fields in commandstats.items()
        if name.startswith("cmdstat_") and isinstance(fields, dict) and "calls" in fields
    }


def command_delta(
    before: dict[str, int], after: dict[str, int], *, ours: dict[str, int] | None = None
) -> dict[str, int]:
    """Calls per command between two samples, less ``ours`` (the sampler's own calls); only
    commands that were called, by name."""
    calls = {name: count - before.get(name, 0) for name, count in after.items()}
    for name, count in (ours or {}).items():
        calls[name] = calls.get(name, 0) - count
    return {name: count for name, count in sorted(calls.items()) if count > 0}


class LatencySummary(msgspec.Struct, frozen=True):
    """Percentiles in microseconds."""

    p50: int
    p90: int
    p99: int
    max: int
    mean: float

    @classmethod
    def of(cls, histogram: Histogram) -> LatencySummary:
        return cls(
            p50=histogram.percentile(50),
            p90=histogram.percentile(90),
            p99=histogram.percentile(99),
            max=histogram.max,
            mean=round(histogram.mean, 1),
        )


class BrokerCpu(msgspec.Struct, frozen=True):
    """CPU seconds one broker process used during the window."""

    pid: int
    cpu_seconds: float


class ResumeFigures(msgspec.Struct, frozen=True, kw_only=True):
    """What a ``--resume`` run adds to its report."""

    #: The receivers dropped their sockets for the window (``--detached``).
    detached: bool
    #: Messages confirmed ``held: true`` in the window.
    held: int
    acks_sent: int
    channel_acked: int
    unacknowledged: int
    #: Messages replayed to the resuming receivers, the wall time of the resume phase, the
    #: brokers' CPU from the end of the window to the end of the run, and that per message
    #: replayed (None when nothing was replayed or no broker was measured).
    replayed: int
    resume_seconds: float
    broker_cpu_resume_seconds: float | None
    broker_cpu_us_per_replayed: float | None


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """The figures of a throughput run (what ``--json`` prints)."""

    mode: str
    placement: str
    urls: list[str]
    pairs: int
    window: int
    payload_size: int
    target_rate: float
    processes: int
    idle_connections: int
    duration_seconds: float
    messages_per_second: float
    delivered: int
    confirmed: int
    sent_total: int
    errors: int
    failed: int
    unconfirmed: int
    lost: int
    duplicates: int
    reordered: int
    corrupt: int
    ok: bool
    rate_met: bool | None
    confirm_latency_us: LatencySummary
    delivery_latency_us: LatencySummary
    broker_cpu: list[BrokerCpu]
    broker_cpu_percent: float | None
    broker_cpu_us_per_message: float | None
    redis_cpu_seconds: float | None
    redis_cpu_us_per_message: float | None
    generator_cpu_percent: float
    generator_cpu_us_per_message: float | None
    generator_bound: bool
    error_samples: list[str]
    #: Calls of each Redis command during the window (``INFO commandstats``; with --redis-url).
    redis_commands: dict[str, int] | None = None
    resume: ResumeFigures | None = None


#: A generator process above this share of one core is the bottleneck, not the broker.
GENERATOR_BOUND_SHARE = 0.9


def build_report(
    merged: WorkerResult,
    *,
    placement: str,
    urls: list[str],
    window: int,
    payload_size: int,
    target_rate: float,
    processes: int,
    broker_cpu: list[BrokerCpu],
    redis_cpu_seconds: float | None = None,
    redis_commands: dict[str, int] | None = None,
    resume: bool = False,
    detached: bool = False,
    broker_cpu_resume_seconds: float | None = None,
) -> Report:
    """Derive the report's figures from the merged counts and the broker CPU samples.

    The messages a figure per message divides by are those delivered in the window, or,
    ``detached``, those held for the absent receivers in it.
    """
    seconds = merged.window_seconds
    counted = merged.held_window if detached else merged.delivered_window
    broker_seconds = sum(b.cpu_seconds for b in broker_cpu)
    errors = merged.failed + merged.unconfirmed + merged.corrupt
    verification_clean = (
        merged.lost == 0
        and merged.duplicates == 0
        and merged.reordered == 0
        and merged.unacknowledged == 0
    )
    rate = counted / seconds if seconds > 0 else 0.0
    return Report(
        mode="throughput",
        placement=placement,
        urls=urls,
        pairs=merged.pairs,
        window=window,
        payload_size=payload_size,
        target_rate=target_rate,
        processes=processes,
        idle_connections=merged.idle_connections,
        duration_seconds=round(seconds, 3),
        messages_per_second=round(rate, 1),
        delivered=merged.delivered_window,
        confirmed=merged.confirmed_window,
        sent_total=merged.sent_total,
        errors=errors,
        failed=merged.failed,
        unconfirmed=merged.unconfirmed,
        lost=merged.lost,
        duplicates=merged.duplicates,
        reordered=merged.reordered,
        corrupt=merged.corrupt,
        ok=errors == 0 and verification_clean and merged.sent_total > 0,
        # Within 5 % of the offered rate; None when unpaced.
        rate_met=(rate >= 0.95 * target_rate) if target_rate > 0 else None,
        confirm_latency_us=LatencySummary.of(merged.confirm_latency.histogram()),
        delivery_latency_us=LatencySummary.of(merged.delivery_latency.histogram()),
        broker_cpu=broker_cpu,
        broker_cpu_percent=(
            round(100 * broker_seconds / seconds, 1) if broker_cpu and seconds > 0 else None
        ),
        broker_cpu_us_per_message=(
            round(broker_seconds * 1e6 / counted, 2) if broker_cpu and counted else None
        ),
        redis_cpu_seconds=redis_cpu_seconds,
        redis_cpu_us_per_message=(
            round(redis_cpu_seconds * 1e6 / counted, 2)
            if redis_cpu_seconds is not None and counted
            else None
        ),
        generator_cpu_percent=round(100 * merged.generator_cpu_seconds / seconds, 1)
        if seconds > 0
        else 0.0,
        generator_cpu_us_per_message=(
            round(merged.generator_cpu_seconds * 1e6 / counted, 2) if counted else None
        ),
        generator_bound=seconds > 0
        and merged.generator_cpu_seconds / seconds > GENERATOR_BOUND_SHARE * processes,
        error_samples=merged.errors,
        redis_commands=redis_commands,
        resume=_resume_figures(merged, detached, broker_cpu_resume_seconds) if resume else None,
    )


def _resume_figures(
    merged: WorkerResult, detached: bool, broker_cpu_resume_seconds: float | None
) -> ResumeFigures:
    replayed = merged.replayed
    return ResumeFigures(
        detached=detached,
        held=merged.held_window,
        acks_sent=merged.acks_sent,
        channel_acked=merged.channel_acked,
        unacknowledged=merged.unacknowledged,
        replayed=replayed,
        resume_seconds=round(merged.resume_seconds, 3),
        broker_cpu_resume_seconds=broker_cpu_resume_seconds,
        broker_cpu_us_per_replayed=(
            round(broker_cpu_resume_seconds * 1e6 / replayed, 2)
            if broker_cpu_resume_seconds is not None and replayed
            else None
        ),
    )

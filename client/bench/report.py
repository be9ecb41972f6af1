"""Reports as readable tables (pure formatting)."""

from __future__ import annotations

from client.bench.coordinator import IdleReport
from client.bench.results import LatencySummary, Report, ResumeFigures

__all__ = ["format_idle", "format_throughput"]


def _latency_row(name: str, summary: LatencySummary) -> str:
    return (
        f"  {name:<14}{summary.p50:>10,}{summary.p90:>10,}{summary.p99:>10,}"
        f"{summary.max:>10,}{summary.mean:>12,.1f}"
    )


def format_throughput(report: Report) -> str:
    """The report of a throughput run as a table."""
    rate = f"{report.target_rate:,.0f} msg/s" if report.target_rate > 0 else "unpaced"
    resume = report.resume
    mode = ""
    if resume is not None:
        mode = ", resumable sessions" + (" (receivers detached)" if resume.detached else "")
    lines = [
        f"broker-bench throughput: {report.pairs} pairs ({report.placement}), "
        f"window {report.window}, payload {report.payload_size} B, rate {rate}, "
        f"{report.idle_connections:,} idle, {report.processes} generator process(es){mode}",
        f"  brokers: {', '.join(report.urls)}",
        "",
        f"{'messages/s' + (' held' if resume and resume.detached else ''):<18}"
        f"{report.messages_per_second:>12,.1f}"
        + (
            ""
            if report.rate_met is None
            else "   (offered rate met)"
            if report.rate_met
            else "   (OFFERED RATE NOT MET)"
        ),
        f"{'delivered':<18}{report.delivered:>12,}   in the {report.duration_seconds:g} s window"
        f" (confirmed {report.confirmed:,}; sent over the whole run {report.sent_total:,})",
        f"{'verification':<18}{'OK' if report.ok else 'FAILED':>12}   lost {report.lost}, "
        f"duplicates {report.duplicates}, reordered {report.reordered}, errors {report.errors} "
        f"(failed {report.failed}, unconfirmed {report.unconfirmed}, corrupt {report.corrupt})",
        "",
        f"  {'latency (µs)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'mean':>12}",
        _latency_row("confirmation", report.confirm_latency_us),
        _latency_row("delivery", report.delivery_latency_us),
        "",
    ]
    if report.broker_cpu_us_per_message is not None and report.broker_cpu_percent is not None:
        pids = ", ".join(f"{b.pid}: {b.cpu_seconds:.2f} s" for b in report.broker_cpu)
        lines.append(
            f"{'broker CPU':<18}{report.broker_cpu_us_per_message:>12,.1f} µs/message   "
            f"({report.broker_cpu_percent:.0f} % of one core; {pids})"
        )
    else:
        lines.append(f"{'broker CPU':<18}{'-':>12}   (give --broker-pid to measure it)")
    if report.redis_cpu_us_per_message is not None and report.redis_cpu_seconds is not None:
        lines.append(
            f"{'Redis CPU':<18}{report.redis_cpu_us_per_message:>12,.1f} µs/message   "
            f"({report.redis_cpu_seconds:.2f} s, from INFO cpu; not in the broker figure)"
        )
    if report.redis_commands is not None:
        calls = ", ".join(f"{name} {count:,}" for name, count in report.redis_commands.items())
        lines.append(f"{'Redis commands':<18}{'':>12}   in the window: {calls or 'none'}")
    if resume is not None:
        lines += _resume_lines(resume)
    gen = report.generator_cpu_us_per_message
    lines.append(
        f"{'generator CPU':<18}{(f'{gen:,.1f}' if gen is not None else '-'):>12} µs/message   "
        f"({report.generator_cpu_percent:.0f} % of one core"
        + (
            "; GENERATOR-BOUND: the generator, not the broker, limited this run)"
            if report.generator_bound
            else ")"
        )
    )
    if report.error_samples:
        lines.append("")
        lines.append("errors seen:")
        lines.extend(f"  {e}" for e in report.error_samples)
    return "\n".join(lines)


def _resume_lines(resume: ResumeFigures) -> list[str]:
    lines = [
        f"{'resume':<18}{resume.acks_sent:>12,} acks sent, {resume.channel_acked:,} "
        f"channel_acked received, {resume.unacknowledged:,} messages never acknowledged",
    ]
    if resume.detached:
        per_message = (
            f"{resume.broker_cpu_us_per_replayed:,.1f} µs/message"
            if resume.broker_cpu_us_per_replayed is not None
            else "-"
        )
        lines.append(
            f"{'replay':<18}{resume.replayed:>12,} messages in {resume.resume_seconds:g} s;"
            f" broker CPU {per_message} (from the end of the window to the last resumed)"
        )
    return lines


def format_idle(report: IdleReport) -> str:
    """The report of an idle run as a table."""
    lines = [
        f"broker-bench idle: {report.connections:,} registered connections",
        f"  brokers: {', '.join(report.urls)}",
        "",
        f"{'registered':<22}{report.registered:>12,}   errors {report.errors}",
        f"{'connect + register':<22}{report.connects_per_second:>12,.0f} /s"
        f"   ({report.connect_seconds:g} s in all)",
    ]
    if report.bytes_per_connection is not None:
        before = sum(report.broker_rss_before) / 2**20
        after = sum(report.broker_rss_after) / 2**20
        lines.append(
            f"{'memory / connection':<22}{report.bytes_per_connection / 1024:>12,.1f} KiB"
            f"   (broker RSS {before:,.1f} -> {after:,.1f} MiB)"
        )
    else:
        lines.append(f"{'memory / connection':<22}{'-':>12}   (give --broker-pid to measure it)")
    if report.error_samples:
        lines.append("")
        lines.append("errors seen:")
        lines.extend(f"  {e}" for e in report.error_samples)
    return "\n".join(lines)

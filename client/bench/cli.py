"""``broker-bench``: the command line (click)."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit

import click
import msgspec

from client.bench.coordinator import ThroughputConfig, run_idle, run_throughput
from client.bench.procfs import process_listens_on
from client.bench.report import format_idle, format_throughput

__all__ = ["main"]

_url_option = click.option(
    "--url",
    "urls",
    multiple=True,
    default=["ws://127.0.0.1:3004"],
    show_default=True,
    help="Broker URL; repeat for several nodes (pairs and idle connections are spread).",
)
_pid_option = click.option(
    "--broker-pid",
    "broker_pids",
    multiple=True,
    type=int,
    help="PID of a broker process to measure (repeatable; read from /proc).",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
_quiet_option = click.option("--quiet", is_flag=True, help="No progress line on stderr.")


def _check_local(urls: tuple[str, ...]) -> None:
    # Load only ever targets this machine: a benchmark must not load somebody else's broker.
    for url in urls:
        host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            raise click.BadParameter(
                f"{url}: only loopback brokers may be loaded", param_hint="--url"
            )


def _check_pids(urls: tuple[str, ...], pids: tuple[int, ...]) -> None:
    # A pid that is not the broker's (a shell's, npx's rather than its child's) would make
    # every CPU figure per message wrong, often 0: say so before the run.
    ports = [urlsplit(url).port or 80 for url in urls]
    for pid in pids:
        if process_listens_on(pid, ports) is False:
            click.echo(
                f"warning: process {pid} listens on none of the --url ports "
                f"({', '.join(map(str, ports))}): its CPU and memory are not the broker's",
                err=True,
            )


def _describe(exc: BaseException) -> str:
    # A failed setup arrives as an ExceptionGroup from the TaskGroup: show its first leaf.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Load generator for the connection broker: it verifies what it measures."""


@main.command()
@_url_option
@click.option(
    "--placement",
    type=click.Choice(["same-node", "cross-node"]),
    default="same-node",
    show_default=True,
    help="cross-node: the sender is on url[i], its receiver on url[i+1 mod n].",
)
@click.option("--pairs", default=10, show_default=True, help="Sender/receiver pairs.")
@click.option("--window", default=64, show_default=True, help="Unconfirmed messages per sender.")
@click.option("--payload-size", default=100, show_default=True, help="Payload bytes (JSON).")
@click.option("--duration", default=10.0, show_default=True, help="Measured seconds.")
@click.option("--warmup", default=2.0, show_default=True, help="Seconds of load before.")
@click.option("--rate", default=0.0, show_default=True, help="Total paced msg/s; 0 saturates.")
@click.option("--processes", default=1, show_default=True, help="Generator processes.")
@click.option("--idle", default=0, show_default=True, help="Extra idle registered connections.")
@click.option("--tick", default=0.001, show_default=True, help="Pacing tick, seconds.")
@click.option("--drain-timeout", default=5.0, show_default=True, help="Wait for the last replies.")
@click.option(
    "--redis-url",
    default=None,
    help="Also measure this Redis' CPU (INFO cpu) and count its commands (INFO commandstats).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Resumable sessions, as the SDK's: register with resume, seq on every message, acks.",
)
@click.option(
    "--detached",
    is_flag=True,
    help="With --resume: the receivers drop their sockets for the run (the node holds every "
    "message for them), then resume and read the replay. Each session must hold about "
    "rate / pairs x (warmup + duration) messages: raise the node's --resume-max-frames "
    "and --resume-max-bytes to fit.",
)
@_pid_option
@_json_option
@_quiet_option
def throughput(
    urls: tuple[str, ...],
    placement: str,
    pairs: int,
    window: int,
    payload_size: int,
    duration: float,
    warmup: float,
    rate: float,
    processes: int,
    idle: int,
    tick: float,
    drain_timeout: float,
    redis_url: str | None,
    resume: bool,
    detached: bool,
    broker_pids: tuple[int, ...],
    as_json: bool,
    quiet: bool,
) -> None:
    """Messages/s, latency and broker CPU per message of N sender/receiver pairs.

    Exits with status 1 when a message was lost, duplicated, reordered or not confirmed
    (with --resume also: not acknowledged).
    """
    _check_local(urls)
    _check_pids(urls, broker_pids)
    if placement == "cross-node" and len(urls) < 2:
        raise click.BadParameter("cross-node needs two --url or more", param_hint="--placement")
    if detached and not resume:
        raise click.BadParameter("--detached needs --resume", param_hint="--detached")
    config = ThroughputConfig(
        urls=list(urls),
        placement="cross-node" if placement == "cross-node" else "same-node",
        pairs=pairs,
        window=window,
        payload_size=payload_size,
        duration=duration,
        warmup=warmup,
        rate=rate,
        processes=processes,
        idle=idle,
        broker_pids=list(broker_pids),
        redis_url=redis_url,
        tick=tick,
        drain_timeout=drain_timeout,
        resume=resume,
        detached=detached,
    )
    try:
        report = run_throughput(config, progress=not quiet)
    except (OSError, RuntimeError, ExceptionGroup) as exc:
        raise click.ClickException(f"the run could not start or finish: {_describe(exc)}") from exc
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(report).decode()))
    else:
        click.echo(format_throughput(report))
    sys.exit(0 if report.ok else 1)


@main.command()
@_url_option
@click.option("--connections", "count", default=1000, show_default=True, help="How many.")
@click.option("--concurrency", default=100, show_default=True, help="Handshakes in flight.")
@click.option("--settle", default=1.0, show_default=True, help="Seconds before reading memory.")
@click.option("--hold", default=0.0, show_default=True, help="Seconds to hold them open after.")
@_pid_option
@_json_option
@_quiet_option
def idle(
    urls: tuple[str, ...],
    count: int,
    concurrency: int,
    settle: float,
    hold: float,
    broker_pids: tuple[int, ...],
    as_json: bool,
    quiet: bool,
) -> None:
    """Connect rate and broker memory per idle registered connection."""
    _check_local(urls)
    _check_pids(urls, broker_pids)
    report = run_idle(
        list(urls),
        count,
        pids=list(broker_pids),
        concurrency=concurrency,
        settle=settle,
        hold=hold,
        progress=not quiet,
    )
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(report).decode()))
    else:
        click.echo(format_idle(report))
    sys.exit(0 if report.errors == 0 and report.registered == count else 1)


if __name__ == "__main__":  # pragma: no cover
    main()

"""Side-by-side benchmark: the original package, our standalone node, our 2-node cluster.

Not a test (``conftest.py`` keeps pytest away from it; CI does not run it). One run measures,
alternating the systems (original, standalone, cluster; original, standalone, cluster; ...),
each round on freshly started processes, and reports the median of the rounds:

- memory per idle registered connection (``broker-bench idle``, first thing on a fresh process);
- saturated throughput (no pacing) with the broker's and the generator's CPU;
- a paced 5,000 msg/s: broker CPU µs per message and p99 confirmation latency;
- the same with 5,000 extra idle registered connections;
- for the cluster, same-node and cross-node pairs, and Redis' own CPU per message.

Run it from the repository root on an otherwise idle machine::

    .venv/bin/python -m tests.bench.run_bench            # writes docs/bench/
    .venv/bin/python -m tests.bench.run_bench --quick    # a smoke run, about a minute

It writes ``results.md`` (the table), ``results.png`` (the plot) and ``results.json`` (every
run's full report) into the results directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from tests.support.cluster import Cluster
from tests.support.nodes import BROKER_NODE, NodeProcess
from tests.support.polling import wait_until_serving
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

PACKAGE = "@sitnikov/connection-broker@1.0.0"
BIN = Path(sys.executable).parent
BROKER_BENCH = str(BIN / "broker-bench")
#: The nodes log warnings only: per-frame debug lines would cost CPU that the figures count.
QUIET = ["--log-level", "warning"]

# --- the systems ---------------------------------------------------------------------------


@dataclass
class Running:
    """A started system: its broker URLs, the pids to measure, and Redis if any."""

    urls: list[str]
    pids: list[int]
    redis_url: str | None = None


def npm_install(directory: Path) -> Path:
    """Install the original package from the npm registry; returns its bin/broker.js."""
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not installed: the original package cannot be measured")
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(directory), PACKAGE],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )
    return directory / "node_modules" / "@sitnikov" / "connection-broker" / "bin" / "broker.js"


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return True
        except OSError:
            return False

    wait_until_serving(
        process, listening, timeout=timeout, message=f"the broker to listen on {port}"
    )


@contextlib.contextmanager
def original(broker_js: Path) -> Iterator[Running]:
    port = free_port()
    node = shutil.which("node") or "node"
    # Its per-message console output goes to /dev/null, as in the figures.
    process = subprocess.Popen(
        [node, str(broker_js), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield Running(urls=[f"ws://127.0.0.1:{port}"], pids=[process.pid])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextlib.contextmanager
def standalone(binary: str = BROKER_NODE) -> Iterator[Running]:
    with NodeProcess(extra_args=QUIET, binary=binary) as node:
        yield Running(urls=[node.url], pids=[node.pid])


@contextlib.contextmanager
def cluster(binary: str = BROKER_NODE) -> Iterator[Running]:
    """Two nodes (default settings) on a redis-server of their own."""
    with RedisServer() as redis, Cluster(redis, args=QUIET, binary=binary) as nodes:
        started = nodes.launch(2)
        yield Running(
            urls=[node.url for node in started],
            pids=[node.pid for node in started],
            redis_url=redis.url,
        )


# --- the scenarios -------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    duration: float
    warmup: float
    rate: float
    idle: int
    pairs: int
    window: int
    payload: int
    processes: int


def bench(args: list[str], timeout: float) -> dict[str, Any]:
    run = subprocess.run(
        [BROKER_BENCH, *args, "--json", "--quiet"],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    if not run.stdout.strip():
        raise RuntimeError(f"broker-bench {' '.join(args)} failed:\n{run.stderr.decode()}")
    result: dict[str, Any] = json.loads(run.stdout)
    if run.returncode != 0:
        print(f"  !! verification failed: {' '.join(args)}", file=sys.stderr)
    return result


def throughput(
    system: Running,
    settings: Settings,
    *,
    placement: str,
    rate: float,
    idle: int,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """One ``broker-bench throughput`` run; ``extra``: more of its options (``--resume``)."""
    args = ["throughput", "--placement", placement, *extra]
    for url in system.urls:
        args += ["--url", url]
    for pid in system.pids:
        args += ["--broker-pid", str(pid)]
    if system.redis_url:
        args += ["--redis-url", system.redis_url]
    args += [
        "--pairs", str(settings.pairs),
        "--window", str(settings.window),
        "--payload-size", str(settings.payload),
        "--duration", str(settings.duration),
        "--warmup", str(settings.warmup),
        "--rate", str(rate),
        "--idle", str(idle),
        "--processes", str(settings.processes),
    ]  # fmt: skip
    return bench(args, timeout=settings.duration + settings.warmup + 120 + idle / 100)


def idle_memory(system: Running, count: int) -> dict[str, Any]:
    args = ["idle", "--connections", str(count)]
    for url in system.urls:
        args += ["--url", url]
    for pid in system.pids:
        args += ["--broker-pid", str(pid)]
    return bench(args, timeout=120 + count / 50)


#: (row, placement) measured on each system; the cluster has both placements.
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "original": [("original package (Node.js)", "same-node")],
    "standalone": [("our standalone node", "same-node")],
    "cluster": [
        ("our 2-node cluster, same-node pairs", "same-node"),
        ("our 2-node cluster, cross-node pairs", "cross-node"),
    ],
}


def measure_system(name: str, system: Running, settings: Settings) -> dict[str, dict[str, Any]]:
    """Every scenario on one freshly started system: {row: {scenario: report}}."""
    rows: dict[str, dict[str, Any]] = {}
    memory = idle_memory(system, settings.idle) if settings.idle else None
    for row, placement in VARIANTS[name]:
        print(f"  {row}", file=sys.stderr)
        runs: dict[str, Any] = {}
        if memory is not None:
            runs["idle_memory"] = memory
        runs["saturated"] = throughput(system, settings, placement=placement, rate=0, idle=0)
        runs["paced"] = throughput(
            system, settings, placement=placement, rate=settings.rate, idle=0
        )
        if settings.idle:
            runs["paced_idle"] = throughput(
                system, settings, placement=placement, rate=settings.rate, idle=settings.idle
            )
        rows[row] = runs
    return rows


# --- the figures ---------------------------------------------------------------------------

#: (column title, scenario, how to read the figure from its report)
COLUMNS: list[tuple[str, str, str]] = [
    ("saturated msg/s", "saturated", "messages_per_second"),
    ("saturated: broker µs/msg", "saturated", "broker_cpu_us_per_message"),
    ("saturated: generator CPU %", "saturated", "generator_cpu_percent"),
    ("paced: broker µs/msg", "paced", "broker_cpu_us_per_message"),
    ("paced: p99 confirm µs", "paced", "confirm_latency_us.p99"),
    ("paced: Redis µs/msg", "paced", "redis_cpu_us_per_message"),
    ("paced + idle: broker µs/msg", "paced_idle", "broker_cpu_us_per_message"),
    ("paced + idle: p99 confirm µs", "paced_idle", "confirm_latency_us.p99"),
    ("paced + idle: msg/s", "paced_idle", "messages_per_second"),
    ("KiB per idle connection", "idle_memory", "bytes_per_connection"),
]


def pick(report: dict[str, Any], path: str) -> float | None:
    value: Any = report
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    number = float(value)
    return number / 1024 if path == "bytes_per_connection" else number


def medians(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for row in rounds[0]:
        table[row] = {}
        for title, scenario, path in COLUMNS:
            values = [
                v
                for r in rounds
                if scenario in r.get(row, {})
                for v in [pick(r[row][scenario], path)]
                if v is not None
            ]
            table[row][title] = statistics.median(values) if values else None
        table[row]["verified"] = float(
            all(
                report.get("ok", report.get("errors", 1) == 0)
                for r in rounds
                for report in r.get(row, {}).values()
            )
        )
    return table


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"


def machine(load_before: float) -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    redis = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "websockets": version("websockets"),
        "msgspec": version("msgspec"),
        "uvloop": version("uvloop"),
        "node": node.stdout.strip(),
        "redis-server": redis.stdout.split(" v=")[-1].split()[0] if redis.stdout else "?",
        "original package": PACKAGE,
        "our commit": commit.stdout.strip() or "?",
        # Other work on the machine spoils the figures (p99 latency first): say how busy it was.
        "1-min load average before / after": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
    }


def targets(table: dict[str, dict[str, float | None]]) -> list[str]:
    """The issue's targets, checked against the medians (a benchmark, not a test)."""
    orig = table.get("original package (Node.js)", {})
    ours = table.get("our standalone node", {})
    cross = table.get("our 2-node cluster, cross-node pairs", {})
    lines: list[str] = []

    def line(text: str, ok: bool | None, detail: str) -> None:
        mark = "n/a" if ok is None else ("met" if ok else "**missed**")
        lines.append(f"- {text}: {mark} ({detail})")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    r = ratio(ours.get("paced: broker µs/msg"), orig.get("paced: broker µs/msg"))
    line(
        "standalone CPU/msg at the paced rate ≤ 0.5x the original's",
        None if r is None else r <= 0.5,
        f"{fmt(r and r * 100)} % of the original's",
    )
    r = ratio(ours.get("paced + idle: broker µs/msg"), ours.get("paced: broker µs/msg"))
    line(
        "with the idle connections, within 10 % of our 0-idle figure",
        None if r is None else r <= 1.1,
        f"{fmt(r and r * 100)} %",
    )
    r = ratio(cross.get("paced: broker µs/msg"), ours.get("paced: broker µs/msg"))
    line(
        "cross-node CPU/msg (both nodes) ≤ 1.5x standalone",
        None if r is None else r <= 1.5,
        f"{fmt(r)}x; Redis adds {fmt(cross.get('paced: Redis µs/msg'))} µs/msg",
    )
    a, b = ours.get("KiB per idle connection"), orig.get("KiB per idle connection")
    line(
        "memory per idle connection ≤ the original's",
        None if a is None or b is None else a <= b,
        f"{fmt(a)} vs {fmt(b)} KiB",
    )
    a, b = ours.get("paced: p99 confirm µs"), orig.get("paced: p99 confirm µs")
    line(
        "p99 confirmation latency at the paced rate ≤ the original's",
        None if a is None or b is None else a <= b,
        f"{fmt(a)} vs {fmt(b)} µs",
    )
    return lines  # fmt: skip


def write_markdown(
    path: Path,
    table: dict[str, dict[str, float | None]],
    info: dict[str, str],
    settings: Settings,
    rounds: int,
    command: str,
) -> None:
    titles = [title for title, _, _ in COLUMNS]
    out = [
        "# Benchmark: the original package, our node, our cluster",
        "",
        f"Medians of {rounds} rounds, systems alternated within each round, each round on "
        f"fresh processes. {settings.pairs} sender/receiver pairs, window {settings.window}, "
        f"{settings.payload}-byte payloads, {settings.duration:g} s measured after "
        f"{settings.warmup:g} s of warm-up; paced = {settings.rate:,.0f} msg/s in total; "
        f"idle = {settings.idle:,} extra idle registered connections; "
        f"{settings.processes} generator process(es). µs/msg = CPU time of the broker "
        "process(es) during the window / messages delivered in it (both nodes for the "
        "cluster; Redis reported apart).",
        "",
        "| system | " + " | ".join(titles) + " | verified |",
        "|---|" + "---:|" * len(titles) + "---|",
    ]
    for row, figures in table.items():
        cells = [fmt(figures.get(t)) for t in titles]
        verified = "yes" if figures.get("verified") else "**NO**"
        out.append(f"| {row} | " + " | ".join(cells) + f" | {verified} |")
    out += [
        "",
        "Targets of issue 6:",
        "",
        *targets(table),
        "",
        "![benchmark plot](results.png)",
        "",
        "Machine and versions: " + "; ".join(f"{k}: {v}" for k, v in info.items()) + ".",
        "",
        f"Reproduce: `{command}` (see docs/bench.md).",
        "",
    ]
    path.write_text("\n".join(out))


def write_plot(path: Path, table: dict[str, dict[str, float | None]], settings: Settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table)
    panels = [
        ("broker CPU µs per message", ["paced: broker µs/msg", "paced + idle: broker µs/msg",
                                       "saturated: broker µs/msg"],
         [f"paced {settings.rate:,.0f}/s", f"+ {settings.idle:,} idle", "saturated"]),
        ("p99 confirmation latency, µs", ["paced: p99 confirm µs", "paced + idle: p99 confirm µs"],
         [f"paced {settings.rate:,.0f}/s", f"+ {settings.idle:,} idle"]),
        ("KiB per idle registered connection", ["KiB per idle connection"], ["idle"]),
    ]  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 5.5))
    width = 0.8 / len(rows)
    colors = ["#8c8c8c", "#1f77b4", "#2ca02c", "#ff7f0e"]
    for axis, (title, columns, labels) in zip(axes, panels, strict=True):
        for i, row in enumerate(rows):
            values = [table[row].get(c) or 0.0 for c in columns]
            positions = [x + (i - (len(rows) - 1) / 2) * width for x in range(len(columns))]
            axis.bar(positions, values, width, label=row, color=colors[i % len(colors)])
        axis.set_xticks(range(len(columns)), labels)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle("connection broker: lower is better (medians)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--results-dir", type=Path, default=Path("docs/bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--idle", type=int, default=5000)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument(
        "--systems", default="original,standalone,cluster", help="comma-separated subset"
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s, 500 idle: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.idle = 1, 3.0, 1.0, 500
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        rate=args.rate,
        idle=args.idle,
        pairs=args.pairs,
        window=args.window,
        payload=args.payload,
        processes=args.processes,
    )
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    command = "python -m tests.bench.run_bench " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    args.results_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="connection-broker-npm-") as npm_dir:
        broker_js = npm_install(Path(npm_dir)) if "original" in systems else Path()
        for number in range(1, args.rounds + 1):
            results: dict[str, dict[str, Any]] = {}
            for name in systems:
                print(f"round {number}/{args.rounds}: {name}", file=sys.stderr)
                starters: dict[str, Callable[[], contextlib.AbstractContextManager[Running]]] = {
                    "original": lambda: original(broker_js),
                    "standalone": standalone,
                    "cluster": cluster,
                }
                starter = starters[name]
                with starter() as system:
                    results.update(measure_system(name, system, settings))
            rounds.append(results)
    table = medians(rounds)
    info = machine(load_before)
    (args.results_dir / "results.json").write_text(
        json.dumps({"machine": info, "settings": settings.__dict__, "rounds": rounds}, indent=1)
    )
    write_markdown(args.results_dir / "results.md", table, info, settings, args.rounds, command)
    write_plot(args.results_dir / "results.png", table, settings)
    print((args.results_dir / "results.md").read_text())


if __name__ == "__main__":
    main()

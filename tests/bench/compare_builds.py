"""Two variants of the node side by side: what a change costs per message.

Not a test (CI does not run it). Give it the ``broker-node`` executables of two checkouts
(each installed in its own virtualenv); it alternates them round by round on fresh
processes, with the same ``broker-bench throughput`` load, and prints the median broker CPU
per message and p99 confirmation latency of each, and their ratio::

    .venv/bin/python -m tests.bench.compare_builds \\
        --before ../baseline/.venv/bin/broker-node --after .venv/bin/broker-node --rounds 5

Scenarios: a standalone node with same-node pairs, and a 2-node cluster on one redis-server
with cross-node pairs, both paced (5,000 msg/s by default); ``--scenarios`` picks others by
name (``standalone saturated``, ``cross-node detached``, ...: ``BUILD_SCENARIOS``), and
``--bench-arg`` passes options to every run of both builds (``--bench-arg=--resume``).

``--resume`` compares session resume off and on instead (issue 14): one build (``--after``,
by default this virtualenv's ``broker-node``), the generator without and with ``--resume``
(resumable sessions, as the SDK's), paced and saturated (the nodes then run with
``--max-requests-per-second 0``); and the detached scenarios, where the "on" run's receivers
are away for the whole run (``--detached``: every message is held for them, then replayed)
while the "off" run is the plain one. Those nodes keep up to ``DETACHED_MAX_FRAMES`` frames
per session, so that no session passes its bound::

    .venv/bin/python -m tests.bench.compare_builds --resume --rounds 5

Every run reads Redis' ``INFO commandstats`` before and after its window: the summary shows
what each variant asked of Redis per message. ``--json FILE`` keeps every run's report;
``--summarize FILE [FILE ...]`` prints the summary of such files again, their runs pooled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.run_bench import Running, Settings, throughput
from tests.support.nodes import BROKER_NODE, NodeProcess
from tests.support.redis_server import RedisServer

QUIET = ["--log-level", "warning"]

#: Frames (and bytes) a session may keep in the detached scenarios: a receiver away for the
#: whole run is held rate / pairs x (warm-up + duration) messages, about 5,000 at the
#: defaults, where the node's default bound is 10,000 frames and 4 MiB.
DETACHED_MAX_FRAMES = 50_000
DETACHED_MAX_BYTES = 32 * 1024 * 1024
NO_REQUEST_LIMIT = ("--max-requests-per-second", "0")


@dataclass(frozen=True)
class Variant:
    """One side of the comparison: a node build and the generator's options."""

    name: str
    binary: str
    bench_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scenario:
    """A system and a load, run once per variant per round."""

    name: str
    cluster: bool
    saturated: bool = False
    node_args: tuple[str, ...] = ()
    #: Generator options of both variants' runs.
    bench_args: tuple[str, ...] = ()
    #: Generator options of the second variant's runs only (the first is the plain run).
    second_args: tuple[str, ...] = ()

    @property
    def placement(self) -> str:
        return "cross-node" if self.cluster else "same-node"


_DETACHED_NODE = (
    "--resume-max-frames",
    str(DETACHED_MAX_FRAMES),
    "--resume-max-bytes",
    str(DETACHED_MAX_BYTES),
    # A resume replays what was held into the client's outbound buffer (the node checks).
    "--max-outbound-buffer",
    str(DETACHED_MAX_BYTES),
)
_PACED_AND_SATURATED = [
    Scenario("standalone paced", cluster=False),
    Scenario("standalone saturated", cluster=False, saturated=True, node_args=NO_REQUEST_LIMIT),
    Scenario("cross-node paced", cluster=True),
    Scenario("cross-node saturated", cluster=True, saturated=True, node_args=NO_REQUEST_LIMIT),
]
#: Two builds: both run every scenario alike (the paced ones unless --scenarios says).
BUILD_SCENARIOS = [
    *_PACED_AND_SATURATED,
    *(
        Scenario(
            f"{system} detached",
            cluster=system == "cross-node",
            node_args=_DETACHED_NODE,
            bench_args=("--resume", "--detached"),
        )
        for system in ("standalone", "cross-node")
    ),
]
DEFAULT_BUILD_SCENARIOS = ("standalone paced", "cross-node paced")
#: Resume off and on: the detached runs against the plain ones.
RESUME_SCENARIOS = [
    *_PACED_AND_SATURATED,
    *(
        Scenario(
            f"{system} detached",
            cluster=system == "cross-node",
            node_args=_DETACHED_NODE,
            second_args=("--detached",),
        )
        for system in ("standalone", "cross-node")
    ),
]


@contextlib.contextmanager
def standalone(binary: str, node_args: Sequence[str] = ()) -> Iterator[Running]:
    with NodeProcess(extra_args=[*QUIET, *node_args], binary=binary) as node:
        yield Running(urls=[node.url], pids=[node.pid])


@contextlib.contextmanager
def cluster(binary: str, node_args: Sequence[str] = ()) -> Iterator[Running]:
    args = [*QUIET, *node_args]
    with (
        RedisServer() as redis,
        NodeProcess(redis_url=redis.url, extra_args=args, binary=binary) as first,
        NodeProcess(redis_url=redis.url, extra_args=args, binary=binary) as second,
    ):
        yield Running(
            urls=[first.url, second.url], pids=[first.pid, second.pid], redis_url=redis.url
        )


def measure(
    variant: Variant, scenario: Scenario, settings: Settings, *, second: bool
) -> dict[str, Any]:
    """One run on fresh processes; ``second``: the variant is the comparison's second."""
    system = cluster if scenario.cluster else standalone
    extra = [*variant.bench_args, *scenario.bench_args, *(scenario.second_args if second else ())]
    rate = 0.0 if scenario.saturated else settings.rate
    with system(variant.binary, scenario.node_args) as running:
        return throughput(
            running, settings, placement=scenario.placement, rate=rate, idle=0, extra=extra
        )


# --- the summary (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Medians:
    """The medians of one variant's runs of one scenario."""

    runs: int
    verified: bool
    cpu_us: float | None
    p99_us: float
    rate: float
    redis_us: float | None
    #: Median calls per command in the window, and per 1,000 messages.
    redis_calls: dict[str, float]
    redis_per_1000: dict[str, float]
    #: Detached runs: the brokers' CPU per message replayed on resume.
    replay_us: float | None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def medians_of(reports: list[dict[str, Any]]) -> Medians:
    """Medians of one variant's runs of one scenario (figures a run lacks are left out; a
    Redis command a run did not call counts as 0 calls in it)."""

    def figure(key: str) -> list[float]:
        return [float(r[key]) for r in reports if r.get(key) is not None]

    sampled = [r for r in reports if r.get("redis_commands") is not None]
    names = sorted({name for r in sampled for name in r["redis_commands"]})
    counted = [r["messages_per_second"] * r["duration_seconds"] for r in sampled]
    replays = [
        float(r["resume"]["broker_cpu_us_per_replayed"])
        for r in reports
        if r.get("resume") and r["resume"].get("broker_cpu_us_per_replayed") is not None
    ]
    return Medians(
        runs=len(reports),
        verified=all(r["ok"] for r in reports),
        cpu_us=_median(figure("broker_cpu_us_per_message")),
        p99_us=statistics.median(r["confirm_latency_us"]["p99"] for r in reports),
        rate=statistics.median(r["messages_per_second"] for r in reports),
        redis_us=_median(figure("redis_cpu_us_per_message")),
        redis_calls={
            name: statistics.median(r["redis_commands"].get(name, 0) for r in sampled)
            for name in names
        },
        redis_per_1000={
            name: statistics.median(
                1000 * r["redis_commands"].get(name, 0) / n
                for r, n in zip(sampled, counted, strict=True)
                if n
            )
            for name in names
            if any(counted)
        },
        replay_us=_median(replays),
    )


def ratio(after: float | None, before: float | None) -> float | None:
    return after / before if after is not None and before else None


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _commands(calls: dict[str, float], digits: int) -> str:
    return ", ".join(f"{name} {value:,.{digits}f}" for name, value in calls.items()) or "none"


def summary_table(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    scenarios: list[Scenario],
    names: tuple[str, str],
) -> list[str]:
    """A markdown table: per scenario the medians of both variants and their ratio."""
    first, second = names
    lines = [
        f"| scenario | {first}: µs/msg | {second}: µs/msg | {second}/{first} "
        f"| {first}: p99 µs | {second}: p99 µs | {first}: msg/s | {second}: msg/s "
        f"| Redis µs/msg ({first} / {second}) | verified |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for scenario in scenarios:
        if (scenario.name, first) not in results:
            continue
        a = medians_of(results[(scenario.name, first)])
        b = medians_of(results[(scenario.name, second)])
        redis = (
            f"{_cell(a.redis_us)} / {_cell(b.redis_us)}"
            if a.redis_us is not None or b.redis_us is not None
            else "-"
        )
        lines.append(
            f"| {scenario.name} | {_cell(a.cpu_us)} | {_cell(b.cpu_us)} "
            f"| {_cell(ratio(b.cpu_us, a.cpu_us), 2)} | {a.p99_us:,.0f} | {b.p99_us:,.0f} "
            f"| {a.rate:,.0f} | {b.rate:,.0f} | {redis} "
            f"| {'yes' if a.verified and b.verified else '**NO**'} |"
        )
    return lines


def detail_lines(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    scenarios: list[Scenario],
    names: tuple[str, str],
) -> list[str]:
    """Redis commands per 1,000 messages and replay costs, where a scenario has them."""
    lines: list[str] = []
    for scenario in scenarios:
        for name in names:
            runs = results.get((scenario.name, name))
            if not runs:
                continue
            m = medians_of(runs)
            if m.redis_calls:
                lines.append(
                    f"- {scenario.name}, {name}: Redis calls in the window "
                    f"{_commands(m.redis_calls, 0)}; per 1,000 messages "
                    f"{_commands(m.redis_per_1000, 2)}"
                )
            if m.replay_us is not None:
                lines.append(
                    f"- {scenario.name}, {name}: replay on resume {m.replay_us:,.1f} µs of "
                    "broker CPU per message replayed"
                )
    return lines


# --- the runner ----------------------------------------------------------------------------


def run(
    variants: tuple[Variant, Variant],
    scenarios: list[Scenario],
    settings: Settings,
    rounds: int,
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every scenario with both variants, ``rounds`` times, alternating which goes first."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(rounds):
        for scenario in scenarios:
            # Alternate which variant goes first, so that drift on the machine hits both.
            order = [(variants[0], False), (variants[1], True)]
            if round_ % 2:
                order.reverse()
            for variant, second in order:
                report = measure(variant, scenario, settings, second=second)
                results.setdefault((scenario.name, variant.name), []).append(report)
                cpu = report["broker_cpu_us_per_message"]
                print(
                    f"round {round_ + 1} {scenario.name:<21} {variant.name:<6} "
                    f"{_cell(cpu):>7} µs/msg  p99 {report['confirm_latency_us']['p99']:>9,} µs"
                    f"  {report['messages_per_second']:>9,.0f} msg/s"
                    + ("" if report["ok"] else "  VERIFICATION FAILED"),
                    flush=True,
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="broker-node of the base")
    parser.add_argument("--after", type=Path, help="broker-node of the change")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="compare session resume off and on (one build: --after, or this venv's)",
    )
    parser.add_argument(
        "--bench-arg",
        action="append",
        default=[],
        help="a broker-bench option for both builds (repeat), e.g. --bench-arg=--resume",
    )
    parser.add_argument("--scenarios", help="comma-separated subset of the scenario names")
    parser.add_argument("--json", type=Path, help="also write every run's report here")
    parser.add_argument(
        "--summarize", type=Path, nargs="+", help="only summarize --json files (runs pooled)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=5000.0)
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if args.resume:
        binary = str(args.after or BROKER_NODE)
        variants = (Variant("off", binary), Variant("on", binary, ("--resume",)))
        scenarios = RESUME_SCENARIOS
    else:
        if args.before is None or args.after is None:
            parser.error("--before and --after are needed (or --resume)")
        common = tuple(args.bench_arg)
        variants = (
            Variant("before", str(args.before), common),
            Variant("after", str(args.after), common),
        )
        scenarios = [s for s in BUILD_SCENARIOS if s.name in DEFAULT_BUILD_SCENARIOS]
    if args.scenarios:
        chosen = {name.strip() for name in args.scenarios.split(",")}
        every = RESUME_SCENARIOS if args.resume else BUILD_SCENARIOS
        scenarios = [s for s in every if s.name in chosen]
        if not scenarios:
            parser.error(f"no scenario named {sorted(chosen)}")
    settings = Settings(
        duration=args.duration,
        warmup=2.0,
        rate=args.rate,
        idle=0,
        pairs=10,
        window=64,
        payload=100,
        processes=1,
    )
    results = run(variants, scenarios, settings, args.rounds)
    if args.json is not None:
        runs = [{"scenario": s, "variant": v, "reports": r} for (s, v), r in results.items()]
        args.json.write_text(json.dumps(runs, indent=1))
    print(
        f"\nmedians of {args.rounds} rounds; paced = {args.rate:,.0f} msg/s, "
        f"{settings.pairs} pairs, window {settings.window}, {settings.payload}-byte payloads, "
        f"{args.duration:g} s measured after {settings.warmup:g} s:\n"
    )
    print_summary(results, scenarios, (variants[0].name, variants[1].name))


def print_summary(
    results: dict[tuple[str, str], list[dict[str, Any]]],
    scenarios: list[Scenario],
    names: tuple[str, str],
) -> None:
    print("\n".join(summary_table(results, scenarios, names)))
    print()
    print("\n".join(detail_lines(results, scenarios, names)))


def summarize(paths: list[Path]) -> None:
    """The summary of runs that ``--json`` wrote (several files: their runs pooled)."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in paths:
        for entry in json.loads(path.read_text()):
            results.setdefault((entry["scenario"], entry["variant"]), []).extend(entry["reports"])
    names_seen = list(dict.fromkeys(variant for _, variant in results))
    if len(names_seen) != 2:
        raise SystemExit(f"expected two variants, found {names_seen}")
    scenario_names = list(dict.fromkeys(scenario for scenario, _ in results))
    known = {s.name: s for s in [*RESUME_SCENARIOS, *BUILD_SCENARIOS]}
    scenarios = [known.get(name, Scenario(name, cluster=False)) for name in scenario_names]
    rounds = sorted({len(reports) for reports in results.values()})
    print(f"medians of {'/'.join(map(str, rounds))} runs per variant and scenario:\n")
    print_summary(results, scenarios, (names_seen[0], names_seen[1]))


if __name__ == "__main__":
    main()

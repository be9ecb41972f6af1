"""Two builds of the node side by side: what a change costs per message.

Not a test (CI does not run it). Give it the ``broker-node`` executables of two checkouts
(each installed in its own virtualenv); it alternates them round by round on fresh
processes, with the same ``broker-bench throughput`` load, and prints the median broker CPU
per message and p99 confirmation latency of each, and their ratio::

    .venv/bin/python -m tests.bench.compare_builds \\
        --before ../baseline/.venv/bin/broker-node --after .venv/bin/broker-node --rounds 5

Scenarios: a standalone node with same-node pairs, and a 2-node cluster on one redis-server
with cross-node pairs, both paced (5,000 msg/s by default).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from tests.bench.run_bench import Settings, cluster, standalone, throughput


def measure(binary: str, scenario: str, settings: Settings) -> dict[str, Any]:
    system = standalone if scenario == "standalone" else cluster
    placement = "same-node" if scenario == "standalone" else "cross-node"
    with system(binary) as running:
        return throughput(running, settings, placement=placement, rate=settings.rate, idle=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="broker-node of the base")
    parser.add_argument("--after", type=Path, required=True, help="broker-node of the change")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=5000.0)
    args = parser.parse_args()
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
    builds = {"before": str(args.before), "after": str(args.after)}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for scenario in ("standalone", "cross-node"):
            # Alternate which build goes first, so that drift on the machine hits both.
            order = list(builds.items())
            if round_ % 2:
                order.reverse()
            for name, binary in order:
                report = measure(binary, scenario, settings)
                results.setdefault((scenario, name), []).append(report)
                print(
                    f"round {round_ + 1} {scenario:<11} {name:<6} "
                    f"{report['broker_cpu_us_per_message']:7.1f} µs/msg  "
                    f"p99 {report['confirm_latency_us']['p99']:>7,} µs",
                    flush=True,
                )
    print(f"\nmedians of {args.rounds} rounds, paced {args.rate:,.0f} msg/s:")
    for scenario in ("standalone", "cross-node"):
        medians = {}
        for name in builds:
            runs = results[(scenario, name)]
            cpu = statistics.median(r["broker_cpu_us_per_message"] for r in runs)
            p99 = statistics.median(r["confirm_latency_us"]["p99"] for r in runs)
            medians[name] = (cpu, p99)
            print(f"  {scenario:<11} {name:<6} {cpu:7.1f} µs/msg   p99 {p99:>8,.0f} µs")
        ratio = medians["after"][0] / medians["before"][0]
        print(f"  {scenario:<11} after/before CPU per message: {ratio:.2f}")


if __name__ == "__main__":
    main()

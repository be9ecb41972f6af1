"""The pure part of ``compare_builds.py``: medians, ratios and the summary of two variants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.bench.compare_builds import (
    BUILD_SCENARIOS,
    RESUME_SCENARIOS,
    Scenario,
    detail_lines,
    medians_of,
    ratio,
    summarize,
    summary_table,
)


def report(
    cpu: float | None,
    p99: int,
    *,
    rate: float = 5000.0,
    ok: bool = True,
    redis: dict[str, int] | None = None,
    replay: float | None = None,
) -> dict[str, Any]:
    return {
        "ok": ok,
        "broker_cpu_us_per_message": cpu,
        "confirm_latency_us": {"p99": p99},
        "messages_per_second": rate,
        "duration_seconds": 8.0,
        "redis_cpu_us_per_message": 5.0 if redis is not None else None,
        "redis_commands": redis,
        "resume": None if replay is None else {"broker_cpu_us_per_replayed": replay},
    }


def test_medians_of_runs_leave_out_missing_figures() -> None:
    m = medians_of(
        [
            report(20.0, 300, redis={"publish": 4000, "set": 2}, replay=4.0),
            report(None, 100, redis={"publish": 8000}, ok=False),
            report(40.0, 200, redis={"publish": 6000, "set": 2}, replay=6.0),
        ]
    )
    assert m.runs == 3
    assert m.verified is False
    assert m.cpu_us == 30.0
    assert m.p99_us == 200
    assert m.redis_us == 5.0
    # Calls in the window and per 1,000 messages (40,000 in each window); a run without a
    # command called it 0 times.
    assert m.redis_calls == {"publish": 6000, "set": 2}
    assert m.redis_per_1000 == {"publish": 150.0, "set": 0.05}
    assert m.replay_us == 5.0


def test_ratio_needs_both_figures() -> None:
    assert ratio(30.0, 20.0) == 1.5
    assert ratio(None, 20.0) is None
    assert ratio(30.0, None) is None


def test_summary_has_a_row_per_scenario_measured() -> None:
    standalone, cross = Scenario("standalone", cluster=False), Scenario("cross", cluster=True)
    results = {
        ("standalone", "off"): [report(20.0, 300), report(22.0, 310)],
        ("standalone", "on"): [report(25.0, 400), report(27.5, 420)],
        ("cross", "off"): [report(50.0, 900, redis={"publish": 4000})],
        ("cross", "on"): [report(55.0, 950, redis={"publish": 4000}, replay=8.0, ok=False)],
    }
    lines = summary_table(
        results, [standalone, cross, Scenario("absent", cluster=False)], ("off", "on")
    )
    assert lines[0].startswith("| scenario | off: µs/msg | on: µs/msg | on/off |")
    assert len(lines) == 4
    assert lines[2] == "| standalone | 21.0 | 26.2 | 1.25 | 305 | 410 | 5,000 | 5,000 | - | yes |"
    assert lines[3].endswith("| 5.0 / 5.0 | **NO** |")
    details = detail_lines(results, [standalone, cross], ("off", "on"))
    assert details == [
        "- cross, off: Redis calls in the window publish 4,000; per 1,000 messages publish 100.00",
        "- cross, on: Redis calls in the window publish 4,000; per 1,000 messages publish 100.00",
        "- cross, on: replay on resume 8.0 µs of broker CPU per message replayed",
    ]


def test_detached_scenarios_hold_more_than_a_run_sends_per_session() -> None:
    for scenario in [*RESUME_SCENARIOS, *BUILD_SCENARIOS]:
        if "--detached" in (*scenario.bench_args, *scenario.second_args):
            frames = int(scenario.node_args[scenario.node_args.index("--resume-max-frames") + 1])
            # 5,000 msg/s over 10 pairs for 2 s of warm-up and 8 s measured, with room.
            assert frames >= 2 * 5000 / 10 * (2 + 8)


def test_summarize_pools_the_runs_of_several_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(
        json.dumps(
            [
                {"scenario": "standalone paced", "variant": "off", "reports": [report(20.0, 1)]},
                {"scenario": "standalone paced", "variant": "on", "reports": [report(30.0, 1)]},
            ]
        )
    )
    second.write_text(
        json.dumps(
            [
                {"scenario": "standalone paced", "variant": "off", "reports": [report(22.0, 1)]},
                {"scenario": "standalone paced", "variant": "on", "reports": [report(34.0, 1)]},
            ]
        )
    )
    summarize([first, second])
    out = capsys.readouterr().out
    assert "medians of 2 runs per variant and scenario" in out
    assert "| standalone paced | 21.0 | 32.0 | 1.52 |" in out

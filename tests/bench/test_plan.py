from __future__ import annotations

import pytest

from client.bench.coordinator import ThroughputConfig, plan_workers
from client.bench.plan import place_idle, place_pairs, split

A, B, C = "ws://127.0.0.1:1", "ws://127.0.0.1:2", "ws://127.0.0.1:3"


def test_same_node_pairs_stay_on_one_url() -> None:
    assert place_pairs([A, B], 3, "same-node") == [(A, A), (B, B), (A, A)]


def test_cross_node_receiver_is_on_the_next_url() -> None:
    assert place_pairs([A, B, C], 4, "cross-node") == [(A, B), (B, C), (C, A), (A, B)]


def test_placement_errors() -> None:
    with pytest.raises(ValueError, match="at least one URL"):
        place_pairs([], 1, "same-node")
    with pytest.raises(ValueError, match="two URLs"):
        place_pairs([A], 1, "cross-node")


def test_idle_connections_round_robin() -> None:
    assert place_idle([A, B], 3) == [A, B, A]


def test_split_deals_evenly() -> None:
    assert split(list(range(7)), 3) == [[0, 3, 6], [1, 4], [2, 5]]
    assert split([1], 3) == [[1], [], []]
    with pytest.raises(ValueError, match="parts"):
        split([1], 0)


def test_plan_workers_splits_pairs_idle_and_rate() -> None:
    config = ThroughputConfig(urls=[A, B], pairs=10, processes=3, idle=5, rate=5000.0)
    loads = plan_workers(config)
    assert [len(load.pairs) for load in loads] == [4, 3, 3]
    assert sum(len(load.idle) for load in loads) == 5
    assert sum(load.rate for load in loads) == pytest.approx(5000.0)
    assert loads[0].rate == pytest.approx(2000.0)


def test_plan_workers_never_has_idle_processes_and_needs_a_pair() -> None:
    assert len(plan_workers(ThroughputConfig(urls=[A], pairs=2, processes=8))) == 2
    with pytest.raises(ValueError, match="pair"):
        plan_workers(ThroughputConfig(urls=[A], pairs=0))


def test_plan_workers_passes_resume_on_and_detached_implies_it() -> None:
    plain = plan_workers(ThroughputConfig(urls=[A], pairs=2))
    assert [(load.resume, load.detached) for load in plain] == [(False, False)]
    resume = plan_workers(ThroughputConfig(urls=[A], pairs=2, processes=2, resume=True))
    assert [(load.resume, load.detached) for load in resume] == [(True, False)] * 2
    detached = plan_workers(ThroughputConfig(urls=[A], pairs=2, detached=True))
    assert [(load.resume, load.detached) for load in detached] == [(True, True)]

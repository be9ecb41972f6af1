"""Faults between the workload's steps leave every channel working or reported closed at
both ends, lose no confirmed message, and leave Redis holding only what lives (issue 10
item 3; see ``faults.py``)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from tests.differential import profiles
from tests.differential.conftest import Loop
from tests.differential.faults import Faults
from tests.differential.harness import System
from tests.support.cluster import Cluster


def _run(faults: frozenset[str], loop: Loop, nodes: Cluster) -> None:
    cluster = System("cluster", [node.url for node in nodes.nodes])

    class WithFaults(Faults):
        pass

    WithFaults.faults = faults
    WithFaults.loop = loop
    WithFaults.systems = (cluster,)
    WithFaults.nodes = nodes
    # A fault costs seconds (a drain, a lapsed heartbeat, a node start): fewer examples.
    current = profiles.chosen()
    fewer = settings(
        current,
        max_examples=max(2, current.max_examples // 4),
        stateful_step_count=max(5, current.stateful_step_count // 2),
    )
    try:
        run_state_machine_as_test(WithFaults, settings=fewer)
    finally:
        loop.run(cluster.disconnect_all())
        if cluster.observer is not None:
            loop.run(cluster.observer.close())


def test_nodes_stopped_or_killed_between_steps(loop: Loop, three_nodes: Cluster) -> None:
    _run(frozenset({"stop", "kill"}), loop, three_nodes)


def test_redis_restarted_empty_or_pubsub_killed_between_steps(
    loop: Loop, three_nodes: Cluster
) -> None:
    _run(frozenset({"redis", "pubsub"}), loop, three_nodes)

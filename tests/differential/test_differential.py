"""The cluster behaves exactly like one node (issue 10): the same random workload runs on a
standalone node and on a three-node cluster, and every client of each must observe one of the
outcomes a single node could produce (see ``workload.py`` and ``model.py``)."""

from __future__ import annotations

from hypothesis.stateful import run_state_machine_as_test

from tests.differential import profiles
from tests.differential.conftest import Loop
from tests.differential.harness import System
from tests.differential.workload import Workload
from tests.support.cluster import Cluster
from tests.support.nodes import NodeProcess


def test_cluster_and_one_node_answer_alike(
    loop: Loop, standalone: NodeProcess, three_nodes: Cluster
) -> None:
    one_node = System("standalone", [standalone.url])
    cluster = System("cluster", [node.url for node in three_nodes.nodes])

    class OnBoth(Workload):
        pass

    OnBoth.loop = loop
    OnBoth.systems = (one_node, cluster)
    try:
        run_state_machine_as_test(OnBoth, settings=profiles.chosen())
    finally:
        loop.run(_close_observers(one_node, cluster))


async def _close_observers(*systems: System) -> None:
    for system in systems:
        await system.disconnect_all()
        if system.observer is not None:
            await system.observer.close()

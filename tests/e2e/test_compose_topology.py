"""End to end: the compose topology (redis, 3 broker replicas, nginx) as real processes.

Everything a client does goes through nginx running ``deploy/nginx.conf`` (rendered for local
ports); the test itself looks at the nodes directly only to check them (``/metrics``, logs)
and at Redis (SCAN). Two phases, one cluster:

(a) SDK clients land on every node, and channels work across every pair of nodes;
(b) a rolling restart (SIGTERM each node in turn, start it again on its port) while 20
    reconnecting SDK clients keep exchanging request/response messages: afterwards every
    client works, every node exited 0 without a traceback, and Redis holds nothing of the
    node processes that are gone.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Sequence
from typing import TypeVar

import pytest

from broker_node.cluster.keys import RedisKeys
from client import BrokerClient
from tests.client.helpers import client_tasks
from tests.e2e.registry import leftovers, snapshot
from tests.e2e.topology import ComposeTopology
from tests.e2e.workload import ECHO_ROLE, REQUEST_TIMEOUT, Requester, Responder, sdk_client
from tests.support.nodes import http_get, metric_sample
from tests.support.polling import wait_for_value

pytestmark = pytest.mark.slow

#: The compose file's broker settings with test timings: heartbeats every 0.5 s, lost after
#: 5 s (long enough that a loaded machine never looks dead), drain within 5 s; JSON logs.
NODE_ARGS = [
    "--heartbeat-interval", "0.5",
    "--node-ttl", "5",
    "--drain-timeout", "5",
    "--log-format", "json",
]  # fmt: skip
KEYS = RedisKeys("broker")
RESPONDERS = 10
REQUESTERS = 10
#: Bound of every wait for the cluster to settle (each is a poll, usually done in ~1 s).
SETTLE = 20.0

T = TypeVar("T")


@pytest.fixture
def node_args() -> list[str]:
    return NODE_ARGS


async def test_clients_spread_over_nodes_and_survive_a_rolling_restart(
    topology: ComposeTopology,
) -> None:
    responders = [Responder(topology.url) for _ in range(RESPONDERS)]
    requesters = [Requester(topology.url, index) for index in range(REQUESTERS)]
    clients = [r.client for r in responders] + [r.client for r in requesters]
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(50):
            # One at a time, as clients arrive: nginx's round-robin deals them out.
            for client in clients:
                async with asyncio.timeout(SETTLE):
                    await client.connect()

            # (a) Every node got clients: each node's own gauge, and the registry agrees.
            gauges = await wait_for_value(
                lambda: asyncio.to_thread(_connection_gauges, topology),
                lambda counts: sum(counts) == len(clients),
                timeout=SETTLE,
                message="the nodes' broker_connections gauges to add up to 20",
            )
            assert all(count > 0 for count in gauges), f"clients per node: {gauges}"
            await _check_channels_across_every_pair_of_nodes(topology, responders, clients)

            # (b) The workload runs through the roll.
            tasks = [asyncio.create_task(r.run(stop)) for r in requesters]
            await _all_working(requesters, responders, since=time.monotonic())
            for index in range(3):
                retired = await asyncio.to_thread(topology.restart, index)
                assert retired.exit_code == 0, f"node {retired.node_id}:\n{retired.log}"
                # Readiness is all a rollout waits for; clients still must find their way.
                await _all_working(requesters, responders, since=time.monotonic())

            # After the roll: fresh round trips for every requester, answers from everyone.
            roll_done = time.monotonic()
            await _all_working(requesters, responders, since=roll_done, round_trips=3)
            stop.set()
            async with asyncio.timeout(SETTLE):
                await asyncio.gather(*tasks)
            unexpected = [u for r in requesters for u in r.unexpected]
            unexpected += [u for r in responders for u in r.unexpected]
            assert unexpected == []
            await _check_every_responder_answers(topology, responders)

            # Redis holds the current nodes and live connections, and nothing else.
            node_ids = topology.node_ids()
            assert len({r.node_id for r in topology.retired} | set(node_ids)) == 6
            connection_ids = [c.connection_id for c in clients]
            assert None not in connection_ids
            await wait_for_value(
                lambda: _leftovers(topology, node_ids, connection_ids),
                lambda found: found == [],
                timeout=SETTLE,
                message="Redis to hold only the current nodes' state",
            )
            _report(topology, requesters, responders, gauges)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(client.close() for client in clients))
    assert client_tasks() == set()

    # Every node process (3 rolled, 3 current) stops cleanly on SIGTERM and never crashed.
    await asyncio.to_thread(topology.stop)
    assert len(topology.retired) == 6
    for retired in topology.retired:
        assert retired.exit_code == 0, f"node {retired.node_id} exited {retired.exit_code}"
        assert "Traceback" not in retired.log, f"node {retired.node_id}:\n{retired.log}"
        assert '"level": "error"' not in retired.log, f"node {retired.node_id}:\n{retired.log}"


# --- phase (a) ------------------------------------------------------------------------------


def _connection_gauges(topology: ComposeTopology) -> list[int]:
    """``broker_connections`` of each current node, read from its own /metrics."""
    counts = []
    for node in topology.nodes:
        status, body = http_get(node.http + "/metrics", timeout=2.0)
        assert status == 200, body
        counts.append(int(metric_sample(body, "broker_connections")))
    return counts


async def _check_channels_across_every_pair_of_nodes(
    topology: ComposeTopology, responders: list[Responder], clients: list[BrokerClient]
) -> None:
    """For each ordered pair of nodes (A, B): a client on A asks a responder on B."""
    snap = await snapshot(topology.redis.url, KEYS)
    node_of = {
        cid: record["node"]
        for cid, record in snap.family(KEYS.connection_prefix).items()
        if isinstance(record, dict)
    }
    node_ids = topology.node_ids()
    assert set(node_of.values()) == set(node_ids)
    openers = {node_of.get(str(c.connection_id)): c for c in clients}
    targets = {node_of.get(str(r.client.connection_id)): r.client for r in responders}
    assert set(targets) == set(node_ids), f"responders on {sorted(map(str, targets))}"
    for a, b in itertools.permutations(node_ids, 2):
        target_id = targets[b].connection_id
        assert target_id is not None
        channel = await openers[a].open_channel(target_id)
        question = {"from": a, "to": b, "payload": ["any", 1, None, True, {"json": 2.5}]}
        assert await channel.request(question, timeout=REQUEST_TIMEOUT) == question
        await channel.close()


# --- phase (b) ------------------------------------------------------------------------------


async def _all_working(
    requesters: list[Requester],
    responders: list[Responder],
    *,
    since: float,
    round_trips: int = 1,
) -> None:
    """Wait until every requester completed and every responder answered since ``since``."""

    async def lagging() -> list[str]:
        late = [
            f"requester {r.index}" for r in requesters if r.round_trips_since(since) < round_trips
        ]
        late += [
            f"responder {r.client.connection_id}" for r in responders if not r.answered_since(since)
        ]
        return late

    await wait_for_value(
        lagging, lambda late: late == [], timeout=SETTLE, message="every client to work"
    )


async def _check_every_responder_answers(
    topology: ComposeTopology, responders: list[Responder]
) -> None:
    """A new client finds exactly the live responders, and each answers it."""
    async with sdk_client(topology.url, "probe") as probe:
        listed = await probe.list_by_role(ECHO_ROLE)
        assert sorted(listed) == sorted(str(r.client.connection_id) for r in responders)
        for target in listed:
            channel = await probe.open_channel(target)
            assert await channel.request({"probe": target}) == {"probe": target}
            await channel.close()


async def _leftovers(
    topology: ComposeTopology, node_ids: list[str], connection_ids: Sequence[str | None]
) -> list[str]:
    snap = await snapshot(topology.redis.url, KEYS)
    return leftovers(snap, node_ids=node_ids, connection_ids=[str(c) for c in connection_ids])


def _report(
    topology: ComposeTopology,
    requesters: list[Requester],
    responders: list[Responder],
    gauges: list[int],
) -> None:
    tolerated: collections.Counter[str] = collections.Counter()
    for requester in requesters:
        tolerated.update(requester.tolerated)
    for responder in responders:
        tolerated.update(responder.tolerated)
    trips = sum(len(r.round_trips) for r in requesters)
    print(f"clients per node before the roll: {gauges}")
    print(f"round trips: {trips}; tolerated during the roll: {tolerated}")
    print(f"nodes: {[r.node_id for r in topology.retired]} -> {topology.node_ids()}")

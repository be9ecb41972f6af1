"""A node process dies (kill -9) or stalls (SIGSTOP) past its TTL: survivors reap it once.

Every peer on a surviving node is told ``channel_closed_notification`` exactly once, within the
TTL plus a heartbeat interval; the dead node's connections leave ``list_by_role``; nothing of
it stays in Redis but its tombstone; a stalled node that comes back does not resurrect it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from shared.ids import ChannelId, NodeId
from tests.integration.helpers import (
    KEYS,
    RedisInspector,
    frames_for,
    list_role,
    node_keys,
    send_confirmed,
    unread,
)
from tests.support.cluster import HEARTBEAT, SLACK, TTL, Cluster
from tests.support.nodes import NodeProcess, metric
from tests.support.polling import wait_until
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow

#: From the kill to a peer's notification: the heartbeat lapses within the TTL, a survivor
#: notices within one heartbeat interval.
DETECTION = TTL + HEARTBEAT + SLACK


@dataclass
class Doomed:
    """A node about to be lost, with channels to peers on the survivors."""

    node: NodeProcess
    clients: list[WireClient]
    #: (peer, channel id) for every channel with one end on the doomed node.
    peers: list[tuple[WireClient, str]]


async def doomed_node(
    cluster: Cluster, victim: NodeProcess, survivors: list[NodeProcess]
) -> Doomed:
    """Two clients on ``victim``; on each survivor two peers, one that the victim's client
    opened a channel to and one that opened a channel to it."""
    v1, v2 = await cluster.client(victim, "victim"), await cluster.client(victim, "victim")
    peers: list[tuple[WireClient, str]] = []
    ends: list[WireClient] = []
    for survivor in survivors:
        target, opener = (
            await cluster.client(survivor, "peer"),
            await cluster.client(survivor, "peer"),
        )
        assert target.connection_id is not None and v2.connection_id is not None
        channel = await v1.open(target.connection_id)
        assert (await target.notification("incoming_channel"))["channelId"] == channel
        peers.append((target, channel))
        ends.append(v1)
        channel = await opener.open(v2.connection_id)
        assert (await v2.notification("incoming_channel"))["channelId"] == channel
        peers.append((opener, channel))
        ends.append(v2)
    # Every channel works before the fault.
    for (peer, channel), end in zip(peers, ends, strict=True):
        await send_confirmed(peer, end, channel, "before")
        await send_confirmed(end, peer, channel, "before")
    return Doomed(victim, [v1, v2], peers)


async def notified_within(peers: list[tuple[WireClient, str]], since: float, bound: float) -> None:
    """Each peer is told of its channel within ``bound`` seconds of ``since``."""

    async def one(peer: WireClient, channel: str) -> float:
        frame = await peer.notification("channel_closed_notification", timeout=bound + 1)
        assert frame["channelId"] == channel, frame
        return time.monotonic() - since

    delays = await asyncio.gather(*(one(peer, channel) for peer, channel in peers))
    assert max(delays) <= bound, delays


async def no_more_notifications(clients: list[WireClient], seconds: float) -> None:
    """Listen to every client for a while: no further ``channel_closed_notification``."""
    windows = await asyncio.gather(*(frames_for(client, seconds) for client in clients))
    for client, frames in zip(clients, windows, strict=True):
        late = [f for f in frames if f.get("type") == "channel_closed_notification"]
        late += unread(client, "channel_closed_notification")
        assert late == [], late


async def test_kill_9_peers_notified_and_nothing_left_in_redis(cluster: Cluster) -> None:
    victim, n1, n2 = await cluster.start(3)
    victim_id, n1_id, n2_id = (node.effective_id() for node in (victim, n1, n2))
    doomed = await doomed_node(cluster, victim, [n1, n2])
    peers = [peer for peer, _ in doomed.peers]
    # A channel between the survivors must outlive the reap.
    s1, s2 = peers[0], peers[2]
    assert s2.connection_id is not None
    survivor_channel = await s1.open(s2.connection_id)
    await s2.notification("incoming_channel")

    await asyncio.to_thread(victim.kill)
    killed = time.monotonic()
    await notified_within(doomed.peers, killed, DETECTION)

    # The dead node's connections are gone from every survivor's view.
    live_ids = {p.connection_id for p in peers}
    for peer in (s1, s2):
        assert await list_role(peer, "victim") == set()
        assert await list_role(peer, "peer") == live_ids

    # The reaped state in Redis: exactly the survivors' keys, plus the dead node's tombstone.
    redis = RedisInspector(cluster.redis.url)
    try:
        n1_peers = [p.connection_id for p in peers[:2] if p.connection_id]
        n2_peers = [p.connection_id for p in peers[2:] if p.connection_id]
        expected = (
            node_keys(n1_id, connections=n1_peers, channels=[survivor_channel])
            | node_keys(n2_id, connections=n2_peers, channels=[survivor_channel])
            | {KEYS.nodes, KEYS.role("peer"), KEYS.tombstone(NodeId(victim_id))}
        )

        await redis.wait_for_keys(expected, timeout=DETECTION)
        assert await redis.client.smembers(KEYS.nodes) == {n1_id, n2_id}
        assert await redis.client.hgetall(KEYS.channel(ChannelId(survivor_channel))) == {
            "opener": s1.connection_id,
            "opener_node": n1_id,
            "target": s2.connection_id,
            "target_node": n2_id,
        }
    finally:
        await redis.aclose()

    # Exactly once, and the survivors' own channel still works.
    await no_more_notifications(peers, 3 * HEARTBEAT)
    await send_confirmed(s1, s2, survivor_channel, "after")
    await send_confirmed(s2, s1, survivor_channel, "after")


async def reaps(nodes: list[NodeProcess]) -> tuple[float, int]:
    """The reaps the nodes counted (/metrics) and logged."""
    counted = sum([await metric(node, "broker_reaped_nodes_total") for node in nodes])
    logged = sum(node.output().count("reaped lost node") for node in nodes)
    return counted, logged


async def test_two_survivors_race_to_reap_one_node_each_peer_notified_once(
    cluster: Cluster,
) -> None:
    victim, n1, n2 = await cluster.start(3)
    doomed = await doomed_node(cluster, victim, [n1, n2])
    # More peers on each survivor: several channels per node to notify.
    for survivor in (n1, n2):
        for _ in range(3):
            peer = await cluster.client(survivor, "peer")
            assert peer.connection_id is not None
            channel = await doomed.clients[0].open(peer.connection_id)
            await peer.notification("incoming_channel")
            doomed.peers.append((peer, channel))
    assert await reaps([n1, n2]) == (0, 0)

    await asyncio.to_thread(victim.kill)
    killed = time.monotonic()
    await notified_within(doomed.peers, killed, DETECTION)

    async def reaped() -> bool:
        return (await reaps([n1, n2]))[0] >= 1

    await wait_until(reaped, timeout=DETECTION, message="a survivor to reap the victim")
    # Both survivors keep looking for lapsed nodes meanwhile: still one reap, one notice each.
    await no_more_notifications([peer for peer, _ in doomed.peers], 5 * HEARTBEAT)
    assert await reaps([n1, n2]) == (1, 1)
    outputs = n1.output() + n2.output()
    assert outputs.count(f"reaped lost node {victim.effective_id()}") == 1


async def test_paused_node_reaped_then_resumed_does_not_resurrect(cluster: Cluster) -> None:
    stalled, survivor = await cluster.start(2)
    stalled_id = NodeId(stalled.effective_id())
    doomed = await doomed_node(cluster, stalled, [survivor])
    peers = [peer for peer, _ in doomed.peers]
    stalled_ids = {c.connection_id for c in doomed.clients}

    await asyncio.to_thread(stalled.pause)
    paused = time.monotonic()
    try:
        await notified_within(doomed.peers, paused, DETECTION)
        assert await list_role(peers[0], "victim") == set()

        async def reaped() -> bool:
            return (await reaps([survivor]))[0] == 1

        await wait_until(reaped, timeout=DETECTION, message="the survivor to reap the stalled")
    finally:
        await asyncio.to_thread(stalled.resume)

    # Back after being reaped: its clients are closed so that they reconnect cleanly...
    for client in doomed.clients:
        code, _ = await client.closed_with(timeout=DETECTION)
        assert code == 1012
    # ... and nothing of them comes back into the registry.
    redis = RedisInspector(cluster.redis.url)
    try:

        async def rejoined() -> bool:
            keys = await redis.keys()
            return KEYS.heartbeat(stalled_id) in keys and KEYS.tombstone(stalled_id) not in keys

        await wait_until(rejoined, timeout=DETECTION, message="the stalled node to rejoin")
        peer_ids = [p.connection_id for p in peers if p.connection_id]
        expected = (
            node_keys(stalled_id)
            | node_keys(survivor.effective_id(), connections=peer_ids)
            | {KEYS.nodes, KEYS.role("peer")}
        )
        assert await redis.keys() == expected
    finally:
        await redis.aclose()
    for peer in peers:
        assert await list_role(peer, "victim") == set()
        assert not stalled_ids & await list_role(peer, "peer")
    await no_more_notifications(peers, 2 * HEARTBEAT)

    # New clients on the resumed node work across nodes.
    fresh = await cluster.client(stalled, "victim")
    assert await list_role(peers[0], "victim") == {fresh.connection_id}
    assert peers[0].connection_id is not None
    channel = await fresh.open(peers[0].connection_id)
    await peers[0].notification("incoming_channel")
    await send_confirmed(fresh, peers[0], channel, "hello again")
    await send_confirmed(peers[0], fresh, channel, "welcome back")

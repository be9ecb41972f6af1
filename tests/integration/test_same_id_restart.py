"""A node that crashes and restarts under the same ``--node-id`` within the TTL (issue 11,
item 2): as a Kubernetes pod restarted in place does. The new start is a new incarnation with
an id of its own; the old one's heartbeat lapses, a survivor reaps it and tells the peers of
its clients, and Redis ends up holding exactly the live state."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.ids import NodeId
from tests.integration.helpers import KEYS, RedisInspector, list_role, node_keys
from tests.support.cluster import SLACK, Cluster, fast_args

pytestmark = pytest.mark.slow

#: Long enough that the restarted process is up before the old incarnation's heartbeat lapses.
TTL = 8.0
ARGS = fast_args(heartbeat=0.5, ttl=TTL)


async def test_a_node_restarted_under_its_id_inherits_nothing(cluster: Cluster) -> None:
    (survivor,) = await cluster.start(1, args=ARGS)
    (pod,) = await cluster.start(1, args=ARGS, names=["pod-a"])
    first_id = pod.effective_id()

    doomed = await cluster.client(pod, "doomed")
    assert doomed.connection_id is not None
    peer = await cluster.client(survivor, "peer")
    assert peer.connection_id is not None
    channel = await peer.open(doomed.connection_id)
    await doomed.notification("incoming_channel")

    pod.kill()
    killed = time.monotonic()
    await asyncio.to_thread(pod.start)  # the same configured id, at once
    second_id = pod.effective_id()
    assert time.monotonic() - killed < TTL, "restarted too slowly to test a restart in the TTL"
    newcomer = await cluster.client(pod, "newcomer")
    assert newcomer.connection_id is not None

    notice = await peer.notification("channel_closed_notification", timeout=TTL + 5 * SLACK)
    assert notice["channelId"] == channel
    reply = await peer.request("message", channelId=channel, payload="anyone?")
    assert reply["type"] == "channel_message_failed" and reply["error"] == "Channel not found"
    assert await list_role(peer, "doomed") == set()
    assert await list_role(peer, "newcomer") == {newcomer.connection_id}

    # Each start has an id of its own, and the configured name shows in both.
    assert second_id != first_id
    assert second_id.startswith("pod-a") and first_id.startswith("pod-a")

    redis = RedisInspector(cluster.redis.url)
    try:
        expected = (
            node_keys(survivor.effective_id(), connections=[peer.connection_id])
            | node_keys(second_id, connections=[newcomer.connection_id])
            | {
                KEYS.nodes,
                KEYS.role("peer"),
                KEYS.role("newcomer"),
                KEYS.tombstone(NodeId(first_id)),
            }
        )

        await redis.wait_for_keys(expected, timeout=TTL + 5 * SLACK)
        assert await redis.client.smembers(KEYS.nodes) == {survivor.effective_id(), second_id}
    finally:
        await redis.aclose()

"""Divergences from one node that the differential test (tests/differential/) found beyond the
three of issue 10, each as a small deterministic test on broker-node processes sharing a real
redis-server."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.support.cluster import Cluster

pytestmark = pytest.mark.slow


async def test_a_stranger_on_a_third_node_is_refused_as_on_one_node(cluster: Cluster) -> None:
    """A connection that is not an end of a channel gets "Not authorized for this channel"
    for `message` and `close` on it, wherever the channel's ends are."""
    n0, n1, n2 = await cluster.start(3)
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    stranger = await cluster.client(n2, "c")
    assert b.connection_id is not None
    channel = await a.open(b.connection_id)
    sent = await stranger.request("message", channelId=channel, payload=1)
    closed = await stranger.request("close", channelId=channel)
    assert (sent["type"], sent["error"]) == (
        "channel_message_failed",
        "Not authorized for this channel",
    )
    assert (closed["type"], closed["error"]) == (
        "channel_close_failed",
        "Not authorized for this channel",
    )


@pytest.mark.parametrize("where", ["same node", "across nodes"])
async def test_an_end_that_closed_a_channel_is_told_it_is_not_found(
    cluster: Cluster, where: str
) -> None:
    """After `close` on a channel, `message` and `close` on it fail with "Channel not found",
    as on one node, also when written right behind the close without waiting for its reply."""
    nodes = await cluster.start(2)
    a = await cluster.client(nodes[0], "a")
    b = await cluster.client(nodes[0] if where == "same node" else nodes[1], "b")
    assert b.connection_id is not None and a.ws is not None
    channel = await a.open(b.connection_id)
    first = a.next_id
    for offset, kind in enumerate(("close", "message", "close")):
        request = {"type": kind, "id": first + offset, "channelId": channel, "payload": 1}
        await a.ws.send(json.dumps(request))
    a.next_id += 3
    replies = [await a.reply_to(first + offset, timeout=10) for offset in range(3)]
    assert replies[0]["type"] == "channel_closed"
    assert [(r["type"], r["error"]) for r in replies[1:]] == [
        ("channel_message_failed", "Channel not found"),
        ("channel_close_failed", "Channel not found"),
    ]


async def test_both_ends_closing_at_once_never_hear_not_authorized(cluster: Cluster) -> None:
    """Both ends of cross-node channels close at the same moment: one gets `channel_closed`,
    the other `channel_closed_notification` and "Channel not found", as on one node (never
    "Not authorized for this channel": each of them is an end)."""
    n0, n1 = await cluster.start(2)
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    assert b.connection_id is not None
    errors: set[str] = set()
    for _ in range(30):
        channel = await a.open(b.connection_id)
        await b.notification("incoming_channel")
        replies = await asyncio.gather(
            a.request("close", channelId=channel, timeout=10),
            b.request("close", channelId=channel, timeout=10),
        )
        errors.update(r["error"] for r in replies if r["type"] == "channel_close_failed")
        for client in (a, b):
            client.received.clear()
    assert errors <= {"Channel not found"}

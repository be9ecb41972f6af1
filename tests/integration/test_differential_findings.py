"""Divergences from one node that the differential test (tests/differential/) found beyond the
three of issue 10, each as a small deterministic test on broker-node processes sharing a real
redis-server. Marks from tests/differential/known.py say which ones the code still has."""

from __future__ import annotations

import json

import pytest

from tests.differential.known import (
    REPLIES_OUT_OF_REQUEST_ORDER,
    STRANGER_TOLD_CHANNEL_NOT_FOUND,
)
from tests.integration.helpers import Cluster
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow


async def pipeline(client: WireClient, requests: list[dict[str, object]]) -> list[int]:
    """Write the requests back to back without awaiting a reply; the replyTo of each reply,
    in the order the replies arrive."""
    assert client.ws is not None
    ids = []
    for request in requests:
        ids.append(client.next_id)
        await client.ws.send(json.dumps({**request, "id": client.next_id}))
        client.next_id += 1
    order: list[int] = []
    while len(order) < len(ids):
        frame = await client.recv(timeout=10)
        if frame.get("replyTo") in ids:
            order.append(frame["replyTo"])
    return order


@REPLIES_OUT_OF_REQUEST_ORDER
async def test_pipelined_requests_are_answered_in_the_order_sent(cluster: Cluster) -> None:
    """One node answers a connection's requests in the order they arrive. A client that
    writes `open` (to a peer on another node) and then a `message` on a channel that does not
    exist must get `channel_opened` first, then `channel_message_failed`."""
    n0, n1 = await cluster.start(2)
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    assert b.connection_id is not None
    order = await pipeline(
        a,
        [
            {"type": "open", "targetId": b.connection_id},
            {"type": "message", "channelId": "no-such-channel", "payload": 1},
        ],
    )
    assert order == sorted(order)


@STRANGER_TOLD_CHANNEL_NOT_FOUND
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

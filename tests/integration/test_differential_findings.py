"""Divergences from one node that the differential test (tests/differential/) found beyond the
three of issue 10, each as a small deterministic test on broker-node processes sharing a real
redis-server. Marks from tests/differential/known.py say which ones the code still has."""

from __future__ import annotations

import pytest

from tests.differential.known import STRANGER_TOLD_CHANNEL_NOT_FOUND
from tests.integration.helpers import Cluster

pytestmark = pytest.mark.slow


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

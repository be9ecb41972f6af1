"""Helpers of the node-level cluster tests: what clients saw, and what Redis holds.

The cluster itself is built by :class:`tests.support.cluster.Cluster` (the ``cluster`` fixture).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Final

from redis.asyncio import Redis

from broker_node.cluster.keys import RedisKeys
from shared.ids import ChannelId, ConnectionId, NodeId
from tests.support.polling import wait_for_value
from tests.support.wire import Frame, WireClient

KEYS: Final = RedisKeys()


async def frames_for(client: WireClient, seconds: float) -> list[Frame]:
    """Every frame the client receives during the next ``seconds`` (a listening window)."""
    frames: list[Frame] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            frames.append(await client.recv(timeout=left))
        except TimeoutError:
            break
    return frames


def unread(client: WireClient, kind: str) -> list[Frame]:
    """Frames of ``kind`` the client received and no helper consumed yet; consumes them."""
    found = [frame for frame in client.received if frame.get("type") == kind]
    for frame in found:
        client.received.remove(frame)
    return found


async def list_role(client: WireClient, role: str) -> set[str]:
    reply = await client.request("list_by_role", role=role)
    assert reply["type"] == "connections", reply
    return set(reply["ids"])


async def send_confirmed(
    sender: WireClient, receiver: WireClient, channel: str, body: object
) -> None:
    """One message: the sender gets ``channel_message_sent`` and the receiver the payload."""
    reply = await sender.request("message", channelId=channel, payload=body)
    assert reply["type"] == "channel_message_sent", reply
    assert reply["channelId"] == channel
    delivered = await receiver.notification("channel_message")
    assert delivered["channelId"] == channel
    assert delivered["payload"] == body


class RedisInspector:
    """Reads what the cluster stores, from a connection of the test's own."""

    def __init__(self, url: str) -> None:
        self.client: Redis = Redis.from_url(url, decode_responses=True)

    async def keys(self) -> set[str]:
        found: set[str] = set()
        async for key in self.client.scan_iter(match=KEYS.pattern, count=1000):
            found.add(key)
        return found

    async def wait_for_keys(
        self, expected: set[str], *, timeout: float, interval: float | None = None
    ) -> None:
        """Until Redis holds exactly ``expected``; fails naming the extra and missing keys."""

        def difference(found: set[str]) -> str:
            extra, missing = sorted(found - expected), sorted(expected - found)
            return f"{len(extra)} extra, e.g. {extra[:5]}; missing {missing}"

        await wait_for_value(
            self.keys,
            lambda found: found == expected,
            timeout=timeout,
            interval=interval,
            message="Redis to hold exactly the live entries",
            describe=difference,
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def node_keys(
    node_id: str, *, connections: Iterable[str] = (), channels: Iterable[str] = ()
) -> set[str]:
    """The keys that a live node holding these connections and channels (an end of each)
    contributes, the shared ``{p}:nodes`` set and role sets aside."""
    node = NodeId(node_id)
    conns = [ConnectionId(c) for c in connections]
    chans = [ChannelId(c) for c in channels]
    keys = {KEYS.heartbeat(node)}
    keys.update(KEYS.connection(c) for c in conns)
    keys.update(KEYS.channel(c) for c in chans)
    if conns:
        keys.add(KEYS.node_connections(node))
    if chans:
        keys.add(KEYS.node_channels(node))
    return keys

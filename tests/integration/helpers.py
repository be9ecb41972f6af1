"""Helpers of the node-level cluster tests: node processes, bounded waits, Redis inspection."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from redis.asyncio import Redis

from broker_node.cluster.keys import RedisKeys
from shared.ids import ChannelId, ConnectionId, NodeId
from tests.support.nodes import NodeProcess, http_get
from tests.support.redis_server import RedisServer
from tests.support.wire import Frame, WireClient

#: Failure detection in a second or so (the defaults are 5 s / 15 s / 2.5 s).
HEARTBEAT: Final = 0.2
TTL: Final = 1.0
REQUEST_TIMEOUT: Final = 1.0
DRAIN_TIMEOUT: Final = 5.0
#: Scheduling noise on a busy two-core CI machine running Redis, nodes and the test.
SLACK: Final = 1.0

KEYS: Final = RedisKeys()


def fast_args(
    *,
    heartbeat: float = HEARTBEAT,
    ttl: float = TTL,
    request_timeout: float = REQUEST_TIMEOUT,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> list[str]:
    return [
        "--heartbeat-interval", str(heartbeat),
        "--node-ttl", str(ttl),
        "--request-timeout", str(request_timeout),
        "--drain-timeout", str(drain_timeout),
    ]  # fmt: skip


@dataclass
class Cluster:
    """``broker-node`` processes on one redis-server, and the clients the test connects."""

    redis: RedisServer
    nodes: list[NodeProcess] = field(default_factory=list)
    clients: list[WireClient] = field(default_factory=list)

    async def start(self, count: int, *, args: list[str] | None = None) -> list[NodeProcess]:
        """Start ``count`` nodes (ids ``node-<n>``) in parallel and wait until they are ready."""
        made = [
            NodeProcess(
                redis_url=self.redis.url,
                node_id=f"node-{len(self.nodes) + n}",
                extra_args=fast_args() if args is None else args,
            )
            for n in range(count)
        ]
        self.nodes += made
        await asyncio.gather(*(asyncio.to_thread(node.start) for node in made))
        return made

    async def client(self, node: NodeProcess, role: str | None = None) -> WireClient:
        """A connected client of ``node``, registered with ``role`` unless it is None."""
        client = await WireClient(node.url).__aenter__()
        self.clients.append(client)
        if role is not None:
            await client.register(role)
        return client

    async def aclose(self) -> None:
        for client in self.clients:
            try:
                async with asyncio.timeout(2):
                    await client.close()
            except (TimeoutError, OSError):
                pass
        await asyncio.gather(
            *(asyncio.to_thread(node.__exit__, None, None, None) for node in self.nodes)
        )


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.05
) -> None:
    """Poll an external state until ``check`` holds; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in another process
            await asyncio.sleep(interval)


async def status(node: NodeProcess, path: str = "/readyz") -> int:
    """The HTTP status of ``path`` on the node (0 when nothing answers)."""
    code, _ = await asyncio.to_thread(http_get, node.http + path, 0.5)
    return code


async def metric(node: NodeProcess, name: str) -> float:
    """One unlabelled sample of the node's /metrics."""
    _, body = await asyncio.to_thread(http_get, node.http + "/metrics", 1.0)
    match = re.search(rf"^{re.escape(name)} (\S+)$", body, re.MULTILINE)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


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

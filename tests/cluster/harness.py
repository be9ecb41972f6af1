"""One view of each backend for the contract suite: memory, fakeredis and a real redis-server.

The bus runs over memory and the real server only: it drives sockets of its own (``resp.py``),
which fakeredis cannot provide.

A ``Harness`` holds a backend under test plus what a test needs around it: more backends on the
same store (other nodes), a way to let heartbeat time pass, a wipe (an empty Redis after a
restart) and the set of stored keys, named as ``keys.py`` names them (the memory hub's state is
mapped to the same names, so that one assertion fits all three).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from redis.asyncio import Redis

from broker_node.cluster.base import Backend, Bus, Subscription
from broker_node.cluster.keys import RedisKeys
from broker_node.cluster.memory import MemoryBackend, MemoryHub
from broker_node.config import Settings
from broker_node.core.records import ChannelRecord, ConnectionRecord
from shared.ids import NodeId, new_channel_id, new_connection_id

PREFIX = "ctest"
KEYS = RedisKeys(PREFIX)
#: Generous for a healthy local server, short enough for the fault tests' bounds.
REQUEST_TIMEOUT = 1.0

A = NodeId("node-a")
B = NodeId("node-b")
C = NodeId("node-c")
LONG_TTL_MS = 60_000
SHORT_TTL_MS = 150


def connection(node_id: NodeId, role: str = "worker") -> ConnectionRecord:
    return ConnectionRecord(new_connection_id(), node_id, role)


def channel(opener: ConnectionRecord, target: ConnectionRecord) -> ChannelRecord:
    return ChannelRecord(
        new_channel_id(),
        opener.connection_id,
        opener.node_id,
        target.connection_id,
        target.node_id,
    )


def settings_for(url: str | None, request_timeout: float = REQUEST_TIMEOUT) -> Settings:
    # The node scripts' timeout is max(request_timeout, heartbeat_interval).
    return Settings(
        redis_url=url,
        redis_prefix=PREFIX,
        request_timeout=request_timeout,
        heartbeat_interval=request_timeout,
    )


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    name: str
    backend: Backend
    make_peer: Callable[[], Backend]
    advance_ms: Callable[[int], None]
    wipe: Callable[[], Awaitable[None]]
    stored_keys: Callable[[], Awaitable[set[str]]]
    on_close: Callable[[], Awaitable[None]] | None = None
    peers: list[Backend] = field(default_factory=list)

    def peer(self) -> Backend:
        """Another node's backend on the same store."""
        backend = self.make_peer()
        self.peers.append(backend)
        return backend

    async def aclose(self) -> None:
        for backend in [*self.peers, self.backend]:
            await backend.aclose()
        if self.on_close is not None:
            await self.on_close()


def memory_harness() -> Harness:
    clock = FakeClock()
    hub = MemoryHub(clock=clock)

    def advance(ms: int) -> None:
        clock.now += ms / 1000

    async def wipe() -> None:
        hub.wipe()

    async def stored_keys() -> set[str]:
        # Every entry the hub holds, as the Redis key that would hold it; an empty set left
        # behind in the hub shows up here just as an empty Redis key would.
        names = {KEYS.connection(c) for c in hub.connections}
        names |= {KEYS.role(r) for r in hub.roles}
        names |= {KEYS.channel(c) for c in hub.channels}
        names |= {KEYS.node_connections(n) for n in hub.node_connections}
        names |= {KEYS.node_channels(n) for n in hub.node_channels}
        names |= {KEYS.nodes} if hub.nodes else set()
        names |= {KEYS.heartbeat(n) for n, deadline in hub.nodes.items() if deadline > clock()}
        names |= {KEYS.tombstone(n) for n in hub.tombstones}
        return names

    return Harness(
        name="memory",
        backend=MemoryBackend(hub, standalone=False),
        make_peer=lambda: MemoryBackend(hub, standalone=False),
        advance_ms=advance,
        wipe=wipe,
        stored_keys=stored_keys,
    )


def redis_harness(name: str, make_backend: Callable[[], Backend], admin: Redis) -> Harness:
    """A harness over a Redis (real or fake) that ``admin`` also reaches."""

    async def wipe() -> None:
        await admin.flushall()

    async def stored_keys() -> set[str]:
        return {
            key.decode() if isinstance(key, bytes) else key
            async for key in admin.scan_iter(match=KEYS.pattern, count=1000)
        }

    return Harness(
        name=name,
        backend=make_backend(),
        make_peer=make_backend,
        advance_ms=lambda ms: None,  # real time passes; tests poll for the effect
        wipe=wipe,
        stored_keys=stored_keys,
        on_close=admin.aclose,
    )


@dataclass
class Listener:
    """A live subscription and the payloads it has delivered so far."""

    subscription: Subscription
    payloads: asyncio.Queue[bytes]


@asynccontextmanager
async def listen(bus: Bus, node_id: NodeId) -> AsyncIterator[Listener]:
    """Subscribe ``node_id``'s inbox, collecting what it delivers."""
    payloads: asyncio.Queue[bytes] = asyncio.Queue()
    async with bus.subscribe(node_id, payloads.put_nowait) as subscription:
        yield Listener(subscription, payloads)


async def receive(listener: Listener, count: int) -> list[bytes]:
    """The next ``count`` payloads; ``BackendUnavailable`` once the subscription is lost with
    fewer delivered."""
    received: list[bytes] = []
    lost = asyncio.ensure_future(listener.subscription.wait_lost())
    try:
        while len(received) < count:
            if not listener.payloads.empty():
                received.append(listener.payloads.get_nowait())
                continue
            arrival = asyncio.ensure_future(listener.payloads.get())
            await asyncio.wait((arrival, lost), return_when=asyncio.FIRST_COMPLETED)
            if arrival.done():
                received.append(arrival.result())
            else:
                arrival.cancel()
                lost.result()  # raises BackendUnavailable
        return received
    finally:
        lost.cancel()

"""The in-process backend: a standalone node (the default), or several nodes in one process.

One ``MemoryHub`` plays the part of Redis: nodes that share a hub form one cluster. Heartbeat
TTLs follow a clock that tests can replace, so liveness is tested without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from broker_node.cluster.base import (
    Bus,
    ClaimRefusal,
    Deliver,
    Heartbeat,
    PublishResult,
    Registry,
    Subscription,
)
from broker_node.core.records import (
    AdoptedSession,
    ChannelRecord,
    ConnectionRecord,
    Reaped,
    SessionClaim,
    SessionKey,
)
from broker_node.errors import BackendUnavailable
from shared.ids import ChannelId, ConnectionId, NodeId

_T = TypeVar("_T")
logger = logging.getLogger(__name__)

#: Payloads waiting in one node's inbox before further ones are dropped (as Redis drops a
#: subscriber whose output buffer overflows): memory stays bounded.
INBOX_LIMIT = 100_000


@dataclass
class MemoryHub:
    """The shared state of one in-process cluster."""

    clock: Callable[[], float] = time.monotonic
    connections: dict[ConnectionId, ConnectionRecord] = field(default_factory=dict)
    roles: defaultdict[str, set[ConnectionId]] = field(default_factory=lambda: defaultdict(set))
    channels: dict[ChannelId, ChannelRecord] = field(default_factory=dict)
    node_connections: defaultdict[NodeId, set[ConnectionId]] = field(
        default_factory=lambda: defaultdict(set)
    )
    node_channels: defaultdict[NodeId, set[ChannelId]] = field(
        default_factory=lambda: defaultdict(set)
    )
    #: node -> heartbeat deadline (clock seconds)
    nodes: dict[NodeId, float] = field(default_factory=dict)
    tombstones: set[NodeId] = field(default_factory=set)
    inboxes: dict[NodeId, _MemorySubscription] = field(default_factory=dict)
    #: Resumable sessions: when each detached one went away (ms), and each one's epoch.
    detached_at: dict[ConnectionId, int] = field(default_factory=dict)
    epochs: dict[ConnectionId, int] = field(default_factory=dict)

    def wipe(self) -> None:
        """Forget everything, as a Redis restarted empty would (subscriptions survive)."""
        self.connections.clear()
        self.roles.clear()
        self.channels.clear()
        self.node_connections.clear()
        self.node_channels.clear()
        self.nodes.clear()
        self.tombstones.clear()
        self.detached_at.clear()
        self.epochs.clear()

    def _drop_connection(self, record: ConnectionRecord) -> None:
        self.connections.pop(record.connection_id, None)
        self.detached_at.pop(record.connection_id, None)
        self.epochs.pop(record.connection_id, None)
        members = self.roles.get(record.role)
        if members is not None:
            members.discard(record.connection_id)
            if not members:
                del self.roles[record.role]
        self._discard(self.node_connections, record.node_id, record.connection_id)

    def _drop_channel(self, record: ChannelRecord) -> None:
        self.channels.pop(record.channel_id, None)
        for node_id in (record.opener_node, record.target_node):
            self._discard(self.node_channels, node_id, record.channel_id)

    @staticmethod
    def _discard(index: defaultdict[NodeId, set[_T]], key: NodeId, value: _T) -> None:
        members = index.get(key)
        if members is not None:
            members.discard(value)
            if not members:
                del index[key]

    def _remove_node_state(self, node_id: NodeId) -> list[ChannelRecord]:
        removed = [
            self.channels[c] for c in self.node_channels.get(node_id, ()) if c in self.channels
        ]
        for record in removed:
            self._drop_channel(record)
        for connection_id in list(self.node_connections.get(node_id, ())):
            if (conn := self.connections.get(connection_id)) is not None:
                self._drop_connection(conn)
        self.node_connections.pop(node_id, None)
        self.node_channels.pop(node_id, None)
        self.nodes.pop(node_id, None)
        return removed


class MemoryRegistry(Registry):
    def __init__(self, hub: MemoryHub) -> None:
        self._hub = hub

    async def add_connection(self, record: ConnectionRecord) -> None:
        hub = self._hub
        hub.connections[record.connection_id] = record
        hub.roles[record.role].add(record.connection_id)
        hub.node_connections[record.node_id].add(record.connection_id)

    async def remove_connection(self, record: ConnectionRecord) -> None:
        self._hub._drop_connection(record)

    async def find_connection(self, connection_id: ConnectionId) -> ConnectionRecord | None:
        return self._hub.connections.get(connection_id)

    async def list_by_role(self, role: str) -> list[ConnectionId]:
        return list(self._hub.roles.get(role, ()))

    async def find_channel(self, channel_id: ChannelId) -> ChannelRecord | None:
        return self._hub.channels.get(channel_id)

    async def add_channel(self, record: ChannelRecord) -> None:
        hub = self._hub
        hub.channels[record.channel_id] = record
        hub.node_channels[record.opener_node].add(record.channel_id)
        hub.node_channels[record.target_node].add(record.channel_id)

    async def remove_channel(self, record: ChannelRecord) -> None:
        self._hub._drop_channel(record)

    async def remove_connections(self, records: Sequence[ConnectionRecord]) -> None:
        for record in records:
            self._hub._drop_connection(record)

    async def remove_channels(self, records: Sequence[ChannelRecord]) -> None:
        for record in records:
            self._hub._drop_channel(record)

    async def node_index(self, node_id: NodeId) -> tuple[set[ConnectionId], set[ChannelId]]:
        hub = self._hub
        return set(hub.node_connections.get(node_id, ())), set(hub.node_channels.get(node_id, ()))

    async def prune(
        self,
        node_id: NodeId,
        connection_ids: Sequence[ConnectionId],
        channel_ids: Sequence[ChannelId],
    ) -> None:
        hub = self._hub
        for connection_id in connection_ids:
            conn = hub.connections.get(connection_id)
            if conn is not None and conn.node_id == node_id:
                hub._drop_connection(conn)
            hub._discard(hub.node_connections, node_id, connection_id)
        for channel_id in channel_ids:
            chan = hub.channels.get(channel_id)
            if chan is not None and chan.opener_node == node_id:
                hub._drop_channel(chan)
            elif chan is None:
                hub._discard(hub.node_channels, node_id, channel_id)

    async def heartbeat(self, node_id: NodeId, ttl_ms: int) -> Heartbeat:
        hub = self._hub
        if node_id in hub.tombstones:
            return Heartbeat.FENCED
        known = node_id in hub.nodes
        hub.nodes[node_id] = hub.clock() + ttl_ms / 1000
        return Heartbeat.RENEWED if known else Heartbeat.REJOINED

    async def rejoin(self, node_id: NodeId, ttl_ms: int) -> None:
        hub = self._hub
        hub.tombstones.discard(node_id)
        hub._remove_node_state(node_id)
        hub.nodes[node_id] = hub.clock() + ttl_ms / 1000

    async def live_nodes(self) -> set[NodeId]:
        now = self._hub.clock()
        return {node for node, deadline in self._hub.nodes.items() if deadline > now}

    async def lapsed_nodes(self) -> list[NodeId]:
        now = self._hub.clock()
        return [node for node, deadline in self._hub.nodes.items() if deadline <= now]

    async def reap(self, node_id: NodeId) -> list[ChannelRecord] | None:
        hub = self._hub
        deadline = hub.nodes.get(node_id)
        if deadline is None or deadline > hub.clock():
            return None
        removed = hub._remove_node_state(node_id)
        hub.tombstones.add(node_id)
        return removed

    async def reap_adopting(self, node_id: NodeId, adopter: NodeId, now_ms: int) -> Reaped | None:
        hub = self._hub
        deadline = hub.nodes.get(node_id)
        if deadline is None or deadline > hub.clock():
            return None
        adopted: list[AdoptedSession] = []
        for connection_id in list(hub.node_connections.get(node_id, ())):
            conn = hub.connections.get(connection_id)
            if conn is None or conn.session is None:
                continue
            moved_conn = ConnectionRecord(connection_id, adopter, conn.role, conn.session)
            hub.connections[connection_id] = moved_conn
            hub._discard(hub.node_connections, node_id, connection_id)
            hub.node_connections[adopter].add(connection_id)
            detached_at = hub.detached_at.setdefault(connection_id, now_ms)
            adopted.append(
                AdoptedSession(moved_conn, detached_at, hub.epochs.get(connection_id, 0))
            )
        kept = {session.record.connection_id for session in adopted}
        moved = await self._keep_channels(node_id, kept, adopter)
        removed = hub._remove_node_state(node_id)
        hub.tombstones.add(node_id)
        return Reaped(removed, adopted, moved)

    async def _keep_channels(
        self, node_id: NodeId, kept: set[ConnectionId], adopter: NodeId | None
    ) -> list[ChannelRecord]:
        """Before a node's state goes: keep (rewritten) each channel of it whose every end on
        the node was adopted (``kept``, now on ``adopter``) or already resumed elsewhere."""
        hub = self._hub

        def holder(end: ConnectionId, end_node: NodeId) -> NodeId | None:
            if end_node != node_id:
                return end_node
            if end in kept:
                return adopter
            record = hub.connections.get(end)
            return record.node_id if record is not None and record.node_id != node_id else None

        moved: list[ChannelRecord] = []
        for channel_id in list(hub.node_channels.get(node_id, ())):
            chan = hub.channels.get(channel_id)
            if chan is None:
                continue
            opener_at = holder(chan.opener, chan.opener_node)
            target_at = holder(chan.target, chan.target_node)
            if opener_at is not None and target_at is not None:
                hub._drop_channel(chan)
                new = msgspec.structs.replace(chan, opener_node=opener_at, target_node=target_at)
                await self.add_channel(new)
                moved.append(new)
        return moved

    async def leave(self, node_id: NodeId) -> None:
        await self._keep_channels(node_id, set(), None)
        self._hub._remove_node_state(node_id)

    async def restore(
        self,
        node_id: NodeId,
        connections: Sequence[ConnectionRecord],
        channels: Sequence[ChannelRecord],
    ) -> None:
        for connection in connections:
            await self.add_connection(connection)
        for channel in channels:
            await self.add_channel(channel)

    async def claim_session(
        self,
        connection_id: ConnectionId,
        token_hash: str,
        new_token_hash: str,
        node_id: NodeId,
        now_ms: int,
    ) -> SessionClaim | ClaimRefusal:
        hub = self._hub
        conn = hub.connections.get(connection_id)
        if conn is None or conn.session is None or conn.session.token_hash != token_hash:
            return ClaimRefusal.UNKNOWN
        detached_at = hub.detached_at.get(connection_id)
        if detached_at is not None and now_ms - detached_at >= conn.session.window * 1000:
            return ClaimRefusal.EXPIRED
        epoch = hub.epochs.get(connection_id, 0) + 1
        hub.epochs[connection_id] = epoch
        hub.detached_at.pop(connection_id, None)
        session = SessionKey(new_token_hash, conn.session.window)
        hub.connections[connection_id] = ConnectionRecord(
            connection_id, node_id, conn.role, session
        )
        hub._discard(hub.node_connections, conn.node_id, connection_id)
        hub.node_connections[node_id].add(connection_id)
        return SessionClaim(conn.node_id, conn.role, conn.session.window, epoch)

    async def mark_detached(self, connection_id: ConnectionId, node_id: NodeId, at_ms: int) -> None:
        conn = self._hub.connections.get(connection_id)
        if conn is not None and conn.node_id == node_id:
            self._hub.detached_at[connection_id] = at_ms

    async def end_session(self, record: ConnectionRecord) -> bool:
        conn = self._hub.connections.get(record.connection_id)
        if conn is None or conn.node_id != record.node_id:
            return False
        self._hub._drop_connection(conn)
        return True

    async def transfer_session(
        self, connection_id: ConnectionId, from_node: NodeId, to_node: NodeId
    ) -> bool:
        hub = self._hub
        conn = hub.connections.get(connection_id)
        if conn is None or conn.node_id != from_node:
            return False
        hub.connections[connection_id] = msgspec.structs.replace(conn, node_id=to_node)
        hub._discard(hub.node_connections, from_node, connection_id)
        hub.node_connections[to_node].add(connection_id)
        return True

    async def move_channels(self, records: Sequence[ChannelRecord], from_node: NodeId) -> None:
        hub = self._hub
        for record in records:
            if record.opener_node != from_node and record.target_node != from_node:
                hub._discard(hub.node_channels, from_node, record.channel_id)
            await self.add_channel(record)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class _MemorySubscription(Subscription):
    """An inbox: payloads queue here and reach ``deliver`` on the next loop turn, in order."""

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self._queued: deque[bytes] = deque()
        # The failure is the future's result, not its exception: a subscription its node
        # leaves on purpose has no one waiting, and an unretrieved exception would be logged.
        self._lost: asyncio.Future[BackendUnavailable] = asyncio.get_running_loop().create_future()

    def offer(self, payload: bytes) -> bool:
        """Queue a payload; False when the inbox is full (the payload is dropped)."""
        if len(self._queued) >= INBOX_LIMIT or self._lost.done():
            return False
        if not self._queued:
            asyncio.get_running_loop().call_soon(self._drain)
        self._queued.append(payload)
        return True

    def _drain(self) -> None:
        queued = self._queued
        while queued and not self._lost.done():
            try:
                self._deliver(queued.popleft())
            except Exception:
                # One payload's failure is not the subscription's (as on Redis): log, go on.
                logger.exception("handling a bus payload failed")

    def lose(self, reason: str) -> None:
        if not self._lost.done():
            self._lost.set_result(BackendUnavailable(reason))
            self._queued.clear()

    async def wait_lost(self) -> None:
        raise await asyncio.shield(self._lost)


class MemoryBus(Bus):
    def __init__(self, hub: MemoryHub) -> None:
        self._hub = hub
        self._subscriptions: set[_MemorySubscription] = set()

    def send(self, messages: Sequence[tuple[NodeId, bytes]], on_result: PublishResult) -> None:
        inboxes = self._hub.inboxes
        counts = []
        for node_id, payload in messages:
            inbox = inboxes.get(node_id)
            counts.append(1 if inbox is not None and inbox.offer(payload) else 0)
        asyncio.get_running_loop().call_soon(on_result, counts)

    @asynccontextmanager
    async def _subscribe(self, node_id: NodeId, deliver: Deliver) -> AsyncIterator[Subscription]:
        inbox = _MemorySubscription(deliver)
        self._hub.inboxes[node_id] = inbox
        self._subscriptions.add(inbox)
        try:
            yield inbox
        finally:
            self._subscriptions.discard(inbox)
            inbox.lose("unsubscribed")
            if self._hub.inboxes.get(node_id) is inbox:
                del self._hub.inboxes[node_id]

    def subscribe(
        self, node_id: NodeId, deliver: Deliver
    ) -> AbstractAsyncContextManager[Subscription]:
        return self._subscribe(node_id, deliver)

    async def aclose(self) -> None:
        for inbox in list(self._subscriptions):
            inbox.lose("bus closed")


class MemoryBackend:
    """The registry and bus of one in-process hub."""

    def __init__(self, hub: MemoryHub | None = None, *, standalone: bool = True) -> None:
        self.hub = hub if hub is not None else MemoryHub()
        self._registry = MemoryRegistry(self.hub)
        self._bus = MemoryBus(self.hub)
        self._standalone = standalone

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def bus(self) -> Bus:
        return self._bus

    @property
    def standalone(self) -> bool:
        return self._standalone

    async def aclose(self) -> None:
        await self._bus.aclose()

"""The two interfaces a cluster backend implements: the registry and the bus.

Theory of operation
-------------------
The *registry* is the cluster-wide truth about who is connected where: connections
(id -> node, role), a role index for ``list_by_role``, channels (id -> both ends and their
nodes), per-node indexes of both (so that a node's state can be removed in one step), and node
liveness (a heartbeat with a TTL, plus a tombstone for nodes that were reaped).

The *bus* carries envelopes between nodes. Each node listens on its own inbox; a node
publishes only to the node that holds the recipient. Publishes of one node are delivered in
the order they were published (one publisher connection, pipelined), which is what keeps
messages ordered per channel and direction across nodes. The bus is the hot path of every
cross-node message, so it works with callbacks, not awaits: ``send`` writes at once and reports
the outcome later, and a subscription hands each payload to a callback as it is read; no task
switch happens per publish or per payload.

Every method may raise ``BackendUnavailable`` (and nothing else) when the backend cannot be
reached within its timeout; ``Bus.send`` hands that failure to its callback instead.
Implementations: ``memory.py`` (standalone node, and several nodes in one process for tests)
and ``redis.py``. One contract test suite runs over all of them.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from broker_node.core.records import (
    ChannelRecord,
    ConnectionRecord,
    Reaped,
    SessionClaim,
)
from broker_node.core.records import (
    ClaimRefusal as ClaimRefusal,  # defined with the records it is about: pure
)
from broker_node.errors import BackendUnavailable
from shared.ids import ChannelId, ConnectionId, NodeId


class Heartbeat(enum.Enum):
    """What renewing a node's heartbeat found."""

    #: The node was known and its heartbeat is renewed.
    RENEWED = "renewed"
    #: The node was unknown (the backend lost its state, e.g. an empty Redis after a restart):
    #: it is registered again and the caller must ``restore`` its connections and channels.
    REJOINED = "rejoined"
    #: The node was reaped by a survivor while it could not renew (a long pause, a partition).
    #: Nothing was renewed; the caller must drop its clients and call ``rejoin``.
    FENCED = "fenced"


class Registry(Protocol):
    """The cluster-wide registry of nodes, connections and channels."""

    async def add_connection(self, record: ConnectionRecord) -> None:
        """Store a connection, index it by role and under its node."""

    async def remove_connection(self, record: ConnectionRecord) -> None:
        """Remove a connection from every index; absent entries are fine."""

    async def find_connection(self, connection_id: ConnectionId) -> ConnectionRecord | None:
        """The connection's record, or None when it is not registered."""

    async def list_by_role(self, role: str) -> list[ConnectionId]:
        """Every registered connection of ``role``, on every node; cost follows the answer."""

    async def find_channel(self, channel_id: ChannelId) -> ChannelRecord | None:
        """The channel's record (its ends), or None when it is not open on any node."""

    async def add_channel(self, record: ChannelRecord) -> None:
        """Store a channel and index it under both ends' nodes."""

    async def remove_channel(self, record: ChannelRecord) -> None:
        """Remove a channel from every index; absent entries are fine."""

    # Bulk removal and resynchronisation: bounded work per call, and never a moment in which
    # a live entry is missing (no remove-everything-then-rewrite).

    async def remove_connections(self, records: Sequence[ConnectionRecord]) -> None:
        """``remove_connection`` for each record, in few round trips."""

    async def remove_channels(self, records: Sequence[ChannelRecord]) -> None:
        """``remove_channel`` for each record, in few round trips."""

    async def node_index(self, node_id: NodeId) -> tuple[set[ConnectionId], set[ChannelId]]:
        """The ids of the connections and channels indexed under ``node_id``."""

    async def prune(
        self,
        node_id: NodeId,
        connection_ids: Sequence[ConnectionId],
        channel_ids: Sequence[ChannelId],
    ) -> None:
        """Remove these connections of ``node_id`` and these channels opened from ``node_id``,
        each from every index, as the stored records name them; an id whose record belongs to
        another node (or is gone) only leaves ``node_id``'s index."""

    async def heartbeat(self, node_id: NodeId, ttl_ms: int) -> Heartbeat:
        """Renew the node's liveness for ``ttl_ms``, unless it was reaped (see ``Heartbeat``)."""

    async def rejoin(self, node_id: NodeId, ttl_ms: int) -> None:
        """After ``FENCED``: forget the tombstone and register the node afresh, with no state."""

    async def live_nodes(self) -> set[NodeId]:
        """Nodes whose heartbeat is current."""

    async def lapsed_nodes(self) -> list[NodeId]:
        """Known nodes whose heartbeat has lapsed and that nobody has reaped yet."""

    async def reap(self, node_id: NodeId) -> list[ChannelRecord] | None:
        """Atomically remove a lapsed node's connections and channels and leave a tombstone.

        Returns the channels removed, or None when the node is alive again or another survivor
        reaped it first: of several racing survivors, exactly one gets a list.
        """

    async def reap_adopting(self, node_id: NodeId, adopter: NodeId, now_ms: int) -> Reaped | None:
        """``reap``, except that the dead node's resumable sessions are not removed: they move
        to ``adopter``, detached (since ``now_ms`` if they were attached), and so do the
        channels whose every end on the dead node is such a session. Other channels are
        removed as by ``reap``. None as for ``reap``."""

    async def leave(self, node_id: NodeId) -> None:
        """Graceful stop: remove everything of the node, its heartbeat included; no tombstone."""

    async def restore(
        self,
        node_id: NodeId,
        connections: Sequence[ConnectionRecord],
        channels: Sequence[ChannelRecord],
    ) -> None:
        """Write the node's live connections and channels again (idempotent)."""

    # Resumable sessions (issue 14).

    async def claim_session(
        self,
        connection_id: ConnectionId,
        token_hash: str,
        new_token_hash: str,
        node_id: NodeId,
        now_ms: int,
    ) -> SessionClaim | ClaimRefusal:
        """Atomically take a session over for ``node_id``: the token must match and the window
        must not have passed; the token is replaced (it is single use), the epoch bumped, the
        session marked attached and indexed under ``node_id``. Of two claims with one token,
        exactly one succeeds."""

    async def mark_detached(self, connection_id: ConnectionId, node_id: NodeId, at_ms: int) -> None:
        """The session's client went away at ``at_ms`` (only if ``node_id`` still holds it)."""

    async def end_session(self, record: ConnectionRecord) -> bool:
        """Remove a session whose window passed, only if ``record.node_id`` still holds it
        (False: a resume took it over meanwhile)."""

    async def transfer_session(
        self, connection_id: ConnectionId, from_node: NodeId, to_node: NodeId
    ) -> bool:
        """A draining node gives a detached session to ``to_node`` (only if it still holds it:
        False when a resume took it meanwhile); ``det`` and the token are kept."""

    async def move_channels(self, records: Sequence[ChannelRecord], from_node: NodeId) -> None:
        """Rewrite channels whose end moved off ``from_node`` (a resumed session's)."""

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` unless the backend answers."""

    async def aclose(self) -> None:
        """Release connections."""


class Subscription(Protocol):
    """A node's live subscription to its inbox; payloads go to the ``deliver`` callback."""

    async def wait_lost(self) -> None:
        """Wait while the subscription lasts; raises ``BackendUnavailable`` once it is lost
        (it never returns normally)."""


#: Receives one payload published to the subscribed inbox, in publish order.
Deliver = Callable[[bytes], None]
#: Receives the outcome of one ``send``: per payload, how many subscribers received it (0: the
#: node is not listening, the payload is lost and its sender must be told), or the failure when
#: the outcome is unknown (the payloads may or may not have reached their nodes).
PublishResult = Callable[["list[int] | BackendUnavailable"], None]


class Bus(Protocol):
    """Node-to-node delivery of opaque payloads."""

    def send(self, messages: Sequence[tuple[NodeId, bytes]], on_result: PublishResult) -> None:
        """Publish each payload to its node's inbox, in order, without waiting.

        The payloads of successive calls reach each node in call order. ``on_result`` is
        called exactly once, never from within ``send`` (so a caller may send from a callback
        without re-entering itself), and the results of successive calls come in call order.
        """

    def subscribe(
        self, node_id: NodeId, deliver: Deliver
    ) -> AbstractAsyncContextManager[Subscription]:
        """Listen on the node's inbox. Entering returns once the subscription is active; from
        then on every payload published to the inbox is passed to ``deliver``."""

    async def aclose(self) -> None:
        """Release connections."""


async def publish(bus: Bus, messages: Sequence[tuple[NodeId, bytes]]) -> list[int]:
    """``Bus.send``, awaited: the per-payload subscriber counts, or ``BackendUnavailable``."""
    outcome: asyncio.Future[list[int] | BackendUnavailable] = (
        asyncio.get_running_loop().create_future()
    )

    def settle(result: list[int] | BackendUnavailable) -> None:
        if not outcome.done():
            outcome.set_result(result)

    bus.send(messages, settle)
    result = await outcome
    if isinstance(result, BackendUnavailable):
        raise result
    return result


class Backend(Protocol):
    """A registry and a bus that share their connections and settings."""

    @property
    def registry(self) -> Registry: ...

    @property
    def bus(self) -> Bus: ...

    @property
    def standalone(self) -> bool:
        """True for the in-process backend of a single node."""

    async def aclose(self) -> None: ...

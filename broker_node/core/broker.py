"""The broker's protocol decisions for one node.

Theory of operation
-------------------
``BrokerCore`` holds what one node knows: its own client connections, every channel that has
an end on this node (both ends and their nodes, learned when the channel opens, so the hot path
never asks the registry), and the cross-node work in flight (messages awaiting a confirmation,
opens awaiting the target's node). Each event (a request from a client, a batch from the bus, a
client gone, a node lost, time passing) goes in; a list of actions comes out, which the shell
executes in order. Nothing here does I/O or reads a clock other than the one it is given.

Requests that need the cluster registry (``register``, ``list_by_role``, ``open``) are split in
two: ``begin_*`` decides whether the registry is needed at all, the shell awaits the registry,
and ``finish_*`` turns the answer into replies. ``message`` and ``close`` never wait for the
registry: the channel table here is enough, and the registry is updated in the background.

Message ordering per channel and direction follows from three facts: a client's requests are
handled in the order they arrive, the shell publishes this node's envelopes in the order the
core produced them, and a node handles a bus batch in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from broker_node.core.actions import (
    Action,
    CloseClient,
    ForgetChannel,
    ForgetConnection,
    Publish,
    Send,
)
from broker_node.core.envelopes import Closed, Confirm, Deliver, Envelope, Incoming, OpenResult
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.core.stats import NodeStats
from shared.codec import (
    CLOSE_UNSUPPORTED_DATA,
    CloseConnection,
    ErrorReply,
    FailedReply,
    Rejection,
    encode,
)
from shared.ids import ChannelId, ConnectionId, NodeId, new_channel_id
from shared.messages import (
    FAILURE_TYPE,
    ChannelClosed,
    ChannelClosedNotification,
    ChannelCloseFailed,
    ChannelMessage,
    ChannelMessageFailed,
    ChannelMessageSent,
    ChannelOpened,
    ChannelOpenFailed,
    Close,
    Connections,
    Error,
    IncomingChannel,
    ListByRole,
    ListByRoleFailed,
    Message,
    Open,
    Register,
    Registered,
    RegisterFailed,
)

NOT_REGISTERED: Final = "Connection not registered"
ALREADY_REGISTERED: Final = "Connection already registered"
TARGET_NOT_FOUND: Final = "Target connection not found"
CHANNEL_NOT_FOUND: Final = "Channel not found"
NOT_AUTHORIZED: Final = "Not authorized for this channel"
RECIPIENT_GONE: Final = "Recipient not connected"
NODE_LOST: Final = "Recipient's node was lost"
NOT_CONFIRMED: Final = "Delivery not confirmed in time"
TOO_MANY_UNCONFIRMED: Final = "Too many unconfirmed messages"
TARGET_NODE_SILENT: Final = "Target's node did not answer in time"
REGISTRY_UNAVAILABLE: Final = "Cluster registry unavailable, try again"
LATE_DELIVERY: Final = "Delivery arrived out of order and was dropped"
# --- hostile input and resource limits (issue 15)
TOO_MANY_CHANNELS: Final = "Too many channels on this connection"
TARGET_TOO_MANY_CHANNELS: Final = "Target connection has too many channels"
INVALID_LIMIT: Final = "Invalid field: limit must be a positive integer"

#: Failure reasons used as metric labels; any other text counts as "invalid_request".
KNOWN_REASONS: Final = frozenset(
    {
        NOT_REGISTERED,
        ALREADY_REGISTERED,
        TARGET_NOT_FOUND,
        CHANNEL_NOT_FOUND,
        NOT_AUTHORIZED,
        RECIPIENT_GONE,
        NODE_LOST,
        NOT_CONFIRMED,
        TOO_MANY_UNCONFIRMED,
        TARGET_NODE_SILENT,
        REGISTRY_UNAVAILABLE,
        LATE_DELIVERY,
        TOO_MANY_CHANNELS,
        TARGET_TOO_MANY_CHANNELS,
        INVALID_LIMIT,
    }
)


@dataclass(slots=True)
class LocalConnection:
    """A client connected to this node."""

    connection_id: ConnectionId
    #: Failures as ``{"type": "error"}`` for the original JS client (opt-in per connection).
    legacy_errors: bool
    role: str | None = None
    registering: bool = False
    #: The ``id`` of the next frame sent to this client (strictly increasing from 1).
    next_id: int = 1
    channels: set[ChannelId] = field(default_factory=set)
    #: Cross-node messages sent and not yet confirmed.
    unconfirmed: int = 0


class _PendingDelivery(NamedTuple):
    sender: ConnectionId
    request_id: int
    channel_id: ChannelId
    node_id: NodeId
    deadline: float


class _PendingOpen(NamedTuple):
    opener: ConnectionId
    request_id: int
    channel: ChannelRecord
    deadline: float


class BrokerCore:
    """What one node decides; see the module docstring."""

    def __init__(
        self,
        node_id: NodeId,
        *,
        max_role_length: int,
        max_unconfirmed: int,
        request_timeout: float,
        clock: Callable[[], float],
        stats: NodeStats | None = None,
        first_seq: int = 0,
        # --- hostile input and resource limits (issue 15)
        max_channels: int = 1000,
        list_page_size: int = 1000,
    ) -> None:
        self.node_id = node_id
        #: Channels one connection may be an end of (opened by it or to it).
        self.max_channels = max_channels
        #: Most ids in one ``connections`` reply.
        self.list_page_size = list_page_size
        self.max_role_length = max_role_length
        self.max_unconfirmed = max_unconfirmed
        self.request_timeout = request_timeout
        self.clock = clock
        self.stats = stats if stats is not None else NodeStats()
        self.connections: dict[ConnectionId, LocalConnection] = {}
        self.channels: dict[ChannelId, ChannelRecord] = {}
        self._deliveries: dict[int, _PendingDelivery] = {}
        self._opens: dict[int, _PendingOpen] = {}
        # Sequence numbers of this node's envelopes; the shell starts them from the wall clock
        # so that they keep increasing across a restart under the same node id.
        self._seq = first_seq
        #: The last delivery seq accepted from each sending node.
        self._last_delivery: dict[NodeId, int] = {}

    # --- connections --------------------------------------------------------------------

    def connect(self, connection_id: ConnectionId, *, legacy_errors: bool = False) -> None:
        self.connections[connection_id] = LocalConnection(connection_id, legacy_errors)

    def is_connected(self, connection_id: ConnectionId) -> bool:
        return connection_id in self.connections

    def disconnect(self, connection_id: ConnectionId) -> list[Action]:
        """The client is gone: close its channels, notify their other ends, leave the registry."""
        conn = self.connections.pop(connection_id, None)
        if conn is None:
            return []
        actions: list[Action] = []
        for channel_id in conn.channels:
            record = self.channels.pop(channel_id, None)
            if record is not None:
                self._notify_other_end(record, connection_id, actions)
                actions.append(ForgetChannel(record))
        if conn.role is not None:
            actions.append(
                ForgetConnection(ConnectionRecord(connection_id, self.node_id, conn.role))
            )
        return actions

    def pending_counts(self) -> tuple[int, int]:
        """Cross-node messages and opens awaiting another node."""
        return len(self._deliveries), len(self._opens)

    # --- bad input ----------------------------------------------------------------------

    def reject(self, connection_id: ConnectionId, rejection: Rejection) -> list[Action]:
        """Answer a frame the codec refused (the bad-input table)."""
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        match rejection:
            case CloseConnection(code=code, reason=reason):
                return [CloseClient(connection_id, code, reason)]
            case ErrorReply(reply_to=reply_to, error=error):
                frame = encode(Error(id=self._next_id(conn), replyTo=reply_to, error=error))
                return [Send(connection_id, frame)]
            case FailedReply(request_type=kind, reply_to=reply_to, error=error, subject=subject):
                return [Send(connection_id, self._failure(conn, kind, reply_to, subject, error))]

    def binary_frame(self, connection_id: ConnectionId) -> list[Action]:
        return [
            CloseClient(connection_id, CLOSE_UNSUPPORTED_DATA, "Binary frames are not supported")
        ]

    # --- register -----------------------------------------------------------------------

    def begin_register(
        self, connection_id: ConnectionId, request: Register
    ) -> list[Action] | ConnectionRecord:
        """Refuse the request, or return the record the shell must write to the registry."""
        conn = self.connections[connection_id]
        error: str | None = None
        if conn.role is not None or conn.registering:
            error = ALREADY_REGISTERED
        elif not request.role:
            error = "Invalid field: role must be a non-empty string"
        elif len(request.role) > self.max_role_length:
            error = f"Invalid field: role is longer than {self.max_role_length} characters"
        if error is not None:
            return self._fail(conn, "register", request.id, "", error)
        conn.registering = True
        return ConnectionRecord(connection_id, self.node_id, request.role)

    def finish_register(
        self, connection_id: ConnectionId, request: Register, error: str | None = None
    ) -> list[Action]:
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        conn.registering = False
        if error is not None:
            return self._fail(conn, "register", request.id, "", error)
        conn.role = request.role
        frame = encode(
            Registered(id=self._next_id(conn), replyTo=request.id, connectionId=connection_id)
        )
        return [Send(connection_id, frame)]

    # --- list_by_role -------------------------------------------------------------------

    def begin_list(self, connection_id: ConnectionId, request: ListByRole) -> list[Action] | None:
        """Refuse the request, or None: the shell asks the registry."""
        conn = self.connections[connection_id]
        if conn.role is None:
            return self._fail(conn, "list_by_role", request.id, "", NOT_REGISTERED)
        if request.limit is not None and request.limit < 1:
            return self._fail(conn, "list_by_role", request.id, "", INVALID_LIMIT)
        return None

    def finish_list(
        self,
        connection_id: ConnectionId,
        request: ListByRole,
        ids: list[ConnectionId] | None,
        error: str | None = None,
    ) -> list[Action]:
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        if ids is None:
            return self._fail(conn, "list_by_role", request.id, "", error or REGISTRY_UNAVAILABLE)
        page, more = self._page(ids, request)
        frame = encode(Connections(id=self._next_id(conn), replyTo=request.id, ids=page, more=more))
        return [Send(connection_id, frame)]

    def _page(self, ids: Iterable[str], request: ListByRole) -> tuple[list[str], bool]:
        # Sorted, so that ``after`` (the last id of a page) finds the next page even as
        # connections come and go between the requests.
        size = self.list_page_size
        if request.limit is not None:
            size = min(size, request.limit)
        after = request.after
        ordered = sorted(ids) if after is None else sorted(i for i in ids if i > after)
        return ordered[:size], len(ordered) > size

    # --- open ---------------------------------------------------------------------------

    def begin_open(self, connection_id: ConnectionId, request: Open) -> list[Action] | None:
        """Refuse the request, or None: the shell looks the target up in the registry."""
        conn = self.connections[connection_id]
        if conn.role is None:
            return self._fail(conn, "open", request.id, request.targetId, NOT_REGISTERED)
        if self._at_channel_cap(conn):
            self.stats.limit_refusals["channels"] += 1
            return self._fail(conn, "open", request.id, request.targetId, TOO_MANY_CHANNELS)
        return None

    def _at_channel_cap(self, conn: LocalConnection) -> bool:
        """The connection's channels, with its opens still in flight, reach the cap."""
        cap = self.max_channels
        held = len(conn.channels)
        if held + len(self._opens) < cap:
            return False
        cid = conn.connection_id
        return held + sum(1 for pending in self._opens.values() if pending.opener == cid) >= cap

    def plan_open(
        self, connection_id: ConnectionId, request: Open, target: ConnectionRecord | None
    ) -> list[Action] | ChannelRecord:
        """After the lookup: refuse, or the channel the shell must write to the registry."""
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        if target is None:
            return self._fail(conn, "open", request.id, request.targetId, TARGET_NOT_FOUND)
        local_target = self.connections.get(target.connection_id)
        if local_target is not None and len(local_target.channels) >= self.max_channels:
            self.stats.limit_refusals["channels"] += 1
            return self._fail(conn, "open", request.id, request.targetId, TARGET_TOO_MANY_CHANNELS)
        return ChannelRecord(
            channel_id=new_channel_id(),
            opener=connection_id,
            opener_node=self.node_id,
            target=target.connection_id,
            target_node=target.node_id,
        )

    def fail_open(self, connection_id: ConnectionId, request: Open, error: str) -> list[Action]:
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        return self._fail(conn, "open", request.id, request.targetId, error)

    def launch_open(
        self, connection_id: ConnectionId, request: Open, channel: ChannelRecord
    ) -> list[Action]:
        """The channel is in the registry: tell the target, then the opener."""
        opener = self.connections.get(connection_id)
        if opener is None:
            return [ForgetChannel(channel)]
        if channel.target_node != self.node_id:
            self._seq += 1
            deadline = self.clock() + self.request_timeout
            self._opens[self._seq] = _PendingOpen(connection_id, request.id, channel, deadline)
            return [Publish(channel.target_node, Incoming(self._seq, channel))]
        target = self.connections.get(channel.target)
        if target is None:
            actions: list[Action] = [ForgetChannel(channel)]
            actions += self._fail(opener, "open", request.id, request.targetId, TARGET_NOT_FOUND)
            return actions
        # The target hears of the channel before the opener can send anything on it.
        actions = [self._tell_incoming(target, channel)]
        actions.append(self._opened(opener, request.id, channel))
        return actions

    def _tell_incoming(self, target: LocalConnection, channel: ChannelRecord) -> Send:
        self.channels[channel.channel_id] = channel
        target.channels.add(channel.channel_id)
        frame = encode(
            IncomingChannel(
                id=self._next_id(target), from_=channel.opener, channelId=channel.channel_id
            )
        )
        return Send(target.connection_id, frame)

    def _opened(self, opener: LocalConnection, request_id: int, channel: ChannelRecord) -> Send:
        self.channels[channel.channel_id] = channel
        opener.channels.add(channel.channel_id)
        frame = encode(
            ChannelOpened(
                id=self._next_id(opener),
                replyTo=request_id,
                channelId=channel.channel_id,
                targetId=channel.target,
            )
        )
        return Send(opener.connection_id, frame)

    # --- message (the hot path) ---------------------------------------------------------

    def message(self, connection_id: ConnectionId, request: Message) -> list[Action]:
        conn = self.connections[connection_id]
        channel_id = ChannelId(request.channelId)
        if conn.role is None:
            return self._fail(conn, "message", request.id, channel_id, NOT_REGISTERED)
        channel = self.channels.get(channel_id)
        if channel is None:
            return self._fail(conn, "message", request.id, channel_id, CHANNEL_NOT_FOUND)
        if connection_id == channel.opener:
            peer, peer_node = channel.target, channel.target_node
        elif connection_id == channel.target:
            peer, peer_node = channel.opener, channel.opener_node
        else:
            return self._fail(conn, "message", request.id, channel_id, NOT_AUTHORIZED)
        if peer_node == self.node_id:
            recipient = self.connections.get(peer)
            if recipient is None:
                return self._fail(conn, "message", request.id, channel_id, RECIPIENT_GONE)
            delivery = encode(
                ChannelMessage(
                    id=self._next_id(recipient), channelId=channel_id, payload=request.payload
                )
            )
            sent = encode(
                ChannelMessageSent(id=self._next_id(conn), replyTo=request.id, channelId=channel_id)
            )
            self.stats.messages_local += 1
            return [Send(peer, delivery), Send(connection_id, sent)]
        if conn.unconfirmed >= self.max_unconfirmed:
            return self._fail(conn, "message", request.id, channel_id, TOO_MANY_UNCONFIRMED)
        conn.unconfirmed += 1
        self._seq += 1
        deadline = self.clock() + self.request_timeout
        self._deliveries[self._seq] = _PendingDelivery(
            connection_id, request.id, channel_id, peer_node, deadline
        )
        self.stats.messages_cross_node_out += 1
        envelope = Deliver(self._seq, self.node_id, channel_id, peer, request.payload)
        return [Publish(peer_node, envelope)]

    # --- close --------------------------------------------------------------------------

    def close(self, connection_id: ConnectionId, request: Close) -> list[Action]:
        conn = self.connections[connection_id]
        channel_id = ChannelId(request.channelId)
        if conn.role is None:
            return self._fail(conn, "close", request.id, channel_id, NOT_REGISTERED)
        channel = self.channels.get(channel_id)
        if channel is None:
            return self._fail(conn, "close", request.id, channel_id, CHANNEL_NOT_FOUND)
        if channel.peer_of(connection_id) is None:
            return self._fail(conn, "close", request.id, channel_id, NOT_AUTHORIZED)
        actions: list[Action] = []
        self._drop_channel(channel)
        self._notify_other_end(channel, connection_id, actions)
        frame = encode(
            ChannelClosed(id=self._next_id(conn), replyTo=request.id, channelId=channel_id)
        )
        actions.append(Send(connection_id, frame))
        actions.append(ForgetChannel(channel))
        return actions

    def _drop_channel(self, channel: ChannelRecord) -> None:
        self.channels.pop(channel.channel_id, None)
        for end in (channel.opener, channel.target):
            conn = self.connections.get(end)
            if conn is not None:
                conn.channels.discard(channel.channel_id)

    def _notify_other_end(
        self, channel: ChannelRecord, leaving: ConnectionId, actions: list[Action]
    ) -> None:
        peer = channel.peer_of(leaving)
        if peer is None or peer[0] == leaving:
            return
        peer_id, peer_node = peer
        if peer_node != self.node_id:
            actions.append(Publish(peer_node, Closed(channel.channel_id, peer_id)))
            return
        conn = self.connections.get(peer_id)
        if conn is not None:
            conn.channels.discard(channel.channel_id)
            actions.append(self._closed_notification(conn, channel.channel_id))

    def _closed_notification(self, conn: LocalConnection, channel_id: ChannelId) -> Send:
        frame = encode(ChannelClosedNotification(id=self._next_id(conn), channelId=channel_id))
        return Send(conn.connection_id, frame)

    # --- the bus ------------------------------------------------------------------------

    def on_bus(self, envelopes: Iterable[Envelope]) -> list[Action]:
        """A batch from another node, handled in order."""
        actions: list[Action] = []
        # Confirmations are batched per sending node: one envelope per node per batch.
        confirmations: dict[NodeId, tuple[list[int], list[tuple[int, str]]]] = {}
        for envelope in envelopes:
            match envelope:
                case Deliver():
                    self._on_deliver(envelope, actions, confirmations)
                case Confirm(written=written, refused=refused):
                    self._on_confirm(written, refused, actions)
                case Incoming(seq=seq, channel=channel):
                    self._on_incoming(seq, channel, actions)
                case OpenResult(seq=seq, error=error):
                    self._on_open_result(seq, error, actions)
                case Closed(channel_id=channel_id, recipient=recipient):
                    self._on_closed(channel_id, recipient, actions)
        for node_id, (written, refused) in confirmations.items():
            actions.append(Publish(node_id, Confirm(written, refused)))
        return actions

    def _on_deliver(
        self,
        envelope: Deliver,
        actions: list[Action],
        confirmations: dict[NodeId, tuple[list[int], list[tuple[int, str]]]],
    ) -> None:
        written, refused = confirmations.setdefault(envelope.sender_node, ([], []))
        # A node's deliveries to this node carry increasing seqs in publish order. One that
        # arrives behind a newer one is from a publish its sender saw fail (a Redis that
        # stalled, then ran its buffered commands): its sender already reported it failed,
        # and delivering it now would break the channel's order.
        if envelope.seq <= self._last_delivery.get(envelope.sender_node, 0):
            refused.append((envelope.seq, LATE_DELIVERY))
            return
        self._last_delivery[envelope.sender_node] = envelope.seq
        channel = self.channels.get(envelope.channel_id)
        recipient = self.connections.get(envelope.recipient)
        if channel is None or channel.peer_of(envelope.recipient) is None:
            refused.append((envelope.seq, CHANNEL_NOT_FOUND))
        elif recipient is None:
            refused.append((envelope.seq, RECIPIENT_GONE))
        else:
            frame = encode(
                ChannelMessage(
                    id=self._next_id(recipient),
                    channelId=envelope.channel_id,
                    payload=envelope.payload,
                )
            )
            actions.append(Send(recipient.connection_id, frame))
            written.append(envelope.seq)
            self.stats.messages_cross_node_in += 1

    def _on_confirm(
        self, written: list[int], refused: list[tuple[int, str]], actions: list[Action]
    ) -> None:
        for seq in written:
            pending = self._deliveries.pop(seq, None)
            if pending is not None:
                self._settle(pending, None, actions)
        for seq, error in refused:
            pending = self._deliveries.pop(seq, None)
            if pending is not None:
                self._settle(pending, error, actions)

    def _settle(self, pending: _PendingDelivery, error: str | None, actions: list[Action]) -> None:
        conn = self.connections.get(pending.sender)
        if conn is None:
            return
        conn.unconfirmed -= 1
        if error is None:
            self.stats.confirmations_sent += 1
            frame = encode(
                ChannelMessageSent(
                    id=self._next_id(conn), replyTo=pending.request_id, channelId=pending.channel_id
                )
            )
            actions.append(Send(conn.connection_id, frame))
        else:
            actions += self._fail(conn, "message", pending.request_id, pending.channel_id, error)

    def _on_incoming(self, seq: int, channel: ChannelRecord, actions: list[Action]) -> None:
        target = self.connections.get(channel.target)
        if target is None or target.role is None:
            actions.append(Publish(channel.opener_node, OpenResult(seq, TARGET_NOT_FOUND)))
            return
        if len(target.channels) >= self.max_channels:
            self.stats.limit_refusals["channels"] += 1
            actions.append(Publish(channel.opener_node, OpenResult(seq, TARGET_TOO_MANY_CHANNELS)))
            return
        actions.append(self._tell_incoming(target, channel))
        actions.append(Publish(channel.opener_node, OpenResult(seq, None)))

    def _on_open_result(self, seq: int, error: str | None, actions: list[Action]) -> None:
        pending = self._opens.pop(seq, None)
        if pending is None:
            return
        channel = pending.channel
        opener = self.connections.get(pending.opener)
        if error is not None:
            actions.append(ForgetChannel(channel))
            if opener is not None:
                actions += self._fail(opener, "open", pending.request_id, channel.target, error)
        elif opener is None:
            # The opener left while the target was being told: close the target's side too.
            actions.append(Publish(channel.target_node, Closed(channel.channel_id, channel.target)))
            actions.append(ForgetChannel(channel))
        else:
            actions.append(self._opened(opener, pending.request_id, channel))

    def _on_closed(
        self, channel_id: ChannelId, recipient: ConnectionId, actions: list[Action]
    ) -> None:
        channel = self.channels.get(channel_id)
        if channel is None or channel.peer_of(recipient) is None:
            return
        self._drop_channel(channel)
        conn = self.connections.get(recipient)
        if conn is not None:
            actions.append(self._closed_notification(conn, channel_id))

    # --- faults and time ----------------------------------------------------------------

    def undeliverable(self, node_id: NodeId, envelopes: Iterable[Envelope]) -> list[Action]:
        """The bus could not hand these envelopes to ``node_id``: answer what waits on them."""
        actions: list[Action] = []
        for envelope in envelopes:
            match envelope:
                case Deliver(seq=seq):
                    pending = self._deliveries.pop(seq, None)
                    if pending is not None:
                        self._settle(pending, NODE_LOST, actions)
                case Incoming(seq=seq):
                    self._on_open_result(seq, TARGET_NOT_FOUND, actions)
                case Closed() | Confirm() | OpenResult():
                    # The other node is unreachable; its own cleanup (or the reaper) settles it.
                    pass
        return actions

    def node_lost(self, node_id: NodeId) -> list[Action]:
        """``node_id`` died or was reaped: close every channel to it, fail what waits on it.

        The lost node is also sent a ``Closed`` for each channel: if it was only thought lost
        (its heartbeat vanished with an empty Redis), its clients hear of the closure too, so
        no channel is left open at one end only. A dead node's inbox takes nothing.
        """
        actions: list[Action] = []
        self._last_delivery.pop(node_id, None)
        lost = [c for c in self.channels.values() if node_id in (c.opener_node, c.target_node)]
        for channel in lost:
            self._drop_channel(channel)
            for end, end_node in channel.ends():
                if end_node == self.node_id:
                    conn = self.connections.get(end)
                    if conn is not None:
                        actions.append(self._closed_notification(conn, channel.channel_id))
                else:
                    actions.append(Publish(end_node, Closed(channel.channel_id, end)))
            actions.append(ForgetChannel(channel))
        for seq, pending in list(self._deliveries.items()):
            if pending.node_id == node_id:
                del self._deliveries[seq]
                self._settle(pending, NODE_LOST, actions)
        for seq, pending_open in list(self._opens.items()):
            if pending_open.channel.target_node == node_id:
                self._on_open_result(seq, TARGET_NOT_FOUND, actions)
        return actions

    def expire(self) -> list[Action]:
        """Fail cross-node work that waited longer than the request timeout."""
        now = self.clock()
        actions: list[Action] = []
        # Both tables are in deadline order (insertion order, one timeout): stop at the first
        # entry still in time.
        for seq, pending in list(self._deliveries.items()):
            if pending.deadline > now:
                break
            del self._deliveries[seq]
            self._settle(pending, NOT_CONFIRMED, actions)
        for seq, pending_open in list(self._opens.items()):
            if pending_open.deadline > now:
                break
            channel = pending_open.channel
            actions.append(Publish(channel.target_node, Closed(channel.channel_id, channel.target)))
            self._on_open_result(seq, TARGET_NODE_SILENT, actions)
        return actions

    def records(self) -> tuple[list[ConnectionRecord], list[ChannelRecord]]:
        """Everything of this node that belongs in the registry (to restore it)."""
        connections = [
            ConnectionRecord(conn.connection_id, self.node_id, conn.role)
            for conn in self.connections.values()
            if conn.role is not None
        ]
        return connections, list(self.channels.values())

    def remote_nodes(self) -> set[NodeId]:
        """Nodes that hold the other end of one of this node's channels."""
        nodes = {c.opener_node for c in self.channels.values()}
        nodes.update(c.target_node for c in self.channels.values())
        nodes.discard(self.node_id)
        return nodes

    # --- frames -------------------------------------------------------------------------

    @staticmethod
    def _next_id(conn: LocalConnection) -> int:
        frame_id = conn.next_id
        conn.next_id = frame_id + 1
        return frame_id

    def _fail(
        self, conn: LocalConnection, request_type: str, reply_to: int, subject: str, error: str
    ) -> list[Action]:
        return [
            Send(conn.connection_id, self._failure(conn, request_type, reply_to, subject, error))
        ]

    def _failure(
        self, conn: LocalConnection, request_type: str, reply_to: int, subject: str, error: str
    ) -> bytes:
        frame_id = self._next_id(conn)
        reason = error if error in KNOWN_REASONS else "invalid_request"
        self.stats.failures[(FAILURE_TYPE[request_type], reason)] += 1
        if conn.legacy_errors:
            return encode(Error(id=frame_id, replyTo=reply_to, error=error))
        match request_type:
            case "register":
                return encode(RegisterFailed(id=frame_id, replyTo=reply_to, error=error))
            case "list_by_role":
                return encode(ListByRoleFailed(id=frame_id, replyTo=reply_to, error=error))
            case "open":
                return encode(
                    ChannelOpenFailed(id=frame_id, replyTo=reply_to, targetId=subject, error=error)
                )
            case "message":
                return encode(
                    ChannelMessageFailed(
                        id=frame_id, replyTo=reply_to, channelId=subject, error=error
                    )
                )
            case _:
                return encode(
                    ChannelCloseFailed(
                        id=frame_id, replyTo=reply_to, channelId=subject, error=error
                    )
                )

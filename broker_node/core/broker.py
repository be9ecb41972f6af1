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

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Final, NamedTuple

import msgspec

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.auth.policy import Grants, Policy, grants_for, may_list, may_open, may_register
from broker_node.core.actions import (
    Action,
    CloseClient,
    EndSession,
    ForgetChannel,
    ForgetConnection,
    KeepFrames,
    LoadSession,
    LocalReceipt,
    MarkDetached,
    MoveChannels,
    PauseReading,
    Publish,
    Rebind,
    Receipt,
    RemoteReceipt,
    Replay,
    ResumeReading,
    Send,
)
from broker_node.core.envelopes import (
    Acked,
    Closed,
    CloseRequest,
    CloseResult,
    Confirm,
    Deliver,
    Envelope,
    Handover,
    Incoming,
    Moved,
    OpenResult,
    Resync,
    Take,
)
from broker_node.core.records import (
    ChannelRecord,
    ClaimRefusal,
    ConnectionRecord,
    Reaped,
    SessionClaim,
    SessionKey,
)
from broker_node.core.sessions import Session, SessionLog, new_resume_token, token_hash
from broker_node.core.stats import NodeStats
from shared.codec import (
    CLOSE_POLICY_VIOLATION,
    CLOSE_UNSUPPORTED_DATA,
    CloseConnection,
    ErrorReply,
    FailedReply,
    Rejection,
    encode,
)
from shared.ids import ChannelId, ConnectionId, NodeId, new_channel_id
from shared.messages import (
    CLOSE_RESUME_ELSEWHERE,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOKEN_INVALID,
    REQUESTS,
    Ack,
    ChannelAcked,
    ChannelClosed,
    ChannelClosedNotification,
    ChannelMessage,
    ChannelMessageSent,
    ChannelOpened,
    ChannelResync,
    Close,
    Connections,
    Error,
    IncomingChannel,
    ListByRole,
    Message,
    Open,
    Refresh,
    Refreshed,
    Register,
    Registered,
    Resume,
    Resumed,
    ResumedChannel,
)

NOT_REGISTERED: Final = "Connection not registered"
ALREADY_REGISTERED: Final = "Connection already registered"
TARGET_NOT_FOUND: Final = "Target connection not found"
CHANNEL_NOT_FOUND: Final = "Channel not found"
NOT_AUTHORIZED: Final = "Not authorized for this channel"
RECIPIENT_GONE: Final = "Recipient not connected"
NODE_LOST: Final = "Recipient's node was lost"
NOT_CONFIRMED: Final = "Delivery not confirmed in time"
#: The frame was handed to the recipient's socket, which closed before the kernel took all of
#: it: like ``NOT_CONFIRMED``, the outcome is unknown.
DELIVERY_UNKNOWN: Final = "Recipient disconnected during delivery; outcome unknown"
TARGET_NODE_SILENT: Final = "Target's node did not answer in time"
REGISTRY_UNAVAILABLE: Final = "Cluster registry unavailable, try again"
LATE_DELIVERY: Final = "Delivery arrived out of order and was dropped"
# Session resume (issue 14).
RESUME_DISABLED: Final = "Resume is not enabled on this node"
RESUME_TOKEN_INVALID: Final = "Resume token not valid"
RESUME_EXPIRED: Final = "Resume window expired"
#: Close reason of a session's old socket when its client resumed on a new one.
RESUMED_ELSEWHERE: Final = "Session resumed on another connection"
# Authentication (issue 13)
AUTH_REQUIRED: Final = "Authentication required"
ROLE_NOT_ALLOWED: Final = "Role not allowed for this token"
AUTH_DISABLED: Final = "Authentication is not enabled on this node"
OTHER_SUBJECT: Final = "Token is for another subject"
USER_LIMIT: Final = "Too many connections for this user"
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
        DELIVERY_UNKNOWN,
        TARGET_NODE_SILENT,
        REGISTRY_UNAVAILABLE,
        LATE_DELIVERY,
        AUTH_REQUIRED,
        ROLE_NOT_ALLOWED,
        AUTH_DISABLED,
        OTHER_SUBJECT,
        USER_LIMIT,
        TOO_MANY_CHANNELS,
        TARGET_TOO_MANY_CHANNELS,
        INVALID_LIMIT,
    }
)


#: Builds a frame given its id (ids are taken when the frame is sent, so that they increase).
FrameBuilder = Callable[[int], bytes]


@dataclass(slots=True)
class _Held:
    """Frames about a channel that wait behind the replies still owed before them: ready
    frames, or the place of request ``request_id``'s reply (``frames`` None until known)."""

    request_id: int | None
    frames: list[FrameBuilder] | None = None


@dataclass(frozen=True, slots=True)
class AuthRules:
    """Authentication is on: the policy and the times a connection is held to."""

    policy: Policy | None
    #: Seconds a connection may stay without a valid token before it is closed.
    timeout: float
    #: Seconds a connection may outlive its token's ``exp`` without a refresh.
    grace: float


@dataclass(frozen=True, slots=True)
class ResumeRules:
    """Session resume is on (issue 14): the window, the bounds of a session's kept frames."""

    #: Seconds a detached session waits for its client.
    window: int
    max_frames: int
    max_bytes: int
    #: Seconds a channel whose resumable end's node was lost waits to hear (``Moved``) where
    #: that end went, before it closes as for any lost node.
    orphan_timeout: float
    new_token: Callable[[], tuple[str, str]] = new_resume_token

    def new_log(self) -> SessionLog:
        return SessionLog(self.max_frames, self.max_bytes)


class ResumePlan(NamedTuple):
    """A resume the shell must claim in the registry."""

    session_id: ConnectionId
    token_hash: str
    new_token: str
    new_token_hash: str


@dataclass(slots=True)
class _PendingResume:
    """A resume claimed in the registry whose session another node holds (or held)."""

    socket_id: ConnectionId
    request: Resume
    plan: ResumePlan
    claim: SessionClaim
    deadline: float


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
    #: Messages sent and not yet confirmed or failed, and their payload bytes.
    unconfirmed: int = 0
    unconfirmed_bytes: int = 0
    #: Reading this client's socket is paused until enough of that is settled.
    flow_paused: bool = False
    #: Per channel: messages of this client not yet settled (they settle in order), and the
    #: frames about that channel made meanwhile, which wait behind their replies so that the
    #: client gets them in the order one node would have sent them.
    pending: dict[ChannelId, int] = field(default_factory=dict)
    held: dict[ChannelId, deque[_Held]] = field(default_factory=dict)
    # Authentication (issue 13): who the token says this is, and what it may do.
    identity: Identity | None = None
    grants: Grants | None = None
    # Session resume (issue 14).
    session: Session | None = None
    #: The resume token (and its hash) made for ``registered``, while the registry is written.
    fresh_token: tuple[str, str] | None = None


class _PendingDelivery(msgspec.Struct, frozen=True, gc=False):
    """A cross-node message awaiting its confirmation (one per message: built in C)."""

    sender: ConnectionId
    request_id: int
    channel_id: ChannelId
    node_id: NodeId
    deadline: float
    size: int
    #: As ``LocalReceipt.acked_seq``.
    acked_seq: int | None = None


@dataclass(slots=True)
class _PendingClose:
    closer: ConnectionId
    request_id: int
    channel: ChannelRecord
    deadline: float


class _PendingOpen(NamedTuple):
    opener: ConnectionId
    request_id: int
    channel: ChannelRecord
    deadline: float


def _session_key(conn: LocalConnection) -> SessionKey | None:
    session = conn.session
    return None if session is None else SessionKey(session.token_hash, session.window)


def _notification_frame(channel_id: ChannelId, frame_id: int) -> bytes:
    return encode(ChannelClosedNotification(id=frame_id, channelId=channel_id))


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
        max_unconfirmed_bytes: int = 2 * 1024 * 1024,
        auth: AuthRules | None = None,
        wall_clock: Callable[[], float] | None = None,
        # --- hostile input and resource limits (issue 15)
        max_channels: int = 1000,
        list_page_size: int = 1000,
        resume: ResumeRules | None = None,
    ) -> None:
        self.node_id = node_id
        #: Channels one connection may be an end of (opened by it or to it).
        self.max_channels = max_channels
        #: Most ids in one ``connections`` reply.
        self.list_page_size = list_page_size
        self.max_role_length = max_role_length
        #: Flow control: past either bound, reading the sender's socket pauses until half of
        #: it is settled. Nothing is refused for it: the sender is slowed down.
        self.max_unconfirmed = max_unconfirmed
        self.max_unconfirmed_bytes = max_unconfirmed_bytes
        self.request_timeout = request_timeout
        self.clock = clock
        self.stats = stats if stats is not None else NodeStats()
        self.connections: dict[ConnectionId, LocalConnection] = {}
        self.channels: dict[ChannelId, ChannelRecord] = {}
        self._deliveries: dict[int, _PendingDelivery] = {}
        self._opens: dict[int, _PendingOpen] = {}
        self._closes: dict[int, _PendingClose] = {}
        #: Channels with a cross-node close in flight, to the close's seq.
        self._closing: dict[ChannelId, int] = {}
        # Sequence numbers of this node's envelopes; the shell starts them from the wall clock
        # so that they keep increasing across a restart under the same node id.
        self._seq = first_seq
        #: The last delivery seq accepted from each sending node.
        self._last_delivery: dict[NodeId, int] = {}
        #: None: authentication is off (the original protocol); see ``AuthRules``.
        self.auth = auth
        #: Unix time, for token expiry (``clock`` may be monotonic).
        self.wall_clock = wall_clock if wall_clock is not None else clock
        #: (deadline, connection): authenticate by then (clock), or the token's exp + grace
        #: (wall clock); heaps, see ``check_tokens``.
        self._auth_due: list[tuple[float, ConnectionId]] = []
        self._expiry_due: list[tuple[float, ConnectionId]] = []
        #: None: session resume is off (the original protocol); see ``ResumeRules``.
        self.resume = resume
        #: Detached sessions, to when their window ends (clock).
        self._detached: dict[ConnectionId, float] = {}
        #: Sessions whose end the registry is asked for (``EndSession``).
        self._ending: set[ConnectionId] = set()
        #: Resumes claimed here whose session another node is asked for (``Take``).
        self._resuming: dict[ConnectionId, _PendingResume] = {}
        #: Sessions a ``Take`` asked for, handed over once their work in flight settled.
        self._handing: dict[ConnectionId, tuple[Take, float]] = {}
        #: Sessions handed over: where to forward what still comes for them, and until when.
        self._moved: dict[ConnectionId, tuple[NodeId, float]] = {}
        #: Channels whose resumable end's node was lost, to when they stop waiting for it.
        self._orphans: dict[ChannelId, float] = {}
        #: Detached sessions whose window passed but which the registry gave to a resume on
        #: another node: kept for that node's Take.
        self._disowned: set[ConnectionId] = set()

    # --- connections --------------------------------------------------------------------

    def connect(self, connection_id: ConnectionId, *, legacy_errors: bool = False) -> None:
        self.connections[connection_id] = LocalConnection(connection_id, legacy_errors)
        if self.auth is not None:
            heapq.heappush(self._auth_due, (self.clock() + self.auth.timeout, connection_id))

    def is_connected(self, connection_id: ConnectionId) -> bool:
        return connection_id in self.connections

    def disconnect(self, connection_id: ConnectionId) -> list[Action]:
        """The client is gone: close its channels, notify their other ends, leave the registry."""
        conn = self.connections.pop(connection_id, None)
        if conn is None:
            return []
        notices: list[Action] = []
        forget: list[Action] = []
        for channel_id in conn.channels:
            record = self.channels.pop(channel_id, None)
            if record is not None:
                if self._closing.pop(channel_id, None) is None:
                    self._notify_other_end(record, connection_id, notices)
                # else: the other end's node is being told by the close already under way.
                forget.append(ForgetChannel(record))
        if conn.role is None:
            return notices + forget
        # As on one node, a peer that hears of the departure no longer finds the connection.
        gone = ConnectionRecord(connection_id, self.node_id, conn.role)
        forget.append(ForgetConnection(gone, tuple(notices)))
        return forget

    def pending_counts(self) -> tuple[int, int]:
        """Cross-node messages and opens (closes included) awaiting another node."""
        return len(self._deliveries), len(self._opens) + len(self._closes)

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
        self,
        connection_id: ConnectionId,
        request: Register,
        token: Identity | TokenRefusal | None = None,
    ) -> list[Action] | ConnectionRecord:
        """Refuse the request, or return the record the shell must write to the registry.

        ``token``: the verified ``token`` field of the request, if it had one."""
        conn = self.connections[connection_id]
        error: str | None = None
        if conn.role is not None or conn.registering:
            error = ALREADY_REGISTERED
        elif not request.role:
            error = "Invalid field: role must be a non-empty string"
        elif len(request.role) > self.max_role_length:
            error = f"Invalid field: role is longer than {self.max_role_length} characters"
        elif self.auth is not None:
            error = self._authorize_register(conn, request.role, token)
        if error is not None:
            return self._fail(conn, "register", request.id, "", error)
        conn.registering = True
        session = None
        if request.resume and self.resume is not None:
            conn.fresh_token = self.resume.new_token()
            session = SessionKey(conn.fresh_token[1], self.resume.window)
        return ConnectionRecord(connection_id, self.node_id, request.role, session)

    def finish_register(
        self, connection_id: ConnectionId, request: Register, error: str | None = None
    ) -> list[Action]:
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        conn.registering = False
        fresh, conn.fresh_token = conn.fresh_token, None
        if error is not None:
            return self._fail(conn, "register", request.id, "", error)
        conn.role = request.role
        if conn.identity is not None:
            conn.grants = grants_for(self._policy(), conn.identity, request.role)
        actions: list[Action] = []
        resume_token = window = None
        if fresh is not None and self.resume is not None:
            resume_token, hashed = fresh
            window = self.resume.window
            conn.session = Session(connection_id, hashed, window, self.resume.new_log())
            conn.session.log.last_request_id = request.id
            # From its ``registered`` on, every frame to it is kept until acknowledged.
            actions.append(KeepFrames(connection_id, conn.session.log))
        frame = encode(
            Registered(
                id=self._next_id(conn),
                replyTo=request.id,
                connectionId=connection_id,
                expiresIn=self._expires_in(conn),
                resumeToken=resume_token,
                resumeWindow=window,
            )
        )
        actions.append(Send(connection_id, frame))
        return actions

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
        if self.auth is not None and not self._may_list(conn, request.role):
            ids = []  # a role the caller may not see looks empty: nothing leaks
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
        if target is not None and self.auth is not None and not self._may_open(conn, target):
            target = None  # a forbidden target is answered exactly as a missing one
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
            opener_resumes=conn.session is not None,
            target_resumes=target.session is not None,
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

    def fail_on_channel(
        self, connection_id: ConnectionId, kind: str, request: Message | Close, error: str
    ) -> list[Action]:
        """Fail a message or close for ``error`` (the registry could not be asked)."""
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        channel_id = ChannelId(request.channelId)
        return self._fail_on_channel(conn, kind, request.id, channel_id, error, [])

    def knows_channel(self, connection_id: ConnectionId, channel_id: str) -> bool:
        """Whether this node can answer a message or close on ``channel_id`` by itself: it
        holds the channel, or the request fails before the channel matters. Otherwise the
        shell asks the registry whether the channel is open elsewhere (``elsewhere``)."""
        conn = self.connections.get(connection_id)
        return conn is None or conn.role is None or ChannelId(channel_id) in self.channels

    def message(
        self, connection_id: ConnectionId, request: Message, *, elsewhere: bool = False
    ) -> list[Action]:
        """A message; ``elsewhere``: the registry says the channel, unknown here, is open on
        other nodes, so this connection is not one of its ends."""
        conn = self.connections[connection_id]
        channel_id = ChannelId(request.channelId)
        if conn.role is None:
            return self._fail_on_channel(
                conn, "message", request.id, channel_id, NOT_REGISTERED, []
            )
        channel = self.channels.get(channel_id)
        if channel is None:
            error = NOT_AUTHORIZED if elsewhere else CHANNEL_NOT_FOUND
            return self._fail_on_channel(conn, "message", request.id, channel_id, error, [])
        if connection_id == channel.opener:
            peer, peer_node = channel.target, channel.target_node
        elif connection_id == channel.target:
            peer, peer_node = channel.opener, channel.opener_node
        else:
            return self._fail_on_channel(
                conn, "message", request.id, channel_id, NOT_AUTHORIZED, []
            )
        if self._closing and channel_id in self._closing:
            # Its own close is under way: as on one node, the channel is gone for it.
            return self._fail_on_channel(
                conn, "message", request.id, channel_id, CHANNEL_NOT_FOUND, []
            )
        size = len(request.payload)
        actions: list[Action]
        if peer_node == self.node_id:
            recipient = self.connections.get(peer)
            if recipient is None:
                return self._fail_on_channel(
                    conn, "message", request.id, channel_id, RECIPIENT_GONE, []
                )
            frame_id = recipient.next_id  # ``_next_id``, inlined on the hot path
            recipient.next_id = frame_id + 1
            delivery = encode(
                ChannelMessage(
                    id=frame_id, channelId=channel_id, seq=request.seq, payload=request.payload
                )
            )
            self.stats.messages_local += 1
            # Confirmed once the recipient's socket took it (see ``written``).
            actions = [
                Send(
                    peer,
                    delivery,
                    LocalReceipt(
                        connection_id,
                        request.id,
                        channel_id,
                        size,
                        request.seq if recipient.session is None else None,
                    ),
                )
            ]
        else:
            self._seq += 1
            deadline = self.clock() + self.request_timeout
            acked_seq = request.seq if not channel.resumes(peer) else None
            self._deliveries[self._seq] = _PendingDelivery(
                connection_id, request.id, channel_id, peer_node, deadline, size, acked_seq
            )
            self.stats.messages_cross_node_out += 1
            envelope = Deliver(
                self._seq, self.node_id, channel_id, peer, request.payload, request.seq
            )
            actions = [Publish(peer_node, envelope)]
        conn.unconfirmed += 1
        conn.unconfirmed_bytes += size
        pending = conn.pending
        pending[channel_id] = pending.get(channel_id, 0) + 1
        if not conn.flow_paused and (
            conn.unconfirmed > self.max_unconfirmed
            or conn.unconfirmed_bytes > self.max_unconfirmed_bytes
        ):
            conn.flow_paused = True
            self.stats.flow_pauses += 1
            # Before the delivery: its confirmation (and a resume with it) may come as soon
            # as the recipient's socket took it, while the shell is still executing this list.
            actions.insert(0, PauseReading(connection_id))
        return actions

    def _unhold(
        self, conn: LocalConnection, channel_id: ChannelId, size: int, actions: list[Action]
    ) -> None:
        """A message of ``conn`` is settled (its reply is in ``actions``): what waited behind
        it may go, and reading resumes once half the window is free."""
        left = conn.pending[channel_id] - 1
        if left:
            conn.pending[channel_id] = left
        else:
            del conn.pending[channel_id]
            if conn.held:
                self._release_held(conn, channel_id, actions)
        conn.unconfirmed -= 1
        conn.unconfirmed_bytes -= size
        if conn.flow_paused:
            self._maybe_resume(conn, actions)

    def _maybe_resume(self, conn: LocalConnection, actions: list[Action]) -> None:
        if (
            conn.unconfirmed <= self.max_unconfirmed // 2
            and conn.unconfirmed_bytes <= self.max_unconfirmed_bytes // 2
        ):
            conn.flow_paused = False
            actions.append(ResumeReading(conn.connection_id))

    # --- frames written (or not) to a recipient's socket --------------------------------

    def written(self, receipts: Iterable[Receipt], *, held: bool = False) -> list[Action]:
        """The kernel accepted these frames: confirm them to their senders. ``held``: the
        frames are kept for a detached session instead (the reply says so)."""
        actions: list[Action] = []
        confirmations: dict[NodeId, list[int]] | None = None
        connections = self.connections
        for receipt in receipts:
            if type(receipt) is LocalReceipt:
                sender = connections.get(receipt.sender)
                if sender is None:
                    continue
                # The hot path of every same-node message: ``_next_id`` and ``_unhold``
                # inlined for the common case.
                frame_id = sender.next_id
                sender.next_id = frame_id + 1
                channel_id = receipt.channel_id
                frame = encode(
                    ChannelMessageSent(
                        id=frame_id, replyTo=receipt.request_id, channelId=channel_id, held=held
                    )
                )
                actions.append(Send(receipt.sender, frame))
                if receipt.acked_seq is not None and not held:
                    self._tell(Acked(channel_id, receipt.sender, receipt.acked_seq), actions)
                pending = sender.pending
                left = pending[channel_id] - 1
                sender.unconfirmed -= 1
                sender.unconfirmed_bytes -= receipt.size
                if left:
                    pending[channel_id] = left
                else:
                    del pending[channel_id]
                    if sender.held:
                        self._release_held(sender, channel_id, actions)
                if sender.flow_paused:
                    self._maybe_resume(sender, actions)
            else:
                assert type(receipt) is RemoteReceipt
                if confirmations is None:
                    confirmations = {receipt.node_id: [receipt.seq]}
                elif (seqs := confirmations.get(receipt.node_id)) is None:
                    confirmations[receipt.node_id] = [receipt.seq]
                else:
                    seqs.append(receipt.seq)
        if confirmations is not None:
            for node_id, seqs in confirmations.items():
                confirm = Confirm([], [], seqs) if held else Confirm(seqs, [])
                actions.append(Publish(node_id, confirm))
        return actions

    def unwritten(self, receipts: Iterable[Receipt], *, handed: bool) -> list[Action]:
        """The recipient's connection ended before the kernel took these frames.

        ``handed``: the frames were given to the socket, so some bytes may have reached the
        recipient: the outcome is unknown. Otherwise nothing of them left this node.
        """
        error = DELIVERY_UNKNOWN if handed else RECIPIENT_GONE
        actions: list[Action] = []
        refusals: dict[NodeId, list[tuple[int, str]]] = {}
        for receipt in receipts:
            if type(receipt) is LocalReceipt:
                sender = self.connections.get(receipt.sender)
                if sender is not None:
                    actions += self._fail(
                        sender, "message", receipt.request_id, receipt.channel_id, error
                    )
                    self._unhold(sender, receipt.channel_id, receipt.size, actions)
            else:
                assert type(receipt) is RemoteReceipt
                refusals.setdefault(receipt.node_id, []).append((receipt.seq, error))
        for node_id, refused in refusals.items():
            actions.append(Publish(node_id, Confirm([], refused)))
        return actions

    # --- close --------------------------------------------------------------------------

    def close(
        self, connection_id: ConnectionId, request: Close, *, elsewhere: bool = False
    ) -> list[Action]:
        """A close; ``elsewhere`` as for ``message``."""
        conn = self.connections[connection_id]
        channel_id = ChannelId(request.channelId)
        if conn.role is None:
            return self._fail_on_channel(conn, "close", request.id, channel_id, NOT_REGISTERED, [])
        channel = self.channels.get(channel_id)
        if channel is None:
            error = NOT_AUTHORIZED if elsewhere else CHANNEL_NOT_FOUND
            return self._fail_on_channel(conn, "close", request.id, channel_id, error, [])
        if channel.peer_of(connection_id) is None:
            return self._fail_on_channel(conn, "close", request.id, channel_id, NOT_AUTHORIZED, [])
        if self._closing and channel_id in self._closing:
            return self._fail_on_channel(
                conn, "close", request.id, channel_id, CHANNEL_NOT_FOUND, []
            )
        peer = channel.peer_of(connection_id)
        assert peer is not None
        peer_id, peer_node = peer
        if peer_node != self.node_id and peer_id != connection_id:
            # Confirmed once the other end's node applied it (``CloseResult``); meanwhile the
            # channel stays known here so that the other end's earlier messages still arrive.
            self._seq += 1
            deadline = self.clock() + self.request_timeout
            self._closes[self._seq] = _PendingClose(connection_id, request.id, channel, deadline)
            self._closing[channel_id] = self._seq
            # Its reply's place among the frames about the channel: later ones wait behind it.
            self._held_entry(conn, channel_id, _Held(request.id))
            return [Publish(peer_node, CloseRequest(self._seq, self.node_id, channel_id, peer_id))]
        actions: list[Action] = []
        self._drop_channel(channel)
        self._notify_other_end(channel, connection_id, actions)
        self._channel_closed(conn, request.id, channel_id, actions)
        actions.append(ForgetChannel(channel))
        return actions

    def _channel_closed(
        self, conn: LocalConnection, request_id: int, channel_id: ChannelId, actions: list[Action]
    ) -> None:
        def build(frame_id: int) -> bytes:
            return encode(ChannelClosed(id=frame_id, replyTo=request_id, channelId=channel_id))

        self._on_channel(conn, channel_id, build, actions)

    def _on_close_request(self, envelope: CloseRequest, actions: list[Action]) -> None:
        channel_id, recipient = envelope.channel_id, envelope.recipient
        channel = self.channels.get(channel_id)
        if channel is None or channel.peer_of(recipient) is None:
            # Already closed here (this end closed it, or left): that came first.
            actions.append(Publish(envelope.sender_node, CloseResult(envelope.seq, False)))
            return
        own_seq = self._closing.get(channel_id)
        if own_seq is not None:
            # Both ends closed at once. Both nodes pick the same winner, the opener's close,
            # which is what one node would have done had the opener's request come first.
            if recipient == channel.opener:
                actions.append(Publish(envelope.sender_node, CloseResult(envelope.seq, False)))
                return
            # This end loses: its own close's answer (not applied) tells it of the closure,
            # then fails, in the place of its close among its frames about the channel.
            del self._closing[channel_id]
            self._drop_channel(channel)
        else:
            self._drop_channel(channel)
            conn = self.connections.get(recipient)
            if conn is not None:
                self._closed_notification(conn, channel_id, actions)
        actions.append(Publish(envelope.sender_node, CloseResult(envelope.seq, True)))

    def _on_close_result(self, seq: int, applied: bool, actions: list[Action]) -> None:
        pending = self._closes.pop(seq, None)
        if pending is not None:
            self._settle_close(seq, pending, applied, actions)

    def _settle_close(
        self, seq: int, pending: _PendingClose, applied: bool, actions: list[Action]
    ) -> None:
        channel = pending.channel
        if self._closing.get(channel.channel_id) == seq:
            del self._closing[channel.channel_id]
        self._drop_channel(channel)
        actions.append(ForgetChannel(channel))
        conn = self.connections.get(pending.closer)
        if conn is None:
            return
        channel_id, request_id = channel.channel_id, pending.request_id
        if applied:

            def closed(frame_id: int) -> bytes:
                return encode(ChannelClosed(id=frame_id, replyTo=request_id, channelId=channel_id))

            self._fill(conn, channel_id, request_id, [closed], actions)
            return
        # The other end closed it first: as on one node, this end hears of it, then fails.
        frames: list[FrameBuilder] = [partial(_notification_frame, channel_id)]
        frames.append(
            partial(
                self._failure_frame,
                conn=conn,
                request_type="close",
                reply_to=request_id,
                subject=channel_id,
                error=CHANNEL_NOT_FOUND,
            )
        )
        self._fill(conn, channel_id, request_id, frames, actions)

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
            self._closed_notification(conn, channel.channel_id, actions)

    def _closed_notification(
        self, conn: LocalConnection, channel_id: ChannelId, actions: list[Action]
    ) -> None:
        self._on_channel(conn, channel_id, partial(_notification_frame, channel_id), actions)

    # --- the bus ------------------------------------------------------------------------

    def on_bus(self, envelopes: Iterable[Envelope]) -> list[Action]:
        """A batch from another node, handled in order."""
        actions: list[Action] = []
        # Refusals are batched per sending node: one envelope per node per batch (what is
        # written is confirmed once the kernel took it, see ``written``).
        refusals: dict[NodeId, list[tuple[int, str]]] = {}
        for envelope in envelopes:
            if self._moved and self._forward(envelope, actions):
                continue
            # The hot path (every cross-node message): a delivery and a confirmation are told
            # by their exact type, before the match, whose class patterns cost several times
            # as much on Python 3.11.
            if type(envelope) is Deliver:
                self._on_deliver(envelope, actions, refusals)
                continue
            if type(envelope) is Confirm:
                self._on_confirm(envelope.written, envelope.refused, actions)
                if envelope.held:
                    self._on_held(envelope.held, actions)
                continue
            match envelope:
                case Incoming(seq=seq, channel=channel):
                    self._on_incoming(seq, channel, actions)
                case OpenResult(seq=seq, error=error):
                    self._on_open_result(seq, error, actions)
                case Closed(channel_id=channel_id, recipient=recipient):
                    self._on_closed(channel_id, recipient, actions)
                case CloseRequest():
                    self._on_close_request(envelope, actions)
                case CloseResult(seq=seq, applied=applied):
                    self._on_close_result(seq, applied, actions)
                case Take():
                    self._on_take(envelope, actions)
                case Handover():
                    self._on_handover(envelope, actions)
                case Moved():
                    self._on_moved(envelope)
                case Acked() | Resync():
                    self._tell(envelope, actions)
        for node_id, refused in refusals.items():
            actions.append(Publish(node_id, Confirm([], refused)))
        return actions

    def _on_deliver(
        self,
        envelope: Deliver,
        actions: list[Action],
        refusals: dict[NodeId, list[tuple[int, str]]],
    ) -> None:
        # A node's deliveries to this node carry increasing seqs in publish order. One that
        # arrives behind a newer one is from a publish its sender saw fail (a Redis that
        # stalled, then ran its buffered commands): its sender already answered it (delivery
        # not confirmed in time), and delivering it now would break the channel's order.
        error: str
        if envelope.seq <= self._last_delivery.get(envelope.sender_node, 0):
            error = LATE_DELIVERY
        else:
            self._last_delivery[envelope.sender_node] = envelope.seq
            channel = self.channels.get(envelope.channel_id)
            recipient = self.connections.get(envelope.recipient)
            if channel is None or channel.peer_of(envelope.recipient) is None:
                error = CHANNEL_NOT_FOUND
            elif recipient is None:
                error = RECIPIENT_GONE
            else:
                frame = encode(
                    ChannelMessage(
                        id=self._next_id(recipient),
                        channelId=envelope.channel_id,
                        seq=envelope.message_seq,
                        payload=envelope.payload,
                    )
                )
                # Confirmed to the sending node once the recipient's socket took it.
                receipt = RemoteReceipt(envelope.sender_node, envelope.seq)
                actions.append(Send(recipient.connection_id, frame, receipt))
                self.stats.messages_cross_node_in += 1
                return
        refused = refusals.get(envelope.sender_node)
        if refused is None:
            refusals[envelope.sender_node] = [(envelope.seq, error)]
        else:
            refused.append((envelope.seq, error))

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

    def _on_held(self, held: list[int], actions: list[Action]) -> None:
        for seq in held:
            pending = self._deliveries.pop(seq, None)
            if pending is not None:
                self._settle(pending, None, actions, held=True)

    def _settle(
        self,
        pending: _PendingDelivery,
        error: str | None,
        actions: list[Action],
        *,
        held: bool = False,
    ) -> None:
        conn = self.connections.get(pending.sender)
        if conn is None:
            return
        if error is None:
            self.stats.confirmations_sent += 1
            frame = encode(
                ChannelMessageSent(
                    id=self._next_id(conn),
                    replyTo=pending.request_id,
                    channelId=pending.channel_id,
                    held=held,
                )
            )
            actions.append(Send(conn.connection_id, frame))
            if pending.acked_seq is not None and not held:
                self._tell(
                    Acked(pending.channel_id, conn.connection_id, pending.acked_seq), actions
                )
        else:
            actions += self._fail(conn, "message", pending.request_id, pending.channel_id, error)
        self._unhold(conn, pending.channel_id, pending.size, actions)

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
        if self._closing.pop(channel_id, None) is not None:
            # The other end left while this end's close was on its way: that came first, and
            # the close's answer (not applied) tells this end so.
            return
        conn = self.connections.get(recipient)
        if conn is not None:
            self._closed_notification(conn, channel_id, actions)

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
                case CloseRequest(seq=seq):
                    # The other end's node is gone: the channel is closed here, and the shell
                    # keeps telling that node (as for ``Closed``) in case it comes back.
                    self._on_close_result(seq, True, actions)
                case Take(connection_id=session_id):
                    # The node that held the session is gone: what the registry knows will do.
                    resuming = self._resuming.get(session_id)
                    if resuming is not None:
                        actions.append(LoadSession(session_id, resuming.claim.previous_node))
                case (
                    Closed()
                    | Confirm()
                    | OpenResult()
                    | CloseResult()
                    | Handover()
                    | Moved()
                    | Acked()
                    | Resync()
                ):
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
        orphan_deadline = self.clock() + (self.resume.orphan_timeout if self.resume else 0.0)
        for channel in lost:
            if self.resume is not None and all(
                channel.resumes(end) for end, end_node in channel.ends() if end_node == node_id
            ):
                # Its end there is a session: the reaper adopts it (or its client resumes), and
                # its new node says so (``Moved``). It waits for that instead of closing.
                self._orphans[channel.channel_id] = orphan_deadline
                continue
            own_seq = self._closing.get(channel.channel_id)
            if own_seq is not None:
                # This end's close stands: the other end's node is gone.
                self._on_close_result(own_seq, True, actions)
                continue
            self._drop_channel(channel)
            for end, end_node in channel.ends():
                if end_node == self.node_id:
                    conn = self.connections.get(end)
                    if conn is not None:
                        self._closed_notification(conn, channel.channel_id, actions)
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
        for seq, pending_close in list(self._closes.items()):
            if node_id in (pending_close.channel.opener_node, pending_close.channel.target_node):
                self._on_close_result(seq, True, actions)
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
        for seq, pending_close in list(self._closes.items()):
            if pending_close.deadline > now:
                break
            # The close stands here; the other end's node is told again by a plain notice
            # (idempotent there) in case the request was lost.
            del self._closes[seq]
            channel = pending_close.channel
            peer = channel.peer_of(pending_close.closer)
            assert peer is not None
            actions.append(Publish(peer[1], Closed(channel.channel_id, peer[0])))
            self._settle_close(seq, pending_close, True, actions)
        if self.resume is not None:
            self._expire_sessions(now, actions)
        return actions

    def records(self) -> tuple[list[ConnectionRecord], list[ChannelRecord]]:
        """Everything of this node that belongs in the registry (to restore it)."""
        connections = [
            ConnectionRecord(conn.connection_id, self.node_id, conn.role, _session_key(conn))
            for conn in self.connections.values()
            if conn.role is not None
        ]
        return connections, list(self.channels.values())

    def pending_channel_ids(self) -> set[ChannelId]:
        """Channels written to the registry whose opening awaits the target's node."""
        return {pending.channel.channel_id for pending in self._opens.values()}

    def remote_nodes(self) -> set[NodeId]:
        """Nodes that hold the other end of one of this node's channels."""
        nodes = {c.opener_node for c in self.channels.values()}
        nodes.update(c.target_node for c in self.channels.values())
        nodes.discard(self.node_id)
        return nodes

    # --- session resume (issue 14) ------------------------------------------------------
    #
    # A resumable session lives on one node at a time (its holder). Its socket may go and come
    # back (``client_gone`` then a resume), on this node or another: the holder keeps the
    # frames its client has not acknowledged (the shell writes them to its ``SessionLog``, see
    # ``KeepFrames``), holds new ones while it is detached, and hands all of it to the node
    # that claimed the session in the registry (``Take`` -> ``Handover``). Peers are told only
    # where the session's end of each channel went (``Moved``), never that it was away.

    def client_gone(self, connection_id: ConnectionId, *, said_bye: bool = False) -> list[Action]:
        """The client's socket is going or gone: a resumable session waits for its client
        (detached); any other connection ends (``disconnect``), and so does a session whose
        client closed with 1000 (``said_bye``: it ended the session on purpose)."""
        conn = self.connections.get(connection_id)
        if conn is None:
            return []
        session = conn.session
        if session is None or conn.role is None or said_bye:
            if session is not None:
                self._forget_session(conn)
            return self.disconnect(connection_id)
        if session.detached_at is not None:
            return []
        return self._detach(conn, session)

    def _detach(self, conn: LocalConnection, session: Session) -> list[Action]:
        session.detached_at = self.clock()
        self._detached[conn.connection_id] = session.detached_at + session.window
        assert conn.role is not None
        record = ConnectionRecord(conn.connection_id, self.node_id, conn.role, _session_key(conn))
        return [MarkDetached(record, int(self.wall_clock() * 1000))]

    def unwritten_to(
        self, recipient: ConnectionId, receipts: Iterable[Receipt], *, handed: bool
    ) -> list[Action]:
        """``unwritten`` for frames to ``recipient``, whose socket ended: a session keeps them
        (they were written to its log), so their senders hear they are held."""
        conn = self.connections.get(recipient)
        if (conn is not None and conn.session is not None) or recipient in self._moved:
            return self.written(receipts, held=True)
        return self.unwritten(receipts, handed=handed)

    def hold(
        self, connection_id: ConnectionId, frame: bytes, receipt: Receipt | None
    ) -> list[Action]:
        """A frame for a client with no socket here: kept if it is a detached session."""
        conn = self.connections.get(connection_id)
        session = conn.session if conn is not None else None
        if session is None:
            return [] if receipt is None else self.unwritten([receipt], handed=False)
        actions = [] if receipt is None else self.written([receipt], held=True)
        if not session.log.append(frame):
            actions += self.session_overflow(connection_id)
        return actions

    def session_overflow(self, connection_id: ConnectionId) -> list[Action]:
        """A session's kept frames passed a bound: it ends, as a slow consumer does."""
        conn = self.connections.get(connection_id)
        if conn is None or conn.session is None:
            return []
        self.stats.slow_consumers += 1
        self.stats.sessions_overflowed += 1
        detached = conn.session.detached_at is not None
        self._forget_session(conn)
        if detached:
            return self.disconnect(connection_id)
        # Closing its socket ends it (``client_gone``: no session any more).
        return [CloseClient(connection_id, CLOSE_POLICY_VIOLATION, "slow consumer")]

    def _forget_session(self, conn: LocalConnection) -> None:
        conn.session = None
        self._detached.pop(conn.connection_id, None)
        self._ending.discard(conn.connection_id)
        self._handing.pop(conn.connection_id, None)

    def ack(self, connection_id: ConnectionId, request: Ack) -> list[Action]:
        """The client processed every frame up to ``lastId`` (no reply)."""
        conn = self.connections[connection_id]
        if conn.session is None:
            return []
        conn.session.log.ack(min(request.lastId, conn.next_id - 1))
        return self._acked(conn, request.channels)

    def _acked(self, conn: LocalConnection, processed: dict[str, int] | None) -> list[Action]:
        """Tell the senders up to which ``seq`` the client processed their messages (its own
        count: it drops a message that came after a gap, which its frame ack would cover)."""
        actions: list[Action] = []
        for channel_key, seq in (processed or {}).items():
            channel_id = ChannelId(channel_key)
            channel = self.channels.get(channel_id)
            peer = channel.peer_of(conn.connection_id) if channel is not None else None
            if peer is None:
                continue
            peer_id, peer_node = peer
            self._to_peer(peer_node, Acked(channel_id, peer_id, seq), actions)
        return actions

    def _to_peer(self, node_id: NodeId, notice: Acked | Resync, actions: list[Action]) -> None:
        """A notice for the other end of a channel: told here, or sent to its node."""
        if node_id == self.node_id:
            self._tell(notice, actions)
        else:
            actions.append(Publish(node_id, notice))

    def _tell(self, notice: Acked | Resync, actions: list[Action]) -> None:
        """``channel_acked`` / ``channel_resync`` to a local end of the channel."""
        conn = self.connections.get(notice.recipient)
        if conn is None or notice.channel_id not in conn.channels:
            return
        frame_id = self._next_id(conn)
        frame: ChannelAcked | ChannelResync
        match notice:
            case Acked(channel_id=channel_id, seq=seq):
                frame = ChannelAcked(id=frame_id, channelId=channel_id, seq=seq)
            case Resync(channel_id=channel_id, last_seq=last_seq):
                frame = ChannelResync(id=frame_id, channelId=channel_id, lastSeq=last_seq)
        actions.append(Send(notice.recipient, encode(frame)))

    def begin_resume(
        self,
        connection_id: ConnectionId,
        request: Resume,
        token: Identity | TokenRefusal | None = None,
    ) -> list[Action] | ResumePlan:
        """Refuse the request, or return the claim the shell must make in the registry."""
        conn = self.connections[connection_id]
        error: str | None = None
        if conn.role is not None or conn.registering:
            error = ALREADY_REGISTERED
        elif self.resume is None:
            error = RESUME_DISABLED
        elif self.auth is not None:
            error = self._authorize_resume(conn, token)
        if error is not None:
            return self._fail(conn, "resume", request.id, "", error)
        assert self.resume is not None
        conn.registering = True
        new_token, new_hash = self.resume.new_token()
        return ResumePlan(
            ConnectionId(request.connectionId), token_hash(request.resumeToken), new_token, new_hash
        )

    def _authorize_resume(
        self, conn: LocalConnection, token: Identity | TokenRefusal | None
    ) -> str | None:
        if isinstance(token, TokenRefusal):
            self.stats.token_refusals[token.reason] += 1
            return token.error
        identity = token if token is not None else conn.identity
        if identity is None:
            return AUTH_REQUIRED
        if conn.identity is not identity:
            self._set_identity(conn, identity)
        return None

    def claimed(
        self,
        connection_id: ConnectionId,
        request: Resume,
        plan: ResumePlan,
        claim: SessionClaim | ClaimRefusal | None,
    ) -> list[Action]:
        """The registry's answer to a resume's claim (None: it could not be asked)."""
        conn = self.connections.get(connection_id)
        if not isinstance(claim, SessionClaim):
            if conn is None:
                return []
            conn.registering = False
            self.stats.resumes_refused += 1
            error = (
                REGISTRY_UNAVAILABLE
                if claim is None
                else RESUME_EXPIRED
                if claim is ClaimRefusal.EXPIRED
                else RESUME_TOKEN_INVALID
            )
            return self._fail(conn, "resume", request.id, "", error)
        # Ours now in the registry, whatever happens to the new socket: it is taken over
        # (detached, if the socket went meanwhile).
        deadline = self.clock() + 2 * self.request_timeout
        pending = _PendingResume(connection_id, request, plan, claim, deadline)
        held = self.connections.get(plan.session_id)
        if claim.previous_node == self.node_id and held is not None and held.session is not None:
            return self._resume_here(pending, held, held.session)
        self._resuming[plan.session_id] = pending
        if claim.previous_node == self.node_id:
            # The registry says this node holds it, but it does not (it restarted, or ended
            # the session in the same instant): take what the registry knows.
            return [LoadSession(plan.session_id, claim.previous_node)]
        take = Take(plan.session_id, claim.epoch, self.node_id, request.lastId)
        return [Publish(claim.previous_node, take)]

    def _resume_here(
        self, pending: _PendingResume, conn: LocalConnection, session: Session
    ) -> list[Action]:
        """The session is held here: its new socket takes the old one's place."""
        actions: list[Action] = []
        self._detached.pop(conn.connection_id, None)
        self._ending.discard(conn.connection_id)
        session.token_hash = pending.plan.new_token_hash
        session.epoch = pending.claim.epoch
        self._attach(pending, conn, session, actions)
        return actions

    def _attach(
        self,
        pending: _PendingResume,
        conn: LocalConnection,
        session: Session,
        actions: list[Action],
    ) -> None:
        """Bind the resume's socket to the session, replay what its client has not
        processed, and answer ``resumed`` (or, if the socket left, keep it detached)."""
        session_id, request = conn.connection_id, pending.request
        socket = self.connections.get(pending.socket_id)
        if socket is None:
            if session.detached_at is None:
                actions += self._detach(conn, session)
            return
        del self.connections[pending.socket_id]
        actions.append(
            Rebind(pending.socket_id, session_id, CLOSE_RESUME_ELSEWHERE, RESUMED_ELSEWHERE)
        )
        if socket.identity is not None:
            self._set_identity(conn, socket.identity)
            if conn.role is not None:
                conn.grants = grants_for(self._policy(), socket.identity, conn.role)
        conn.legacy_errors = socket.legacy_errors
        session.detached_at = None
        log = session.log
        complete = not session.lost
        if session.lost:
            # The frames kept here were numbered by a node that did not know the client's
            # ids: number them after what it processed.
            conn.next_id = log.renumber(max(conn.next_id, request.lastId + 1, log.acked_id + 1))
            session.lost = False
        else:
            log.ack(request.lastId)
            actions += self._acked(conn, request.channels)
        actions.append(KeepFrames(session_id, log))
        actions.append(Replay(session_id, tuple(log.after(request.lastId))))
        channels = None
        if not complete:
            channels = [
                ResumedChannel(channel_id, peer[0])
                for channel_id in sorted(conn.channels)
                if (record := self.channels.get(channel_id)) is not None
                and (peer := record.peer_of(session_id)) is not None
            ]
            seen = request.channels or {}
            for channel_id in sorted(conn.channels):
                self._resync(conn, ChannelId(channel_id), seen.get(channel_id, 0), actions)
        frame = Resumed(
            id=self._next_id(conn),
            replyTo=request.id,
            connectionId=session_id,
            resumeToken=pending.plan.new_token,
            resumeWindow=session.window,
            complete=complete,
            lastRequestId=log.last_request_id if complete else None,
            channels=channels,
            expiresIn=self._expires_in(conn),
        )
        actions.append(Send(session_id, encode(frame)))
        if conn.flow_paused:
            actions.append(PauseReading(session_id))
        self.stats.resumes += 1

    def _resync(
        self, conn: LocalConnection, channel_id: ChannelId, last_seq: int, actions: list[Action]
    ) -> None:
        """Ask the peer to send again what the session may have missed on the channel."""
        peer = self.channels[channel_id].peer_of(conn.connection_id)
        assert peer is not None  # the session is an end of each of its channels
        peer_id, peer_node = peer
        self._to_peer(peer_node, Resync(channel_id, peer_id, last_seq), actions)

    def _on_take(self, take: Take, actions: list[Action]) -> None:
        """A resume on another node claimed a session: hand it over once its work in flight
        here (messages awaiting confirmation, opens, closes) has settled."""
        conn = self.connections.get(take.connection_id)
        session = conn.session if conn is not None else None
        if conn is None or session is None:
            actions.append(Publish(take.node, Handover(take.connection_id, take.epoch, False)))
            return
        if session.detached_at is None:
            actions.append(
                CloseClient(take.connection_id, CLOSE_RESUME_ELSEWHERE, RESUMED_ELSEWHERE)
            )
            session.detached_at = self.clock()
        self._detached.pop(take.connection_id, None)
        self._ending.discard(take.connection_id)
        self._handing[take.connection_id] = (take, self.clock() + self.request_timeout)
        self._hand_over_if_settled(conn, self.clock(), actions)

    def _hand_over_if_settled(
        self,
        conn: LocalConnection,
        now: float,
        actions: list[Action],
        *,
        detached_at_ms: int | None = None,
    ) -> None:
        take, deadline = self._handing[conn.connection_id]
        cid = conn.connection_id
        busy = (
            conn.unconfirmed
            or conn.registering
            or any(pending.opener == cid for pending in self._opens.values())
            or any(pending.closer == cid for pending in self._closes.values())
        )
        if busy and now < deadline:
            return
        del self._handing[cid]
        session = conn.session
        assert session is not None and conn.role is not None
        session.log.ack(take.last_id)
        moved: list[ChannelRecord] = []
        # (Every channel of a connection is in the table: closing drops it from both.)
        for channel_id in conn.channels:
            record = self.channels.pop(channel_id).moved(cid, take.node)
            moved.append(record)
            peer_id, peer_node = record.peer_of(cid) or (cid, take.node)
            if peer_node == self.node_id and peer_id != cid:
                self.channels[channel_id] = record  # its other end stays here
        del self.connections[cid]
        self._moved[cid] = (take.node, self.clock() + session.window)
        self.stats.sessions_handed_over += 1
        identity = conn.identity
        handover = Handover(
            cid,
            take.epoch,
            True,
            role=conn.role,
            legacy_errors=conn.legacy_errors,
            next_id=conn.next_id,
            frames=[msgspec.Raw(frame) for frame in session.log.after(take.last_id)],
            channels=moved,
            last_request_id=session.log.last_request_id,
            lost=session.lost,
            subject=identity.subject if identity is not None else None,
            detached_at_ms=detached_at_ms,
            window=session.window,
            token_hash=session.token_hash,
        )
        actions.append(Publish(take.node, handover))

    def _forward(self, envelope: Envelope, actions: list[Action]) -> bool:
        """Forward what comes for a session handed over to another node; True if it did."""
        match envelope:
            case (
                Deliver(recipient=target)
                | Closed(recipient=target)
                | CloseRequest(recipient=target)
                | Acked(recipient=target)
                | Resync(recipient=target)
            ):
                pass
            case Incoming(channel=channel):
                target = channel.target
            case _:
                return False
        moved = self._moved.get(target)
        if moved is None or target in self.connections:
            return False
        actions.append(Publish(moved[0], envelope))
        return True

    def _on_handover(self, state: Handover, actions: list[Action]) -> None:
        session_id = state.connection_id
        pending = self._resuming.pop(session_id, None)
        if pending is None:
            if state.found and state.detached_at_ms is not None:
                self._install(state, None, actions)  # a draining node's hand-off
            return
        if not state.found:
            self._resuming[session_id] = pending
            actions.append(LoadSession(session_id, pending.claim.previous_node))
            return
        self._install(state, pending, actions, previous=pending.claim.previous_node)

    def install_lost(
        self, session_id: ConnectionId, channels: list[ChannelRecord] | None
    ) -> list[Action]:
        """``LoadSession``'s answer: the session's channels per the registry (None: it could
        not be asked). The session resumes with no frames kept ("not complete")."""
        pending = self._resuming.pop(session_id, None)
        if pending is None or session_id in self.connections:
            return []
        claim = pending.claim
        if channels is None:
            actions: list[Action] = []
            socket = self.connections.get(pending.socket_id)
            if socket is not None:
                socket.registering = False
                actions += self._fail(
                    socket, "resume", pending.request.id, "", REGISTRY_UNAVAILABLE
                )
            record = ConnectionRecord(session_id, self.node_id, claim.role)
            actions.append(ForgetConnection(record))
            return actions
        state = Handover(
            session_id,
            claim.epoch,
            True,
            role=claim.role,
            next_id=pending.request.lastId + 1,
            channels=[c for c in channels if c.peer_of(session_id) is not None],
            last_request_id=None,
            lost=True,
            window=claim.window,
            token_hash=pending.plan.new_token_hash,
        )
        actions = []
        self._install(state, pending, actions, previous=claim.previous_node)
        return actions

    def _install(
        self,
        state: Handover,
        pending: _PendingResume | None,
        actions: list[Action],
        *,
        previous: NodeId | None = None,
        registry_moved: bool = False,
    ) -> None:
        """Take over a session handed over (or adopted): it is held here from now on."""
        assert self.resume is not None
        session_id = state.connection_id
        conn = LocalConnection(
            session_id, state.legacy_errors, role=state.role, next_id=state.next_id
        )
        log = self.resume.new_log()
        for frame in state.frames:
            log.append(bytes(frame))
        if state.last_request_id is not None:
            log.last_request_id = state.last_request_id
        token = pending.plan.new_token_hash if pending is not None else state.token_hash
        session = Session(session_id, token, state.window, log, lost=state.lost)
        if pending is not None:
            session.epoch = pending.claim.epoch
        conn.session = session
        moved: list[ChannelRecord] = []
        for record in state.channels:
            if record.peer_of(session_id) is None:
                continue
            record = record.moved(session_id, self.node_id)
            moved.append(record)
            self.channels[record.channel_id] = record
            self._orphans.pop(record.channel_id, None)
            conn.channels.add(record.channel_id)
            _, peer_node = record.peer_of(session_id) or (session_id, self.node_id)
            if peer_node != self.node_id:
                actions.append(
                    Publish(peer_node, Moved(record.channel_id, session_id, self.node_id))
                )
        self.connections[session_id] = conn
        self._moved.pop(session_id, None)
        if moved and not registry_moved and previous is not None:
            actions.append(MoveChannels(tuple(moved), previous))
        if pending is None:
            session.detached_at = self.clock()
            if state.detached_at_ms is not None:
                away = max(0.0, self.wall_clock() - state.detached_at_ms / 1000)
                session.detached_at -= away
            self._detached[session_id] = session.detached_at + session.window
            return
        self._attach(pending, conn, session, actions)

    def _on_moved(self, moved: Moved) -> None:
        record = self.channels.get(moved.channel_id)
        if record is None or record.peer_of(moved.connection_id) is None:
            return
        self.channels[moved.channel_id] = record.moved(moved.connection_id, moved.node)
        self._orphans.pop(moved.channel_id, None)

    def adopt(self, reaped: Reaped, lost_node: NodeId) -> list[Action]:
        """This node reaped ``lost_node`` and adopted its sessions (``reap_adopting``): hold
        them, detached, with whatever frames they had lost, until their clients resume."""
        actions: list[Action] = []
        if self.resume is None:
            return actions
        for adopted in reaped.adopted:
            record = adopted.record
            session_id = record.connection_id
            if session_id in self.connections or record.session is None:
                continue
            channels = [c for c in reaped.moved if c.peer_of(session_id) is not None]
            state = Handover(
                session_id,
                adopted.epoch,
                True,
                role=record.role,
                channels=channels,
                last_request_id=None,
                lost=True,
                detached_at_ms=adopted.detached_at_ms,
                window=record.session.window,
                token_hash=record.session.token_hash,
            )
            self._install(state, None, actions, previous=lost_node, registry_moved=True)
            self.stats.sessions_adopted += 1
        return actions

    def session_ended(self, connection_id: ConnectionId, ended: bool) -> list[Action]:
        """``EndSession``'s answer: ``ended`` (its window passed here): it ends as a
        disconnect does; else a resume elsewhere claimed it first, and its ``Take`` comes."""
        self._ending.discard(connection_id)
        conn = self.connections.get(connection_id)
        if conn is None or conn.session is None or conn.session.detached_at is None:
            return []
        if not ended:
            if connection_id in self._disowned:
                # Still not ours, and no Take came: the claimer died and its reaper adopted
                # the session from the registry. Its new holder has it; drop it quietly.
                self._disowned.discard(connection_id)
                self._drop_quietly(conn)
                return []
            # Kept until the Take comes (the registry gave it to a resume elsewhere).
            self._disowned.add(connection_id)
            self._detached[connection_id] = self.clock() + 2 * self.request_timeout
            return []
        self.stats.sessions_expired += 1
        self._forget_session(conn)
        return self.disconnect(connection_id)

    def _drop_quietly(self, conn: LocalConnection) -> None:
        """Forget a session another node holds now: no notice, no registry change."""
        self._forget_session(conn)
        del self.connections[conn.connection_id]
        for channel_id in conn.channels:
            peer = self.channels[channel_id].peer_of(conn.connection_id)
            if peer is None or peer[1] != self.node_id:
                del self.channels[channel_id]

    def session_retry(self, connection_id: ConnectionId) -> list[Action]:
        """``EndSession`` could not reach the registry: the next expiry check tries again."""
        self._ending.discard(connection_id)
        return []

    def _expire_sessions(self, now: float, actions: list[Action]) -> None:
        for session_id in list(self._handing):
            conn = self.connections.get(session_id)
            if conn is None:
                del self._handing[session_id]
            else:
                self._hand_over_if_settled(conn, now, actions)
        for session_id, deadline in list(self._detached.items()):
            if deadline > now or session_id in self._ending:
                continue
            conn = self.connections.get(session_id)
            if conn is None or conn.session is None or conn.role is None:
                del self._detached[session_id]
                continue
            self._ending.add(session_id)
            record = ConnectionRecord(session_id, self.node_id, conn.role, _session_key(conn))
            actions.append(EndSession(record))
        for session_id, pending in list(self._resuming.items()):
            if pending.deadline <= now:
                pending.deadline = now + self.request_timeout
                actions.append(LoadSession(session_id, pending.claim.previous_node))
        for session_id, (_, until) in list(self._moved.items()):
            if until <= now:
                del self._moved[session_id]
        for channel_id, deadline in list(self._orphans.items()):
            if deadline <= now:
                del self._orphans[channel_id]
                channel = self.channels.get(channel_id)
                if channel is not None:
                    self._close_orphan(channel, actions)

    def _close_orphan(self, channel: ChannelRecord, actions: list[Action]) -> None:
        """Nobody said where a lost node's session end went: close as for a lost node."""
        self._drop_channel(channel)
        for end, end_node in channel.ends():
            if end_node == self.node_id:
                conn = self.connections.get(end)
                if conn is not None:
                    self._closed_notification(conn, channel.channel_id, actions)
        actions.append(ForgetChannel(channel))

    def drain_sessions(self) -> list[Action]:
        """A drain: every attached session's client is told to resume on another node (its
        socket closes with 4100), and the session waits here, detached, to be handed over."""
        actions: list[Action] = []
        for conn in list(self.connections.values()):
            session = conn.session
            if session is not None and conn.role is not None and session.detached_at is None:
                actions.append(
                    CloseClient(
                        conn.connection_id,
                        CLOSE_RESUME_ELSEWHERE,
                        "Node draining: resume on another node",
                    )
                )
                actions += self._detach(conn, session)
        return actions

    def detached_sessions(self) -> list[ConnectionId]:
        """Sessions held here with no socket (what a drain still has to hand off)."""
        return [
            cid
            for cid, conn in self.connections.items()
            if conn.session is not None and conn.session.detached_at is not None
        ]

    def hand_off(self, session_id: ConnectionId, node_id: NodeId) -> list[Action]:
        """A draining node gives a detached session (already transferred to ``node_id`` in the
        registry) to that node, which holds it until its client resumes."""
        conn = self.connections.get(session_id)
        session = conn.session if conn is not None else None
        if conn is None or session is None or session.detached_at is None:
            return []
        take = Take(session_id, session.epoch, node_id, session.log.acked_id)
        # Whatever is still in flight for it is settled by now (the drain answered it all).
        self._handing[session_id] = (take, self.clock())
        away = self.clock() - session.detached_at
        actions: list[Action] = []
        self._hand_over_if_settled(
            conn, self.clock(), actions, detached_at_ms=int((self.wall_clock() - away) * 1000)
        )
        return actions

    # --- authentication (issue 13) ------------------------------------------------------

    def authenticated(
        self, connection_id: ConnectionId, token: Identity | TokenRefusal
    ) -> list[Action]:
        """The token of the handshake (header or URL): keep it, or close the connection."""
        conn = self.connections.get(connection_id)
        if conn is None or self.auth is None:
            return []
        if isinstance(token, TokenRefusal):
            self.stats.token_refusals[token.reason] += 1
            self.stats.auth_closes["expired" if token.expired else "invalid_token"] += 1
            code = CLOSE_TOKEN_EXPIRED if token.expired else CLOSE_TOKEN_INVALID
            return [CloseClient(connection_id, code, token.error)]
        self._set_identity(conn, token)
        return []

    def refresh(
        self, connection_id: ConnectionId, request: Refresh, token: Identity | TokenRefusal
    ) -> list[Action]:
        """A fresh token for the same subject and role; the connection keeps going."""
        conn = self.connections[connection_id]
        if self.auth is None:
            return self._fail(conn, "refresh", request.id, "", AUTH_DISABLED)
        if conn.role is None or conn.identity is None:
            return self._fail(conn, "refresh", request.id, "", NOT_REGISTERED)
        if isinstance(token, TokenRefusal):
            self.stats.token_refusals[token.reason] += 1
            return self._fail(conn, "refresh", request.id, "", token.error)
        if token.subject != conn.identity.subject:
            return self._fail(conn, "refresh", request.id, "", OTHER_SUBJECT)
        if not may_register(token, conn.role):
            return self._fail(conn, "refresh", request.id, "", ROLE_NOT_ALLOWED)
        self._set_identity(conn, token)
        conn.grants = grants_for(self._policy(), token, conn.role)
        frame = encode(
            Refreshed(id=self._next_id(conn), replyTo=request.id, expiresIn=self._expires_in(conn))
        )
        return [Send(connection_id, frame)]

    def check_tokens(self) -> list[Action]:
        """Close connections that did not authenticate in time, or whose token expired and
        was not refreshed within the grace period (both: "reconnect with a new token").

        Deadlines wait in two heaps, so a check costs the connections that are due, not all of
        them; an entry whose connection left, authenticated or refreshed since is dropped."""
        auth = self.auth
        if auth is None:
            return []
        actions: list[Action] = []
        now = self.clock()
        due = self._auth_due
        while due and due[0][0] <= now:
            _, cid = heapq.heappop(due)
            conn = self.connections.get(cid)
            if conn is not None and conn.identity is None:
                self.stats.auth_closes["timeout"] += 1
                actions.append(CloseClient(cid, CLOSE_TOKEN_EXPIRED, "Not authenticated in time"))
        wall = self.wall_clock()
        expiring = self._expiry_due
        closing: set[ConnectionId] = set()
        while expiring and expiring[0][0] <= wall:
            deadline, cid = heapq.heappop(expiring)
            conn = self.connections.get(cid)
            if conn is None or conn.identity is None or conn.identity.expires_at is None:
                continue
            # Only the entry of the current token counts (a refresh pushed a new one).
            if deadline == conn.identity.expires_at + auth.grace and cid not in closing:
                closing.add(cid)
                self.stats.auth_closes["expired"] += 1
                actions.append(CloseClient(cid, CLOSE_TOKEN_EXPIRED, "Token expired"))
        return actions

    def _set_identity(self, conn: LocalConnection, identity: Identity) -> None:
        conn.identity = identity
        auth = self.auth
        if auth is None or identity.expires_at is None:
            return
        heapq.heappush(self._expiry_due, (identity.expires_at + auth.grace, conn.connection_id))
        # Entries of connections gone or refreshed stay until their (maybe hours away) deadline:
        # past twice the live ones, the heap is rebuilt from the live connections.
        if len(self._expiry_due) > 2 * len(self.connections) + 1024:
            self._expiry_due = [
                (c.identity.expires_at + auth.grace, c.connection_id)
                for c in self.connections.values()
                if c.identity is not None and c.identity.expires_at is not None
            ]
            heapq.heapify(self._expiry_due)

    def revoke(self, is_revoked: Callable[[Identity], bool]) -> list[Action]:
        """Close every local connection whose token ``is_revoked`` (a user or a token was
        revoked cluster-wide): "token invalid, do not retry"."""
        actions: list[Action] = [
            CloseClient(conn.connection_id, CLOSE_TOKEN_INVALID, "Token revoked")
            for conn in self.connections.values()
            if conn.identity is not None and is_revoked(conn.identity)
        ]
        self.stats.auth_closes["revoked"] += len(actions)
        return actions

    def identity_of(self, connection_id: ConnectionId) -> Identity | None:
        conn = self.connections.get(connection_id)
        return conn.identity if conn is not None else None

    def _authorize_register(
        self, conn: LocalConnection, role: str, token: Identity | TokenRefusal | None
    ) -> str | None:
        if isinstance(token, TokenRefusal):
            self.stats.token_refusals[token.reason] += 1
            return token.error
        identity = token if token is not None else conn.identity
        if identity is None:
            return AUTH_REQUIRED
        if not may_register(identity, role):
            return ROLE_NOT_ALLOWED
        if conn.identity is not identity:
            self._set_identity(conn, identity)
        return None

    def _policy(self) -> Policy | None:
        return self.auth.policy if self.auth is not None else None

    def _may_list(self, conn: LocalConnection, role: str) -> bool:
        return conn.grants is not None and may_list(conn.grants, role)

    def _may_open(self, conn: LocalConnection, target: ConnectionRecord) -> bool:
        if conn.grants is None or conn.role is None:
            return False
        return may_open(self._policy(), conn.grants, conn.role, target.role)

    def _expires_in(self, conn: LocalConnection) -> int | None:
        identity = conn.identity
        if identity is None or identity.expires_at is None:
            return None
        return max(0, int(identity.expires_at - self.wall_clock()))

    # --- frames -------------------------------------------------------------------------

    @staticmethod
    def _next_id(conn: LocalConnection) -> int:
        frame_id = conn.next_id
        conn.next_id = frame_id + 1
        return frame_id

    # --- frames about a channel, in the order one node would send them -----------------

    @staticmethod
    def _held_entry(conn: LocalConnection, channel_id: ChannelId, entry: _Held) -> None:
        held = conn.held.get(channel_id)
        if held is None:
            conn.held[channel_id] = deque((entry,))
        else:
            held.append(entry)

    def _on_channel(
        self,
        conn: LocalConnection,
        channel_id: ChannelId,
        build: FrameBuilder,
        actions: list[Action],
    ) -> None:
        """Send a frame about ``channel_id`` behind the replies still owed to ``conn`` for its
        requests on that channel."""
        if channel_id in conn.pending or channel_id in conn.held:
            self._held_entry(conn, channel_id, _Held(None, [build]))
        else:
            actions.append(Send(conn.connection_id, build(self._next_id(conn))))

    def _fill(
        self,
        conn: LocalConnection,
        channel_id: ChannelId,
        request_id: int,
        frames: list[FrameBuilder],
        actions: list[Action],
    ) -> None:
        """The reply to ``request_id``, whose place was kept, is known."""
        for entry in conn.held.get(channel_id, ()):
            if entry.frames is None and entry.request_id == request_id:
                entry.frames = frames
                break
        self._release_held(conn, channel_id, actions)

    def _release_held(
        self, conn: LocalConnection, channel_id: ChannelId, actions: list[Action]
    ) -> None:
        """Send the held frames that no reply owed is ahead of any more."""
        held = conn.held.get(channel_id)
        if held is None or channel_id in conn.pending:
            return
        while held:
            ready = held[0].frames
            if ready is None:
                return
            held.popleft()
            for build in ready:
                actions.append(Send(conn.connection_id, build(self._next_id(conn))))
        del conn.held[channel_id]

    def _fail_on_channel(
        self,
        conn: LocalConnection,
        request_type: str,
        reply_to: int,
        channel_id: ChannelId,
        error: str,
        actions: list[Action],
    ) -> list[Action]:
        build = partial(
            self._failure_frame,
            conn=conn,
            request_type=request_type,
            reply_to=reply_to,
            subject=channel_id,
            error=error,
        )
        self._on_channel(conn, channel_id, build, actions)
        return actions

    def _fail(
        self, conn: LocalConnection, request_type: str, reply_to: int, subject: str, error: str
    ) -> list[Action]:
        return [
            Send(conn.connection_id, self._failure(conn, request_type, reply_to, subject, error))
        ]

    def _failure(
        self, conn: LocalConnection, request_type: str, reply_to: int, subject: str, error: str
    ) -> bytes:
        return self._failure_frame(
            self._next_id(conn), conn, request_type, reply_to, subject, error
        )

    def _failure_frame(
        self,
        frame_id: int,
        conn: LocalConnection,
        request_type: str,
        reply_to: int,
        subject: str,
        error: str,
    ) -> bytes:
        reason = error if error in KNOWN_REASONS else "invalid_request"
        spec = REQUESTS[request_type]
        self.stats.failures[(spec.failure_type, reason)] += 1
        if conn.legacy_errors:
            return encode(Error(id=frame_id, replyTo=reply_to, error=error))
        return encode(spec.failed(frame_id, reply_to, subject, error))

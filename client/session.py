"""The client's protocol state for one connection, without any I/O.

Theory of operation
-------------------
A ``Session`` lives exactly as long as one WebSocket connection. The shell (``client.py``)
asks it for request frames and feeds it every frame it reads; the session answers with plain
values and never touches a socket, a task or a clock:

* **Requests.** ``register``, ``list_by_role``, ``open_channel``, ``send`` and
  ``close_channel`` number the request (1, 2, 3, ... per connection), remember what kind of
  request the id stands for, and return an ``OutgoingRequest`` with the encoded frame. A
  payload that msgspec cannot encode as JSON raises ``InvalidPayload`` here, before anything
  exists to send. Payloads travel as ``msgspec.Raw``: encoded once, never re-parsed.
* **Replies.** ``receive(frame)`` matches a reply to its request by ``replyTo`` and turns it
  into ``RequestSucceeded`` (with a typed value) or ``RequestRejected`` (reply type and error
  text). ``{"type": "error", "replyTo": N}`` (unknown type, compat mode) rejects request N;
  an ``error`` without ``replyTo`` is reported as a ``Violation`` for the shell to log.
  Untyped success replies (``{"replyTo": N, ...}`` without ``type``, as the original npm
  broker sends them) are read by the kind of request N, so the SDK works against it too.
* **Notifications.** ``incoming_channel``, ``channel_message`` and
  ``channel_closed_notification`` are routed by ``channelId`` to the channels this connection
  has: ``ChannelIncoming``, ``ChannelPayload``, ``ChannelEnded``.
* **A peer faster than our reply.** The broker tells the target about a new channel before it
  answers the opener, so the target's first message can arrive before our ``channel_opened``.
  While an ``open`` is pending, notifications for unknown channels are held (bounded) and
  released right after the ``channel_opened`` that names their channel.
* **Abandoned requests.** When a caller stops waiting (timeout, cancellation) the shell calls
  ``abandon``; a late reply is then dropped, except a late ``channel_opened``, which yields
  ``AbandonedChannel`` so that the shell closes a channel nobody holds.
* **The end.** ``connection_lost()`` returns every pending request id and every open channel,
  so that the shell fails the former at once and reports the latter closed.

States (one connection)::

    NEW --register()--> REGISTERING --registered--> READY
                             |--register_failed--> FAILED
    any state --connection_lost()--> ENDED

Only ``READY`` accepts ``list_by_role``/``open_channel``/``send``/``close_channel``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final, assert_never

import msgspec

from client.errors import ChannelClosed, CloseReason, ConnectionLost, InvalidPayload, NotConnected
from shared.codec import decode_broker_message, encode
from shared.ids import ChannelId, ConnectionId
from shared.messages import (
    REQUESTS,
    BrokerMessage,
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
    Refresh,
    Refreshed,
    RefreshFailed,
    Register,
    Registered,
    RegisterFailed,
    RequestKind,
)
from shared.messages import (
    ChannelClosed as ChannelClosedReply,
)

__all__ = [
    "UNEXPECTED_REPLY",
    "AbandonedChannel",
    "ChannelEnded",
    "ChannelIncoming",
    "ChannelPayload",
    "Closed",
    "Event",
    "Listed",
    "Opened",
    "OutgoingRequest",
    "RegisteredAs",
    "RequestKind",
    "RequestRejected",
    "RequestSucceeded",
    "Sent",
    "Session",
    "SessionState",
    "TokenRefreshed",
    "Violation",
    "encode_payload",
]

#: ``reply_type`` of a rejection the session made up: the reply did not fit the request.
UNEXPECTED_REPLY: Final = "unexpected_reply"

#: Notifications held for channels whose ``channel_opened`` has not arrived yet, at most.
DEFAULT_MAX_EARLY: Final = 1024


class SessionState(enum.Enum):
    NEW = "new"
    REGISTERING = "registering"
    READY = "ready"
    FAILED = "failed"
    ENDED = "ended"


# --- values the session returns ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A request to write as one text frame; its reply will name ``request_id``."""

    request_id: int
    kind: RequestKind
    frame: bytes


@dataclass(frozen=True, slots=True)
class RegisteredAs:
    connection_id: ConnectionId
    #: Seconds until the token expires, when the broker requires one.
    expires_in: int | None = None


@dataclass(frozen=True, slots=True)
class TokenRefreshed:
    """The broker took the new token; it expires in ``expires_in`` seconds."""

    expires_in: int | None


@dataclass(frozen=True, slots=True)
class Listed:
    ids: list[ConnectionId]
    #: More ids follow (a node caps its page size): ask again ``after`` the last one.
    more: bool = False


@dataclass(frozen=True, slots=True)
class Opened:
    channel_id: ChannelId
    peer_id: ConnectionId


@dataclass(frozen=True, slots=True)
class Sent:
    channel_id: ChannelId


@dataclass(frozen=True, slots=True)
class Closed:
    channel_id: ChannelId


ReplyValue = RegisteredAs | Listed | Opened | Sent | Closed | TokenRefreshed


@dataclass(frozen=True, slots=True)
class RequestSucceeded:
    request_id: int
    value: ReplyValue


@dataclass(frozen=True, slots=True)
class RequestRejected:
    request_id: int
    kind: RequestKind
    reply_type: str
    error: str


@dataclass(frozen=True, slots=True)
class ChannelIncoming:
    """The peer ``peer_id`` opened ``channel_id`` to us."""

    channel_id: ChannelId
    peer_id: ConnectionId


@dataclass(frozen=True, slots=True)
class ChannelPayload:
    channel_id: ChannelId
    payload: msgspec.Raw


@dataclass(frozen=True, slots=True)
class ChannelEnded:
    """The peer closed the channel (or its connection ended)."""

    channel_id: ChannelId


@dataclass(frozen=True, slots=True)
class AbandonedChannel:
    """A channel was opened for a request nobody waits for any more: close it."""

    channel_id: ChannelId


@dataclass(frozen=True, slots=True)
class Violation:
    """Something to log; ``serious`` is the broker's fault, otherwise an expected race."""

    description: str
    serious: bool = True


Event = (
    RequestSucceeded
    | RequestRejected
    | ChannelIncoming
    | ChannelPayload
    | ChannelEnded
    | AbandonedChannel
    | Violation
)


@dataclass(frozen=True, slots=True)
class Ending:
    """What ``connection_lost`` leaves behind: requests to fail, channels to report closed."""

    failed_requests: list[int]
    closed_channels: list[ChannelId]


# --- helpers ------------------------------------------------------------------------------

_payload_encoder: Final = msgspec.json.Encoder()
_any_decoder: Final = msgspec.json.Decoder()


def encode_payload(payload: object) -> msgspec.Raw:
    """Encode a payload as JSON once; raises ``InvalidPayload`` if it cannot be."""
    if isinstance(payload, msgspec.Raw):
        return payload
    try:
        return msgspec.Raw(_payload_encoder.encode(payload))
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidPayload(f"payload is not JSON-serialisable: {exc}") from exc


class _CompatRegistered(msgspec.Struct):
    connectionId: str


class _CompatConnections(msgspec.Struct):
    ids: list[str]


class _CompatOpened(msgspec.Struct):
    channelId: str


@dataclass(slots=True)
class _Pending:
    kind: RequestKind
    #: The channel (``message``/``close``) or target (``open``) the request is about.
    subject: str = ""
    abandoned: bool = False


def _tag(message: BrokerMessage) -> str:
    tag = type(message).__struct_config__.tag
    return str(tag)


@dataclass(slots=True)
class Session:
    """Protocol state of one connection. See the module docstring."""

    max_early: int = DEFAULT_MAX_EARLY
    state: SessionState = SessionState.NEW
    connection_id: ConnectionId | None = None
    _next_id: int = 1
    _pending: dict[int, _Pending] = field(default_factory=dict)
    #: channel id -> peer connection id, for every channel open on this connection.
    _channels: dict[ChannelId, ConnectionId] = field(default_factory=dict)
    _pending_opens: int = 0
    _early: dict[ChannelId, list[ChannelPayload | ChannelEnded]] = field(default_factory=dict)
    _early_count: int = 0

    # --- requests -------------------------------------------------------------------------

    def register(self, role: str, token: str | None = None) -> OutgoingRequest:
        if self.state is not SessionState.NEW:
            raise RuntimeError(f"register() in state {self.state.value}")
        self.state = SessionState.REGISTERING
        request_id = self._take_id("register")
        frame = encode(Register(id=request_id, role=role, token=token))
        return OutgoingRequest(request_id, "register", frame)

    def refresh(self, token: str) -> OutgoingRequest:
        """A ``refresh`` request carrying a new token for the same user."""
        self._require_ready()
        request_id = self._take_id("refresh")
        return OutgoingRequest(request_id, "refresh", encode(Refresh(id=request_id, token=token)))

    def list_by_role(self, role: str, *, after: str | None = None) -> OutgoingRequest:
        """A ``list_by_role`` request; ``after``: the page after that id (paging)."""
        self._require_ready()
        request_id = self._take_id("list_by_role")
        frame = encode(ListByRole(id=request_id, role=role, after=after))
        return OutgoingRequest(request_id, "list_by_role", frame)

    def open_channel(self, target_id: str) -> OutgoingRequest:
        self._require_ready()
        request_id = self._take_id("open", target_id)
        self._pending_opens += 1
        return OutgoingRequest(request_id, "open", encode(Open(id=request_id, targetId=target_id)))

    def send(self, channel_id: ChannelId, payload: object) -> OutgoingRequest:
        """A ``message`` request; ``InvalidPayload`` or ``ChannelClosed`` before anything else."""
        raw = encode_payload(payload)
        self._require_ready()
        if channel_id not in self._channels:
            raise ChannelClosed(channel_id, CloseReason.LOCAL)
        request_id = self._take_id("message", channel_id)
        frame = encode(Message(id=request_id, channelId=channel_id, payload=raw))
        return OutgoingRequest(request_id, "message", frame)

    def close_channel(self, channel_id: ChannelId) -> OutgoingRequest | None:
        """Stop routing the channel and build its ``close``; ``None`` if it is already gone."""
        if self.state is not SessionState.READY or self._channels.pop(channel_id, None) is None:
            return None
        request_id = self._take_id("close", channel_id)
        return OutgoingRequest(
            request_id, "close", encode(Close(id=request_id, channelId=channel_id))
        )

    def abandon(self, request_id: int) -> None:
        """The caller stopped waiting for ``request_id``; its reply, if any, is dropped."""
        pending = self._pending.get(request_id)
        if pending is not None:
            pending.abandoned = True

    def forget_channel(self, channel_id: ChannelId) -> None:
        """Stop routing ``channel_id`` without telling the broker (it is already gone)."""
        self._channels.pop(channel_id, None)

    def connection_lost(self) -> Ending:
        """The connection ended: every pending request fails, every channel is closed."""
        ending = Ending(
            failed_requests=[rid for rid, p in self._pending.items() if not p.abandoned],
            closed_channels=list(self._channels),
        )
        self.state = SessionState.ENDED
        self._pending.clear()
        self._channels.clear()
        self._early.clear()
        self._early_count = 0
        self._pending_opens = 0
        return ending

    # --- inspection -----------------------------------------------------------------------

    @property
    def channels(self) -> dict[ChannelId, ConnectionId]:
        """A copy of the open channels (channel id -> peer id)."""
        return dict(self._channels)

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet (abandoned ones included)."""
        return len(self._pending)

    # --- frames in ------------------------------------------------------------------------

    def receive(self, frame: bytes | str) -> list[Event]:
        """Everything one broker frame means, in the order the shell must act on it."""
        try:
            message = decode_broker_message(frame)
        except msgspec.DecodeError:
            events = self._receive_untyped(frame)
        else:
            events = self._dispatch(message)
        if self._pending_opens == 0 and self._early:
            # No open is pending: what is held belongs to no channel we will ever have.
            self._early.clear()
            self._early_count = 0
        return events

    def _dispatch(self, message: BrokerMessage) -> list[Event]:
        match message:
            case IncomingChannel(from_=peer, channelId=channel):
                return self._incoming(ChannelId(channel), ConnectionId(peer))
            case ChannelMessage(channelId=channel, payload=payload):
                return self._route(ChannelPayload(ChannelId(channel), payload))
            case ChannelClosedNotification(channelId=channel):
                return self._route(ChannelEnded(ChannelId(channel)))
            case Error(replyTo=reply_to, error=error):
                if reply_to is None:
                    return [Violation(f"broker error: {error}")]
                return self._failure(reply_to, "error", error)
            case (
                RegisterFailed()
                | ListByRoleFailed()
                | ChannelOpenFailed()
                | ChannelMessageFailed()
                | ChannelCloseFailed()
                | RefreshFailed()
            ):
                return self._failure(message.replyTo, _tag(message), message.error)
            case (
                Registered() | Connections() | ChannelOpened() | ChannelMessageSent() | Refreshed()
            ):
                return self._success(message.replyTo, message)
            case ChannelClosedReply():
                return self._success(message.replyTo, message)
            case _:  # pragma: no cover - mypy proves every message type is handled
                assert_never(message)

    # --- replies --------------------------------------------------------------------------

    def _claim(self, reply_to: int) -> _Pending | None:
        pending = self._pending.pop(reply_to, None)
        if pending is not None and pending.kind == "open":
            self._pending_opens -= 1
        return pending

    def _success(self, reply_to: int, message: BrokerMessage) -> list[Event]:
        pending = self._claim(reply_to)
        if pending is None:
            return [Violation(f"reply {_tag(message)} to unknown request {reply_to}")]
        tag = _tag(message)
        if tag != REQUESTS[pending.kind].success_type:
            return self._rejected(
                reply_to, pending, UNEXPECTED_REPLY, f"{tag} does not answer {pending.kind}"
            )
        match message:
            case Registered(connectionId=connection_id, expiresIn=expires_in):
                return self._registered(reply_to, pending, ConnectionId(connection_id), expires_in)
            case Refreshed(expiresIn=expires_in):
                return self._done(reply_to, pending, TokenRefreshed(expires_in))
            case Connections(ids=ids, more=more):
                return self._done(reply_to, pending, Listed([ConnectionId(i) for i in ids], more))
            case ChannelOpened(channelId=channel):
                return self._opened(reply_to, pending, ChannelId(channel))
            case ChannelMessageSent(channelId=channel):
                return self._done(reply_to, pending, Sent(ChannelId(channel)))
            case ChannelClosedReply(channelId=channel):
                return self._done(reply_to, pending, Closed(ChannelId(channel)))
            case _:  # pragma: no cover - REQUESTS admits only the cases above
                raise AssertionError(tag)

    def _done(self, reply_to: int, pending: _Pending, value: ReplyValue) -> list[Event]:
        if pending.abandoned:
            return []
        return [RequestSucceeded(reply_to, value)]

    def _registered(
        self,
        reply_to: int,
        pending: _Pending,
        connection_id: ConnectionId,
        expires_in: int | None = None,
    ) -> list[Event]:
        self.connection_id = connection_id
        if self.state is SessionState.REGISTERING:
            self.state = SessionState.READY
        return self._done(reply_to, pending, RegisteredAs(connection_id, expires_in))

    def _opened(self, reply_to: int, pending: _Pending, channel: ChannelId) -> list[Event]:
        early = self._early.pop(channel, [])
        self._early_count -= len(early)
        self._channels[channel] = ConnectionId(pending.subject)
        if pending.abandoned:
            # Nobody holds this channel: the shell closes it on the broker (``close_channel``
            # finds it here); what the peer sent on it early has no reader.
            return [AbandonedChannel(channel)]
        events: list[Event] = [
            RequestSucceeded(reply_to, Opened(channel, ConnectionId(pending.subject)))
        ]
        for event in early:
            events.append(event)
            if isinstance(event, ChannelEnded):
                self._channels.pop(channel, None)
                break
        return events

    def _failure(self, reply_to: int, reply_type: str, error: str) -> list[Event]:
        pending = self._claim(reply_to)
        if pending is None:
            return [Violation(f"{reply_type} for unknown request {reply_to}: {error}")]
        return self._rejected(reply_to, pending, reply_type, error)

    def _rejected(
        self, reply_to: int, pending: _Pending, reply_type: str, error: str
    ) -> list[Event]:
        if pending.kind == "register" and self.state is SessionState.REGISTERING:
            self.state = SessionState.FAILED
        if pending.kind == "close":
            # Whatever the reason (usually "Channel not found": the peer closed first), the
            # channel is no longer routed; nothing is left to close.
            self._channels.pop(ChannelId(pending.subject), None)
        if pending.abandoned:
            return []
        events: list[Event] = [RequestRejected(reply_to, pending.kind, reply_type, error)]
        if reply_type == UNEXPECTED_REPLY:
            events.insert(0, Violation(f"request {reply_to}: {error}"))
        return events

    def _receive_untyped(self, frame: bytes | str) -> list[Event]:
        # Not one of our typed messages. The original npm broker answers success without a
        # ``type``: {"connectionId": ..., "replyTo": 1, "id": 2}; read it by the request kind.
        try:
            value: Any = _any_decoder.decode(frame)
        except msgspec.DecodeError:
            return [Violation(f"frame is not JSON: {frame[:80]!r}")]
        if not isinstance(value, dict):
            return [Violation("frame is not a JSON object")]
        reply_to = value.get("replyTo")
        if "type" in value or type(reply_to) is not int:
            return [Violation(f"unintelligible frame of type {value.get('type')!r}")]
        pending = self._claim(reply_to)
        if pending is None:
            return [Violation(f"untyped reply to unknown request {reply_to}")]
        try:
            match pending.kind:
                case "register":
                    reg = msgspec.convert(value, _CompatRegistered)
                    return self._registered(reply_to, pending, ConnectionId(reg.connectionId))
                case "list_by_role":
                    listed = msgspec.convert(value, _CompatConnections)
                    return self._done(
                        reply_to, pending, Listed([ConnectionId(i) for i in listed.ids])
                    )
                case "open":
                    opened = msgspec.convert(value, _CompatOpened)
                    return self._opened(reply_to, pending, ChannelId(opened.channelId))
                case "message":
                    return self._done(reply_to, pending, Sent(ChannelId(pending.subject)))
                case "close":
                    return self._done(reply_to, pending, Closed(ChannelId(pending.subject)))
                case "refresh":
                    return self._done(reply_to, pending, TokenRefreshed(None))
                case _:  # pragma: no cover
                    assert_never(pending.kind)
        except msgspec.ValidationError as exc:
            return self._rejected(reply_to, pending, UNEXPECTED_REPLY, f"invalid reply: {exc}")

    # --- notifications --------------------------------------------------------------------

    def _incoming(self, channel: ChannelId, peer: ConnectionId) -> list[Event]:
        if channel in self._channels:
            return [Violation(f"incoming_channel for a channel already open: {channel}")]
        self._channels[channel] = peer
        return [ChannelIncoming(channel, peer)]

    def _route(self, event: ChannelPayload | ChannelEnded) -> list[Event]:
        channel = event.channel_id
        if channel in self._channels:
            if isinstance(event, ChannelEnded):
                del self._channels[channel]
            return [event]
        if self._pending_opens > 0:
            if self._early_count >= self.max_early:
                return [Violation(f"too many early notifications; dropped one for {channel}")]
            self._early.setdefault(channel, []).append(event)
            self._early_count += 1
            return []
        # Usually a race we caused: we closed the channel and the peer's last frames were
        # already on their way.
        kind = "message" if isinstance(event, ChannelPayload) else "close notification"
        return [Violation(f"{kind} for a channel that is not open: {channel}", serious=False)]

    # --- internals ------------------------------------------------------------------------

    def _take_id(self, kind: RequestKind, subject: str = "") -> int:
        request_id = self._next_id
        self._next_id += 1
        self._pending[request_id] = _Pending(kind, subject)
        return request_id

    def _require_ready(self) -> None:
        if self.state is SessionState.READY:
            return
        if self.state is SessionState.ENDED:
            raise ConnectionLost()
        raise NotConnected(f"Not registered with the broker (session {self.state.value})")

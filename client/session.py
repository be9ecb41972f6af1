"""The client's protocol state for one broker session, without any I/O.

Theory of operation
-------------------
A ``Session`` is one broker session: one WebSocket connection, or, when the broker granted a
resumable one (its ``registered`` carried a ``resumeToken``), a chain of connections joined by
``resume`` requests (``docs/resume-design.md``). The shell (``client.py``) asks it for request
frames and feeds it every frame it reads; the session answers with plain values and never
touches a socket, a task or a clock (the shell passes times in). Every frame to write, in
order, comes out of ``frames_to_send()``, as websockets' protocols hand out ``data_to_send()``.

* **Requests.** ``register``, ``refresh``, ``list_by_role``, ``open_channel``, ``send`` and
  ``close_channel`` number the request (1, 2, 3, ... per session), remember what kind of
  request the id stands for, and return an ``OutgoingRequest``. Its ``request_id`` names the
  call in every event about it, even when the request goes out again under another id. A
  payload that msgspec cannot encode as JSON raises ``InvalidPayload`` here, before anything
  exists to send. Payloads travel as ``msgspec.Raw``: encoded once, never re-parsed.
* **Replies.** ``receive(frame)`` matches a reply to its request by ``replyTo`` and turns it
  into ``RequestSucceeded`` (with a typed value) or ``RequestRejected`` (reply type and error
  text). ``{"type": "error", "replyTo": N}`` (unknown type, compat mode) rejects request N;
  an ``error`` without ``replyTo`` is reported as a ``Violation`` for the shell to log.
  Untyped success replies (``{"replyTo": N, ...}`` without ``type``, as the original npm
  broker sends them) are read by the kind of request N, so the SDK works against it too.
* **Notifications.** ``incoming_channel``, ``channel_message`` and
  ``channel_closed_notification`` are routed by ``channelId`` to the channels this session
  has: ``ChannelIncoming``, ``ChannelPayload``, ``ChannelEnded``.
* **A peer faster than our reply.** The broker tells the target about a new channel before it
  answers the opener, so the target's first message can arrive before our ``channel_opened``.
  While an ``open`` is pending, notifications for unknown channels are held (bounded) and
  released right after the ``channel_opened`` that names their channel.
* **Abandoned requests.** When a caller stops waiting (timeout, cancellation) the shell calls
  ``abandon``; a late reply is then dropped, except a late ``channel_opened``, which yields
  ``AbandonedChannel`` so that the shell closes a channel nobody holds.
* **The end.** ``connection_closed()`` of a session that is not resumable (and
  ``connection_lost()`` of any) returns an ``Ending``: every pending request and every open
  channel, so that the shell fails the former at once and reports the latter closed.

Resumable sessions add two layers (``docs/resume-design.md``):

* **Broker frames.** The id of the last broker frame processed is kept; ``ack`` frames report
  it once ``ACK_EVERY`` frames are unacknowledged (at once) or ``ACK_DELAY`` seconds after the
  first one (``ScheduleAck``: the shell's timer then calls ``ack()``). A frame whose id is not
  above the last one is a replay overlap and is dropped.
* **Per channel** (``_Stream``): our messages carry ``seq`` 1, 2, 3 ... and are kept until the
  peer's ``channel_acked`` covers them, at most ``max_unacked`` per channel (``send_blocked``;
  the shell waits, ``SendWindowOpened`` says when to look again). ``channel_resync`` and a
  retryable ``channel_message_failed`` resend, in order, from the first message the peer may
  lack (go-back-N; once at once, then at the pace of ``resend_stalled``).
  ``resend_stalled(now)`` also resends a channel whose acknowledgements made no progress for
  ``RESEND_AFTER`` seconds (not while the peer is detached: its messages are held); the
  automatic resends of a channel wait longer each time (``RESEND_WAIT`` doubling up to
  ``MAX_RESEND_WAIT``) until the peer progresses, so a slow peer does not drown. A message
  the broker refuses for good gives its ``seq`` to the next ones, which go out again, so that
  the peer never waits for a message that will not come. Incoming messages with a ``seq``
  are delivered only in order: one already processed is dropped, one after a gap is dropped
  too (the sender sends it again). The highest ``seq`` processed per channel goes to the
  broker in ``ack`` and ``resume`` (it becomes the peer's ``channel_acked``).
* **Detach and resume.** ``connection_closed(close_code)`` detaches the session (``Detached``)
  unless the close code says resuming cannot help (``SESSION_ENDING_CLOSES``). While
  detached, requests are queued. ``expire(detached_for)`` ends a session whose window surely
  passed; ``resume(token)`` builds the ``resume`` request for a new connection. Frames
  before ``resumed`` are processed as usual (the broker replays them). On ``resumed``: the
  requests the broker never read go out again (new ids, the same ``seq``), then the queued
  ones, in call order; with ``complete: false`` the node that held the session was lost, so
  channels are reconciled with the registry's list, every unacknowledged message is resent,
  idempotent requests are issued again and an ``open`` fails with ``RequestLost`` (its
  outcome is unknown). ``resume_failed`` ends the session: ``SessionLost``.

States (one session)::

    NEW --register()--> REGISTERING --registered--> READY
                             |--register_failed--> FAILED
    READY --connection_closed() (resumable)--> DETACHED --resume()--> RESUMING
    RESUMING --resumed--> READY      RESUMING --connection_closed()--> DETACHED
    RESUMING --resume_failed--> ENDED   DETACHED --expire() (window passed)--> ENDED
    any state --connection_closed() (not resumable), connection_lost()--> ENDED

``READY`` sends ``list_by_role``/``open_channel``/``send``/``close_channel``/``refresh``;
``DETACHED`` and ``RESUMING`` accept them too and send them once ``resumed``.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Any, Final, assert_never

import msgspec

from client.errors import ChannelClosed, CloseReason, ConnectionLost, InvalidPayload, NotConnected
from client.events import (
    AbandonedChannel,
    ChannelEnded,
    ChannelIncoming,
    ChannelPayload,
    Closed,
    Detached,
    Ending,
    Event,
    Listed,
    Opened,
    OutgoingRequest,
    RegisteredAs,
    ReplyValue,
    RequestLost,
    RequestRejected,
    RequestSucceeded,
    ScheduleAck,
    SendWindowOpened,
    Sent,
    SessionLost,
    SessionResumed,
    TokenRefreshed,
    Violation,
)
from shared.codec import decode_broker_message, encode
from shared.ids import ChannelId, ConnectionId
from shared.messages import (
    CLOSE_RESUME_ELSEWHERE,
    CLOSE_TOKEN_INVALID,
    REQUESTS,
    Ack,
    BrokerMessage,
    ChannelAcked,
    ChannelClosedNotification,
    ChannelCloseFailed,
    ChannelMessage,
    ChannelMessageFailed,
    ChannelMessageSent,
    ChannelOpened,
    ChannelOpenFailed,
    ChannelResync,
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
    Request,
    RequestKind,
    Resume,
    Resumed,
    ResumedChannel,
    ResumeFailed,
)
from shared.messages import (
    ChannelClosed as ChannelClosedReply,
)

__all__ = [
    "ACK_DELAY",
    "ACK_EVERY",
    "DEFAULT_MAX_UNACKED",
    "OPEN_OUTCOME_UNKNOWN",
    "RESEND_AFTER",
    "RETRYABLE_FAILURES",
    "SESSION_ENDING_CLOSES",
    "UNEXPECTED_REPLY",
    "WINDOW_EXPIRED",
    "AbandonedChannel",
    "ChannelEnded",
    "ChannelIncoming",
    "ChannelPayload",
    "Closed",
    "Detached",
    "Ending",
    "Event",
    "Listed",
    "Opened",
    "OutgoingRequest",
    "RegisteredAs",
    "ReplyValue",
    "RequestKind",
    "RequestLost",
    "RequestRejected",
    "RequestSucceeded",
    "ScheduleAck",
    "SendWindowOpened",
    "Sent",
    "Session",
    "SessionLost",
    "SessionResumed",
    "SessionState",
    "TokenRefreshed",
    "Violation",
    "encode_payload",
]

#: ``reply_type`` of a rejection the session made up: the reply did not fit the request.
UNEXPECTED_REPLY: Final = "unexpected_reply"

#: Notifications held for channels whose ``channel_opened`` has not arrived yet, at most.
DEFAULT_MAX_EARLY: Final = 1024

#: Acknowledge broker frames as soon as this many are unacknowledged ...
ACK_EVERY: Final = 32
#: ... or this many seconds after the first unacknowledged one.
ACK_DELAY: Final = 0.1
#: Resend a channel's unacknowledged messages after this many seconds without progress.
RESEND_AFTER: Final = 5.0
#: Automatic resends of one channel (after failures, or by the safety net) are at least this
#: far apart, a wait that doubles up to ``MAX_RESEND_WAIT`` until the peer makes progress.
RESEND_WAIT: Final = 1.0
MAX_RESEND_WAIT: Final = 60.0
#: Messages per channel kept until the peer acknowledges them, at most (then sends wait).
DEFAULT_MAX_UNACKED: Final = 1000

#: ``channel_message_failed`` errors after which the message may still be delivered by
#: sending it again (the broker's words, ``broker_node/core/broker.py``).
RETRYABLE_FAILURES: Final = frozenset(
    {
        "Recipient's node was lost",
        "Delivery not confirmed in time",
        "Recipient disconnected during delivery; outcome unknown",
        "Delivery arrived out of order and was dropped",
        "Recipient not connected",
    }
)
#: ``channel_message_failed`` errors that say the channel itself is gone.
_CHANNEL_GONE: Final = frozenset({"Channel not found", "Not authorized for this channel"})
_CHANNEL_NOT_FOUND: Final = "Channel not found"

#: Close codes after which a resume cannot help: the broker ended the session (1008, slow
#: consumer), refuses the token (4003), or refused a frame of ours that a resume would send
#: again (1002, 1003, 1007, 1009).
SESSION_ENDING_CLOSES: Final = frozenset({1002, 1003, 1007, 1008, 1009, CLOSE_TOKEN_INVALID})

#: ``RequestLost`` of an ``open`` read by a node that was lost before it answered.
OPEN_OUTCOME_UNKNOWN: Final = (
    "The broker node that read this open was lost; whether the channel opened is unknown"
)
#: ``SessionLost`` reason when the resume window passed before a resume could be sent.
WINDOW_EXPIRED: Final = "Resume window expired"


class SessionState(enum.Enum):
    NEW = "new"
    REGISTERING = "registering"
    READY = "ready"
    DETACHED = "detached"
    RESUMING = "resuming"
    FAILED = "failed"
    ENDED = "ended"


_USABLE: Final = frozenset({SessionState.READY, SessionState.DETACHED, SessionState.RESUMING})
_DETACHED: Final = frozenset({SessionState.DETACHED, SessionState.RESUMING})


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


@dataclass(slots=True, eq=False)
class _Call:
    """One request the caller knows by ``ticket``, however many times it goes out."""

    ticket: int
    kind: RequestKind
    #: The channel (``message``/``close``) or target (``open``) the request is about.
    subject: str
    #: As made; sent again under a new id (and the current ``seq``).
    request: Request
    abandoned: bool = False
    #: Its event (success, failure, lost) was given; later answers are dropped.
    answered: bool = False
    #: The id of its latest transmission (its answer is the one that counts).
    wire_id: int = 0
    #: Waiting in the session's queue for a resume.
    queued: bool = False
    # --- a message of a resumable session ---
    #: 0: not sequenced.
    seq: int = 0
    #: Still kept for resending (in its stream, until ``channel_acked`` covers it).
    retained: bool = False
    #: A transmission was confirmed (``channel_message_sent``).
    confirmed: bool = False


@dataclass(slots=True, eq=False)
class _Stream:
    """One channel's sequencing in a resumable session."""

    next_seq: int = 1
    #: Our messages not yet acknowledged by the peer's SDK, in ``seq`` order.
    unacked: collections.deque[_Call] = field(default_factory=collections.deque)
    #: The highest ``seq`` of ours the peer acknowledged.
    acked: int = 0
    #: The highest ``seq`` of the peer's we processed.
    received: int = 0
    #: The recipient is detached (a confirmation said ``held``) and has not acked since.
    peer_held: bool = False
    #: The next retryable failure resends at once; later ones wait for a tick that may.
    retry_armed: bool = True
    #: A retryable failure came since the last resend.
    retry_due: bool = False
    #: No automatic resend before this time; the wait after the next one.
    not_before: float = float("-inf")
    wait: float = RESEND_WAIT
    #: Since when no progress was seen (``None``: not watched).
    watched_since: float | None = None


def _worth_sending(call: _Call) -> bool:
    """After a resume: not a message the peer acknowledged or the broker refused for good
    (a message of a channel closed since still goes: the broker answers it)."""
    return not call.seq or call.retained or not (call.answered or call.abandoned)


def _tag(message: BrokerMessage) -> str:
    tag = type(message).__struct_config__.tag
    return str(tag)


@dataclass(slots=True)
class Session:
    """Protocol state of one broker session. See the module docstring."""

    max_early: int = DEFAULT_MAX_EARLY
    #: Ask for a resumable session when registering (it is one if ``registered`` says so).
    request_resume: bool = False
    #: Messages per channel kept until the peer acknowledges them (``send_blocked``).
    max_unacked: int = DEFAULT_MAX_UNACKED
    state: SessionState = SessionState.NEW
    connection_id: ConnectionId | None = None
    #: The single-use token of the next ``resume``; ``None``: the session is not resumable.
    resume_token: str | None = None
    #: Seconds the broker waits for a resume after a disconnect.
    resume_window: int | None = None
    _next_id: int = 1
    #: Transmission id -> its call, for every request sent and not answered.
    _pending: dict[int, _Call] = field(default_factory=dict)
    #: Calls made while detached (or resent then), sent once resumed.
    _queued: list[_Call] = field(default_factory=list)
    #: channel id -> peer connection id, for every channel open on this session.
    _channels: dict[ChannelId, ConnectionId] = field(default_factory=dict)
    _streams: dict[ChannelId, _Stream] = field(default_factory=dict)
    _pending_opens: int = 0
    _early: dict[ChannelId, list[ChannelMessage | ChannelClosedNotification]] = field(
        default_factory=dict
    )
    _early_count: int = 0
    _outbox: list[bytes] = field(default_factory=list)
    _last_frame_id: int = 0
    _unacked_frames: int = 0
    #: Channels whose ``received`` moved since the last ``ack``.
    _dirty: set[ChannelId] = field(default_factory=set)
    #: Calls still waited for that went out again since ``take_resent()``.
    _resent: list[int] = field(default_factory=list)
    _resume_id: int | None = None

    # --- requests -------------------------------------------------------------------------

    def register(self, role: str, token: str | None = None) -> OutgoingRequest:
        if self.state is not SessionState.NEW:
            raise RuntimeError(f"register() in state {self.state.value}")
        self.state = SessionState.REGISTERING
        ticket = self._take_id()
        request = Register(id=ticket, role=role, token=token, resume=self.request_resume)
        return self._issue(_Call(ticket, "register", "", request))

    def refresh(self, token: str) -> OutgoingRequest:
        """A ``refresh`` request carrying a new token for the same user."""
        self._require_usable()
        ticket = self._take_id()
        return self._issue(_Call(ticket, "refresh", "", Refresh(id=ticket, token=token)))

    def list_by_role(self, role: str, *, after: str | None = None) -> OutgoingRequest:
        """A ``list_by_role`` request; ``after``: the page after that id (paging)."""
        self._require_usable()
        ticket = self._take_id()
        request = ListByRole(id=ticket, role=role, after=after)
        return self._issue(_Call(ticket, "list_by_role", "", request))

    def open_channel(self, target_id: str) -> OutgoingRequest:
        self._require_usable()
        ticket = self._take_id()
        self._pending_opens += 1
        return self._issue(_Call(ticket, "open", target_id, Open(id=ticket, targetId=target_id)))

    def send(self, channel_id: ChannelId, payload: object) -> OutgoingRequest:
        """A ``message`` request; ``InvalidPayload`` or ``ChannelClosed`` before anything else.

        In a resumable session the message gets the channel's next ``seq`` and is kept until
        the peer acknowledges it; check ``send_blocked`` first.
        """
        raw = encode_payload(payload)
        self._require_usable()
        if channel_id not in self._channels:
            raise ChannelClosed(channel_id, CloseReason.LOCAL)
        ticket = self._take_id()
        stream = self._streams.get(channel_id)
        if stream is None:
            request = Message(id=ticket, channelId=channel_id, payload=raw)
            return self._issue(_Call(ticket, "message", channel_id, request))
        seq = stream.next_seq
        stream.next_seq += 1
        request = Message(id=ticket, channelId=channel_id, payload=raw, seq=seq)
        call = _Call(ticket, "message", channel_id, request, seq=seq, retained=True)
        stream.unacked.append(call)
        return self._issue(call)

    def send_blocked(self, channel_id: ChannelId) -> bool:
        """The channel holds ``max_unacked`` unacknowledged messages: a send must wait."""
        stream = self._streams.get(channel_id)
        return stream is not None and len(stream.unacked) >= self.max_unacked

    def close_channel(self, channel_id: ChannelId) -> OutgoingRequest | None:
        """Stop routing the channel and build its ``close``; ``None`` if it is already gone."""
        if self.state not in _USABLE or channel_id not in self._channels:
            return None
        self._drop_channel(channel_id)
        ticket = self._take_id()
        return self._issue(
            _Call(ticket, "close", channel_id, Close(id=ticket, channelId=channel_id))
        )

    def abandon(self, request_id: int) -> None:
        """The caller stopped waiting for ``request_id``; its reply, if any, is dropped.

        A message of a resumable session is still resent until the peer acknowledges it:
        its ``seq`` is taken, and the peer would wait for it forever.
        """
        call = self._pending.get(request_id)
        if call is None or call.ticket != request_id:
            call = next((c for c in self._calls() if c.ticket == request_id), None)
        if call is not None:
            call.abandoned = True

    def forget_channel(self, channel_id: ChannelId) -> None:
        """Stop routing ``channel_id`` without telling the broker (it is already gone)."""
        self._drop_channel(channel_id)

    def connection_closed(self, close_code: int | None = None) -> Ending | Detached | SessionLost:
        """The connection ended (``close_code``: the broker's close code, if it sent one).

        A resumable session detaches (``Detached``): its requests and channels wait for the
        resume. Otherwise every pending request fails and every channel is closed.
        """
        if self.resume_token is None:
            return self._finish()
        if close_code in SESSION_ENDING_CLOSES:
            return self._lose(f"The broker closed the connection with code {close_code}")
        self.state = SessionState.DETACHED
        self._resume_id = None
        # Never written: every request among them is resent after the resume (unread).
        self._outbox.clear()
        return Detached(immediately=close_code == CLOSE_RESUME_ELSEWHERE)

    def connection_lost(self) -> Ending:
        """The session ends with its connection (resumable or not: ``close()``, say).

        Every pending request fails, every channel is closed.
        """
        return self._finish()

    def expire(self, detached_for: float) -> SessionLost | None:
        """End a detached session whose resume window surely passed (``detached_for`` s ago)."""
        window = self.resume_window
        if self.state is SessionState.DETACHED and window is not None and detached_for >= window:
            return self._lose(WINDOW_EXPIRED)
        return None

    def resume(self, token: str | None = None) -> OutgoingRequest:
        """The ``resume`` request, the first frame of a new connection (``token``: a JWT)."""
        if self.state is not SessionState.DETACHED:
            raise RuntimeError(f"resume() in state {self.state.value}")
        assert self.connection_id is not None and self.resume_token is not None
        self.state = SessionState.RESUMING
        request_id = self._take_id()
        self._resume_id = request_id
        channels: dict[str, int] = {c: stream.received for c, stream in self._streams.items()}
        self._dirty.clear()
        self._unacked_frames = 0  # lastId acknowledges them
        frame = encode(
            Resume(
                id=request_id,
                connectionId=self.connection_id,
                resumeToken=self.resume_token,
                lastId=self._last_frame_id,
                token=token,
                channels=channels or None,
            )
        )
        self._outbox.append(frame)
        return OutgoingRequest(request_id, "resume", frame)

    def ack(self) -> bytes | None:
        """The ``ack`` a ``ScheduleAck`` timer asks for; ``None`` if none is due now."""
        if self.state is not SessionState.READY or self._unacked_frames == 0:
            return None
        return self._send_ack()

    def resend_stalled(self, now: float) -> None:
        """Called every second or so: per channel, resend what failed again, or what the
        peer has not acknowledged for ``RESEND_AFTER`` seconds (the safety net)."""
        if self.state is not SessionState.READY:
            return
        for stream in self._streams.values():
            if not stream.unacked:
                stream.retry_due = False
                stream.watched_since = None
                continue
            if stream.watched_since is None:
                stream.watched_since = now
            stalled = not stream.peer_held and now - stream.watched_since >= RESEND_AFTER
            if (stream.retry_due or stalled) and now >= stream.not_before:
                stream.retry_due = False
                stream.watched_since = now
                stream.not_before = now + stream.wait
                stream.wait = min(2 * stream.wait, MAX_RESEND_WAIT)
                for call in list(stream.unacked):
                    self._send_again(call)

    def frames_to_send(self) -> list[bytes]:
        """Every frame to write since the last call, in order (the shell writes them all)."""
        frames, self._outbox = self._outbox, []
        return frames

    def take_resent(self) -> list[int]:
        """The calls (``request_id``) still waited for that were sent again since the last
        call: the wait for their answer starts over."""
        resent, self._resent = self._resent, []
        return resent

    # --- inspection -----------------------------------------------------------------------

    @property
    def channels(self) -> dict[ChannelId, ConnectionId]:
        """A copy of the open channels (channel id -> peer id)."""
        return dict(self._channels)

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet (abandoned ones included)."""
        return len(self._pending)

    @property
    def resumable(self) -> bool:
        """The broker granted a resumable session (and it has not ended)."""
        return self.resume_token is not None

    @property
    def detached(self) -> bool:
        """Between connections of a resumable session (``DETACHED`` or ``RESUMING``)."""
        return self.state in _DETACHED

    # --- frames in ------------------------------------------------------------------------

    def receive(self, frame: bytes | str) -> list[Event]:
        """Everything one broker frame means, in the order the shell must act on it."""
        try:
            message = decode_broker_message(frame)
        except msgspec.DecodeError:
            events = self._receive_untyped(frame)
        else:
            if (
                self.resumable
                and message.id <= self._last_frame_id
                and not self._answers_resume(message)
            ):
                return [Violation(f"frame {message.id} came again; dropped", serious=False)]
            events = self._dispatch(message)
            if self.resumable:
                events += self._count_frame(message.id)
        if self._pending_opens == 0 and self._early:
            # No open is pending: what is held belongs to no channel we will ever have.
            self._early.clear()
            self._early_count = 0
        return events

    def _dispatch(self, message: BrokerMessage) -> list[Event]:
        match message:
            case IncomingChannel(from_=peer, channelId=channel):
                return self._incoming(ChannelId(channel), ConnectionId(peer))
            case ChannelMessage() | ChannelClosedNotification():
                return self._route(message)
            case Error(replyTo=reply_to, error=error):
                if reply_to is None:
                    return [Violation(f"broker error: {error}")]
                if reply_to == self._resume_id:  # a node that knows no resume, say
                    return [self._lose(error)]
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
            case Resumed() | ResumeFailed() if message.replyTo != self._resume_id:
                return [Violation(f"{_tag(message)} for unknown request {message.replyTo}")]
            case Resumed():
                return self._resumed(message)
            case ResumeFailed(error=error):
                return [self._lose(error)]
            case ChannelAcked(channelId=channel, seq=seq):
                return self._acknowledged(ChannelId(channel), seq, resync=False)
            case ChannelResync(channelId=channel, lastSeq=last_seq):
                return self._acknowledged(ChannelId(channel), last_seq, resync=True)
            case _:  # pragma: no cover - mypy proves every message type is handled
                assert_never(message)

    # --- replies --------------------------------------------------------------------------

    def _claim(self, reply_to: int) -> _Call | None:
        call = self._pending.pop(reply_to, None)
        if call is not None and call.kind == "open":
            self._pending_opens -= 1
        return call

    def _success(self, reply_to: int, message: BrokerMessage) -> list[Event]:
        call = self._claim(reply_to)
        if call is None:
            return [Violation(f"reply {_tag(message)} to unknown request {reply_to}")]
        tag = _tag(message)
        if tag != REQUESTS[call.kind].success_type:
            return self._rejected(call, UNEXPECTED_REPLY, f"{tag} does not answer {call.kind}")
        match message:
            case Registered(connectionId=connection_id, expiresIn=expires_in):
                return self._registered(call, ConnectionId(connection_id), expires_in, message)
            case Refreshed(expiresIn=expires_in):
                return self._done(call, TokenRefreshed(expires_in))
            case Connections(ids=ids, more=more):
                return self._done(call, Listed([ConnectionId(i) for i in ids], more))
            case ChannelOpened(channelId=channel):
                return self._opened(call, ChannelId(channel))
            case ChannelMessageSent(channelId=channel, held=held):
                if call.seq:
                    self._confirmed(call, held)
                return self._done(call, Sent(ChannelId(channel), held))
            case ChannelClosedReply(channelId=channel):
                return self._done(call, Closed(ChannelId(channel)))
            case _:  # pragma: no cover - REQUESTS admits only the cases above
                raise AssertionError(tag)

    def _done(self, call: _Call, value: ReplyValue) -> list[Event]:
        if call.abandoned or call.answered:
            return []
        call.answered = True
        return [RequestSucceeded(call.ticket, value)]

    def _registered(
        self,
        call: _Call,
        connection_id: ConnectionId,
        expires_in: int | None = None,
        reply: Registered | None = None,
    ) -> list[Event]:
        self.connection_id = connection_id
        if self.state is SessionState.REGISTERING:
            self.state = SessionState.READY
            if self.request_resume and reply is not None and reply.resumeToken is not None:
                self.resume_token = reply.resumeToken
                self.resume_window = reply.resumeWindow
        return self._done(call, RegisteredAs(connection_id, expires_in))

    def _opened(self, call: _Call, channel: ChannelId) -> list[Event]:
        early = self._early.pop(channel, [])
        self._early_count -= len(early)
        self._add_channel(channel, ConnectionId(call.subject))
        if call.abandoned:
            # Nobody holds this channel: the shell closes it on the broker (``close_channel``
            # finds it here); what the peer sent on it early has no reader.
            return [AbandonedChannel(channel)]
        call.answered = True
        events: list[Event] = [
            RequestSucceeded(call.ticket, Opened(channel, ConnectionId(call.subject)))
        ]
        for held in early:
            events += self._route(held)
            if channel not in self._channels:
                break
        return events

    def _failure(self, reply_to: int, reply_type: str, error: str) -> list[Event]:
        call = self._claim(reply_to)
        if call is None:
            return [Violation(f"{reply_type} for unknown request {reply_to}: {error}")]
        if call.seq:
            return self._message_failed(reply_to, call, reply_type, error)
        return self._rejected(call, reply_type, error)

    def _rejected(self, call: _Call, reply_type: str, error: str) -> list[Event]:
        if call.kind == "register" and self.state is SessionState.REGISTERING:
            self.state = SessionState.FAILED
        if call.kind == "close":
            # Whatever the reason (usually "Channel not found": the peer closed first), the
            # channel is no longer routed; nothing is left to close.
            self._drop_channel(ChannelId(call.subject))
        if call.abandoned or call.answered:
            return []
        call.answered = True
        events: list[Event] = [RequestRejected(call.ticket, call.kind, reply_type, error)]
        if reply_type == UNEXPECTED_REPLY:
            events.insert(0, Violation(f"request {call.ticket}: {error}"))
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
        call = self._claim(reply_to)
        if call is None:
            return [Violation(f"untyped reply to unknown request {reply_to}")]
        try:
            match call.kind:
                case "register":
                    reg = msgspec.convert(value, _CompatRegistered)
                    return self._registered(call, ConnectionId(reg.connectionId))
                case "list_by_role":
                    listed = msgspec.convert(value, _CompatConnections)
                    return self._done(call, Listed([ConnectionId(i) for i in listed.ids]))
                case "open":
                    opened = msgspec.convert(value, _CompatOpened)
                    return self._opened(call, ChannelId(opened.channelId))
                case "message":
                    return self._done(call, Sent(ChannelId(call.subject)))
                case "close":
                    return self._done(call, Closed(ChannelId(call.subject)))
                case "refresh":
                    return self._done(call, TokenRefreshed(None))
                case "resume" | "ack":  # pragma: no cover - never pending: no reply names them
                    raise AssertionError(call.kind)
                case _:  # pragma: no cover
                    assert_never(call.kind)
        except msgspec.ValidationError as exc:
            return self._rejected(call, UNEXPECTED_REPLY, f"invalid reply: {exc}")

    # --- notifications --------------------------------------------------------------------

    def _incoming(self, channel: ChannelId, peer: ConnectionId) -> list[Event]:
        if channel in self._channels:
            return [Violation(f"incoming_channel for a channel already open: {channel}")]
        self._add_channel(channel, peer)
        return [ChannelIncoming(channel, peer)]

    def _route(self, message: ChannelMessage | ChannelClosedNotification) -> list[Event]:
        channel = ChannelId(message.channelId)
        if channel in self._channels:
            if isinstance(message, ChannelClosedNotification):
                self._drop_channel(channel)
                return [ChannelEnded(channel)]
            return self._deliver(channel, message)
        if self._pending_opens > 0:
            if self._early_count >= self.max_early:
                return [Violation(f"too many early notifications; dropped one for {channel}")]
            self._early.setdefault(channel, []).append(message)
            self._early_count += 1
            return []
        # Usually a race we caused: we closed the channel and the peer's last frames were
        # already on their way.
        kind = "message" if isinstance(message, ChannelMessage) else "close notification"
        return [Violation(f"{kind} for a channel that is not open: {channel}", serious=False)]

    def _deliver(self, channel: ChannelId, message: ChannelMessage) -> list[Event]:
        stream = self._streams.get(channel)
        if stream is not None and message.seq is not None:
            expected = stream.received + 1
            if message.seq != expected:
                # Processed already (a message sent again), or after one we lack (which
                # its sender sends again, followed by this one).
                what = "again" if message.seq < expected else f"while {expected} is missing"
                return [Violation(f"seq {message.seq} on {channel} {what}; dropped", False)]
            stream.received = message.seq
            self._dirty.add(channel)
        return [ChannelPayload(channel, message.payload)]

    # --- resumable sessions: our messages -------------------------------------------------

    def _confirmed(self, call: _Call, held: bool) -> None:
        call.confirmed = True
        stream = self._streams.get(ChannelId(call.subject))
        if held and stream is not None and call.retained:
            stream.peer_held = True

    def _message_failed(
        self, reply_to: int, call: _Call, reply_type: str, error: str
    ) -> list[Event]:
        if reply_to != call.wire_id:
            return []  # sent again since: the answer to that transmission decides
        stream = self._streams.get(ChannelId(call.subject))
        if stream is None or not call.retained:
            return self._rejected(call, reply_type, error)
        if error in _CHANNEL_GONE:
            events: list[Event] = []
            for lost in stream.unacked:
                lost.retained = False
                events += self._rejected(lost, reply_type, error)
            stream.unacked.clear()
            return events
        if error in RETRYABLE_FAILURES:
            # Once at once; then (a window of messages failing one after another, a peer
            # about to leave) at the pace of resend_stalled.
            if stream.retry_armed:
                stream.retry_armed = False
                self._send_again_from(stream, call)
            else:
                stream.retry_due = True
            return []
        if call.confirmed:
            return []  # an earlier transmission was delivered
        # Refused for good (e.g. "Invalid request: ..."): the next messages take its seq and
        # go out again, or the peer would drop them all, waiting for this one.
        return self._renumber(ChannelId(call.subject), stream, call) + self._rejected(
            call, reply_type, error
        )

    def _send_again_from(self, stream: _Stream, call: _Call) -> None:
        calls = list(stream.unacked)
        for later in calls[calls.index(call) :]:
            self._send_again(later)

    def _renumber(self, channel: ChannelId, stream: _Stream, call: _Call) -> list[Event]:
        was_full = len(stream.unacked) >= self.max_unacked
        calls = list(stream.unacked)
        position = calls.index(call)
        del stream.unacked[position]
        call.retained = False
        stream.next_seq -= 1
        for later in calls[position + 1 :]:
            later.seq -= 1
            self._send_again(later)
        return [SendWindowOpened(channel)] if was_full else []

    def _acknowledged(self, channel: ChannelId, seq: int, *, resync: bool) -> list[Event]:
        """``channel_acked``; or ``channel_resync``, which also asks for the rest again."""
        stream = self._streams.get(channel)
        if stream is None:
            kind = "channel_resync" if resync else "channel_acked"
            return [Violation(f"{kind} for a channel that is not open: {channel}", False)]
        was_full = len(stream.unacked) >= self.max_unacked
        events: list[Event] = []
        if seq > stream.acked or resync:
            # Progress: automatic resends start over.
            stream.acked = max(stream.acked, seq)
            stream.peer_held = False
            stream.retry_armed = True
            stream.not_before = float("-inf")
            stream.wait = RESEND_WAIT
            stream.watched_since = None
        while stream.unacked and stream.unacked[0].seq <= seq:
            call = stream.unacked.popleft()
            call.retained = False
            # Processed by the peer: delivered, whatever became of its confirmation.
            events += self._done(call, Sent(channel))
        if was_full and len(stream.unacked) < self.max_unacked:
            events.append(SendWindowOpened(channel))
        if resync:
            for call in list(stream.unacked):
                self._send_again(call)
        return events

    # --- resumable sessions: frames, resume -----------------------------------------------

    def _answers_resume(self, message: BrokerMessage) -> bool:
        # A node that took over from a lost one may not know the last frame id it sent:
        # its ``resumed`` starts the numbering the session follows from then on. A refusal
        # (``resume_failed``, or ``error`` from a node without resume) is the new socket's own
        # frame, numbered from 1: it is not one of the session's.
        return (
            isinstance(message, Resumed | ResumeFailed | Error)
            and message.replyTo is not None
            and message.replyTo == self._resume_id
        )

    def _count_frame(self, frame_id: int) -> list[Event]:
        self._last_frame_id = frame_id
        self._unacked_frames += 1
        if self._unacked_frames >= ACK_EVERY:
            if self.state is SessionState.READY:
                self._send_ack()
            return []
        return [ScheduleAck(ACK_DELAY)] if self._unacked_frames == 1 else []

    def _send_ack(self) -> bytes:
        channels: dict[str, int] = {c: self._streams[c].received for c in self._dirty}
        self._dirty.clear()
        self._unacked_frames = 0
        ack = Ack(id=self._take_id(), lastId=self._last_frame_id, channels=channels or None)
        frame = encode(ack)
        self._outbox.append(frame)
        return frame

    def _resumed(self, reply: Resumed) -> list[Event]:
        self.state = SessionState.READY
        self._resume_id = None
        self.connection_id = ConnectionId(reply.connectionId)
        self.resume_token = reply.resumeToken
        self.resume_window = reply.resumeWindow
        last_read = reply.lastRequestId
        # Replies to what the broker read were replayed, or are still to come; unless the
        # node that read them was lost (or the broker cannot say what it read).
        replies_come = reply.complete and last_read is not None
        events: list[Event] = [SessionResumed(reply.complete, reply.expiresIn)]
        again: dict[int, _Call] = {}
        for wire_id, call in list(self._pending.items()):
            unread = last_read is not None and wire_id > last_read
            if replies_come and not unread:
                continue
            del self._pending[wire_id]
            if wire_id != call.wire_id or not _worth_sending(call):
                continue  # an earlier transmission, or a message settled since
            if unread or call.kind != "open":
                again[call.ticket] = call  # never read, or idempotent (and seq'd messages)
            else:
                events += self._open_lost(call)
        for call in self._queued:
            call.queued = False
            again[call.ticket] = call
        self._queued.clear()
        if not reply.complete:
            closing = {call.subject for call in again.values() if call.kind == "close"}
            events += self._reconcile(reply.channels or [], closing)
            for stream in self._streams.values():
                for call in stream.unacked:
                    again[call.ticket] = call
        for ticket in sorted(again):  # call order
            if _worth_sending(again[ticket]):
                self._send_again(again[ticket])
        if self._unacked_frames:
            events.append(ScheduleAck(ACK_DELAY))
        return events

    def _open_lost(self, call: _Call) -> list[Event]:
        self._pending_opens -= 1
        if call.abandoned:
            return []
        call.answered = True
        return [RequestLost(call.ticket, OPEN_OUTCOME_UNKNOWN)]

    def _reconcile(self, listed: list[ResumedChannel], closing: set[str]) -> list[Event]:
        """The registry's channels of this session after its node was lost, against ours."""
        registry = {ChannelId(c.channelId): ConnectionId(c.peerId) for c in listed}
        events: list[Event] = []
        for channel in [c for c in self._channels if c not in registry]:
            # Closed while its notification was on the lost node.
            stream = self._drop_channel(channel)
            events.append(ChannelEnded(channel))
            for call in stream.unacked if stream is not None else ():
                events += self._rejected(call, "channel_message_failed", _CHANNEL_NOT_FOUND)
        for channel, peer in registry.items():
            if channel not in self._channels and channel not in closing:
                # Opened to us (or by an open whose reply was lost) while on the lost node.
                self._add_channel(channel, peer)
                events.append(ChannelIncoming(channel, peer))
        return events

    def _lose(self, reason: str) -> SessionLost:
        return SessionLost(reason, self._finish())

    # --- internals ------------------------------------------------------------------------

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def _issue(self, call: _Call) -> OutgoingRequest:
        frame = encode(call.request)
        if self.detached:
            call.queued = True
            self._queued.append(call)
        else:
            call.wire_id = call.ticket
            self._pending[call.ticket] = call
            self._outbox.append(frame)
        return OutgoingRequest(call.ticket, call.kind, frame)

    def _send_again(self, call: _Call) -> None:
        """A new transmission of ``call`` under a new id (queued while detached)."""
        if self.state is not SessionState.READY:
            if not call.queued:
                call.queued = True
                self._queued.append(call)
            return
        wire_id = self._take_id()
        call.wire_id = wire_id
        self._pending[wire_id] = call
        if not (call.answered or call.abandoned):
            self._resent.append(call.ticket)
        changes: dict[str, int] = {"id": wire_id}
        if call.seq:
            changes["seq"] = call.seq
        self._outbox.append(encode(msgspec.structs.replace(call.request, **changes)))

    def _add_channel(self, channel: ChannelId, peer: ConnectionId) -> None:
        self._channels[channel] = peer
        if self.resumable and channel not in self._streams:
            self._streams[channel] = _Stream()

    def _drop_channel(self, channel: ChannelId) -> _Stream | None:
        self._channels.pop(channel, None)
        self._dirty.discard(channel)
        stream = self._streams.pop(channel, None)
        if stream is not None:
            for call in stream.unacked:
                call.retained = False
        return stream

    def _calls(self) -> list[_Call]:
        """Every call still known: sent, queued, or kept for resending."""
        calls = [*self._pending.values(), *self._queued]
        for stream in self._streams.values():
            calls += stream.unacked
        return calls

    def _finish(self) -> Ending:
        unanswered = {c.ticket for c in self._calls() if not (c.abandoned or c.answered)}
        ending = Ending(failed_requests=sorted(unanswered), closed_channels=list(self._channels))
        self.state = SessionState.ENDED
        self.resume_token = None
        self._resume_id = None
        self._pending.clear()
        self._queued.clear()
        self._channels.clear()
        self._streams.clear()
        self._dirty.clear()
        self._resent.clear()
        self._outbox.clear()
        self._early.clear()
        self._early_count = 0
        self._pending_opens = 0
        return ending

    def _require_usable(self) -> None:
        if self.state in _USABLE:
            return
        if self.state is SessionState.ENDED:
            raise ConnectionLost()
        raise NotConnected(f"Not registered with the broker (session {self.state.value})")

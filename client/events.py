"""The values ``client.session`` returns: requests made, events of a frame, how a session ends.

Plain frozen dataclasses; the shell (``client.client``) acts on each (see the session's
theory of operation).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from shared.ids import ChannelId, ConnectionId
from shared.messages import RequestKind

__all__ = [
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
    "RequestLost",
    "RequestRejected",
    "RequestSucceeded",
    "ScheduleAck",
    "SendWindowOpened",
    "Sent",
    "SessionLost",
    "SessionResumed",
    "TokenRefreshed",
    "Violation",
]


@dataclass(frozen=True, slots=True)
class OutgoingRequest:
    """A request made; its events name ``request_id``.

    ``frame`` is its encoding; the shell writes what ``frames_to_send()`` returns, which
    holds it, unless the session is detached (it then goes out after the resume).
    """

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
    #: The recipient is detached: the broker holds the message for its resume.
    held: bool = False


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
class RequestLost:
    """The request was read by a broker node that was lost: its outcome is unknown."""

    request_id: int
    reason: str


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


@dataclass(frozen=True, slots=True)
class ScheduleAck:
    """Call ``ack()`` in ``delay`` seconds (unless a call is already scheduled)."""

    delay: float


@dataclass(frozen=True, slots=True)
class SendWindowOpened:
    """``send_blocked(channel_id)`` may have turned false: wake the senders waiting on it."""

    channel_id: ChannelId


@dataclass(frozen=True, slots=True)
class SessionResumed:
    """The session is attached again; ``complete`` false: its node was lost (see module)."""

    complete: bool
    #: Seconds until the token sent with the resume expires (authentication on).
    expires_in: int | None = None


@dataclass(frozen=True, slots=True)
class Ending:
    """What ends with a session: requests to fail, channels to report closed."""

    failed_requests: list[int]
    closed_channels: list[ChannelId]


@dataclass(frozen=True, slots=True)
class SessionLost:
    """A resumable session ended (``reason``); the shell ends it as ``ending`` says."""

    reason: str
    ending: Ending


@dataclass(frozen=True, slots=True)
class Detached:
    """The connection dropped and the session waits for a resume on a new one."""

    #: The node asked for it (close code 4100, a drain): resume at once, without a backoff.
    immediately: bool = False


Event = (
    RequestSucceeded
    | RequestRejected
    | RequestLost
    | ChannelIncoming
    | ChannelPayload
    | ChannelEnded
    | AbandonedChannel
    | Violation
    | ScheduleAck
    | SendWindowOpened
    | SessionResumed
    | SessionLost
)

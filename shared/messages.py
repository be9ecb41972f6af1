"""Every message of the wire protocol, as frozen msgspec Structs.

The protocol is the one of the original ``@sitnikov/connection-broker`` README: each message
is a JSON object tagged by ``type``; field names are camelCase on the wire (``replyTo``,
``connectionId``, ``channelId``, ``targetId``, ``from``). Classes are named after their tag
(``list_by_role`` -> ``ListByRole``). Field order follows the README examples, so encoded
frames match them byte for byte.

Payloads are ``msgspec.Raw``: the broker never parses or re-encodes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

__all__ = [
    "CLOSE_RESUME_ELSEWHERE",
    "REQUESTS",
    "Ack",
    "BrokerMessage",
    "ChannelAcked",
    "ChannelCloseFailed",
    "ChannelClosed",
    "ChannelClosedNotification",
    "ChannelMessage",
    "ChannelMessageFailed",
    "ChannelMessageSent",
    "ChannelOpenFailed",
    "ChannelOpened",
    "ChannelResync",
    "Close",
    "Connections",
    "Error",
    "FailureReply",
    "IncomingChannel",
    "ListByRole",
    "ListByRoleFailed",
    "Message",
    "Open",
    "Refresh",
    "RefreshFailed",
    "Refreshed",
    "Register",
    "RegisterFailed",
    "Registered",
    "Request",
    "RequestKind",
    "RequestSpec",
    "Resume",
    "ResumeFailed",
    "Resumed",
    "ResumedChannel",
]


class _Wire(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True):
    """Base of every wire message; the tag is set per class."""


# --- client -> broker -------------------------------------------------------------------


class Register(_Wire, frozen=True, tag="register"):
    id: int
    role: str
    #: A JWT, when the node requires authentication and the token did not come with the
    #: handshake (issue 13); absent from the original protocol.
    token: str | None = None
    #: Ask for a resumable session (issue 14); ``registered`` then carries its token.
    resume: bool = False


class ListByRole(_Wire, frozen=True, tag="list_by_role"):
    id: int
    role: str
    # --- paging (issue 15; optional, absent in the README's request) ---
    #: At most this many ids in the reply (the node caps it at its own page size).
    limit: int | None = None
    #: Only ids that sort after this one (the last id of the previous page).
    after: str | None = None


class Open(_Wire, frozen=True, tag="open"):
    id: int
    targetId: str


class Message(_Wire, frozen=True, tag="message"):
    id: int
    channelId: str
    payload: msgspec.Raw
    #: Per channel and direction, 1, 2, 3...: lets the peer's SDK drop a message sent again
    #: after a resume (issue 14). Forwarded in ``channel_message``; the broker never reads it.
    seq: int | None = None


class Close(_Wire, frozen=True, tag="close"):
    id: int
    channelId: str


# --- authentication (issue 13) -----------------------------------------------------------


class Refresh(_Wire, frozen=True, tag="refresh"):
    """A fresh token for the same ``sub``, sent before the current one expires."""

    id: int
    token: str


# --- session resume (issue 14) ----------------------------------------------------------


class Resume(_Wire, frozen=True, tag="resume", kw_only=True):
    """Take a detached session over on this socket (see "Session resume" in protocol.md)."""

    id: int
    connectionId: str
    resumeToken: str
    #: The ``id`` of the last broker frame the client processed (0: none).
    lastId: int
    #: A JWT, when authentication is on (the same ``sub`` as the session's).
    token: str | None = None
    #: Per channel, the highest ``seq`` the client processed from its peer.
    channels: dict[str, int] | None = None


class Ack(_Wire, frozen=True, tag="ack"):
    """The client processed every broker frame up to ``lastId`` (no reply)."""

    id: int
    lastId: int
    #: Per channel whose count moved since the previous ack, the highest ``seq`` the client
    #: processed from its peer: what the peer's ``channel_acked`` says. Not derived from the
    #: acked frames, since a client drops a message that arrives after a gap.
    channels: dict[str, int] | None = None


Request = Register | ListByRole | Open | Message | Close | Refresh | Resume | Ack

# --- broker -> client -------------------------------------------------------------------


class Registered(_Wire, frozen=True, tag="registered"):
    id: int
    replyTo: int
    connectionId: str
    #: Seconds until the connection's token expires (authentication on; issue 13).
    expiresIn: int | None = None
    #: A resumable session (asked with ``resume``, issue 14): the single-use token of the
    #: next ``resume``, and for how many seconds after a disconnect it may come.
    resumeToken: str | None = None
    resumeWindow: int | None = None


class RegisterFailed(_Wire, frozen=True, tag="register_failed"):
    id: int
    replyTo: int
    error: str


class Connections(_Wire, frozen=True, tag="connections"):
    id: int
    replyTo: int
    ids: list[str]
    # --- paging (issue 15; optional, absent when false, so the README's reply stays valid) ---
    #: More ids follow the last one of ``ids``: ask again with ``after`` set to it.
    more: bool = False


class ListByRoleFailed(_Wire, frozen=True, tag="list_by_role_failed"):
    id: int
    replyTo: int
    error: str


class ChannelOpened(_Wire, frozen=True, tag="channel_opened"):
    id: int
    replyTo: int
    channelId: str
    targetId: str


class IncomingChannel(_Wire, frozen=True, tag="incoming_channel", kw_only=True):
    id: int
    from_: str = msgspec.field(name="from")
    channelId: str


class ChannelOpenFailed(_Wire, frozen=True, tag="channel_open_failed"):
    id: int
    replyTo: int
    targetId: str
    error: str


class ChannelMessage(_Wire, frozen=True, tag="channel_message", kw_only=True):
    id: int
    channelId: str
    #: The sender's ``seq``, when its ``message`` had one (before the payload, so that a node
    #: can read it without parsing the payload).
    seq: int | None = None
    payload: msgspec.Raw


class ChannelMessageSent(_Wire, frozen=True, tag="channel_message_sent"):
    id: int
    replyTo: int
    channelId: str
    #: The recipient's session is detached: the message is held for it (issue 14).
    held: bool = False


class ChannelMessageFailed(_Wire, frozen=True, tag="channel_message_failed"):
    id: int
    replyTo: int
    channelId: str
    error: str


class ChannelClosed(_Wire, frozen=True, tag="channel_closed"):
    id: int
    replyTo: int
    channelId: str


class ChannelClosedNotification(_Wire, frozen=True, tag="channel_closed_notification"):
    id: int
    channelId: str


class ChannelCloseFailed(_Wire, frozen=True, tag="channel_close_failed"):
    id: int
    replyTo: int
    channelId: str
    error: str


class Error(_Wire, frozen=True, tag="error", kw_only=True):
    """A failure that has no typed reply: bad JSON shapes, unknown types, compat mode."""

    id: int
    replyTo: int | None = None
    error: str


# --- authentication replies (issue 13) ---------------------------------------------------


class Refreshed(_Wire, frozen=True, tag="refreshed", kw_only=True):
    id: int
    replyTo: int
    #: Seconds until the new token expires.
    expiresIn: int | None = None


class RefreshFailed(_Wire, frozen=True, tag="refresh_failed"):
    id: int
    replyTo: int
    error: str


# --- session resume replies and notices (issue 14) ----------------------------------------


class ResumedChannel(msgspec.Struct, frozen=True):
    channelId: str
    peerId: str


class Resumed(_Wire, frozen=True, tag="resumed", kw_only=True):
    id: int
    replyTo: int
    connectionId: str
    resumeToken: str
    resumeWindow: int
    #: Every frame after the request's ``lastId`` came before this reply. False: the node
    #: that held the session was lost, and ``channels`` lists the session's open channels.
    complete: bool
    #: The highest request ``id`` of this session the broker read, when known.
    lastRequestId: int | None = None
    channels: list[ResumedChannel] | None = None
    #: Seconds until the connection's token expires (authentication on).
    expiresIn: int | None = None


class ResumeFailed(_Wire, frozen=True, tag="resume_failed"):
    id: int
    replyTo: int
    error: str


class ChannelAcked(_Wire, frozen=True, tag="channel_acked"):
    """The peer's SDK processed every message of yours on this channel up to ``seq``."""

    id: int
    channelId: str
    seq: int


class ChannelResync(_Wire, frozen=True, tag="channel_resync"):
    """The peer resumed after its node was lost, having processed your messages on this
    channel up to ``lastSeq``: send the later ones again, in order, with the same ``seq``."""

    id: int
    channelId: str
    lastSeq: int


BrokerMessage = (
    Registered
    | RegisterFailed
    | Connections
    | ListByRoleFailed
    | ChannelOpened
    | IncomingChannel
    | ChannelOpenFailed
    | ChannelMessage
    | ChannelMessageSent
    | ChannelMessageFailed
    | ChannelClosed
    | ChannelClosedNotification
    | ChannelCloseFailed
    | Error
    | Refreshed
    | RefreshFailed
    | Resumed
    | ResumeFailed
    | ChannelAcked
    | ChannelResync
)

#: The name of a request type (its ``type`` tag).
RequestKind = Literal[
    "register", "list_by_role", "open", "message", "close", "refresh", "resume", "ack"
]
#: A ``*_failed`` reply.
FailureReply = (
    RegisterFailed
    | ListByRoleFailed
    | ChannelOpenFailed
    | ChannelMessageFailed
    | ChannelCloseFailed
    | RefreshFailed
    | ResumeFailed
    | Error
)


@dataclass(frozen=True)
class RequestSpec:
    """One request type: its class, the reply that says it succeeded, the one that says it
    failed, and the request field that failure names (``targetId``, ``channelId``, or none)."""

    request: type[Request]
    #: None: the request has no reply when it succeeds (``ack``).
    success: type[BrokerMessage] | None
    failure: type[FailureReply]
    subject_field: Literal["targetId", "channelId"] | None = None

    @property
    def success_type(self) -> str | None:
        return None if self.success is None else _tag(self.success)

    @property
    def failure_type(self) -> str:
        return _tag(self.failure)

    def failed(self, frame_id: int, reply_to: int, subject: str, error: str) -> FailureReply:
        """The failure reply, naming ``subject`` in the field the protocol gives it."""
        # Every failure class takes id, replyTo and error; three take the subject too.
        fields = {} if self.subject_field is None else {self.subject_field: subject}
        return self.failure(id=frame_id, replyTo=reply_to, error=error, **fields)


def _tag(cls: type[msgspec.Struct]) -> str:
    return str(cls.__struct_config__.tag)


#: The protocol's request kinds, one row each (the README's request/reply table).
REQUESTS: Final[Mapping[str, RequestSpec]] = {
    "register": RequestSpec(Register, Registered, RegisterFailed),
    "list_by_role": RequestSpec(ListByRole, Connections, ListByRoleFailed),
    "open": RequestSpec(Open, ChannelOpened, ChannelOpenFailed, "targetId"),
    "message": RequestSpec(Message, ChannelMessageSent, ChannelMessageFailed, "channelId"),
    "close": RequestSpec(Close, ChannelClosed, ChannelCloseFailed, "channelId"),
    "refresh": RequestSpec(Refresh, Refreshed, RefreshFailed),
    "resume": RequestSpec(Resume, Resumed, ResumeFailed),
    # A malformed ack has no typed failure: it gets the ``error`` reply.
    "ack": RequestSpec(Ack, None, Error),
}


# --- authentication close codes (issue 13) ----------------------------------------------

#: The token expired (or none came in time): get a new token and reconnect.
CLOSE_TOKEN_EXPIRED: Final = 4001
#: The token is invalid or revoked: do not retry with it.
CLOSE_TOKEN_INVALID: Final = 4003

# --- session resume close code (issue 14) -------------------------------------------------

#: The node is draining: a resumable session resumes on another node (any other close of
#: a resumable session may be resumed too; this one says it at once).
CLOSE_RESUME_ELSEWHERE: Final = 4100

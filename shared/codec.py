"""Frames to requests, and messages to frames.

``decode_request`` never raises: it returns either a request or a *rejection*, a value that
says how the bad-input table of ``docs/cluster-semantics.md`` answers the frame:

==========================================================  ==================================
input                                                       rejection
==========================================================  ==================================
text frame that is not JSON, or a binary frame              ``CloseConnection(1003, reason)``
text frame that is not UTF-8                                ``CloseConnection(1007, reason)``
JSON that is not an object, or without a usable integer id  ``ErrorReply(None, error)``
unknown ``type`` with a usable ``id``                       ``ErrorReply(id, "Unknown ...")``
known ``type``, missing or ill-typed fields                 ``FailedReply`` naming the field
==========================================================  ==================================

(Frames over the size limit are refused with 1009 by the WebSocket layer before they get here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgspec

from shared.messages import FAILURE_TYPE, REQUEST_TYPES, BrokerMessage, Request

CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_INVALID_DATA: Final = 1007
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_GOING_AWAY: Final = 1001


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the WebSocket with this code and reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Answer with ``{"type": "error", ...}``; ``reply_to`` is set when the id was usable."""

    reply_to: int | None
    error: str


@dataclass(frozen=True, slots=True)
class FailedReply:
    """Answer a known request type with its ``*_failed`` reply."""

    request_type: str
    reply_to: int
    error: str
    #: ``channelId`` / ``targetId`` echoed from the request when it held a string.
    subject: str


Rejection = CloseConnection | ErrorReply | FailedReply

_request_decoder: Final[msgspec.json.Decoder[Request]] = msgspec.json.Decoder(Request)
_any_decoder: Final = msgspec.json.Decoder()
_typed_decoders: Final = {name: msgspec.json.Decoder(cls) for name, cls in REQUEST_TYPES.items()}
_encoder: Final = msgspec.json.Encoder()
_broker_decoder: Final[msgspec.json.Decoder[BrokerMessage]] = msgspec.json.Decoder(BrokerMessage)

#: Which request field a ``*_failed`` reply echoes back (``channelId`` or ``targetId``).
SUBJECT_FIELD: Final[dict[str, str]] = {
    "open": "targetId",
    "message": "channelId",
    "close": "channelId",
}


_NOT_UTF8: Final = CloseConnection(CLOSE_INVALID_DATA, "Invalid UTF-8")


def decode_request(frame: bytes | bytearray | memoryview | str) -> Request | Rejection:
    """Decode one text frame from a client."""
    # msgspec checks the UTF-8 of the strings it decodes (raising UnicodeDecodeError, not a
    # DecodeError) but not of a Raw payload, which would reach the recipient, whose client
    # library would then fail its connection: check the whole frame first.
    if not isinstance(frame, str) and not _is_utf8(frame):
        return _NOT_UTF8
    try:
        return _request_decoder.decode(frame)
    except msgspec.DecodeError:
        return _diagnose(frame)


def _is_utf8(frame: bytes | bytearray | memoryview) -> bool:
    # ASCII, nearly every frame, is recognised by a C loop at memory speed; decode the rest.
    if type(frame) is not memoryview and frame.isascii():
        return True
    try:
        str(frame, "utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _diagnose(frame: bytes | bytearray | memoryview | str) -> Rejection:
    # The fast path failed; find the row of the bad-input table that applies.
    try:
        value: Any = _any_decoder.decode(frame)
    except msgspec.DecodeError:
        return CloseConnection(CLOSE_UNSUPPORTED_DATA, "Invalid JSON")
    if not isinstance(value, dict):
        return ErrorReply(None, "Message must be a JSON object")
    request_id = value.get("id")
    if type(request_id) is not int:
        return ErrorReply(None, "Missing or invalid field: id (an integer is required)")
    request_type = value.get("type")
    if request_type is None:
        return ErrorReply(request_id, "Missing field: type")
    if not isinstance(request_type, str) or request_type not in REQUEST_TYPES:
        shown = request_type if isinstance(request_type, str) else repr(request_type)
        return ErrorReply(request_id, f"Unknown request type: {shown}")
    try:
        # Decoding again with the one type gives msgspec's message naming the bad field.
        _typed_decoders[request_type].decode(frame)
    except msgspec.ValidationError as exc:
        error = f"Invalid request: {exc}"
    else:  # pragma: no cover - the fast path accepts anything convert accepts
        error = "Invalid request"
    subject = value.get(SUBJECT_FIELD.get(request_type, ""), "")
    return FailedReply(
        request_type=request_type,
        reply_to=request_id,
        error=error,
        subject=subject if isinstance(subject, str) else "",
    )


def failure_type(request_type: str) -> str:
    """The ``*_failed`` reply type of a request type."""
    return FAILURE_TYPE[request_type]


def encode(message: BrokerMessage | Request) -> bytes:
    """Encode a message as a compact JSON frame."""
    return _encoder.encode(message)


def decode_broker_message(frame: bytes | str) -> BrokerMessage:
    """Decode a broker -> client frame (used by clients); raises ``msgspec.DecodeError``."""
    return _broker_decoder.decode(frame)

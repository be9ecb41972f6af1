"""Frames to requests, and messages to frames.

``decode_request`` never raises: it returns either a request or a *rejection*, a value that
says how the bad-input table ("Bad input" in ``docs/protocol.md``) answers the frame:

==========================================================  ==================================
input                                                       rejection
==========================================================  ==================================
text frame that is not JSON, or a binary frame              ``CloseConnection(1003, reason)``
text frame that is not UTF-8                                ``CloseConnection(1007, reason)``
JSON that is not an object, or without a usable integer id  ``ErrorReply(None, error)``
unknown ``type`` with a usable ``id``                       ``ErrorReply(id, "Unknown ...")``
known ``type``, missing or ill-typed fields                 ``FailedReply`` naming the field
JSON nested deeper than ``max_depth`` levels               the type's ``FailedReply`` (or
                                                            ``ErrorReply``) saying so; past
                                                            ``READABLE_DEPTH`` levels, where
                                                            the id cannot be read safely,
                                                            ``CloseConnection(1003, reason)``
valid JSON this broker cannot carry (an unpaired surrogate  the rows above, with a reason
escape such as ``"\\ud800"``, an out-of-range number in   naming the value
a field other than the payload)
==========================================================  ==================================

(Frames over the size limit are refused with 1009 by the WebSocket layer before they get here.)
Any number in a payload (``1e400``, thousands of digits) is carried byte for byte: the payload
stays ``msgspec.Raw`` and is never converted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from shared.messages import REQUESTS, BrokerMessage, Request

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
    #: The ``broker_bad_frames`` kind when it is not the one the code implies.
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Answer with ``{"type": "error", ...}``; ``reply_to`` is set when the id was usable."""

    reply_to: int | None
    error: str
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class FailedReply:
    """Answer a known request type with its ``*_failed`` reply."""

    request_type: str
    reply_to: int
    error: str
    #: ``channelId`` / ``targetId`` echoed from the request when it held a string.
    subject: str
    kind: str | None = None


Rejection = CloseConnection | ErrorReply | FailedReply


def rejection_kind(rejection: Rejection) -> str:
    """The ``broker_bad_frames`` kind of a rejection: its own, else the one its row implies."""
    if rejection.kind is not None:
        return rejection.kind
    if isinstance(rejection, FailedReply):
        return "bad_fields"
    if isinstance(rejection, ErrorReply):
        return "unknown_type" if rejection.reply_to is not None else "bad_shape"
    if rejection.code == CLOSE_INVALID_DATA:
        return "invalid_utf8"
    return "invalid_json"


_request_decoder: Final[msgspec.json.Decoder[Request]] = msgspec.json.Decoder(Request)
_any_decoder: Final = msgspec.json.Decoder()
_typed_decoders: Final = {
    name: msgspec.json.Decoder(spec.request) for name, spec in REQUESTS.items()
}
_encoder: Final = msgspec.json.Encoder()
_broker_decoder: Final[msgspec.json.Decoder[BrokerMessage]] = msgspec.json.Decoder(BrokerMessage)


_NOT_UTF8: Final = CloseConnection(CLOSE_INVALID_DATA, "Invalid UTF-8")

#: ``broker_bad_frames`` kinds of the limits below.
TOO_DEEP: Final = "too_deep"
UNCARRIABLE: Final = "uncarriable"

#: The default bound on JSON nesting (the request object itself is level 1).
DEFAULT_MAX_DEPTH: Final = 64
#: Frames nested up to this deep are still parsed (to answer with the request's id) once
#: they are known to pass ``max_depth``; msgspec and the stdlib recurse once per level and
#: fail near the interpreter's recursion limit (about 1,000), so deeper ones are not parsed.
READABLE_DEPTH: Final = 256


def decode_request(
    frame: bytes | bytearray | memoryview | str, max_depth: int = DEFAULT_MAX_DEPTH
) -> Request | Rejection:
    """Decode one text frame from a client."""
    # Nearly every frame is ASCII bytes with fewer brackets than the bound: three C-speed
    # scans, and no other call, show that it passes both checks below.
    if not (
        type(frame) is bytes
        and frame.isascii()
        and frame.count(b"{") + frame.count(b"[") <= max_depth
    ):
        refusal = _unreadable(frame, max_depth)
        if refusal is not None:
            return refusal
    try:
        return _request_decoder.decode(frame)
    except msgspec.DecodeError:
        return _diagnose(frame)


def _unreadable(frame: bytes | bytearray | memoryview | str, max_depth: int) -> Rejection | None:
    """The rejection of a frame no parser may see, or None."""
    # msgspec checks the UTF-8 of the strings it decodes (raising UnicodeDecodeError, not a
    # DecodeError) but not of a Raw payload, which would reach the recipient, whose client
    # library would then fail its connection: check the whole frame first.
    if not isinstance(frame, str) and not _is_utf8(frame):
        return _NOT_UTF8
    # Checked before any parser sees the frame: past ~1,000 levels they raise RecursionError,
    # and a payload one node can read but another cannot must never reach the bus.
    depth = nesting_depth(frame, max_depth)
    if depth > max_depth:
        return _too_deep(frame, depth, max_depth)
    return None


_OPENERS: Final = (b"[", b"{")
# A JSON string, escapes included (the unrolled form: no backtracking per character).
_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Every bracket outside strings becomes "(" or ")"; every other byte is deleted.
_PARENS: Final = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth(frame: bytes | bytearray | memoryview | str, limit: int) -> int:
    """How deep ``frame``'s brackets nest, exactly up to ``max(limit, READABLE_DEPTH)``; any
    depth past that (or unbalanced brackets that pass it) is reported as one more than it.

    Nearly every frame has fewer brackets than ``limit`` and costs two C-speed counts.
    """
    data = frame.encode() if isinstance(frame, str) else bytes(frame)
    if data.count(_OPENERS[0]) + data.count(_OPENERS[1]) <= limit:
        return 0
    brackets = _STRING.sub(b"", data).translate(_PARENS, _NOT_BRACKETS)
    # Each pass removes every innermost pair (bytes.replace does not rescan what it built),
    # so the passes needed to empty the string are its nesting depth: C-speed scans only.
    bound = max(limit, READABLE_DEPTH)
    depth = 0
    while brackets and depth <= bound:
        shorter = brackets.replace(b"()", b"")
        if len(shorter) == len(brackets):
            return bound + 1
        brackets = shorter
        depth += 1
    return depth if not brackets else bound + 1


def _too_deep(frame: bytes | bytearray | memoryview | str, depth: int, limit: int) -> Rejection:
    error = f"JSON nested deeper than {limit} levels"
    if depth > READABLE_DEPTH:
        return CloseConnection(CLOSE_UNSUPPORTED_DATA, error, TOO_DEEP)
    parsed = _parse_any(frame)
    if parsed is None:
        return _INVALID_JSON
    return _answer_with(parsed[0], f"Invalid request: {error}", frame, TOO_DEEP)


def _reject_constant(name: str) -> None:
    # NaN, Infinity and -Infinity are not JSON; the stdlib accepts them unless told not to.
    raise ValueError(name)


def _stdlib_value(frame: bytes | bytearray | memoryview | str) -> Any:
    """The frame as the standard library reads JSON, numbers left as text; raises ValueError.

    It accepts every value the grammar allows that msgspec refuses (numbers out of range,
    unpaired surrogate escapes), so that those get an answer naming them instead of a close.
    """
    text = frame if isinstance(frame, str) else str(frame, "utf-8")
    return json.loads(
        text, parse_int=_parse_int, parse_float=_Number, parse_constant=_reject_constant
    )


def _parse_int(text: str) -> int | _Number:
    # Short integers are read (an id stays usable); long ones stay text, since converting
    # thousands of digits is quadratic (and past 4,300 refused by the interpreter).
    return int(text) if len(text) <= 18 else _Number(text)


class _Number(str):
    """A JSON number kept as its text (never an ``int``: it is no usable id)."""


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
    parsed = _parse_any(frame)
    if parsed is None:
        return _INVALID_JSON
    return _answer_with(parsed[0], None, frame)


_INVALID_JSON: Final = CloseConnection(CLOSE_UNSUPPORTED_DATA, "Invalid JSON")


def _parse_any(frame: bytes | bytearray | memoryview | str) -> tuple[Any] | None:
    """The frame's value (in a 1-tuple, since it may be None), or None when it is not JSON."""
    try:
        return (_any_decoder.decode(frame),)
    except msgspec.DecodeError:
        pass
    try:
        return (_stdlib_value(frame),)
    except (ValueError, RecursionError):
        return None


def _uncarriable() -> str:
    # Valid JSON that msgspec refuses: with the protocol's field types that is only an escaped
    # UTF-16 surrogate without its partner (a number out of range fails validation instead,
    # naming its field; payloads are carried raw).
    return (
        "the frame holds an unpaired UTF-16 surrogate escape (such as \\ud800), "
        "which is not Unicode text and cannot be carried"
    )


def _answer_with(
    value: Any,
    error: str | None,
    frame: bytes | bytearray | memoryview | str,
    kind: str | None = None,
) -> Rejection:
    """The rejection for a frame that parsed to ``value``; ``error`` is the reason a request
    with a usable id and known type fails (None: ask msgspec which field is wrong)."""
    if not isinstance(value, dict):
        return ErrorReply(None, "Message must be a JSON object", kind)
    request_id = value.get("id")
    if type(request_id) is not int:
        return ErrorReply(None, "Missing or invalid field: id (an integer is required)", kind)
    request_type = value.get("type")
    if request_type is None:
        return ErrorReply(request_id, "Missing field: type", kind)
    if not isinstance(request_type, str) or request_type not in REQUESTS:
        shown = request_type if isinstance(request_type, str) else repr(request_type)
        return ErrorReply(request_id, f"Unknown request type: {shown}", kind)
    if error is None:
        try:
            # Decoding again with the one type gives msgspec's message naming the bad field.
            _typed_decoders[request_type].decode(frame)
        except msgspec.ValidationError as exc:
            error = f"Invalid request: {exc}"
        except msgspec.DecodeError:
            # Valid JSON (the stdlib read it) that msgspec cannot: say which value it is.
            error = "Invalid request: " + _uncarriable()
            kind = UNCARRIABLE
        else:  # pragma: no cover - the fast path accepts anything convert accepts
            error = "Invalid request"
    subject = value.get(REQUESTS[request_type].subject_field or "", "")
    return FailedReply(
        request_type=request_type,
        reply_to=request_id,
        error=error,
        # type(): a number kept as text (_Number) is no channel or connection id.
        subject=subject if type(subject) is str else "",
        kind=kind,
    )


def failure_type(request_type: str) -> str:
    """The ``*_failed`` reply type of a request type."""
    return REQUESTS[request_type].failure_type


#: Encode a message as a compact JSON frame. The encoder's own method, not a function that
#: calls it: it runs for every frame the node sends, and a Python call costs as much as the
#: encoding of a short reply.
encode: Final[Callable[[BrokerMessage | Request], bytes]] = _encoder.encode


def decode_broker_message(frame: bytes | str) -> BrokerMessage:
    """Decode a broker -> client frame (used by clients); raises ``msgspec.DecodeError``."""
    return _broker_decoder.decode(frame)

"""What nodes say to each other over the bus.

A bus payload is a JSON array of envelopes for one node, in the order they were produced.
Envelopes stay JSON (not msgpack) because a delivery carries the client's payload as a raw
JSON value, which is spliced in and out without being parsed.

One envelope that cannot be decoded (a bug, a newer or older node, a payload nested too deep
to parse) fails alone: the batch is decoded at once (the usual case, at msgspec's speed), and
only when that fails is it split into its elements, each decoded on its own; the ones that
fail are dropped and counted, the others are handled.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec

from broker_node.core.records import ChannelRecord
from shared.ids import ChannelId, ConnectionId, NodeId


class _Envelope(msgspec.Struct, frozen=True, tag_field="k", array_like=True):
    pass


class Deliver(_Envelope, frozen=True, tag="d"):
    """Write ``payload`` to ``recipient`` as a ``channel_message``, then confirm ``seq``."""

    seq: int
    sender_node: NodeId
    channel_id: ChannelId
    recipient: ConnectionId
    payload: msgspec.Raw
    #: The sender's ``seq`` of the message (issue 14), copied into the ``channel_message``.
    message_seq: int | None = None


class Confirm(_Envelope, frozen=True, tag="c"):
    """Deliveries written (``written``) or refused (``refused``: seq and reason), or kept for
    a detached session (``held``)."""

    written: list[int]
    refused: list[tuple[int, str]]
    held: list[int] = []


class Incoming(_Envelope, frozen=True, tag="i"):
    """A channel was opened to a connection of the receiving node; answer with ``OpenResult``."""

    seq: int
    channel: ChannelRecord


class OpenResult(_Envelope, frozen=True, tag="o"):
    """The target's node told (or could not tell) the target of channel open ``seq``."""

    seq: int
    error: str | None


class Closed(_Envelope, frozen=True, tag="x"):
    """The other end closed the channel (or went away): notify ``recipient``."""

    channel_id: ChannelId
    recipient: ConnectionId


class CloseRequest(_Envelope, frozen=True, tag="q"):
    """An end closed the channel: notify ``recipient``, then answer with ``CloseResult``.

    The closer hears ``channel_closed`` only once the other end's node applied the close, so
    that whatever happens causally after that reply sees the channel gone, as on one node.
    """

    seq: int
    sender_node: NodeId
    channel_id: ChannelId
    recipient: ConnectionId


class CloseResult(_Envelope, frozen=True, tag="r"):
    """Close ``seq`` was applied (``applied``), or the channel was already gone there."""

    seq: int
    applied: bool


# --- session resume (issue 14) ----------------------------------------------------------


class Take(_Envelope, frozen=True, tag="t"):
    """A resume on ``node`` claimed session ``connection_id`` (epoch ``epoch``) in the
    registry: hand it over, with the frames after ``last_id``."""

    connection_id: ConnectionId
    epoch: int
    node: NodeId
    last_id: int


class Handover(_Envelope, frozen=True, tag="h"):
    """A session's state, for the node that took it over (``found`` False: not held here)."""

    connection_id: ConnectionId
    epoch: int
    found: bool
    role: str = ""
    legacy_errors: bool = False
    #: The id of the session's next frame, and the frames not yet acknowledged, in order.
    next_id: int = 1
    frames: list[msgspec.Raw] = []
    channels: list[ChannelRecord] = []
    last_request_id: int | None = None
    #: The frames may be incomplete (a node that held the session was lost).
    lost: bool = False
    #: Set when the session is handed off detached (a draining node's), with when it left.
    detached_at_ms: int | None = None
    subject: str | None = None
    window: int = 0
    token_hash: str = ""


class Moved(_Envelope, frozen=True, tag="m"):
    """The end ``connection_id`` of channel ``channel_id`` is now held by ``node``."""

    channel_id: ChannelId
    connection_id: ConnectionId
    node: NodeId


class Acked(_Envelope, frozen=True, tag="a"):
    """Tell ``recipient``: the peer processed its messages on the channel up to ``seq``."""

    channel_id: ChannelId
    recipient: ConnectionId
    seq: int


class Resync(_Envelope, frozen=True, tag="y"):
    """Tell ``recipient``: the peer resumed having processed its messages up to ``last_seq``."""

    channel_id: ChannelId
    recipient: ConnectionId
    last_seq: int


Envelope = (
    Deliver
    | Confirm
    | Incoming
    | OpenResult
    | Closed
    | CloseRequest
    | CloseResult
    | Take
    | Handover
    | Moved
    | Acked
    | Resync
)

_batch_decoder: Final[msgspec.json.Decoder[list[Envelope]]] = msgspec.json.Decoder(list[Envelope])
_envelope_decoder: Final[msgspec.json.Decoder[Envelope]] = msgspec.json.Decoder(Envelope)
_encoder: Final = msgspec.json.Encoder()
#: The tokens that delimit JSON values: whole strings (so that brackets and commas inside
#: them are skipped), brackets and commas. Everything else lies between them.
_TOKENS: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')


def encode_batch(envelopes: list[Envelope]) -> bytes:
    return _encoder.encode(envelopes)


def decode_batch(data: bytes) -> tuple[list[Envelope], int]:
    """The envelopes of a bus payload that could be decoded, and how many could not.

    Never raises. A payload that is not a JSON array at all counts as one undecodable
    envelope; so does whatever follows a break in the array's structure.
    """
    try:
        return _batch_decoder.decode(data), 0
    except (msgspec.DecodeError, RecursionError):
        # RecursionError: a value nested past the interpreter's recursion limit.
        pass
    elements, broken = _split_array(data)
    envelopes: list[Envelope] = []
    dropped = int(broken)
    for element in elements:
        try:
            envelopes.append(_envelope_decoder.decode(element))
        except (msgspec.DecodeError, RecursionError):
            dropped += 1
    return envelopes, dropped


def _split_array(data: bytes) -> tuple[list[memoryview], bool]:
    """The top-level elements of a JSON array (unparsed), and whether its structure broke."""
    view = memoryview(data)
    elements: list[memoryview] = []
    depth = 0
    start = -1
    for token in _TOKENS.finditer(data):
        mark = token.group()
        if mark in _OPEN:
            depth += 1
            if depth == 1:
                if mark != b"[" or data[: token.start()].strip():
                    return elements, True
                start = token.end()
        elif mark in _CLOSE:
            depth -= 1
            if depth == 0:
                if data[start : token.start()].strip():
                    elements.append(view[start : token.start()])
                return elements, bool(data[token.end() :].strip())
            if depth < 0:
                return elements, True
        elif mark == b"," and depth == 1:
            elements.append(view[start : token.start()])
            start = token.end()
    return elements, True


_OPEN: Final = (b"[", b"{")
_CLOSE: Final = (b"]", b"}")

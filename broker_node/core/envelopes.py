"""What nodes say to each other over the bus.

A bus payload carries envelopes for one node, in the order they were produced, each framed on
its own: ``<length>:<JSON envelope>`` repeated (the length in ASCII decimal, in bytes). One
envelope that cannot be decoded (a bug, a newer or older node, a payload too deep to parse) is
dropped and counted alone; the others of its batch are handled. Envelopes stay JSON (not
msgpack) because a delivery carries the client's payload as a raw JSON value, which is spliced
in and out without being parsed. A payload that starts with ``[`` is the former framing (one
JSON array per batch), still read during a rolling upgrade.
"""

from __future__ import annotations

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


class Confirm(_Envelope, frozen=True, tag="c"):
    """Deliveries written (``written``) or refused (``refused``: seq and reason)."""

    written: list[int]
    refused: list[tuple[int, str]]


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


Envelope = Deliver | Confirm | Incoming | OpenResult | Closed

_batch_decoder: Final[msgspec.json.Decoder[list[Envelope]]] = msgspec.json.Decoder(list[Envelope])
_envelope_decoder: Final[msgspec.json.Decoder[Envelope]] = msgspec.json.Decoder(Envelope)
_encoder: Final = msgspec.json.Encoder()
#: Digits of the longest length prefix read (a bus payload is far below 10**12 bytes).
_MAX_PREFIX: Final = 12


def encode_batch(envelopes: list[Envelope]) -> bytes:
    encode = _encoder.encode
    parts: list[bytes] = []
    for envelope in envelopes:
        data = encode(envelope)
        parts.append(b"%d:" % len(data))
        parts.append(data)
    return b"".join(parts)


def decode_batch(data: bytes) -> tuple[list[Envelope], int]:
    """The envelopes of a bus payload that could be decoded, and how many could not.

    Never raises: a broken length prefix loses the rest of the payload (counted as one).
    """
    if data[:1] == b"[":
        try:
            return _batch_decoder.decode(data), 0
        except (msgspec.DecodeError, RecursionError):
            return [], 1
    envelopes: list[Envelope] = []
    dropped = 0
    decode = _envelope_decoder.decode
    view = memoryview(data)
    position = 0
    size = len(data)
    while position < size:
        colon = data.find(b":", position, position + _MAX_PREFIX + 1)
        digits = data[position:colon]
        if colon < 0 or not digits.isdigit():
            return envelopes, dropped + 1
        end = colon + 1 + int(digits)
        if end > size:
            return envelopes, dropped + 1
        try:
            envelopes.append(decode(view[colon + 1 : end]))
        except (msgspec.DecodeError, RecursionError):
            # RecursionError: a JSON value nested past the interpreter's recursion limit.
            dropped += 1
        position = end
    return envelopes, dropped

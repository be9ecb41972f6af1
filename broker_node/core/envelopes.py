"""What nodes say to each other over the bus.

A bus payload is a JSON array of envelopes for one node, in the order they were produced.
Envelopes stay JSON (not msgpack) because a delivery carries the client's payload as a raw
JSON value, which is spliced in and out without being parsed.
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


Envelope = Deliver | Confirm | Incoming | OpenResult | Closed | CloseRequest | CloseResult

_batch_decoder: Final[msgspec.json.Decoder[list[Envelope]]] = msgspec.json.Decoder(list[Envelope])
_encoder: Final = msgspec.json.Encoder()


def encode_batch(envelopes: list[Envelope]) -> bytes:
    return _encoder.encode(envelopes)


def decode_batch(data: bytes) -> list[Envelope]:
    """Decode a bus payload; raises ``msgspec.DecodeError`` on garbage."""
    return _batch_decoder.decode(data)

"""Frames the generator sends, and the broker frames it reads (pure, no I/O).

Replies are matched by ``replyTo`` and classified by their fields, never by ``type`` alone:
our node answers with the README's typed replies (``channel_message_sent``), while the
original package answers success with ``{..., "replyTo": n, "id": m}`` and no ``type``, and
failure with ``{"type": "error", "error": ...}``.

The bench payload is a JSON object ``{"s": seq, "t": send_ns, "p": "xxx..."}``: the
per-channel sequence number, the sender's ``time.monotonic_ns()`` (CLOCK_MONOTONIC is one
clock for every process of the machine) and padding up to the requested payload size.

Resumable sessions (``--resume``, issue 14) add what the SDK puts on the wire: ``seq`` on each
``message`` (the payload's ``s`` again, outside the payload where the node can see it) and the
``ack`` frames of :mod:`client.bench.acks`; the broker's extra fields (``resumeToken``,
``held``, ``seq``, ``complete``) are read here.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec

__all__ = [
    "BenchPayload",
    "BrokerFrame",
    "FrameKind",
    "MessageFrameBuilder",
    "classify",
    "decode_frame",
    "encode_ack",
    "encode_request",
]


class BenchPayload(msgspec.Struct, frozen=True):
    """The part of a bench payload the receiver reads (the padding is skipped)."""

    s: int
    t: int


class BrokerFrame(msgspec.Struct, frozen=True, kw_only=True):
    """Any broker -> client frame, typed or not; absent fields stay ``None``."""

    type: str | None = None
    id: int | None = None
    replyTo: int | None = None
    channelId: str | None = None
    connectionId: str | None = None
    targetId: str | None = None
    ids: list[str] | None = None
    error: str | None = None
    from_: str | None = msgspec.field(default=None, name="from")
    payload: BenchPayload | None = None
    # Session resume (issue 14).
    resumeToken: str | None = None
    seq: int | None = None
    held: bool | None = None
    complete: bool | None = None


class FrameKind(enum.Enum):
    """What a broker frame means to the generator."""

    REPLY_OK = "reply_ok"
    REPLY_FAILED = "reply_failed"
    CHANNEL_MESSAGE = "channel_message"
    INCOMING_CHANNEL = "incoming_channel"
    CHANNEL_CLOSED = "channel_closed_notification"
    CHANNEL_ACKED = "channel_acked"
    ERROR = "error"
    OTHER = "other"


_decoder: Final = msgspec.json.Decoder(BrokerFrame)
_encoder: Final = msgspec.json.Encoder()

_UNSOLICITED: Final[dict[str, FrameKind]] = {
    "channel_message": FrameKind.CHANNEL_MESSAGE,
    "incoming_channel": FrameKind.INCOMING_CHANNEL,
    "channel_closed_notification": FrameKind.CHANNEL_CLOSED,
    "channel_acked": FrameKind.CHANNEL_ACKED,
}


def decode_frame(data: bytes | bytearray | memoryview | str) -> BrokerFrame:
    """Decode one broker frame; raises ``msgspec.DecodeError`` (not JSON, or a foreign payload)."""
    return _decoder.decode(data)


def classify(frame: BrokerFrame) -> FrameKind:
    """Say what a frame is: a reply (good or failed), a notification, or an unmatched error."""
    if frame.replyTo is not None:
        failed = frame.error is not None or (
            frame.type is not None and (frame.type.endswith("_failed") or frame.type == "error")
        )
        return FrameKind.REPLY_FAILED if failed else FrameKind.REPLY_OK
    if frame.type is None:
        return FrameKind.OTHER
    if frame.type == "error":
        return FrameKind.ERROR
    return _UNSOLICITED.get(frame.type, FrameKind.OTHER)


def encode_request(request_type: str, request_id: int, **fields: object) -> bytes:
    """A control request (``register``, ``open``, ``resume``, ...) as a JSON frame."""
    return _encoder.encode({"type": request_type, "id": request_id, **fields})


def encode_ack(request_id: int, last_id: int, channels: dict[str, int]) -> bytes:
    """An ``ack``: every broker frame up to ``last_id`` was processed, and per channel the
    highest ``seq`` processed from the peer (the field is left out when there is none)."""
    if channels:
        return encode_request("ack", request_id, lastId=last_id, channels=channels)
    return encode_request("ack", request_id, lastId=last_id)


class MessageFrameBuilder:
    """Builds ``message`` frames of one channel quickly (one ``%`` format per frame).

    The channel id and the padding are fixed per channel, so a frame is a template with three
    integers filled in. ``payload_size`` is the size of the JSON payload, met exactly while the
    sequence number and timestamp keep the width they had at ``reference_seq`` (within a few
    bytes otherwise). With ``with_seq`` the frame also carries the sequence number as the
    message's ``seq``, as a resumable SDK client sends it.
    """

    __slots__ = ("_template", "_with_seq")

    #: Timestamps from ``time.monotonic_ns()`` on a machine up for less than ~3 years: 17 digits.
    REFERENCE_NS: Final = 10**16
    #: The widest sequence number the size is computed for.
    REFERENCE_SEQ: Final = 100_000

    def __init__(self, channel_id: str, payload_size: int, *, with_seq: bool = False) -> None:
        channel = _encoder.encode(channel_id)  # a JSON string, quotes included
        bare = b'{"s":%d,"t":%d,"p":""}' % (self.REFERENCE_SEQ, self.REFERENCE_NS)
        padding = b"x" * max(0, payload_size - len(bare))
        self._with_seq = with_seq
        self._template = (
            b'{"type":"message","id":%d,"channelId":'
            + channel.replace(b"%", b"%%")
            + (b',"seq":%d' if with_seq else b"")
            + b',"payload":{"s":%d,"t":%d,"p":"'
            + padding
            + b'"}}'
        )

    def build(self, request_id: int, seq: int, sent_ns: int) -> bytes:
        """The frame of message ``seq`` sent at ``sent_ns`` with request id ``request_id``."""
        if self._with_seq:
            return self._template % (request_id, seq, seq, sent_ns)
        return self._template % (request_id, seq, sent_ns)

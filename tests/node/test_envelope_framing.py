"""Bus payload framing: one undecodable envelope fails alone (issue 11 item 3)."""

from __future__ import annotations

import msgspec

from broker_node.core.envelopes import Closed, Deliver, Envelope, decode_batch, encode_batch
from shared.ids import ChannelId, ConnectionId, NodeId


def deliver(seq: int, payload: bytes) -> Deliver:
    return Deliver(
        seq=seq,
        sender_node=NodeId("n"),
        channel_id=ChannelId("c"),
        recipient=ConnectionId("r"),
        payload=msgspec.Raw(payload),
    )


HEALTHY: list[Envelope] = [deliver(1, b'{"a": [1, 2]}'), Closed(ChannelId("c"), ConnectionId("r"))]


def test_round_trip() -> None:
    assert decode_batch(encode_batch(HEALTHY)) == (HEALTHY, 0)
    assert decode_batch(b"") == ([], 0)


def test_a_payload_with_colons_and_newlines_round_trips() -> None:
    batch: list[Envelope] = [deliver(1, b'{"x:y"\n:\n"12:"}'), deliver(2, b"3")]
    assert decode_batch(encode_batch(batch)) == (batch, 0)


def test_a_too_deep_envelope_fails_alone() -> None:
    deep = deliver(2, b"[" * 5000 + b"]" * 5000)
    data = encode_batch([HEALTHY[0], deep, HEALTHY[1]])
    assert decode_batch(data) == (HEALTHY, 1)


def test_an_undecodable_envelope_fails_alone() -> None:
    good = encode_batch(HEALTHY[:1])
    garbage = b'["d", 1]'
    data = good + b"%d:" % len(garbage) + garbage + encode_batch(HEALTHY[1:])
    assert decode_batch(data) == (HEALTHY, 1)


def test_broken_framing_keeps_what_came_before() -> None:
    good = encode_batch(HEALTHY[:1])
    assert decode_batch(good + b"xx:yy") == (HEALTHY[:1], 1)
    assert decode_batch(good + b"999:[]") == (HEALTHY[:1], 1)
    assert decode_batch(good + b"12345678901234567890") == (HEALTHY[:1], 1)


def test_the_former_array_framing_is_still_read() -> None:
    legacy = msgspec.json.encode(HEALTHY)
    assert decode_batch(legacy) == (HEALTHY, 0)
    assert decode_batch(b"[" * 5000) == ([], 1)

"""Bus payloads: one undecodable envelope fails alone (issue 11 item 3)."""

from __future__ import annotations

import msgspec
import pytest

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


def elements(batch: list[Envelope]) -> list[bytes]:
    return [msgspec.json.encode(envelope) for envelope in batch]


def array(*parts: bytes) -> bytes:
    return b"[" + b",".join(parts) + b"]"


def test_round_trip() -> None:
    assert decode_batch(encode_batch(HEALTHY)) == (HEALTHY, 0)
    assert decode_batch(b"[]") == ([], 0)


def test_a_too_deep_envelope_fails_alone() -> None:
    deep = deliver(2, b"[" * 5000 + b"]" * 5000)
    assert decode_batch(encode_batch([HEALTHY[0], deep, HEALTHY[1]])) == (HEALTHY, 1)


@pytest.mark.parametrize(
    "garbage", [b'["d", 1]', b'["zz", "unknown tag"]', b"17", b'{"k": "d"}', b'"],[{"']
)
def test_an_undecodable_envelope_fails_alone(garbage: bytes) -> None:
    first, second = elements(HEALTHY)
    assert decode_batch(array(first, garbage, second)) == (HEALTHY, 1)


def test_brackets_commas_and_escapes_inside_strings_do_not_split() -> None:
    tricky = deliver(3, b'{"x": "],[{\\"}\\\\", "y": [",", "]"]}')
    bad = b'["d", 1]'
    data = array(elements([tricky])[0], bad, elements(HEALTHY)[1])
    assert decode_batch(data) == ([tricky, HEALTHY[1]], 1)


@pytest.mark.parametrize("data", [b"", b"garbage", b"{}", b'"["', b"]", b"[] trailing"])
def test_not_an_array_counts_as_one(data: bytes) -> None:
    assert decode_batch(data) == ([], 1)


def test_a_broken_array_keeps_what_came_before() -> None:
    first, second = elements(HEALTHY)
    # The unterminated last element is the one lost.
    assert decode_batch(array(first, second)[:-1]) == (HEALTHY[:1], 1)
    assert decode_batch(array(first) + b" trailing") == (HEALTHY[:1], 1)

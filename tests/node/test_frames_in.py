"""Frames from a client, byte for byte over a real socket: the fast path and what it hands over.

Every frame layout a client may send, and the malformed ones, end as they did when websockets
parsed everything: requests answered in order, pings answered, fragments assembled, protocol
errors closed with the right code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

import broker_node.connection
from broker_node.config import Settings
from broker_node.connection import ClientConnection
from broker_node.node import BrokerNode
from shared.codec import Rejection
from shared.ids import NodeId
from shared.messages import Request
from tests.support.polling import wait_until
from tests.support.raw_ws import (
    OP_BINARY,
    OP_CONT,
    OP_PING,
    RawClient,
    client_frame,
    text,
)
from tests.support.wire import WireClient

SMALL_LIMIT = 4096


@pytest.fixture
async def small_node() -> AsyncIterator[BrokerNode]:
    settings = Settings(
        host="127.0.0.1", port=0, node_id=NodeId("frames-in"), max_message_size=SMALL_LIMIT
    )
    async with BrokerNode(settings) as running:
        yield running


async def raw_and_peer(node: BrokerNode) -> tuple[RawClient, WireClient, str]:
    """A registered raw client, a registered peer, and a channel from the first to the second."""
    raw = await RawClient.connect(node.port)
    assert (await raw.request({"type": "register", "id": 1, "role": "raw"}))["type"] == "registered"
    peer = await WireClient(f"ws://127.0.0.1:{node.port}").__aenter__()
    peer_id = await peer.register("peer")
    opened = await raw.request({"type": "open", "id": 2, "targetId": peer_id})
    assert opened["type"] == "channel_opened", opened
    await peer.notification("incoming_channel")
    return raw, peer, str(opened["channelId"])


def message(request_id: int, channel: str, payload: Any) -> dict[str, Any]:
    return {"type": "message", "id": request_id, "channelId": channel, "payload": payload}


def list_by_role(request_id: int, role: str = "raw") -> dict[str, Any]:
    return {"type": "list_by_role", "id": request_id, "role": role}


async def test_many_frames_in_one_write_are_handled_in_order(node: BrokerNode) -> None:
    raw, peer, channel = await raw_and_peer(node)
    await raw.write(b"".join(text(message(100 + n, channel, n)) for n in range(300)))
    for n in range(300):
        reply = await raw.json()
        assert reply["type"] == "channel_message_sent" and reply["replyTo"] == 100 + n
    for n in range(300):
        assert (await peer.notification("channel_message"))["payload"] == n
    await raw.aclose()
    await peer.close()


async def read_by_node(sock: ClientConnection, total: int) -> None:
    """Until the node has read ``total`` bytes from ``sock``: what was written before is a
    read of its own, and what is written next comes in another."""
    await wait_until(
        lambda: sock.bytes_received >= total,
        timeout=10,
        interval=0.001,  # one wait per cut of a frame: hundreds per test
        message=f"the node to read {total} bytes",
    )


@pytest.mark.parametrize("payload_size", [10, 200], ids=["7-bit-length", "16-bit-length"])
async def test_a_frame_cut_in_two_at_every_byte(node: BrokerNode, payload_size: int) -> None:
    raw = await RawClient.connect(node.port)
    (sock,) = node.sockets
    frame = text({"type": "list_by_role", "id": 0, "role": "r" * payload_size})
    for cut in range(1, len(frame)):
        received = sock.bytes_received
        await raw.write(frame[:cut])
        await read_by_node(sock, received + cut)
        await raw.write(frame[cut:])
        assert (await raw.json())["type"] == "list_by_role_failed"  # unregistered caller
    await raw.aclose()


async def test_126_and_127_length_encodings(node: BrokerNode) -> None:
    raw, peer, channel = await raw_and_peer(node)
    medium = "m" * 500
    large = "L" * 70_000
    await raw.write(
        text(message(10, channel, medium))
        + text(message(11, channel, large))
        + text(message(12, channel, "small, in a 64-bit length"), length_bytes=8)
        + text(message(13, channel, "small, in a 16-bit length"), length_bytes=2)
    )
    for request_id in (10, 11, 12, 13):
        assert (await raw.json())["replyTo"] == request_id
    for payload in (medium, large, "small, in a 64-bit length", "small, in a 16-bit length"):
        assert (await peer.notification("channel_message"))["payload"] == payload
    # The 127 encoding cut inside its length and inside its masking key.
    frame = text(message(14, channel, large))
    (sock,) = [client for client in node.sockets if client.connection_id != peer.connection_id]
    for cut in (3, 7, 11, 13):
        received = sock.bytes_received
        await raw.write(frame[:cut])
        await read_by_node(sock, received + cut)
        await raw.write(frame[cut:])
        assert (await raw.json())["replyTo"] == 14
        assert (await peer.notification("channel_message"))["payload"] == large
    await raw.aclose()
    await peer.close()


async def test_pings_between_text_frames_are_answered_and_order_kept(node: BrokerNode) -> None:
    raw, peer, channel = await raw_and_peer(node)
    await raw.write(
        text(message(20, channel, "before"))
        + client_frame(b"ping 1", opcode=OP_PING)
        + text({"type": "close", "id": 21, "channelId": channel})
        + client_frame(b"ping 2", opcode=OP_PING)
        + text(message(22, channel, "after the close"))
    )
    replies = [await raw.json() for _ in range(3)]
    assert [(r["replyTo"], r["type"]) for r in replies] == [
        (20, "channel_message_sent"),
        (21, "channel_closed"),
        (22, "channel_message_failed"),
    ]
    while len(raw.pongs) < 2:
        opcode, payload = await raw.frame()
        if opcode == 0xA:
            raw.pongs.append(payload)
    assert raw.pongs == [b"ping 1", b"ping 2"]
    assert (await peer.notification("channel_message"))["payload"] == "before"
    await raw.aclose()
    await peer.close()


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "write-per-frame"])
async def test_a_fragmented_message_with_a_ping_inside(node: BrokerNode, one_write: bool) -> None:
    raw = await RawClient.connect(node.port)
    request = json.dumps(
        {"type": "register", "id": 1, "role": "fragmented-é"}, ensure_ascii=False
    ).encode()
    # The cut between the parts falls inside the two bytes of "é".
    cut = request.index("é".encode()) + 1
    frames = [
        client_frame(request[:10], fin=False),
        client_frame(b"inside", opcode=OP_PING),
        client_frame(request[10:cut], opcode=OP_CONT, fin=False),
        client_frame(request[cut:], opcode=OP_CONT),
        text(list_by_role(2, "fragmented-é")),
    ]
    if one_write:
        await raw.write(b"".join(frames))
    else:
        (sock,) = node.sockets
        for frame in frames:
            received = sock.bytes_received
            await raw.write(frame)
            await read_by_node(sock, received + len(frame))
    registered = await raw.json()
    assert registered["type"] == "registered" and registered["replyTo"] == 1
    listed = await raw.json()
    assert listed["replyTo"] == 2 and listed["ids"] == [registered["connectionId"]]
    assert raw.pongs == [b"inside"]
    await raw.aclose()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(b'{"type":"register","id":1,"role":"r"}', mask=None), 1002),
        (client_frame(b'{"type":"register","id":1,"role":"r"}', rsv=0b100), 1002),
        (client_frame(b'{"type":"register","id":1,"role":"r"}', rsv=0b001), 1002),
        (client_frame(b'{"type":"register"', opcode=OP_CONT), 1002),
        (client_frame(b"x", opcode=0x3), 1002),
        (client_frame(b"x" * 200, opcode=OP_PING), 1002),
        (client_frame(b'{"type":"register","id":1,"role":"r"}', opcode=OP_BINARY), 1003),
        (client_frame(b"not json"), 1003),
    ],
    ids=[
        "unmasked",
        "rsv1",
        "rsv3",
        "stray-continuation",
        "reserved-opcode",
        "long-ping",
        "binary",
        "not-json",
    ],
)
async def test_bad_frames_close_with_their_code(node: BrokerNode, frame: bytes, code: int) -> None:
    raw, peer, channel = await raw_and_peer(node)
    # A good frame first, in the same write: it is handled before the bad one closes the way.
    await raw.write(text(message(5, channel, "last")) + frame)
    assert (await raw.json())["replyTo"] == 5
    assert await raw.close_code() == code
    assert (await peer.notification("channel_message"))["payload"] == "last"
    assert (await peer.notification("channel_closed_notification"))["channelId"] == channel
    await raw.aclose()
    await peer.close()


async def test_a_text_frame_in_the_middle_of_a_fragmented_message_closes_1002(
    node: BrokerNode,
) -> None:
    raw = await RawClient.connect(node.port)
    await raw.write(client_frame(b'{"type":', fin=False) + text(list_by_role(1)))
    assert await raw.close_code() == 1002
    await raw.aclose()


@pytest.mark.parametrize("length_bytes", [2, 8])
async def test_a_header_over_the_limit_closes_1009_without_waiting_for_the_payload(
    small_node: BrokerNode, length_bytes: int
) -> None:
    raw = await RawClient.connect(small_node.port)
    over = client_frame(b"x" * (SMALL_LIMIT + 1), length_bytes=length_bytes)
    # Only the header (and masking key) is sent: the node must not wait for 4 KiB more.
    await raw.write(over[: 2 + length_bytes + 4])
    assert await raw.close_code() == 1009
    await raw.aclose()
    assert small_node.stats.bad_frames["too_big"] == 1


async def test_a_frame_of_exactly_the_limit_is_handled(small_node: BrokerNode) -> None:
    raw = await RawClient.connect(small_node.port)
    request = json.dumps(list_by_role(1, "")).encode()
    padded = request[:-1] + b" " * (SMALL_LIMIT - len(request)) + b"}"
    assert len(padded) == SMALL_LIMIT
    await raw.write(client_frame(padded))
    assert (await raw.json())["replyTo"] == 1
    await raw.write(client_frame(padded + b" "))
    assert await raw.close_code() == 1009
    await raw.aclose()


@pytest.mark.parametrize(
    "frames",
    [
        [b'{"type":"register","id":1,"role":"\xff"}'],
        [b"\xc3\x28"],
        [b'{"type":"register","id":1,"role":"\xed\xa0\x80"}'],  # an encoded surrogate
        [b'{"type":"register","id":1,"role":"\xc0\xaf"}'],  # an overlong encoding
        [b'{"type":"register","id":1,', b'"role":"\xe9t\xe9"}'],  # Latin-1, in fragments
    ],
    ids=["invalid-start-byte", "bad-continuation", "surrogate", "overlong", "fragmented"],
)
async def test_text_that_is_not_utf8_closes_1007(node: BrokerNode, frames: list[bytes]) -> None:
    raw = await RawClient.connect(node.port)
    if len(frames) == 1:
        await raw.write(client_frame(frames[0]))
    else:
        first, last = frames
        await raw.write(client_frame(first, fin=False) + client_frame(last, opcode=OP_CONT))
    assert await raw.close_code() == 1007
    assert node.stats.bad_frames["invalid_utf8"] == 1
    await raw.aclose()


async def test_a_payload_that_is_not_utf8_is_refused_not_forwarded(node: BrokerNode) -> None:
    # msgspec passes a Raw payload through unchecked: the recipient's client would fail its
    # own connection on it if the node forwarded it.
    raw, peer, channel = await raw_and_peer(node)
    frame = json.dumps(message(7, channel, "PLACEHOLDER")).encode()
    await raw.write(client_frame(frame.replace(b"PLACEHOLDER", b"\xff\xfe")))
    assert await raw.close_code() == 1007
    assert (await peer.notification("channel_closed_notification"))["channelId"] == channel
    # The peer is still connected and was sent nothing else.
    assert (await peer.request("list_by_role", role="peer"))["type"] == "connections"
    assert peer.received == []
    await raw.aclose()
    await peer.close()


async def test_non_ascii_utf8_is_delivered(node: BrokerNode) -> None:
    raw, peer, channel = await raw_and_peer(node)
    payload = "été 🚀 €"
    assert (await raw.request(message(8, channel, payload)))["type"] == "channel_message_sent"
    assert (await peer.notification("channel_message"))["payload"] == payload
    await raw.aclose()
    await peer.close()


async def test_frames_sent_with_the_handshake_request(node: BrokerNode) -> None:
    # A client that does not wait for the 101: websockets gets the request alone, and the fast
    # path every byte after it, the last frame only partly.
    second = text(list_by_role(2))
    raw = await RawClient.connect(
        node.port, after_request=text({"type": "register", "id": 1, "role": "raw"}) + second[:5]
    )
    # The first frame was read (with the request, or behind it): the part of the second waits.
    assert (await raw.json())["replyTo"] == 1
    await raw.write(second[5:] + text(list_by_role(3)))
    assert (await raw.json())["replyTo"] == 2
    assert (await raw.json())["replyTo"] == 3
    await raw.aclose()


async def test_eof_in_the_middle_of_a_frame_drops_the_client(node: BrokerNode) -> None:
    raw, peer, channel = await raw_and_peer(node)
    frame = text(message(9, channel, "never finished"))
    (sock,) = [client for client in node.sockets if client.connection_id != peer.connection_id]
    received = sock.bytes_received
    await raw.write(frame[:12])
    await read_by_node(sock, received + 12)
    raw.writer.write_eof()
    assert await raw.at_eof()
    assert (await peer.notification("channel_closed_notification"))["channelId"] == channel
    assert (await peer.request("list_by_role", role="raw"))["ids"] == []
    await raw.aclose()
    await peer.close()


async def test_the_closing_handshake_after_text_frames(node: BrokerNode) -> None:
    raw, peer, channel = await raw_and_peer(node)
    close = client_frame((1000).to_bytes(2, "big") + b"bye", opcode=0x8)
    await raw.write(text(message(3, channel, "last words")) + close + text(list_by_role(4)))
    assert (await raw.json())["replyTo"] == 3
    # The node echoes the close and ignores what follows it.
    assert await raw.close_code() == 1000
    assert await raw.at_eof()
    assert (await peer.notification("channel_message"))["payload"] == "last words"
    await raw.aclose()
    await peer.close()


async def test_paused_reading_loses_and_reorders_nothing(
    node: BrokerNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small backlog bound makes reading pause and resume many times within the burst.
    monkeypatch.setattr(broker_node.connection, "MAX_BACKLOG", 8)
    paused: list[bool] = []
    enqueue = ClientConnection._enqueue

    def spy(self: ClientConnection, request: Request | Rejection) -> None:
        enqueue(self, request)
        paused.append(self.reading_paused)

    monkeypatch.setattr(ClientConnection, "_enqueue", spy)
    raw, peer, channel = await raw_and_peer(node)
    frames = []
    for n in range(2000):
        frames.append(text(list_by_role(1000 + n) if n % 3 else message(1000 + n, channel, n)))
        if n % 100 == 0:
            frames.append(client_frame(str(n).encode(), opcode=OP_PING))
    await raw.write(b"".join(frames))
    replies = [await raw.json() for _ in range(2000)]
    # Replies of each kind keep request order; a confirmation waits for the recipient's
    # socket, so it may come after the reply to a later list_by_role (as across nodes).
    for kind in ("connections", "channel_message_sent"):
        ids = [reply["replyTo"] for reply in replies if reply["type"] == kind]
        assert ids == sorted(ids)
    assert sorted(reply["replyTo"] for reply in replies) == list(range(1000, 3000))
    assert any(paused)
    assert raw.pongs == [str(n).encode() for n in range(0, 2000, 100)]
    for n in range(0, 2000, 3):
        assert (await peer.notification("channel_message"))["payload"] == n
    await raw.aclose()
    await peer.close()

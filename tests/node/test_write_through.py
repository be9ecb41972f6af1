"""A read of one whole request writes what it makes at once; other reads keep coalescing.

The node and its clients are real (an in-process node, TCP sockets); each socket's transport
is watched, so that the test sees which writes happen within ``data_received`` and which wait
for the end of the loop turn.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import pytest

from broker_node.connection import ClientConnection
from broker_node.core.broker import DELIVERY_UNKNOWN
from broker_node.node import BrokerNode
from shared.ids import ConnectionId
from tests.node.test_frames_in import message, raw_and_peer
from tests.support.raw_ws import client_frame


class WatchedTransport:
    """The connection's transport, every write recorded; ``refuse``: a write fails as one to
    a reset connection does (the transport is closed, nothing taken)."""

    def __init__(self, real: asyncio.Transport) -> None:
        self.real = real
        self.writes: list[bytes] = []
        self.refuse = False

    def write(self, data: bytes) -> None:
        if self.refuse:
            self.real.abort()
            return
        self.writes.append(bytes(data))
        self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def watch(node: BrokerNode, cid: str) -> tuple[ClientConnection, WatchedTransport]:
    sock = node.clients[ConnectionId(cid)]
    assert sock.transport is not None
    watched = WatchedTransport(sock.transport)
    sock.transport = cast(asyncio.Transport, watched)
    return sock, watched


def frames_in(writes: list[bytes]) -> list[str]:
    """The types of the server frames in ``writes`` (each unmasked, under 126 bytes or not)."""
    kinds = []
    for data in writes:
        while data:
            length = data[1] & 0x7F
            start = 2 if length < 126 else 4
            if length == 126:
                length = int.from_bytes(data[2:4])
            kinds.append(json.loads(data[start : start + length])["type"])
            data = data[start + length :]
    return kinds


def request_bytes(*requests: dict[str, Any]) -> bytes:
    return b"".join(client_frame(json.dumps(r).encode()) for r in requests)


async def ids(node: BrokerNode) -> tuple[str, str, str, Any, Any]:
    raw, peer, channel = await raw_and_peer(node)
    listed = await raw.request({"type": "list_by_role", "id": 3, "role": "peer"})
    [peer_id] = listed["ids"]
    [raw_id] = [str(cid) for cid in node.clients if str(cid) != peer_id]
    return raw_id, peer_id, channel, raw, peer


async def test_a_lone_message_is_delivered_confirmed_and_answered_within_its_read(
    node: BrokerNode,
) -> None:
    raw_id, peer_id, channel, raw, peer = await ids(node)
    sender, sender_writes = watch(node, raw_id)
    _, peer_writes = watch(node, peer_id)
    sender.data_received(request_bytes(message(10, channel, {"n": 1})))
    # No loop turn has passed: both frames are already with the kernel.
    assert frames_in(peer_writes.writes) == ["channel_message"]
    assert frames_in(sender_writes.writes) == ["channel_message_sent"]
    assert (await peer.notification("channel_message"))["payload"] == {"n": 1}
    assert (await raw.json())["replyTo"] == 10
    await peer.close()
    await raw.aclose()


async def test_several_requests_in_one_read_are_written_together_at_the_end_of_the_turn(
    node: BrokerNode,
) -> None:
    raw_id, peer_id, channel, raw, peer = await ids(node)
    sender, sender_writes = watch(node, raw_id)
    _, peer_writes = watch(node, peer_id)
    sender.data_received(request_bytes(message(10, channel, 1), message(11, channel, 2)))
    assert peer_writes.writes == sender_writes.writes == []
    await asyncio.sleep(0)
    # One write per socket: both messages, then both confirmations.
    assert len(peer_writes.writes) == 1 and len(sender_writes.writes) == 1
    assert frames_in(peer_writes.writes) == ["channel_message"] * 2
    assert frames_in(sender_writes.writes) == ["channel_message_sent"] * 2
    assert [(await raw.json())["replyTo"] for _ in range(2)] == [10, 11]
    await peer.close()
    await raw.aclose()


@pytest.mark.parametrize("requests", [1, 2], ids=["written at once", "written at turn end"])
async def test_a_write_that_fails_confirms_nothing(node: BrokerNode, requests: int) -> None:
    """The recipient's connection was reset as its messages were written: the kernel took
    nothing, so the sender is told the outcome is unknown, never that they were sent."""
    raw_id, peer_id, channel, raw, _reset = await ids(node)
    sender = node.clients[ConnectionId(raw_id)]
    _, peer_writes = watch(node, peer_id)
    peer_writes.refuse = True
    sender.data_received(request_bytes(*(message(10 + n, channel, n) for n in range(requests))))
    for n in range(requests):
        reply = await raw.json()
        assert reply["type"] == "channel_message_failed" and reply["replyTo"] == 10 + n
        assert reply["error"] == DELIVERY_UNKNOWN
    assert peer_writes.writes == []
    await raw.aclose()

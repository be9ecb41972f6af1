"""A read of one whole request writes what it makes at once; other reads keep coalescing.

The node and its clients are real (an in-process node, TCP sockets); each socket's transport
is watched, so that the test sees which writes happen within ``data_received`` and which wait
for the end of the loop turn.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, cast

import pytest

from broker_node.connection import ClientConnection
from broker_node.core.broker import DELIVERY_UNKNOWN
from broker_node.node import BrokerNode
from shared.ids import ConnectionId
from tests.node.test_frames_in import message, raw_and_peer
from tests.support.raw_ws import RawClient, text
from tests.support.wire import WireClient


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


@dataclass
class Pair:
    """A raw sender and a peer on one channel, both sockets watched."""

    sender: ClientConnection
    sender_writes: WatchedTransport
    peer_writes: WatchedTransport
    channel: str
    raw: RawClient
    peer: WireClient


async def watched_pair(node: BrokerNode) -> Pair:
    raw, peer, channel = await raw_and_peer(node)
    listed = await raw.request({"type": "list_by_role", "id": 3, "role": "peer"})
    [peer_id] = listed["ids"]
    [raw_id] = [str(cid) for cid in node.clients if str(cid) != peer_id]
    sender, sender_writes = watch(node, raw_id)
    _, peer_writes = watch(node, peer_id)
    return Pair(sender, sender_writes, peer_writes, channel, raw, peer)


async def test_a_lone_message_is_delivered_confirmed_and_answered_within_its_read(
    node: BrokerNode,
) -> None:
    pair = await watched_pair(node)
    pair.sender.data_received(text(message(10, pair.channel, {"n": 1})))
    # No loop turn has passed: both frames are already with the kernel.
    assert frames_in(pair.peer_writes.writes) == ["channel_message"]
    assert frames_in(pair.sender_writes.writes) == ["channel_message_sent"]
    assert (await pair.peer.notification("channel_message"))["payload"] == {"n": 1}
    assert (await pair.raw.json())["replyTo"] == 10
    await pair.peer.close()
    await pair.raw.aclose()


async def test_several_requests_in_one_read_are_written_together_at_the_end_of_the_turn(
    node: BrokerNode,
) -> None:
    pair = await watched_pair(node)
    pair.sender.data_received(
        text(message(10, pair.channel, 1)) + text(message(11, pair.channel, 2))
    )
    assert pair.peer_writes.writes == pair.sender_writes.writes == []
    await asyncio.sleep(0)
    # One write per socket: both messages, then both confirmations.
    assert len(pair.peer_writes.writes) == 1 and len(pair.sender_writes.writes) == 1
    assert frames_in(pair.peer_writes.writes) == ["channel_message"] * 2
    assert frames_in(pair.sender_writes.writes) == ["channel_message_sent"] * 2
    assert [(await pair.raw.json())["replyTo"] for _ in range(2)] == [10, 11]
    await pair.peer.close()
    await pair.raw.aclose()


@pytest.mark.parametrize("requests", [1, 2], ids=["written at once", "written at turn end"])
async def test_a_write_that_fails_confirms_nothing(node: BrokerNode, requests: int) -> None:
    """The recipient's connection was reset as its messages were written: the kernel took
    nothing, so the sender is told the outcome is unknown, never that they were sent."""
    pair = await watched_pair(node)
    pair.peer_writes.refuse = True
    requests_bytes = b"".join(text(message(10 + n, pair.channel, n)) for n in range(requests))
    pair.sender.data_received(requests_bytes)
    for n in range(requests):
        reply = await pair.raw.json()
        assert reply["type"] == "channel_message_failed" and reply["replyTo"] == 10 + n
        assert reply["error"] == DELIVERY_UNKNOWN
    assert pair.peer_writes.writes == []
    await pair.raw.aclose()

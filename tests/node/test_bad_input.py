"""Every row of the bad-input table over a real socket; the node keeps serving the others."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from broker_node.config import Settings
from broker_node.node import BrokerNode
from shared.ids import NodeId
from tests.support.wire import WireClient, pair

MAX_SIZE = 64 * 1024


@pytest.fixture
async def small_node() -> AsyncIterator[BrokerNode]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        node_id=NodeId("bad-input"),
        max_message_size=MAX_SIZE,
        max_outbound_buffer=256 * 1024,
    )
    async with BrokerNode(settings) as running:
        yield running


@pytest.fixture
def small_url(small_node: BrokerNode) -> str:
    return f"ws://127.0.0.1:{small_node.port}"


async def others_still_work(url: str) -> None:
    a, b, channel = await pair(url)
    assert (await a.request("message", channelId=channel, payload=[1]))[
        "type"
    ] == "channel_message_sent"
    assert (await b.notification("channel_message"))["payload"] == [1]
    await a.close()
    await b.close()


@pytest.mark.parametrize("frame", ["not json", "{", "{'single': 'quotes'}"])
async def test_text_that_is_not_json_closes_1003(small_url: str, frame: str) -> None:
    async with WireClient(small_url) as bad:
        await bad.register("bad")
        await bad.send(frame)
        assert await bad.closed_with() == (1003, "Invalid JSON")
    await others_still_work(small_url)


async def test_binary_frame_closes_1003(small_url: str) -> None:
    async with WireClient(small_url) as bad:
        await bad.send(b'{"type":"register","id":1,"role":"r"}')
        code, reason = await bad.closed_with()
        assert code == 1003 and reason and "Binary" in reason
    await others_still_work(small_url)


async def test_frame_over_the_limit_closes_1009(small_url: str, small_node: BrokerNode) -> None:
    a, b, channel = await pair(small_url)
    big = json.dumps({"type": "message", "id": 5, "channelId": channel, "payload": "x" * MAX_SIZE})
    await a.send(big)
    code, _ = await a.closed_with()
    assert code == 1009
    # Its peer is told, as for any disconnect.
    assert (await b.notification("channel_closed_notification"))["channelId"] == channel
    await b.close()
    await others_still_work(small_url)
    assert small_node.stats.bad_frames["too_big"] == 1


@pytest.mark.parametrize("frame", ["[1, 2]", '"register"', "42", "null"])
async def test_json_that_is_not_an_object_gets_error(small_url: str, frame: str) -> None:
    async with WireClient(small_url) as bad:
        await bad.send(frame)
        reply = await bad.recv()
        assert reply == {"type": "error", "id": 1, "error": "Message must be a JSON object"}
        await bad.register("still-usable")
    await others_still_work(small_url)


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "register", "role": "r"},
        {"type": "register", "id": "7", "role": "r"},
        {"type": "register", "id": 1.5, "role": "r"},
    ],
)
async def test_object_without_usable_id_gets_error(
    small_url: str, frame: dict[str, object]
) -> None:
    async with WireClient(small_url) as bad:
        await bad.send(frame)
        reply = await bad.recv()
        assert reply["type"] == "error" and "replyTo" not in reply and "id" in reply["error"]
    await others_still_work(small_url)


async def test_unknown_type_gets_error_with_reply_to(small_url: str) -> None:
    async with WireClient(small_url) as bad:
        reply = await bad.request("subscribe", topic="x")
        assert reply == {
            "type": "error",
            "id": 1,
            "replyTo": 1,
            "error": "Unknown request type: subscribe",
        }
    await others_still_work(small_url)


@pytest.mark.parametrize(
    ("kind", "fields", "reply_type", "field"),
    [
        ("register", {}, "register_failed", "role"),
        ("register", {"role": 3}, "register_failed", "role"),
        ("list_by_role", {"role": None}, "list_by_role_failed", "role"),
        ("open", {}, "channel_open_failed", "targetId"),
        ("message", {"channelId": "c"}, "channel_message_failed", "payload"),
        ("message", {"payload": 1}, "channel_message_failed", "channelId"),
        ("close", {"channelId": 5}, "channel_close_failed", "channelId"),
    ],
)
async def test_known_type_with_bad_fields_gets_its_failed_reply(
    small_url: str, kind: str, fields: dict[str, object], reply_type: str, field: str
) -> None:
    async with WireClient(small_url) as bad:
        await bad.send({"type": kind, "id": 1, **fields})
        reply = await bad.reply_to(1)
        assert reply["type"] == reply_type and field in reply["error"]
    await others_still_work(small_url)


async def test_slow_consumer_closed_1008_and_peer_notified(
    small_url: str, small_node: BrokerNode
) -> None:
    # The slow client's library stops reading once 4 frames are queued, so TCP backs up
    # until the node's outbound buffer for it (256 KiB here) passes its bound.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connect: small window
    sock.setblocking(False)
    host, port = small_url.removeprefix("ws://").split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    slow = await WireClient(small_url, max_queue=4, sock=sock).__aenter__()
    fast = await WireClient(small_url).__aenter__()
    slow_id = await slow.register("slow")
    await fast.register("fast")
    channel = await fast.open(slow_id)
    assert fast.ws is not None
    notified = asyncio.Event()

    async def read_fast() -> None:
        # The sender keeps reading its confirmations, so it is never the slow one.
        assert fast.ws is not None
        async for raw in fast.ws:
            frame = json.loads(raw)
            if frame["type"] == "channel_closed_notification" and frame["channelId"] == channel:
                notified.set()

    reader = asyncio.create_task(read_fast())
    chunk = "y" * 60_000
    async with asyncio.timeout(30):
        for n in range(5000):
            if notified.is_set():
                break
            await fast.send(
                {"type": "message", "id": 100 + n, "channelId": channel, "payload": chunk}
            )
        await notified.wait()
    assert small_node.stats.slow_consumers == 1
    # Reading again, the slow client finds the close frame behind what was queued for it.
    assert await slow.closed_with(timeout=10) == (1008, "slow consumer")
    await fast.close()
    await reader
    await slow.close()
    await others_still_work(small_url)

"""The SDK against a scripted broker: a real WebSocket server whose every frame the test writes.

For what a correct node never does on cue: replies that come late or never, a peer's message
overtaking our own ``channel_opened``, error frames, garbage, and the untyped replies of the
original npm broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from client import BrokerClient, CloseReason, ProtocolViolation, RequestFailed, RequestTimeout
from tests.client.helpers import client_tasks
from tests.support.polling import wait_until

ME = "11111111-1111-4111-8111-111111111111"
PEER = "22222222-2222-4222-8222-222222222222"
CHANNEL = "33333333-3333-4333-8333-333333333333"


class ScriptedBroker:
    """Registers every connection (typed or untyped reply); queues every other frame."""

    def __init__(self, *, untyped: bool = False) -> None:
        self.untyped = untyped
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ws: ServerConnection | None = None
        self.connections = 0
        self.next_id = 0
        self.server: Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def handler(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.connections += 1
        async for frame in ws:
            message = json.loads(frame)
            if message["type"] == "register":
                if self.untyped:
                    await self.send(connectionId=ME, replyTo=message["id"])
                else:
                    await self.send(type="registered", replyTo=message["id"], connectionId=ME)
            else:
                await self.frames.put(message)

    async def send(self, **frame: Any) -> None:
        assert self.ws is not None
        self.next_id += 1
        await self.ws.send(json.dumps({**frame, "id": self.next_id}))

    async def expect(self, request_type: str) -> dict[str, Any]:
        async with asyncio.timeout(5):
            frame = await self.frames.get()
        assert frame["type"] == request_type, frame
        return frame


@pytest.fixture
async def broker() -> AsyncIterator[ScriptedBroker]:
    scripted = ScriptedBroker()
    async with serve(scripted.handler, "127.0.0.1", 0) as server:
        scripted.server = server
        yield scripted


@pytest.fixture
async def client(broker: ScriptedBroker) -> AsyncIterator[BrokerClient]:
    async with BrokerClient(broker.url, "me", request_timeout=0.5) as connected:
        yield connected
    assert client_tasks() == set()


async def test_a_request_without_reply_times_out_and_its_late_reply_is_ignored(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    with pytest.raises(RequestTimeout) as caught:
        await client.list_by_role("r")
    assert caught.value.operation == "list_by_role"
    assert client.pending_requests == 0
    late = await broker.expect("list_by_role")
    await broker.send(type="connections", replyTo=late["id"], ids=[PEER])
    # The connection goes on: the next request gets its own reply.
    listing = asyncio.create_task(client.list_by_role("r"))
    request = await broker.expect("list_by_role")
    await broker.send(type="connections", replyTo=request["id"], ids=[ME])
    assert await listing == [ME]


async def test_a_channel_opened_after_the_opener_gave_up_is_closed(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    with pytest.raises(RequestTimeout):
        await client.open_channel(PEER)
    request = await broker.expect("open")
    await broker.send(
        type="channel_opened", replyTo=request["id"], channelId=CHANNEL, targetId=PEER
    )
    close = await broker.expect("close")
    assert close["channelId"] == CHANNEL
    await broker.send(type="channel_closed", replyTo=close["id"], channelId=CHANNEL)


async def test_the_peers_first_message_may_overtake_channel_opened(
    broker: ScriptedBroker, client: BrokerClient
) -> None:
    opening = asyncio.create_task(client.open_channel(PEER))
    request = await broker.expect("open")
    await broker.send(type="channel_message", channelId=CHANNEL, payload={"first": True})
    await broker.send(
        type="channel_opened", replyTo=request["id"], channelId=CHANNEL, targetId=PEER
    )
    channel = await opening
    async with asyncio.timeout(5):
        assert await anext(aiter(channel)) == {"first": True}


async def test_error_frames(
    broker: ScriptedBroker, client: BrokerClient, caplog: pytest.LogCaptureFixture
) -> None:
    listing = asyncio.create_task(client.list_by_role("r"))
    request = await broker.expect("list_by_role")
    await broker.send(type="error", replyTo=request["id"], error="Unknown request type: x")
    with pytest.raises(RequestFailed) as caught:
        await listing
    assert caught.value.reply_type == "error"
    assert caught.value.error == "Unknown request type: x"

    listing = asyncio.create_task(client.list_by_role("r"))
    request = await broker.expect("list_by_role")
    await broker.send(type="channel_closed", replyTo=request["id"], channelId=CHANNEL)
    with pytest.raises(ProtocolViolation):
        await listing

    with caplog.at_level(logging.WARNING, logger="client.client"):
        await broker.send(type="error", error="Message must be a JSON object")
        assert broker.ws is not None
        await broker.ws.send("this is not JSON")
        await wait_until(
            lambda: "this is not JSON" in caplog.text, timeout=10, message="the frame logged"
        )
    assert "Message must be a JSON object" in caplog.text
    assert client.connected


async def test_a_node_going_away_sends_a_maintained_client_back(
    broker: ScriptedBroker,
) -> None:
    connected = asyncio.Event()
    async with BrokerClient(
        broker.url,
        "me",
        maintain_connection=True,
        backoff_base=0.01,
        backoff_cap=0.05,
        on_connected=connected.set,
    ) as client:
        connected.clear()
        assert broker.ws is not None
        await broker.ws.close(1001, "Server shutting down")
        async with asyncio.timeout(5):
            await connected.wait()
        assert broker.connections == 2
        assert client.connected
    assert client_tasks() == set()


async def test_the_original_brokers_untyped_replies() -> None:
    # @sitnikov/connection-broker 1.0.0 answers success with no "type", failure with "error".
    scripted = ScriptedBroker(untyped=True)
    async with (
        serve(scripted.handler, "127.0.0.1", 0) as server,
    ):
        scripted.server = server
        async with BrokerClient(scripted.url, "me") as client:
            assert client.connection_id == ME
            listing = asyncio.create_task(client.list_by_role("r"))
            request = await scripted.expect("list_by_role")
            await scripted.send(ids=[PEER], replyTo=request["id"])
            assert await listing == [PEER]

            opening = asyncio.create_task(client.open_channel(PEER))
            request = await scripted.expect("open")
            await scripted.send(channelId=CHANNEL, replyTo=request["id"])
            channel = await opening

            sending = asyncio.create_task(channel.send([1, 2]))
            request = await scripted.expect("message")
            assert request["payload"] == [1, 2]
            await scripted.send(replyTo=request["id"])
            await sending

            failing = asyncio.create_task(channel.send("x"))
            request = await scripted.expect("message")
            await scripted.send(type="error", error="Recipient not found", replyTo=request["id"])
            with pytest.raises(RequestFailed):
                await failing

            closing = asyncio.create_task(channel.close())
            request = await scripted.expect("close")
            await scripted.send(replyTo=request["id"])
            await closing
            assert channel.close_reason is CloseReason.LOCAL

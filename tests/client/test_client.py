"""The SDK against a real standalone node: every API method, errors, buffers, cleanup."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client import (
    BrokerClient,
    Channel,
    ChannelClosed,
    CloseReason,
    ConnectFailed,
    ConnectionLost,
    InvalidPayload,
    NotConnected,
    RequestFailed,
    RequestTimeout,
)
from tests.client.helpers import client_tasks, closed_event
from tests.support.nodes import NodeProcess
from tests.support.polling import wait_until
from tests.support.ports import free_port

PAYLOADS: list[Any] = [
    {"type": "greeting", "message": "Hello!"},
    [1, "two", 3.5, None, True, {"nested": []}],
    'a string with "quotes" and unicode: ✓ é 😀',
    42,
    -1.25e-7,
    True,
    False,
    None,
    {},
    [],
]


@pytest.fixture
async def pair(standalone: str) -> AsyncIterator[tuple[BrokerClient, BrokerClient]]:
    async with (
        BrokerClient(standalone, "alice", request_timeout=5) as alice,
        BrokerClient(standalone, "bob", request_timeout=5) as bob,
    ):
        yield alice, bob
    assert client_tasks() == set()


async def open_pair(alice: BrokerClient, bob: BrokerClient) -> tuple[Channel, Channel]:
    assert bob.connection_id is not None
    channel = await alice.open_channel(bob.connection_id)
    async with asyncio.timeout(5):
        incoming = await anext(aiter(bob.incoming_channels()))
    return channel, incoming


# --- connecting ----------------------------------------------------------------------------


async def test_connect_registers_and_close_forgets(standalone: str) -> None:
    connected: list[str | None] = []
    disconnected: list[bool] = []
    client = BrokerClient(
        standalone,
        "role-x",
        on_connected=lambda: connected.append(client.connection_id),
        on_disconnected=lambda: disconnected.append(True),
    )
    assert client.connection_id is None
    assert not client.connected
    with pytest.raises(NotConnected):
        await client.list_by_role("role-x")
    await client.connect()
    await client.connect()  # already connected: nothing happens
    assert client.connected
    assert client.connection_id is not None
    assert connected == [client.connection_id]
    assert await client.list_by_role("role-x") == [client.connection_id]
    await client.close()
    await client.close()  # idempotent
    assert client.connection_id is None
    assert disconnected == [True]
    assert client_tasks() == set()
    # A closed client can connect again, as a new connection.
    old = connected[0]
    await client.connect()
    assert client.connection_id not in (None, old)
    await client.close()


async def test_list_by_role_lists_every_connection_of_the_role(
    pair: tuple[BrokerClient, BrokerClient], standalone: str
) -> None:
    alice, bob = pair
    async with BrokerClient(standalone, "bob") as bob2:
        ids = await alice.list_by_role("bob")
        assert set(ids) == {bob.connection_id, bob2.connection_id}
    assert await alice.list_by_role("bob") == [bob.connection_id]
    assert await alice.list_by_role("nobody") == []


async def test_connect_to_nothing_fails_with_connect_failed() -> None:
    client = BrokerClient(f"ws://127.0.0.1:{free_port()}", "r", connect_timeout=5)
    with pytest.raises(ConnectFailed) as caught:
        await client.connect()
    assert isinstance(caught.value, NotConnected)
    assert client_tasks() == set()


async def test_register_failed_is_raised_by_connect(standalone: str) -> None:
    client = BrokerClient(standalone, "r" * 10_000)
    with pytest.raises(RequestFailed) as caught:
        await client.connect()
    assert caught.value.reply_type == "register_failed"
    assert not client.connected
    assert client_tasks() == set()


def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError):
        BrokerClient("http://example.com", "r")
    with pytest.raises(ValueError):
        BrokerClient("ws://example.com", "r", request_timeout=0)
    with pytest.raises(ValueError):
        BrokerClient("ws://example.com", "r", channel_buffer=0)
    with pytest.raises(ValueError):
        BrokerClient("ws://example.com", "r", backoff_base=-1)


# --- channels ------------------------------------------------------------------------------


async def test_open_channel_and_incoming_channels(pair: tuple[BrokerClient, BrokerClient]) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)
    assert channel.channel_id == incoming.channel_id
    assert channel.peer_id == bob.connection_id
    assert incoming.peer_id == alice.connection_id
    assert not channel.closed
    assert "open" in repr(channel)


async def test_on_incoming_channel_callback_and_buffered_handover(
    pair: tuple[BrokerClient, BrokerClient],
) -> None:
    alice, bob = pair
    assert bob.connection_id is not None
    # Opened before any callback is set: buffered, then handed to the callback when set.
    first = await alice.open_channel(bob.connection_id)
    seen: list[Channel] = []
    bob.on_incoming_channel = seen.append
    assert bob.on_incoming_channel is not None
    second = await alice.open_channel(bob.connection_id)
    await wait_until(lambda: len(seen) == 2, timeout=10, message="both channels handed over")
    assert [c.channel_id for c in seen] == [first.channel_id, second.channel_id]


async def test_send_confirms_and_every_json_value_arrives(
    pair: tuple[BrokerClient, BrokerClient],
) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)
    for payload in PAYLOADS:
        await channel.send(payload)
    received = []
    async with asyncio.timeout(5):
        async for payload in incoming:
            received.append(payload)
            if len(received) == len(PAYLOADS):
                break
    assert received == PAYLOADS


async def test_on_message_sync_and_async_callbacks(
    pair: tuple[BrokerClient, BrokerClient],
) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)
    await channel.send("early")  # buffered until a callback is set
    await wait_until(lambda: len(incoming._inbox) == 1, timeout=10, message="the message buffered")
    got: list[Any] = []
    incoming.on_message = got.append
    assert got == ["early"]
    await channel.send("sync")
    await wait_until(lambda: got == ["early", "sync"], timeout=10, message="both messages")

    # An async callback may answer on the channel; the client runs it as a task.
    async def echo(payload: Any) -> None:
        await incoming.send({"echo": payload})

    incoming.on_message = echo
    assert await channel.request("ping") == {"echo": "ping"}


async def test_a_failing_callback_does_not_break_the_connection(
    pair: tuple[BrokerClient, BrokerClient], caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)

    def boom(payload: Any) -> None:
        raise RuntimeError("user bug")

    incoming.on_message = boom
    await channel.send(1)
    await wait_until(lambda: "user bug" in caplog.text, timeout=10, message="the error logged")
    assert await alice.list_by_role("bob") == [bob.connection_id]


async def test_request_response_and_its_timeout(pair: tuple[BrokerClient, BrokerClient]) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)

    async def serve() -> None:
        async for question in incoming:
            if question == "ignore me":
                continue
            await incoming.send({"answer": question["n"] * 2})

    server = asyncio.create_task(serve())
    answers = await asyncio.gather(*(channel.request({"n": n}) for n in range(10)))
    # Concurrent requests on one channel take turns, so each gets its own answer.
    assert sorted(a["answer"] for a in answers) == [n * 2 for n in range(10)]
    started = time.monotonic()
    with pytest.raises(RequestTimeout) as caught:
        await channel.request("ignore me", timeout=0.3)
    assert isinstance(caught.value, TimeoutError)
    assert 0.25 < time.monotonic() - started < 3
    await channel.close()
    async with asyncio.timeout(5):
        await server  # the peer's iterator ended with the close


async def test_request_fails_when_the_channel_closes_first(
    pair: tuple[BrokerClient, BrokerClient],
) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)

    async def close_on_first_message() -> None:
        async for _ in incoming:
            await incoming.close()

    closer = asyncio.create_task(close_on_first_message())
    with pytest.raises(ChannelClosed) as caught:
        await channel.request("bye", timeout=5)
    assert caught.value.reason is CloseReason.PEER
    await closer
    with pytest.raises(ChannelClosed):
        await channel.request("again")


async def test_open_channel_to_an_unknown_target(pair: tuple[BrokerClient, BrokerClient]) -> None:
    alice, _ = pair
    with pytest.raises(RequestFailed) as caught:
        await alice.open_channel("00000000-0000-4000-8000-000000000000")
    assert caught.value.reply_type == "channel_open_failed"
    assert caught.value.request_type == "open"
    assert caught.value.error


async def test_close_notifies_the_peer_and_ends_iterators(
    pair: tuple[BrokerClient, BrokerClient],
) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)
    closed = asyncio.Event()
    incoming.on_closed = closed.set
    consumer = asyncio.create_task(_collect(incoming))
    await channel.send("last")
    await channel.close()
    await channel.close()  # idempotent
    assert channel.close_reason is CloseReason.LOCAL
    async with asyncio.timeout(5):
        await closed.wait()
        assert await consumer == ["last"]
    assert incoming.close_reason is CloseReason.PEER
    with pytest.raises(ChannelClosed) as caught:
        await channel.send("after close")
    assert caught.value.reason is CloseReason.LOCAL
    with pytest.raises(ChannelClosed):
        await incoming.send("after the peer closed")
    await incoming.close()  # already closed: nothing to do


async def _collect(channel: Channel) -> list[Any]:
    return [payload async for payload in channel]


async def test_a_payload_that_is_not_json_raises_and_sends_nothing(
    pair: tuple[BrokerClient, BrokerClient],
) -> None:
    alice, bob = pair
    channel, incoming = await open_pair(alice, bob)
    with pytest.raises(InvalidPayload):
        await channel.send({"when": object()})
    with pytest.raises(TypeError):
        await channel.request({1j: "complex keys"})
    await channel.send("first valid")
    async with asyncio.timeout(5):
        assert await anext(aiter(incoming)) == "first valid"


async def test_client_close_closes_every_channel_locally_and_the_peer_hears(
    standalone: str,
) -> None:
    async with BrokerClient(standalone, "bob") as bob:
        alice = BrokerClient(standalone, "alice")
        await alice.connect()
        channel, incoming = await open_pair(alice, bob)
        incoming_closed = closed_event(incoming)
        consumer = asyncio.create_task(_collect(channel))
        incoming_iterator = asyncio.create_task(_collect_channels(alice))
        await alice.close()
        assert channel.close_reason is CloseReason.CONNECTION
        async with asyncio.timeout(5):
            assert await consumer == []
            assert await incoming_iterator == []
            await incoming_closed.wait()
        assert incoming.close_reason is CloseReason.PEER
        with pytest.raises(NotConnected):
            await alice.open_channel(str(bob.connection_id))
    assert client_tasks() == set()


async def _collect_channels(client: BrokerClient) -> list[Channel]:
    return [channel async for channel in client.incoming_channels()]


# --- bounded buffers -----------------------------------------------------------------------


async def test_an_unread_channel_overflows_into_a_close(standalone: str) -> None:
    async with (
        BrokerClient(standalone, "alice") as alice,
        BrokerClient(standalone, "bob", channel_buffer=3) as bob,
    ):
        channel, incoming = await open_pair(alice, bob)
        sender_saw_close = asyncio.Event()
        channel.on_closed = sender_saw_close.set
        for n in range(3):
            await channel.send(n)
        await channel.send(3)  # delivered to bob's socket; bob's buffer is full
        async with asyncio.timeout(5):
            await sender_saw_close.wait()
        assert incoming.close_reason is CloseReason.OVERFLOW
        received = []
        with pytest.raises(ChannelClosed) as caught:
            async for payload in incoming:
                received.append(payload)
        assert received == [0, 1, 2]
        assert caught.value.reason is CloseReason.OVERFLOW
        assert channel.close_reason is CloseReason.PEER


async def test_unread_incoming_channels_are_refused_beyond_the_buffer(standalone: str) -> None:
    async with (
        BrokerClient(standalone, "alice") as alice,
        BrokerClient(standalone, "bob", incoming_buffer=1) as bob,
    ):
        assert bob.connection_id is not None
        kept = await alice.open_channel(bob.connection_id)
        refused = await alice.open_channel(bob.connection_id)
        async with asyncio.timeout(10):
            await closed_event(refused).wait()
        assert refused.close_reason is CloseReason.PEER
        assert not kept.closed
        async with asyncio.timeout(5):
            first = await anext(aiter(bob.incoming_channels()))
        assert first.channel_id == kept.channel_id


# --- the connection dropping ---------------------------------------------------------------


async def test_pending_requests_fail_at_once_when_the_node_dies(
    node_process: NodeProcess,
) -> None:
    # Clients without a resumable session: what a resumable one does instead (it carries on
    # across the gap) is tested in test_resume_scripted.py and with real nodes in
    # tests/integration/test_resume.py and tests/e2e/test_resume_rolling.py.
    async with (
        BrokerClient(node_process.url, "alice", request_timeout=30, resume=False) as alice,
        BrokerClient(node_process.url, "bob", request_timeout=30, resume=False) as bob,
    ):
        channel, _ = await open_pair(alice, bob)
        lost = asyncio.Event()
        channel.on_closed = lost.set
        disconnected = asyncio.Event()
        alice.on_disconnected = disconnected.set
        node_process.pause()  # the node stops answering, the sockets stay open
        requests = [
            asyncio.create_task(alice.list_by_role("bob")),
            asyncio.create_task(channel.send("into the void")),
            asyncio.create_task(channel.request("anyone?")),
        ]
        await wait_until(
            lambda: alice.pending_requests == 3, timeout=10, message="three requests pending"
        )
        started = time.monotonic()
        node_process.kill()
        results = await asyncio.wait_for(
            asyncio.gather(*requests, return_exceptions=True), timeout=5
        )
        assert time.monotonic() - started < 5  # far below the 30 s request timeout
        assert all(isinstance(r, ConnectionLost) for r in results[:2]), results
        # channel.request() learns it from send(), or from the channel closing first.
        assert isinstance(results[2], ConnectionLost | ChannelClosed), results
        assert lost.is_set()
        assert channel.close_reason is CloseReason.CONNECTION
        async with asyncio.timeout(10):
            await disconnected.wait()
        assert not alice.connected
        with pytest.raises(NotConnected):
            await alice.list_by_role("bob")
    assert client_tasks() == set()


async def test_reconnects_to_a_restarted_node(node_process: NodeProcess) -> None:
    connects: list[str | None] = []
    drops = asyncio.Event()
    client = BrokerClient(
        node_process.url,
        "phoenix",
        resume=False,  # a new session on the new node (a standalone restart forgets them all)
        maintain_connection=True,
        backoff_base=0.05,
        backoff_cap=0.2,
        on_connected=lambda: connects.append(client.connection_id),
        on_disconnected=drops.set,
    )
    async with client:
        iterator = asyncio.create_task(_collect_channels(client))
        first_id = client.connection_id
        node_process.kill()
        async with asyncio.timeout(5):
            await drops.wait()
        assert client.connection_id is None
        with pytest.raises(NotConnected):
            await client.list_by_role("phoenix")
        node_process.start()  # same port
        async with asyncio.timeout(10):
            await client.wait_connected()
        assert client.connection_id not in (None, first_id)
        assert connects == [first_id, client.connection_id]
        assert await client.list_by_role("phoenix") == [client.connection_id]
        assert not iterator.done()  # reconnecting does not end incoming_channels()
    async with asyncio.timeout(5):
        assert await iterator == []
    assert client_tasks() == set()


async def test_maintained_connect_waits_for_a_node_and_can_be_abandoned() -> None:
    port = free_port()
    client = BrokerClient(
        f"ws://127.0.0.1:{port}", "r", maintain_connection=True, backoff_base=0.01, backoff_cap=0.05
    )
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await client.connect()
    assert client_tasks() == set()  # giving up on connect() stopped the retries
    with NodeProcess(port=port):
        async with asyncio.timeout(10):
            await client.connect()
        assert client.connected
        await client.close()
    assert client_tasks() == set()


async def test_graceful_node_stop_closes_with_going_away_and_the_client_returns(
    node_process: NodeProcess,
) -> None:
    connected = asyncio.Event()
    client = BrokerClient(
        node_process.url,
        "r",
        resume=False,  # a resumable session is closed with 4100 instead (test_resume*.py)
        maintain_connection=True,
        backoff_base=0.05,
        backoff_cap=0.2,
        on_connected=connected.set,
    )
    disconnected = asyncio.Event()
    client.on_disconnected = disconnected.set
    async with client:
        connected.clear()
        assert node_process.terminate() == 0
        async with asyncio.timeout(10):
            await disconnected.wait()
        node_process.start()
        async with asyncio.timeout(10):
            await connected.wait()
        assert client.connected

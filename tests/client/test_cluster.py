"""The SDK against a real cluster: broker-node processes on one real redis-server.

Clients sit on different nodes; a node is killed under a client that reconnects through a
load balancer (``FailoverProxy``) and comes back on another node.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from client import (
    BrokerClient,
    Channel,
    ChannelClosed,
    CloseReason,
    ConnectionLost,
    NotConnected,
    RequestFailed,
)
from tests.client.helpers import client_tasks, closed_event
from tests.client.proxy import FailoverProxy
from tests.support.cluster import Cluster
from tests.support.polling import wait_until

pytestmark = pytest.mark.slow


async def first_incoming(client: BrokerClient) -> Channel:
    async with asyncio.timeout(5):
        return await anext(aiter(client.incoming_channels()))


async def test_every_method_across_nodes(cluster: Cluster) -> None:
    n0, n1, n2 = await cluster.start(3)
    async with (
        BrokerClient(n0.url, "alice") as alice,
        BrokerClient(n1.url, "bob") as bob,
        BrokerClient(n2.url, "bob") as bob2,
    ):
        # Discovery sees every node.
        assert set(await alice.list_by_role("bob")) == {bob.connection_id, bob2.connection_id}
        assert await bob2.list_by_role("alice") == [alice.connection_id]

        assert bob.connection_id is not None
        channel = await alice.open_channel(bob.connection_id)
        incoming = await first_incoming(bob)
        assert incoming.channel_id == channel.channel_id
        assert incoming.peer_id == alice.connection_id

        await channel.send({"hello": "from node-0"})
        async with asyncio.timeout(5):
            assert await anext(aiter(incoming)) == {"hello": "from node-0"}

        async def answer(payload: Any) -> None:
            await incoming.send({"re": payload})

        incoming.on_message = answer
        assert await channel.request("question", timeout=5) == {"re": "question"}

        closed = asyncio.Event()
        incoming.on_closed = closed.set
        await channel.close()
        async with asyncio.timeout(5):
            await closed.wait()
        assert incoming.close_reason is CloseReason.PEER
        with pytest.raises(ChannelClosed):
            await incoming.send("too late")

        with pytest.raises(RequestFailed) as caught:
            await alice.open_channel("00000000-0000-4000-8000-000000000000")
        assert caught.value.reply_type == "channel_open_failed"
    assert client_tasks() == set()


async def test_iterators_end_when_a_peer_on_another_node_leaves(cluster: Cluster) -> None:
    n0, n1 = await cluster.start(2)
    async with BrokerClient(n0.url, "alice") as alice:
        bob = BrokerClient(n1.url, "bob")
        await bob.connect()
        assert bob.connection_id is not None
        channel = await alice.open_channel(bob.connection_id)
        await first_incoming(bob)
        consumer = asyncio.create_task(_collect(channel))
        await bob.close()  # bob's node closes his channels and tells alice's node
        async with asyncio.timeout(5):
            assert await consumer == []
        assert channel.close_reason is CloseReason.PEER


async def _collect(channel: Channel) -> list[Any]:
    return [payload async for payload in channel]


async def test_reconnect_lands_on_another_node_after_a_kill(cluster: Cluster) -> None:
    n0, n1, n2 = await cluster.start(3)
    connects: list[str | None] = []
    disconnects: list[float] = []
    async with FailoverProxy([n0.port, n1.port]) as balancer:
        roamer = BrokerClient(
            balancer.url,
            "roamer",
            resume=False,  # registers afresh; a resumable session resumes (test_resume*.py)
            request_timeout=30,
            maintain_connection=True,
            backoff_base=0.05,
            backoff_cap=0.5,
            on_connected=lambda: connects.append(roamer.connection_id),
            on_disconnected=lambda: disconnects.append(time.monotonic()),
        )
        async with roamer, BrokerClient(n2.url, "watcher") as watcher:
            assert balancer.routed == [n0.port]
            first_id = roamer.connection_id
            assert await watcher.list_by_role("roamer") == [first_id]

            # A channel from a client on a surviving node to the roamer.
            assert first_id is not None
            watched = await watcher.open_channel(first_id)
            watched_closed = closed_event(watched)
            roamer_end = await first_incoming(roamer)
            n0.pause()  # requests hang, then the node dies under them
            pending = asyncio.create_task(roamer.list_by_role("watcher"))
            await wait_until(
                lambda: roamer.pending_requests == 1, timeout=10, message="the request pending"
            )
            killed_at = time.monotonic()
            n0.kill()
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(pending, timeout=5)
            assert time.monotonic() - killed_at < 5  # not the 30 s request timeout
            assert roamer_end.close_reason is CloseReason.CONNECTION

            async with asyncio.timeout(15):
                await roamer.wait_connected()
            second_id = roamer.connection_id
            assert second_id not in (None, first_id)
            assert balancer.routed == [n0.port, n1.port]  # it came back on node-1
            assert connects == [first_id, second_id]
            assert len(disconnects) == 1

            # Re-registered with the same role; the dead node's connection is reaped.
            async def only_the_new_id_is_listed() -> bool:
                return await watcher.list_by_role("roamer") == [second_id]

            await wait_until(
                only_the_new_id_is_listed, timeout=15, message="only the new id listed"
            )
            # The survivor that reaped node-0 told the watcher its channel is gone.
            async with asyncio.timeout(15):
                await watched_closed.wait()
            assert watched.close_reason is CloseReason.PEER

            # And the roamer works on its new node.
            assert watcher.connection_id is not None
            channel = await roamer.open_channel(watcher.connection_id)
            incoming = await first_incoming(watcher)
            await channel.send("back")
            async with asyncio.timeout(5):
                assert await anext(aiter(incoming)) == "back"
        with pytest.raises(NotConnected):
            await roamer.list_by_role("x")
    assert client_tasks() == set()

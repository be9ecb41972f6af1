"""Cross-node protocol on broker-node processes sharing one real redis-server.

Register / list / open / message / close across three nodes, 10,000 pipelined messages in
order with their confirmations, and the Redis commands one cross-node message costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.integration.helpers import list_role, send_confirmed
from tests.support.cluster import Cluster, fast_args
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow


async def test_three_nodes_register_list_open_message_close(cluster: Cluster) -> None:
    nodes = await cluster.start(3)
    clients = [await cluster.client(node, "peer") for node in nodes]
    a, b, outsider = clients
    ids = {client.connection_id for client in clients}

    # Every node sees the connections of every node.
    for client in clients:
        assert await list_role(client, "peer") == ids
        assert await list_role(client, "nobody") == set()

    # Open from node-0 to node-1 and send at once: the target hears of the channel first.
    assert b.connection_id is not None
    channel = await a.open(b.connection_id)
    first_payload = {"n": 0, "nested": [1, "two", None, True, 3.5]}
    await a.send({"type": "message", "id": 1000, "channelId": channel, "payload": first_payload})
    incoming, delivered = await b.recv(), await b.recv()
    assert incoming["type"] == "incoming_channel", incoming
    assert incoming["channelId"] == channel
    assert incoming["from"] == a.connection_id
    assert delivered["type"] == "channel_message", delivered
    assert delivered["payload"] == first_payload
    assert incoming["id"] < delivered["id"]
    assert (await a.reply_to(1000))["type"] == "channel_message_sent"
    b.received.clear()

    # Both directions, every JSON type as payload.
    for payload in ["text", 42, 1.5, False, None, [1, {"x": "y"}], {"deep": {"er": []}}]:
        await send_confirmed(a, b, channel, payload)
        await send_confirmed(b, a, channel, payload)

    # A third party on another node can neither send nor close.
    reply = await outsider.request("message", channelId=channel, payload="intrusion")
    assert reply["type"] == "channel_message_failed", reply
    assert reply["channelId"] == channel
    reply = await outsider.request("close", channelId=channel)
    assert reply["type"] == "channel_close_failed", reply
    assert reply["channelId"] == channel
    # ... and nothing was closed or delivered.
    await send_confirmed(b, a, channel, "still open")
    assert [f for f in a.received + b.received if f.get("type") != "channel_message"] == []

    # Close from the target's node: the opener is notified, the closer confirmed.
    reply = await b.request("close", channelId=channel)
    assert reply == {**reply, "type": "channel_closed", "channelId": channel}
    notified = await a.notification("channel_closed_notification")
    assert notified["channelId"] == channel
    for client in (a, b):
        reply = await client.request("message", channelId=channel, payload="late")
        assert reply["type"] == "channel_message_failed"
        assert reply["error"] == "Channel not found"
        reply = await client.request("close", channelId=channel)
        assert reply["type"] == "channel_close_failed"
        assert reply["error"] == "Channel not found"


async def pump(
    sender: WireClient, receiver: WireClient, channel: str, count: int, *, window: int
) -> None:
    """Send ``count`` messages with at most ``window`` unconfirmed, pipelined; check that they
    arrive in order, once each, and that the confirmations come back in order too."""
    first_id = sender.next_id
    sender.next_id += count
    credit = asyncio.Semaphore(window)

    async def send_all() -> None:
        for n in range(count):
            await credit.acquire()
            await sender.send(
                {"type": "message", "id": first_id + n, "channelId": channel, "payload": {"n": n}}
            )

    async def confirmations() -> list[int]:
        replies: list[int] = []
        last_frame_id = 0
        while len(replies) < count:
            frame = await sender.recv(timeout=10)
            assert frame["type"] == "channel_message_sent", frame
            assert frame["channelId"] == channel
            assert frame["id"] > last_frame_id
            last_frame_id = frame["id"]
            replies.append(frame["replyTo"])
            credit.release()
        return replies

    async def deliveries() -> list[Any]:
        payloads: list[Any] = []
        last_frame_id = 0
        while len(payloads) < count:
            frame = await receiver.recv(timeout=10)
            assert frame["type"] == "channel_message", frame
            assert frame["channelId"] == channel
            assert frame["id"] > last_frame_id
            last_frame_id = frame["id"]
            payloads.append(frame["payload"]["n"])
        return payloads

    async with asyncio.timeout(60):
        _, replies, payloads = await asyncio.gather(send_all(), confirmations(), deliveries())
    assert replies == list(range(first_id, first_id + count))
    assert payloads == list(range(count))
    sender.received.clear()
    receiver.received.clear()


async def test_ten_thousand_messages_in_order_with_ten_thousand_confirmations(
    cluster: Cluster,
) -> None:
    # Not a test of timeouts: a confirmation may take more than the fast 1 s on a loaded
    # machine, and every message here must be confirmed.
    n0, n1 = await cluster.start(2, args=fast_args(request_timeout=5.0))
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    assert b.connection_id is not None
    channel = await a.open(b.connection_id)
    await b.notification("incoming_channel")

    # Below --max-unconfirmed (4096 by default): every message must be confirmed.
    await pump(a, b, channel, 10_000, window=3_000)
    # And back, on the same channel.
    await pump(b, a, channel, 10_000, window=3_000)


#: Commands the test itself sends to Redis while measuring.
_TEST_COMMANDS = {"cmdstat_info", "cmdstat_config|resetstat", "cmdstat_config"}


async def commands_during(redis: Redis, work: Awaitable[None]) -> dict[str, int]:
    """Calls per Redis command while ``work`` runs (INFO commandstats after CONFIG RESETSTAT)."""
    await redis.config_resetstat()
    await work
    stats: dict[str, dict[str, Any]] = await redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(fields["calls"])
        for name, fields in stats.items()
        if name not in _TEST_COMMANDS
    }


async def test_redis_commands_per_cross_node_message(cluster: Cluster) -> None:
    # A long heartbeat keeps the liveness loops' own commands out of the way of the figure.
    n0, n1 = await cluster.start(2, args=fast_args(heartbeat=2.0, ttl=10.0, request_timeout=5.0))
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    assert b.connection_id is not None
    channel = await a.open(b.connection_id)
    await b.notification("incoming_channel")
    count = 2000
    redis = Redis.from_url(cluster.redis.url, decode_responses=True)
    try:
        pipelined = await commands_during(redis, pump(a, b, channel, count, window=count))

        async def lockstep() -> None:
            for n in range(count):
                await send_confirmed(a, b, channel, n)

        one_by_one = await commands_during(redis, lockstep())
    finally:
        await redis.aclose()

    for label, calls in (("pipelined", pipelined), ("one at a time", one_by_one)):
        total = sum(calls.values())
        print(
            f"\nRedis commands per cross-node message ({label}, N={count}): "
            f"{total / count:.3f} (total {total}: {calls})"
        )
    # Every message costs a PUBLISH of its delivery and of its confirmation at most, batched
    # per loop turn; pipelined, batching makes that far less than one command per message.
    assert sum(pipelined.values()) / count < 1.0
    assert pipelined.get("publish", 0) <= 2 * count
    # One at a time nothing can be batched: two PUBLISH per message, nothing else on the path.
    assert one_by_one.get("publish", 0) <= 2 * count
    assert sum(one_by_one.values()) / count < 2.2

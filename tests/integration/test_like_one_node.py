"""The cluster behaves like one node: the divergences issue 10 found, as regression tests.

Each test states what a user sends and what must arrive, on broker-node processes sharing a
real redis-server, with the two ends of a channel on different nodes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.integration.helpers import frames_for, send_confirmed
from tests.support.cluster import Cluster, fast_args
from tests.support.polling import wait_until
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow

NOT_CONFIRMED = "Delivery not confirmed in time"


async def cross_node_channel(
    cluster: Cluster, args: list[str] | None = None
) -> tuple[WireClient, WireClient, str]:
    n0, n1 = await cluster.start(2, args=args)
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    assert b.connection_id is not None
    channel = await a.open(b.connection_id)
    await b.notification("incoming_channel")
    return a, b, channel


async def blast(sender: WireClient, channel: str, count: int) -> list[int]:
    """Write ``count`` messages in one go, never waiting for a reply; their request ids."""
    assert sender.ws is not None
    first = sender.next_id
    sender.next_id += count
    ids = list(range(first, first + count))
    for request_id in ids:
        frame = {"type": "message", "id": request_id, "channelId": channel, "payload": request_id}
        await sender.ws.send(json.dumps(frame))
    return ids


async def replies_to(client: WireClient, ids: list[int], timeout: float = 60) -> dict[int, Any]:
    wanted = set(ids)
    replies: dict[int, Any] = {}
    async with asyncio.timeout(timeout):
        for frame in list(client.received):
            if frame.get("replyTo") in wanted:
                replies[frame["replyTo"]] = frame
                client.received.remove(frame)
        while len(replies) < len(wanted):
            frame = await client.recv(timeout)
            if frame.get("replyTo") in wanted:
                replies[frame["replyTo"]] = frame
                client.received.remove(frame)
    return replies


async def payloads_at(client: WireClient, count: int, timeout: float = 60) -> list[Any]:
    found: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(found) < count:
            frame = await client.notification("channel_message", timeout)
            found.append(frame["payload"])
    return found


async def test_a_fast_sender_across_nodes_is_slowed_down_not_failed(cluster: Cluster) -> None:
    # A small window makes the sender outrun it many times over.
    # A long request timeout: no confirmation may time out on a loaded machine here.
    args = [*fast_args(request_timeout=5.0), "--max-unconfirmed", "64"]
    a, b, channel = await cross_node_channel(cluster, args)
    count = 10_000
    ids = list(range(a.next_id, a.next_id + count))
    # The sender reads its replies while it sends, as every client does.
    _, replies, delivered = await asyncio.gather(
        blast(a, channel, count), replies_to(a, ids), payloads_at(b, count)
    )
    assert [r["type"] for r in replies.values()].count("channel_message_sent") == count, [
        r for r in replies.values() if r["type"] != "channel_message_sent"
    ][:3]
    assert delivered == ids


async def test_close_after_the_other_end_closed_fails_as_on_one_node(cluster: Cluster) -> None:
    a, b, channel = await cross_node_channel(cluster)
    for _ in range(20):
        reply = await b.request("close", channelId=channel)
        assert reply["type"] == "channel_closed", reply
        # Causally after b's reply: a's close must see b's.
        reply = await a.request("close", channelId=channel)
        assert reply["type"] == "channel_close_failed", reply
        assert reply["error"] == "Channel not found"
        notice = await a.notification("channel_closed_notification", timeout=0.1)
        assert notice["channelId"] == channel
        assert [f for f in a.received + b.received] == []
        assert b.connection_id is not None
        channel = await a.open(b.connection_id)
        await b.notification("incoming_channel")


async def test_a_close_reaches_the_other_end_before_its_reply(cluster: Cluster) -> None:
    a, b, channel = await cross_node_channel(cluster)
    reply = await a.request("close", channelId=channel)
    assert reply["type"] == "channel_closed", reply
    # The other end's node applied the close before a heard back: b cannot send on it any more.
    reply = await b.request("message", channelId=channel, payload="late")
    assert reply["type"] == "channel_message_failed", reply
    assert reply["error"] == "Channel not found"
    assert (await b.notification("channel_closed_notification", timeout=0.1))[
        "channelId"
    ] == channel


async def test_both_ends_closing_at_once_give_one_node_outcomes(cluster: Cluster) -> None:
    a, b, channel = await cross_node_channel(cluster)
    assert b.connection_id is not None
    for _ in range(20):
        a_id, b_id = a.next_id, b.next_id
        a.next_id += 1
        b.next_id += 1
        await asyncio.gather(
            a.send({"type": "close", "id": a_id, "channelId": channel}),
            b.send({"type": "close", "id": b_id, "channelId": channel}),
        )
        a_reply, b_reply = await a.reply_to(a_id), await b.reply_to(b_id)
        outcomes = sorted([a_reply["type"], b_reply["type"]])
        # One close wins; the loser is told of the closure first, then fails.
        assert outcomes == ["channel_close_failed", "channel_closed"], (a_reply, b_reply)
        loser = a if a_reply["type"] == "channel_close_failed" else b
        winner = b if loser is a else a
        assert [f["type"] for f in loser.received] == ["channel_closed_notification"]
        assert winner.received == []
        loser.received.clear()
        channel = await a.open(b.connection_id)
        await b.notification("incoming_channel")


async def test_sends_keep_working_when_redis_restarts_empty(cluster: Cluster) -> None:
    a, b, channel = await cross_node_channel(cluster)
    await send_confirmed(a, b, channel, "before")
    await asyncio.to_thread(cluster.redis.restart)
    failures: list[dict[str, Any]] = []
    for n in range(60):
        reply = await a.request("message", channelId=channel, payload=n)
        if reply["type"] != "channel_message_sent":
            failures.append(reply)
        await asyncio.sleep(0.02)  # paced: the sends span the nodes' recovery
    # Redis is back before the first send: nothing may fail, and nothing was told closed.
    assert failures == []
    assert await payloads_at(b, 60) == list(range(60))
    assert [f for f in a.received + b.received if "closed" in f["type"]] == []


async def test_open_works_while_the_pubsub_connections_are_killed(cluster: Cluster) -> None:
    n0, n1 = await cluster.start(2)
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    assert b.connection_id is not None
    redis = Redis.from_url(cluster.redis.url)
    try:
        for _ in range(5):
            await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
            channel = await a.open(b.connection_id)
            await b.notification("incoming_channel")
            await send_confirmed(a, b, channel, "through")
    finally:
        await redis.aclose()


async def test_a_failure_during_a_redis_pause_is_true(cluster: Cluster) -> None:
    a, b, channel = await cross_node_channel(cluster)
    sent: list[int] = []
    failed: dict[int, str] = {}

    async def sender() -> None:
        for n in range(150):
            reply = await a.request("message", channelId=channel, payload=n, timeout=10)
            if reply["type"] == "channel_message_sent":
                sent.append(n)
            else:
                failed[n] = reply["error"]
            await asyncio.sleep(0.02)  # paced: the sends span the pause

    sending = asyncio.create_task(sender())
    await wait_until(lambda: len(sent) >= 10, timeout=10, message="ten sends confirmed first")
    cluster.redis.pause()
    await asyncio.sleep(3)  # the outage itself, three request timeouts long
    cluster.redis.resume()
    await sending
    frames = b.received + await frames_for(b, 2.0)
    delivered = {f["payload"] for f in frames if f["type"] == "channel_message"}
    assert set(sent) <= delivered
    # A failure that does not say "unknown" must mean "not delivered".
    wrongly_failed = {n: e for n, e in failed.items() if e != NOT_CONFIRMED and n in delivered}
    assert wrongly_failed == {}
    assert failed, "the pause should have failed some sends"


@pytest.mark.parametrize("nodes", [1, 2])
async def test_a_peer_told_of_a_disconnect_no_longer_finds_it(cluster: Cluster, nodes: int) -> None:
    started = await cluster.start(nodes)
    b = await cluster.client(started[-1], "b")
    assert b.connection_id is not None
    for _ in range(30):
        a = await WireClient(started[0].url).__aenter__()
        a_id = await a.register("leaver")
        channel = await a.open(b.connection_id)
        await b.notification("incoming_channel")
        await a.close()
        notice = await b.notification("channel_closed_notification")
        assert notice["channelId"] == channel
        # Causally after the notice: as on one node, the registry no longer has it.
        reply = await b.request("list_by_role", role="leaver")
        assert a_id not in reply["ids"], reply
        reply = await b.request("open", targetId=a_id)
        assert reply["type"] == "channel_open_failed", reply


async def test_a_stranger_on_a_third_node_is_not_authorized(cluster: Cluster) -> None:
    n0, n1, n2 = await cluster.start(3)
    a, b = await cluster.client(n0, "a"), await cluster.client(n1, "b")
    stranger = await cluster.client(n2, "stranger")
    assert b.connection_id is not None
    channel = await a.open(b.connection_id)
    await b.notification("incoming_channel")
    # As on one node: the channel exists, the stranger is not one of its ends.
    for kind, fields in (("message", {"payload": 1}), ("close", {})):
        reply = await stranger.request(kind, channelId=channel, **fields)
        assert reply["type"] == f"channel_{'message' if kind == 'message' else 'close'}_failed"
        assert reply["error"] == "Not authorized for this channel", reply
    await send_confirmed(a, b, channel, "untouched")
    assert (await a.request("close", channelId=channel))["type"] == "channel_closed"
    # Once it is closed and gone from the registry (in the background, within moments),
    # everyone is told it does not exist.

    async def not_found() -> bool:
        reply = await stranger.request("message", channelId=channel, payload=2)
        return bool(reply["error"] == "Channel not found")

    await wait_until(not_found, timeout=5, message="'Channel not found' for the stranger")


async def test_an_end_of_a_just_closed_channel_is_told_it_is_gone(cluster: Cluster) -> None:
    a, b, channel = await cross_node_channel(cluster)
    assert b.connection_id is not None
    for _ in range(10):
        reply = await a.request("close", channelId=channel)
        assert reply["type"] == "channel_closed"
        # Right away, while the registry may still hold it: gone, for both ends, as on one node.
        for end in (a, b):
            reply = await end.request("message", channelId=channel, payload=0)
            assert reply["error"] == "Channel not found", reply
            reply = await end.request("close", channelId=channel)
            assert reply["error"] == "Channel not found", reply
        await b.notification("channel_closed_notification")
        channel = await a.open(b.connection_id)
        await b.notification("incoming_channel")

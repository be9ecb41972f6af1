"""Redis restarted empty, or stalled (SIGSTOP), under broker-node processes with open channels.

No node crashes or hangs: requests that need Redis fail within the request timeout while it is
away, channels within one node keep working, and once Redis is back every node restores its
connections and channels; no channel is left silently dead.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.integration.helpers import list_role, send_confirmed, unread
from tests.support.cluster import HEARTBEAT, SLACK, TTL, Cluster, fast_args
from tests.support.nodes import NodeProcess, metric, wait_readiness
from tests.support.polling import wait_until
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow


async def message_or_closed(sender: WireClient, receiver: WireClient, channel: str) -> str:
    """``"works"`` when a message goes through (confirmed and delivered), ``"closed"`` when
    the sender was told the channel is closed; anything else fails the test."""
    notices = [
        f for f in unread(sender, "channel_closed_notification") if f["channelId"] == channel
    ]
    if notices:
        return "closed"
    reply = await sender.request("message", channelId=channel, payload={"probe": channel})
    if reply["type"] == "channel_message_sent":
        delivered = await receiver.notification("channel_message")
        assert delivered == {**delivered, "channelId": channel, "payload": {"probe": channel}}
        return "works"
    assert reply["type"] == "channel_message_failed", reply
    assert reply["error"] == "Channel not found", reply
    return "closed"


async def peer_judgements(node: NodeProcess) -> float:
    """How many times the node looked for lapsed heartbeats (none while in its grace)."""
    return await metric(node, "broker_registry_calls_total", operation="lapsed_nodes")


async def backend_up(node: NodeProcess, up: bool) -> bool:
    return await metric(node, "broker_backend_up") == float(up)


async def test_redis_restarted_empty_with_open_channels(cluster: Cluster) -> None:
    n0, n1 = await cluster.start(2)
    a0, a1 = await cluster.client(n0, "a"), await cluster.client(n0, "a")
    b0, b1 = await cluster.client(n1, "b"), await cluster.client(n1, "b")
    everyone = {
        "a": {a0.connection_id, a1.connection_id},
        "b": {b0.connection_id, b1.connection_id},
    }
    pairs: list[tuple[WireClient, WireClient]] = [(a0, b0), (b1, a1), (a1, b0), (a0, a1), (b0, b1)]
    channels: list[tuple[WireClient, WireClient, str]] = []
    for opener, target in pairs:
        assert target.connection_id is not None
        channel = await opener.open(target.connection_id)
        await target.notification("incoming_channel")
        await send_confirmed(opener, target, channel, "before")
        channels.append((opener, target, channel))

    await asyncio.to_thread(cluster.redis.restart)
    restarted = time.monotonic()

    # Both nodes answer ready again, and list_by_role finds every live connection.
    await wait_readiness([n0, n1], ready=True, timeout=TTL + 5 * HEARTBEAT + SLACK)

    async def listed() -> bool:
        for client in (a0, b1):
            for role, ids in everyone.items():
                reply = await client.request("list_by_role", role=role)
                if reply["type"] != "connections" or set(reply["ids"]) != ids:
                    return False
        return True

    await wait_until(listed, timeout=5 * HEARTBEAT + SLACK, message="every live connection listed")
    print(f"\nregistry restored {time.monotonic() - restarted:.2f}s after the restart")

    # Every channel works end to end, or both of its ends were told it closed.
    for opener, target, channel in channels:
        there = await message_or_closed(opener, target, channel)
        back = await message_or_closed(target, opener, channel)
        assert there == back, (channel, there, back)
    # The two nodes logged the outage once each, and came back.
    for node in (n0, n1):
        output = node.output()
        assert output.count("cluster backend lost") <= 1
        assert "restoring this node's state" in output or "cluster backend is back" in output

    # New requests across nodes work again.
    assert b1.connection_id is not None
    fresh = await a0.open(b1.connection_id)
    await b1.notification("incoming_channel")
    await send_confirmed(a0, b1, fresh, "after the restart")
    await send_confirmed(b1, a0, fresh, "after the restart")


async def test_redis_stalled_requests_fail_in_time_and_node_recovers(cluster: Cluster) -> None:
    request_timeout = 0.5
    # A TTL longer than the stall: this is about an outage, not about reaping.
    (node,) = await cluster.start(1, args=fast_args(ttl=10.0, request_timeout=request_timeout))
    x, y = await cluster.client(node, "local"), await cluster.client(node, "local")
    assert y.connection_id is not None
    local = await x.open(y.connection_id)
    await y.notification("incoming_channel")
    newcomer = await cluster.client(node)
    bound = request_timeout + SLACK

    async def timed(client: WireClient, kind: str, **fields: object) -> dict[str, object]:
        started = time.monotonic()
        reply = await client.request(kind, timeout=bound + 1, **fields)
        assert time.monotonic() - started <= bound, (kind, reply)
        return reply

    await asyncio.to_thread(cluster.redis.pause)
    stalled = time.monotonic()
    try:
        reply = await timed(newcomer, "register", role="refused")
        assert reply["type"] == "register_failed", reply
        reply = await timed(x, "list_by_role", role="local")
        assert reply["type"] == "list_by_role_failed", reply
        reply = await timed(x, "open", targetId=y.connection_id)
        assert reply["type"] == "channel_open_failed", reply

        await wait_readiness([node], ready=False, timeout=bound + HEARTBEAT)
        # A channel with both ends on this node needs no Redis.
        await send_confirmed(x, y, local, "during the stall")
        await send_confirmed(y, x, local, "during the stall")
        # Stay away for longer than the request timeout, several times over.
        while time.monotonic() - stalled < 3 * request_timeout:
            await send_confirmed(x, y, local, "still")
    finally:
        await asyncio.to_thread(cluster.redis.resume)

    await wait_readiness([node], ready=True, timeout=5 * HEARTBEAT + SLACK)
    # Recovered without a restart: register, list and open work, and nothing the failed
    # register wrote while Redis was stalled shows up as a ghost.
    await newcomer.register("late")
    assert await list_role(x, "late") == {newcomer.connection_id}
    assert await list_role(x, "refused") == set()
    assert await list_role(newcomer, "local") == {x.connection_id, y.connection_id}
    assert newcomer.connection_id is not None
    channel = await x.open(newcomer.connection_id)
    await newcomer.notification("incoming_channel")
    await send_confirmed(x, newcomer, channel, "back")
    await send_confirmed(y, x, local, "back")

    output = node.output()
    assert output.count("cluster backend lost") == 1, output
    assert output.count("cluster backend is back") == 1, output


async def test_redis_stalled_longer_than_the_node_ttl_reaps_nobody(cluster: Cluster) -> None:
    """Every heartbeat lapses while Redis is stopped; the first node back must not reap the
    others (their clients would be closed for nothing): a node that just got Redis back gives
    its peers a TTL to renew before it judges them."""
    n0, n1, n2 = await cluster.start(3)
    a = await cluster.client(n0, "a")
    b = await cluster.client(n1, "b")
    c = await cluster.client(n2, "c")
    assert b.connection_id is not None and c.connection_id is not None
    ab = await a.open(b.connection_id)
    await b.notification("incoming_channel")
    ac = await a.open(c.connection_id)
    await c.notification("incoming_channel")

    cluster.redis.pause()
    try:
        await asyncio.sleep(TTL * 2.5)  # the outage itself: longer than every TTL
    finally:
        cluster.redis.resume()

    nodes = [n0, n1, n2]
    await wait_readiness(nodes, ready=True, timeout=TTL + 5 * HEARTBEAT + SLACK)
    # Past the grace, when a wrongful reap would happen: every node has judged its peers
    # (looked for lapsed heartbeats) three more times.
    judged = [await peer_judgements(node) for node in nodes]

    async def judged_three_more_times() -> bool:
        now = [await peer_judgements(node) for node in nodes]
        return all(after >= before + 3 for before, after in zip(judged, now, strict=True))

    await wait_until(
        judged_three_more_times,
        timeout=TTL + 10 * HEARTBEAT + SLACK,
        message="every node to judge its peers three more times",
    )
    for node in (n0, n1, n2):
        assert await metric(node, "broker_reaped_nodes_total") == 0, node.output()
        assert "reaped" not in node.output()
    for client in (a, b, c):
        assert not unread(client, "channel_closed_notification")
    await send_confirmed(a, b, ab, "after the stall")
    await send_confirmed(a, c, ac, "after the stall")
    assert await list_role(a, "b") == {b.connection_id}


async def test_a_close_during_an_outage_reaches_the_far_end_afterwards(cluster: Cluster) -> None:
    n0, n1 = await cluster.start(2)
    a = await cluster.client(n0, "a")
    b = await cluster.client(n1, "b")
    assert b.connection_id is not None
    channel = await a.open(b.connection_id)
    await b.notification("incoming_channel")

    # Redis goes away with everything it held: a notice published now is lost for good,
    # unless the closer's node sends it again once Redis is back.
    await asyncio.to_thread(cluster.redis.kill)
    closed = await a.request("close", channelId=channel)
    assert closed["type"] == "channel_closed"  # the closer's node decides alone
    # Once the node has seen Redis gone, the notice's publish has failed too.
    await wait_until(
        lambda: backend_up(n0, False), timeout=TTL + SLACK, message="node-0 to see Redis gone"
    )
    await asyncio.to_thread(cluster.redis.start)

    note = await b.notification("channel_closed_notification", timeout=TTL + 10 * HEARTBEAT + SLACK)
    assert note["channelId"] == channel
    refused = await b.request("message", channelId=channel, payload="gone?")
    assert refused["type"] == "channel_message_failed" and refused["error"] == "Channel not found"

"""Connections per user across the cluster (issue 13): counted in Redis, and a dead node's
connections stop counting."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.support.cluster import Cluster, fast_args
from tests.support.nodes import NodeProcess
from tests.support.polling import wait_until
from tests.support.tokens import SECRET, claims, hs256
from tests.support.wire import WireClient

AUTH_ENV = {"BROKER_AUTH_SECRET": SECRET}
LIMIT = 2


NODE_ARGS = [*fast_args(), "--auth-max-connections-per-user", str(LIMIT)]


async def register(
    cluster: Cluster, node: NodeProcess, user: str
) -> tuple[WireClient, dict[str, Any]]:
    client = await cluster.client(node)
    token = hs256(claims(sub=user, roles=["worker"]))
    return client, await client.request("register", role="worker", token=token)


async def test_the_limit_holds_across_nodes_and_frees_on_disconnect(cluster: Cluster) -> None:
    first, second, third = await cluster.start(3, args=NODE_ARGS, env=AUTH_ENV)
    _, one = await register(cluster, first, "alice")
    leaving, two = await register(cluster, second, "alice")
    assert one["type"] == two["type"] == "registered"
    _, three = await register(cluster, third, "alice")
    assert three == {
        "type": "register_failed",
        "id": 1,
        "replyTo": 1,
        "error": "Too many connections for this user",
    }
    # Another user is not affected.
    _, bob = await register(cluster, third, "bob")
    assert bob["type"] == "registered"
    # A connection that leaves gives its slot back.
    await leaving.close()

    async def slot_free() -> bool:
        client, reply = await register(cluster, third, "alice")
        if reply["type"] != "registered":
            await client.close()
        return bool(reply["type"] == "registered")

    await wait_until(slot_free, timeout=10, interval=0.2, message="a free slot for the user")


async def test_a_killed_nodes_connections_stop_counting(cluster: Cluster) -> None:
    doomed, survivor = await cluster.start(2, args=NODE_ARGS, env=AUTH_ENV)
    for _ in range(LIMIT):
        _, reply = await register(cluster, doomed, "carol")
        assert reply["type"] == "registered"
    _, refused = await register(cluster, survivor, "carol")
    assert refused["error"] == "Too many connections for this user"
    await asyncio.to_thread(doomed.kill)

    async def counted_again() -> bool:
        client, reply = await register(cluster, survivor, "carol")
        if reply["type"] != "registered":
            await client.close()
        return bool(reply["type"] == "registered")

    # The dead node's heartbeat lapses within --node-ttl; then its connections no longer count.
    await wait_until(
        counted_again,
        timeout=15,
        interval=0.2,
        message="the dead node's connections to stop counting",
    )
    _, second = await register(cluster, survivor, "carol")
    assert second["type"] == "registered"
    _, third = await register(cluster, survivor, "carol")
    assert third["error"] == "Too many connections for this user"


async def test_standalone_node_limits_per_user() -> None:
    with NodeProcess(extra_args=["--auth-max-connections-per-user", "1"], env=AUTH_ENV) as node:
        token = hs256(claims(sub="dave", roles=["worker"]))
        async with WireClient(node.url) as a, WireClient(node.url) as b:
            assert (await a.request("register", role="worker", token=token))["type"] == (
                "registered"
            )
            reply = await b.request("register", role="worker", token=token)
            assert reply["error"] == "Too many connections for this user"
            await a.close()

            async def freed() -> bool:
                async with WireClient(node.url) as c:
                    answer = await c.request("register", role="worker", token=token)
                    return bool(answer["type"] == "registered")

            await wait_until(freed, timeout=10, interval=0.1, message="the slot freed")

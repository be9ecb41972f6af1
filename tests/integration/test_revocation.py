"""Revocation across the cluster with ``broker-admin`` (issue 13): three real nodes, one Redis."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from broker_node.auth.revocation import Revocation, RevocationKeys, announce
from client import BrokerClient
from tests.support.cluster import Cluster
from tests.support.nodes import NodeProcess
from tests.support.polling import wait_until
from tests.support.tokens import SECRET, claims, hs256
from tests.support.wire import WireClient

BROKER_ADMIN = str(Path(sys.executable).parent / "broker-admin")
AUTH_ENV = {"BROKER_AUTH_SECRET": SECRET}


async def admin(*args: str, redis_url: str) -> dict[str, Any]:
    run = await asyncio.to_thread(
        subprocess.run,
        [BROKER_ADMIN, "--json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"BROKER_REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


async def registered(cluster: Cluster, node: NodeProcess, token: str) -> WireClient:
    client = await cluster.client(node)
    reply = await client.request("register", role="worker", token=token)
    assert reply["type"] == "registered", reply
    return client


async def test_kick_user_closes_its_connections_on_every_node(cluster: Cluster) -> None:
    nodes = await cluster.start(3, env=AUTH_ENV)
    alice_token = hs256(claims(sub="alice", roles=["worker"]))
    alices = [await registered(cluster, node, alice_token) for node in nodes]
    bob = await registered(cluster, nodes[0], hs256(claims(sub="bob", roles=["worker"])))

    outcome = await admin("kick-user", "alice", "--ttl", "600", redis_url=cluster.redis.url)
    assert outcome["kind"] == "sub" and outcome["value"] == "alice"
    assert outcome["nodes"] == 3  # every node listens from before it is ready

    for client in alices:
        assert await client.closed_with(timeout=10) == (4003, "Token revoked")
    assert (await bob.request("list_by_role", role="worker"))["type"] == "connections"

    # The same token is refused everywhere, also on a node started after the kick.
    late = (await cluster.start(1, env=AUTH_ENV))[0]
    for node in [*nodes, late]:
        client = await cluster.client(node)
        reply = await client.request("register", role="worker", token=alice_token)
        assert reply["error"] == "Invalid token: revoked", node.node_id
    # A token issued after the kick is accepted again.
    fresh = hs256({**claims(sub="alice", roles=["worker"]), "iat": int(time.time()) + 2})
    await registered(cluster, nodes[1], fresh)


async def test_revoke_a_token_id(cluster: Cluster) -> None:
    nodes = await cluster.start(3, env=AUTH_ENV)
    revoked = hs256(claims(sub="carol", roles=["worker"], jti="t-revoked"))
    kept = hs256(claims(sub="carol", roles=["worker"], jti="t-kept"))
    victims = [await registered(cluster, node, revoked) for node in nodes]
    survivor = await registered(cluster, nodes[2], kept)

    outcome = await admin("revoke", "t-revoked", redis_url=cluster.redis.url)
    assert outcome["kind"] == "jti" and outcome["nodes"] == 3
    for client in victims:
        assert await client.closed_with(timeout=10) == (4003, "Token revoked")
    assert (await survivor.request("list_by_role", role="worker"))["type"] == "connections"
    retry = await cluster.client(nodes[0])
    reply = await retry.request("register", role="worker", token=revoked)
    assert reply["error"] == "Invalid token: revoked"


async def test_the_sdk_stops_reconnecting_once_its_token_is_revoked(cluster: Cluster) -> None:
    [node] = await cluster.start(1, env=AUTH_ENV)
    token = hs256(claims(sub="dave", roles=["worker"]))
    client = BrokerClient(
        node.url,
        "worker",
        token=token,
        maintain_connection=True,
        backoff_base=0.05,
        backoff_cap=0.2,
    )
    async with client:
        await admin("kick-user", "dave", redis_url=cluster.redis.url)

        async def stopped() -> bool:
            return client._supervisor is not None and client._supervisor.done()

        await wait_until(stopped, timeout=10, message="the kicked client to stop")
        assert not client.connected


async def test_broker_admin_without_redis_fails_clearly() -> None:
    run = await asyncio.to_thread(
        subprocess.run,
        [BROKER_ADMIN, "--redis-url", "redis://127.0.0.1:1", "kick-user", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 1 and "cannot reach Redis" in run.stderr


async def test_a_revocation_made_while_the_listener_is_cut_off_still_applies(
    cluster: Cluster,
) -> None:
    from redis.asyncio import Redis

    [node] = await cluster.start(1, env=AUTH_ENV)
    alice = await registered(cluster, node, hs256(claims(sub="erin", roles=["worker"])))
    redis = Redis.from_url(cluster.redis.url)
    try:
        # Every pub/sub connection is cut (the node's bus and revocation listener alike);
        # the revocation is published before the node can have subscribed again.
        await redis.client_kill_filter(_type="pubsub")
        now = time.time()
        revocation = Revocation(kind="sub", value="erin", at=now, until=now + 600)
        assert await announce(redis, RevocationKeys(), revocation) == 0  # nobody listening
    finally:
        await redis.aclose()
    # The listener subscribes again and loads what Redis remembers: the kick still lands.
    assert await alice.closed_with(timeout=15) == (4003, "Token revoked")

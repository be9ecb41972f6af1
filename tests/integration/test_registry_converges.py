"""The registry converges to exactly the live connections and channels (issue 11, items 1, 5).

Real broker-node processes on a real redis-server: clients that vanish while their registry
write is on the wire, a Redis pause in the middle of such writes, and a client with a great many
channels leaving, each followed by a count of every key in Redis against the live state.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import pytest

import broker_node.node as node_module
from broker_node.config import Settings
from broker_node.node import BrokerNode
from shared.ids import ConnectionId, NodeId
from tests.integration.helpers import KEYS, RedisInspector, list_role, node_keys
from tests.support.cluster import HEARTBEAT, REQUEST_TIMEOUT, TTL, Cluster, fast_args
from tests.support.nodes import NodeProcess, metric, status
from tests.support.polling import wait_until
from tests.support.raw_ws import RawClient, text
from tests.support.redis_server import RedisServer
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow

#: Long enough for the node's registry writes and cleanup to run on a busy machine.
SETTLE = 20.0


async def _vanish(writer: asyncio.StreamWriter) -> None:
    """Drop the TCP connection at once, with a reset: no closing handshake, no FIN wait."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _register_and_vanish(port: int, role: str, extra: list[dict[str, object]]) -> None:
    frames = text({"type": "register", "id": 1, "role": role})
    for n, request in enumerate(extra, start=2):
        frames += text({**request, "id": n})
    client = await RawClient.connect(port, after_request=frames)
    await _vanish(client.writer)


async def _expected_keys(node: NodeProcess, live: list[WireClient], role: str) -> set[str]:
    ids = [c.connection_id for c in live if c.connection_id is not None]
    expected = node_keys(node.effective_id(), connections=ids)
    expected.add(KEYS.nodes)
    if ids:
        expected.add(KEYS.role(role))
    return expected


async def _unready(node: NodeProcess) -> bool:
    return await status(node) == 503


async def _a_registration_timed_out(node: NodeProcess) -> bool:
    errors = await metric(node, "broker_registry_call_errors_total", operation="add_connection")
    return errors >= 1


async def _resynchronised(node: NodeProcess) -> bool:
    return await metric(node, "broker_registry_calls_total", operation="node_index") >= 1


async def _storm(node: NodeProcess, role: str, count: int, extra: list[dict[str, object]]) -> None:
    results = await asyncio.gather(
        *(_register_and_vanish(node.port, role, extra) for _ in range(count)),
        return_exceptions=True,
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) < count // 10, errors[:3]


async def test_clients_that_vanish_mid_register_leave_no_ghosts(cluster: Cluster) -> None:
    (node,) = await cluster.start(1)
    watcher = await cluster.client(node, "watcher")
    await _storm(node, "ghost", 300, [])
    redis = RedisInspector(cluster.redis.url)
    try:
        expected = await _expected_keys(node, [watcher], "watcher")
        await redis.wait_for_keys(expected, timeout=SETTLE)
        assert await list_role(watcher, "ghost") == set()
    finally:
        await redis.aclose()


async def test_clients_that_vanish_mid_open_leave_no_channels(cluster: Cluster) -> None:
    (node,) = await cluster.start(1)
    target = await cluster.client(node, "target")
    assert target.connection_id is not None
    await _storm(node, "opener", 200, [{"type": "open", "targetId": target.connection_id}])
    redis = RedisInspector(cluster.redis.url)
    try:
        expected = await _expected_keys(node, [target], "target")
        await redis.wait_for_keys(expected, timeout=SETTLE)
        # The target was told of channels whose opener left: each was closed again.
        assert await list_role(target, "opener") == set()
    finally:
        await redis.aclose()


async def test_vanishing_clients_during_a_redis_pause_leave_no_ghosts(cluster: Cluster) -> None:
    (node,) = await cluster.start(1)
    watcher = await cluster.client(node, "watcher")
    redis = RedisInspector(cluster.redis.url)
    # The resync that follows must never delete a live entry, not even for a moment.
    await redis.client.config_set("notify-keyspace-events", "Kg")
    pubsub = redis.client.pubsub()
    await pubsub.subscribe(
        f"__keyspace@0__:{KEYS.connection(ConnectionId(str(watcher.connection_id)))}"
    )
    cluster.redis.pause()
    try:
        await _storm(node, "ghost", 100, [])
        # The writes are in the stalled Redis's socket buffers and time out on the node's side:
        # their outcome is unknown there; Redis runs them once it resumes. Redis resumes only
        # once a write has timed out: resumed earlier (a loaded machine reaches not-ready by a
        # heartbeat's timeout alone), the writes complete and nothing needs a resync.
        await wait_until(
            lambda: _unready(node), timeout=SETTLE, message="the node to report not ready"
        )
        await wait_until(
            lambda: _a_registration_timed_out(node),
            timeout=SETTLE,
            message="a registration's write to time out",
        )
    finally:
        cluster.redis.resume()
    try:
        # Once Redis answers, the node's next heartbeat finds its entries dirty and reads back
        # what the registry indexes under it (node_index) to resynchronise.
        await wait_until(
            lambda: _resynchronised(node), timeout=SETTLE, message="the node to resynchronise"
        )
        assert "resynchronising" in node.output()
        expected = await _expected_keys(node, [watcher], "watcher")
        await redis.wait_for_keys(expected, timeout=SETTLE)
        events = []
        while (event := await pubsub.get_message(timeout=0.01)) is not None:
            if event["type"] == "message":
                events.append(event["data"])
        assert "del" not in events
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
        await redis.aclose()


async def _open_many(opener: WireClient, target_id: str, count: int) -> list[str]:
    """``count`` opens written back to back, then their replies: the channel ids."""
    first = opener.next_id
    for n in range(count):
        await opener.send({"type": "open", "id": first + n, "targetId": target_id})
    opener.next_id += count
    channels = []
    for n in range(count):
        reply = await opener.reply_to(first + n, timeout=SETTLE)
        assert reply["type"] == "channel_opened", reply
        channels.append(str(reply["channelId"]))
    return channels


async def test_a_client_with_many_channels_leaving_hides_no_live_entry(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The node's former bound on queued removals, made small so that a test can pass it.
    monkeypatch.setattr(node_module, "MAX_REGISTRY_BACKLOG", 500, raising=False)
    settings = Settings(
        host="127.0.0.1",
        port=0,
        redis_url=redis_server.url,
        node_id=NodeId("bulk"),
        heartbeat_interval=HEARTBEAT,
        node_ttl=TTL,
        request_timeout=REQUEST_TIMEOUT * 5,
        # A channel cap far above the default: this client's point is to have very many.
        max_channels_per_connection=1_000_000,
    )
    redis = RedisInspector(redis_server.url)
    # Every deletion of a live client's record is seen as it happens (keyspace events).
    await redis.client.config_set("notify-keyspace-events", "Kg")
    pubsub = redis.client.pubsub()
    async with BrokerNode(settings) as node:
        url = f"ws://127.0.0.1:{node.port}"
        async with contextlib.AsyncExitStack() as stack:
            bystanders = [await stack.enter_async_context(WireClient(url)) for _ in range(20)]
            for client in bystanders:
                await client.register("bystander")
            target = await stack.enter_async_context(WireClient(url))
            target_id = await target.register("target")
            big = await stack.enter_async_context(WireClient(url))
            await big.register("big")
            live_ids = [c.connection_id for c in (*bystanders, target)]
            await pubsub.psubscribe(
                *(f"__keyspace@0__:{KEYS.connection(ConnectionId(str(c)))}" for c in live_ids)
            )
            await _open_many(big, target_id, 1_200)

            await big.close()
            expected = node_keys(node.node_id, connections=[str(c) for c in live_ids])
            expected |= {KEYS.nodes, KEYS.role("bystander"), KEYS.role("target")}

            await redis.wait_for_keys(expected, timeout=SETTLE)
            # Long enough for a liveness round (which would rewrite a "dirty" registry) to run.
            rounds = node.stats.registry_calls.get("heartbeat", [0])[0]

            async def two_more_rounds() -> bool:
                calls = node.stats.registry_calls.get("heartbeat", [0])[0]
                return bool(calls >= rounds + 2)

            await wait_until(two_more_rounds, timeout=SETTLE, message="two more liveness rounds")
            assert await redis.keys() == expected
            assert await list_role(target, "bystander") == {c.connection_id for c in bystanders}
            events = []
            while (event := await pubsub.get_message(timeout=0.01)) is not None:
                if event["type"] == "pmessage":
                    events.append((event["channel"], event["data"]))
            assert [e for e in events if e[1] == "del"] == []
    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
    await redis.aclose()


#: Channels of the one client that leaves, in the real-process scenario: enough for 20
#: batches of removals (the in-process test above shows the former overflow path).
MANY = 10_000


async def _told_of_channels(target: WireClient, count: int) -> None:
    opened: set[str] = set()
    closed: set[str] = set()
    while len(closed) < count:
        frame = await target.recv(timeout=120)
        target.received.remove(frame)
        if frame.get("type") == "incoming_channel":
            opened.add(str(frame["channelId"]))
        elif frame.get("type") == "channel_closed_notification":
            assert frame["channelId"] in opened, "closed before it was opened"
            closed.add(str(frame["channelId"]))
    assert len(opened) == count


async def test_a_client_with_many_channels_leaving_real_nodes(cluster: Cluster) -> None:
    node, other = await cluster.start(
        2, args=[*fast_args(), "--max-channels-per-connection", str(2 * MANY)]
    )
    told: list[asyncio.Task[None]] = []
    redis = RedisInspector(cluster.redis.url)
    await redis.client.config_set("notify-keyspace-events", "Kg")
    pubsub = redis.client.pubsub()
    try:
        bystanders = [await cluster.client(node, "bystander") for _ in range(50)]
        targets = [await cluster.client(n, "target") for n in (node, other) for _ in range(5)]
        live = [*bystanders, *targets]
        await pubsub.psubscribe(
            *(f"__keyspace@0__:{KEYS.connection(ConnectionId(str(c.connection_id)))}" for c in live)
        )
        # Targets read all along (a client that stops reading is closed as a slow consumer):
        # each is told of each of its channels, then of each one's closing.
        share = MANY // len(targets)
        told += [asyncio.create_task(_told_of_channels(target, share)) for target in targets]
        big = await cluster.client(node, "big")
        first = big.next_id
        for n in range(MANY):
            target_id = targets[n % len(targets)].connection_id
            await big.send({"type": "open", "id": first + n, "targetId": target_id})
        big.next_id += MANY
        last = await big.reply_to(first + MANY - 1, timeout=120)
        assert last["type"] == "channel_opened", last
        await big.close()

        on_node = [c.connection_id for c in live if c in bystanders or c in targets[:5]]
        on_other = [c.connection_id for c in targets[5:]]
        expected = (
            node_keys(node.effective_id(), connections=[str(c) for c in on_node])
            | node_keys(other.effective_id(), connections=[str(c) for c in on_other])
            | {KEYS.nodes, KEYS.role("bystander"), KEYS.role("target")}
        )

        await redis.wait_for_keys(expected, timeout=60, interval=0.5)
        async with asyncio.timeout(SETTLE):
            await asyncio.gather(*told)
        assert await list_role(targets[-1], "bystander") == {c.connection_id for c in bystanders}
        deleted = []
        while (event := await pubsub.get_message(timeout=0.01)) is not None:
            if event["type"] == "pmessage" and event["data"] == "del":
                deleted.append(event["channel"])
        assert deleted == []
    finally:
        for task in told:
            task.cancel()
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8.2
        await redis.aclose()

"""The registry converges to exactly the live connections and channels (issue 11, items 1, 5).

Real broker-node processes on a real redis-server: clients that vanish while their registry
write is on the wire, a Redis pause in the middle of such writes, and a client with a great many
channels leaving, each followed by a count of every key in Redis against the live state.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.integration.helpers import (
    KEYS,
    Cluster,
    RedisInspector,
    eventually,
    list_role,
    node_keys,
    status,
)
from tests.support.nodes import NodeProcess
from tests.support.raw_ws import RawClient, text
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


async def _storm(
    node: NodeProcess, role: str, count: int, extra: list[dict[str, object]]
) -> None:
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

        async def clean() -> bool:
            return await redis.keys() == expected

        try:
            await eventually(clean, timeout=SETTLE)
        except TimeoutError:
            left = await redis.keys() - expected
            pytest.fail(f"{len(left)} keys of vanished clients left, e.g. {sorted(left)[:5]}")
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

        async def clean() -> bool:
            return await redis.keys() == expected

        try:
            await eventually(clean, timeout=SETTLE)
        except TimeoutError:
            left = await redis.keys() - expected
            pytest.fail(f"{len(left)} keys of vanished clients left, e.g. {sorted(left)[:5]}")
        # The target was told of channels whose opener left: each was closed again.
        assert await list_role(target, "opener") == set()
    finally:
        await redis.aclose()


async def test_vanishing_clients_during_a_redis_pause_leave_no_ghosts(cluster: Cluster) -> None:
    (node,) = await cluster.start(1)
    watcher = await cluster.client(node, "watcher")
    cluster.redis.pause()
    try:
        await _storm(node, "ghost", 100, [])
        # The writes are in the stalled Redis's socket buffers and time out on the node's side:
        # their outcome is unknown there; Redis runs them once it resumes.
        await eventually(lambda: _unready(node), timeout=SETTLE)
    finally:
        cluster.redis.resume()
    redis = RedisInspector(cluster.redis.url)
    try:
        expected = await _expected_keys(node, [watcher], "watcher")

        async def clean() -> bool:
            return await redis.keys() == expected

        try:
            await eventually(clean, timeout=SETTLE)
        except TimeoutError:
            left = await redis.keys() - expected
            pytest.fail(f"{len(left)} keys of vanished clients left, e.g. {sorted(left)[:5]}")
    finally:
        await redis.aclose()

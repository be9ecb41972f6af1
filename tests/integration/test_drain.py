"""SIGTERM: the node drains (not ready, clients closed with 1001, peers told, registry left)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tests.integration.helpers import KEYS, RedisInspector, list_role, node_keys, send_confirmed
from tests.support.cluster import DRAIN_TIMEOUT, Cluster
from tests.support.nodes import status

pytestmark = pytest.mark.slow


async def test_sigterm_drains_and_leaves_nothing_in_redis(cluster: Cluster) -> None:
    leaving, staying = await cluster.start(2)
    d1, d2 = await cluster.client(leaving, "leaving"), await cluster.client(leaving, "leaving")
    p1 = await cluster.client(staying, "staying")
    assert p1.connection_id is not None and d2.connection_id is not None
    # Channels both ways across the nodes, and one with both ends on the leaving node.
    out = await d1.open(p1.connection_id)
    await p1.notification("incoming_channel")
    back = await p1.open(d2.connection_id)
    await d2.notification("incoming_channel")
    await d1.open(d2.connection_id)
    await d2.notification("incoming_channel")
    await send_confirmed(d1, p1, out, "before")
    await send_confirmed(p1, d2, back, "before")

    assert await status(leaving) == 200
    process = leaving.process
    assert process is not None
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    # Readiness right after the signal: it may already refuse connections, never say ready
    # once it said anything else.
    seen: list[int] = []
    while process.poll() is None and len(seen) < 50:
        seen.append(await status(leaving))
    settled = [
        code for code in seen[next((i for i, c in enumerate(seen) if c != 200), len(seen)) :]
    ]
    assert 200 not in settled, seen
    assert set(seen) <= {200, 503, 0}, seen

    for client in (d1, d2):
        code, _ = await client.closed_with(timeout=DRAIN_TIMEOUT)
        assert code == 1001
    closed = {
        (await p1.notification("channel_closed_notification", timeout=DRAIN_TIMEOUT))["channelId"]
        for _ in range(2)
    }
    assert closed == {out, back}

    try:
        exit_code = await asyncio.to_thread(process.wait, DRAIN_TIMEOUT + 1)
    except Exception:
        print(leaving.output())
        raise
    assert exit_code == 0, leaving.output()
    assert time.monotonic() - signalled < DRAIN_TIMEOUT
    output = leaving.output()
    assert "draining" in output
    assert "drain timed out" not in output
    # Cancelling the loops mid-call at the end of the drain is no Redis outage.
    assert "cluster backend lost" not in output

    # Nothing of the node in Redis: no heartbeat, no tombstone, not in the nodes set.
    redis = RedisInspector(cluster.redis.url)
    try:
        staying_id = staying.effective_id()
        assert await redis.keys() == node_keys(staying_id, connections=[p1.connection_id]) | {
            KEYS.nodes,
            KEYS.role("staying"),
        }
        assert await redis.client.smembers(KEYS.nodes) == {staying_id}
    finally:
        await redis.aclose()
    assert await list_role(p1, "leaving") == set()

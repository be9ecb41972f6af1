"""Stopping a node whose loops are in the middle of registry calls is no backend outage."""

from __future__ import annotations

import asyncio
import logging

import pytest

from broker_node.cluster.base import Heartbeat
from broker_node.cluster.memory import MemoryBackend, MemoryRegistry
from broker_node.config import Settings
from broker_node.node import BrokerNode
from shared.ids import NodeId


class HangingHeartbeat(MemoryRegistry):
    """An in-memory registry whose heartbeats after the first never answer."""

    def __init__(self, backend: MemoryBackend) -> None:
        super().__init__(backend.hub)
        self.beats = 0
        self.hanging = asyncio.Event()

    async def heartbeat(self, node_id: NodeId, ttl_ms: int) -> Heartbeat:
        self.beats += 1
        if self.beats == 1:
            return await super().heartbeat(node_id, ttl_ms)
        self.hanging.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_stop_during_a_registry_call_logs_no_backend_loss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = MemoryBackend()
    registry = HangingHeartbeat(backend)
    backend._registry = registry
    settings = Settings(
        host="127.0.0.1",
        port=0,
        node_id=NodeId("stopping"),
        heartbeat_interval=0.05,
        request_timeout=30.0,
    )
    node = BrokerNode(settings, backend)
    await node.start()
    async with asyncio.timeout(5):
        await registry.hanging.wait()
    with caplog.at_level(logging.INFO, logger="broker_node"):
        async with asyncio.timeout(5):
            await node.stop()
    # The liveness loop was cancelled inside its heartbeat: neither a lost backend in the
    # log nor a failed registry call in the metrics.
    assert "cluster backend lost" not in caplog.text
    assert node.status.backend_up
    assert node.stats.registry_calls["heartbeat"][2] == 0
    assert "stopped" in caplog.text

"""Fixtures of the SDK tests: real broker nodes, standalone and clustered on a real Redis.

In-process nodes (``BrokerNode`` on port 0) for the API tests; ``broker-node`` subprocesses
(``NodeProcess``) wherever a node must die. Redis is always a ``redis-server`` the test
starts on a free port, never the one on 6379.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from broker_node.config import Settings
from broker_node.node import BrokerNode
from tests.support.nodes import NodeProcess
from tests.support.redis_server import RedisServer

#: Fast failure detection for the cluster processes (the defaults are 5 s / 15 s).
FAST_CLUSTER = ["--heartbeat-interval", "0.2", "--node-ttl", "1.0"]


@pytest.fixture
async def standalone() -> AsyncIterator[str]:
    """The URL of a standalone node in this process."""
    async with BrokerNode(Settings(host="127.0.0.1", port=0)) as node:
        yield f"ws://127.0.0.1:{node.port}"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[list[NodeProcess]]:
    """Three broker-node processes sharing one real redis-server."""
    nodes = [
        NodeProcess(redis_url=redis_server.url, node_id=f"node-{n}", extra_args=FAST_CLUSTER)
        for n in range(3)
    ]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.__exit__(None, None, None)


@pytest.fixture
def node_process() -> Iterator[NodeProcess]:
    """A standalone broker-node process (for tests that kill it)."""
    with NodeProcess() as node:
        yield node

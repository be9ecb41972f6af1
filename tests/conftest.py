"""Fixtures for the whole suite: an in-process node, and the real processes a test starts.

Redis is always a ``redis-server`` a test starts on a free port, never the one on 6379:
``redis_server`` is the test's own (it may kill, pause and restart it), ``shared_redis_server``
lives for the session (a test flushes it or keeps to a prefix of its own, and leaves it
running). ``cluster`` builds ``broker-node`` processes on the test's own server; ``nginx``
is the real load balancer (``.ci/run`` installs it when absent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from broker_node.config import Settings
from broker_node.node import BrokerNode
from shared.ids import NodeId
from tests.differential import profiles  # noqa: F401 - registers the differential profiles
from tests.support.cluster import Cluster
from tests.support.nginx import NginxUnavailable, ensure_nginx
from tests.support.redis_server import RedisServer


@pytest.fixture
async def node() -> AsyncIterator[BrokerNode]:
    """A standalone node in this process, on a free port."""
    settings = Settings(host="127.0.0.1", port=0, node_id=NodeId("test-node"))
    async with BrokerNode(settings) as running:
        yield running


@pytest.fixture
def url(node: BrokerNode) -> str:
    return f"ws://127.0.0.1:{node.port}"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def shared_redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session (see the module docstring)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
async def cluster(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    """No node yet: the test starts what it needs (``await cluster.start(2)``), with short
    failure detection unless it passes options of its own."""
    made = Cluster(redis_server)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture(scope="session")
def nginx() -> Path:
    """The nginx binary; a test that needs it is skipped, saying why, only where none can be
    had (``.ci/run`` installs it)."""
    try:
        return ensure_nginx()
    except NginxUnavailable as exc:
        pytest.skip(f"nginx is unavailable: {exc}")

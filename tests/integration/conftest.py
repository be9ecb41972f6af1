"""Fixtures of the node-level cluster tests: real redis-server and broker-node processes.

Every test gets its own ``redis-server`` on a free port (never the one on 6379), since these
tests kill, pause and restart it, and a ``Cluster`` that starts ``broker-node`` processes on
it with short heartbeat, TTL and request timeouts so that the whole folder stays fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.integration.helpers import Cluster
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def cluster(redis_server: RedisServer) -> AsyncIterator[Cluster]:
    made = Cluster(redis_server)
    try:
        yield made
    finally:
        await made.aclose()

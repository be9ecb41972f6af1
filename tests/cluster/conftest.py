"""Fixtures of the cluster tests: the contract ``harness`` over every backend, and Redis servers.

The real redis-server is the session's shared one (``shared_redis_server``), flushed before
each test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest
from fakeredis.aioredis import FakeAsyncRedisConnection
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis

from broker_node.cluster.base import Backend
from broker_node.cluster.redis import RedisBackend
from tests.cluster.harness import (
    Harness,
    memory_harness,
    redis_harness,
    settings_for,
)
from tests.support.redis_server import RedisServer


def fakeredis_harness() -> Harness:
    # fakeredis runs EVAL/EVALSHA only with lupa installed (the fakeredis[lua] extra).
    pytest.importorskip("lupa", reason="fakeredis needs lupa (fakeredis[lua]) to run Lua")
    server = fakeredis.FakeServer()

    def pools(max_connections: int, timeout: float) -> ConnectionPool:
        return BlockingConnectionPool(
            connection_class=FakeAsyncRedisConnection,
            server=server,
            max_connections=max_connections,
            timeout=timeout,
            protocol=2,
        )

    def make_backend() -> Backend:
        return RedisBackend(settings_for(None), pool_factory=pools)

    return redis_harness("fakeredis", make_backend, fakeredis.FakeAsyncRedis(server=server))


def real_redis_harness(server: RedisServer) -> Harness:
    def make_backend() -> Backend:
        return RedisBackend(settings_for(server.url))

    return redis_harness("redis", make_backend, Redis.from_url(server.url))


async def made_harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind: str = request.param
    if kind == "memory":
        made = memory_harness()
    elif kind == "fakeredis":
        made = fakeredis_harness()
    else:
        made = real_redis_harness(request.getfixturevalue("shared_redis_server"))
    await made.wipe()
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async for made in made_harness(request):
        yield made


@pytest.fixture(params=["memory", "redis"])
async def bus_harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """The bus's backends: it drives sockets of its own, which fakeredis cannot give it."""
    async for made in made_harness(request):
        yield made

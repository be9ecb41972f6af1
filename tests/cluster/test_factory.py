"""Choosing the backend from the URL, and what the Redis URL configures."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from broker_node.cluster.factory import create_backend, masked_url
from broker_node.cluster.memory import MemoryBackend
from broker_node.cluster.redis import RedisBackend, url_pool_factory
from broker_node.config import Settings
from broker_node.errors import ConfigurationError


async def test_no_url_is_a_standalone_memory_backend() -> None:
    backend = create_backend(Settings())
    assert isinstance(backend, MemoryBackend)
    assert backend.standalone
    await backend.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0",
        "REDIS://127.0.0.1:1",
        "rediss://user:p%40ss@redis.example:6380/2",
        "unix:///run/redis.sock?db=1",
    ],
)
async def test_redis_schemes_make_a_redis_backend(url: str) -> None:
    backend = create_backend(Settings(redis_url=url))  # connects lazily
    assert isinstance(backend, RedisBackend)
    assert not backend.standalone
    await backend.aclose()


@pytest.mark.parametrize("url", ["memory://", "http://user:hunter2@host", "127.0.0.1:6379"])
def test_other_urls_are_refused_without_echoing_secrets(url: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        create_backend(Settings(redis_url=url))
    assert "hunter2" not in str(refused.value)


def test_redis_backend_needs_a_url_or_a_pool_factory() -> None:
    with pytest.raises(ConfigurationError):
        RedisBackend(Settings())


def test_url_options_and_timeouts_reach_the_connections() -> None:
    tls = url_pool_factory("rediss://user:p%40ss@redis.example:6380/2")(1, 1.5)
    assert tls.connection_class is SSLConnection
    kwargs = tls.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", "p@ss", 2)
    assert kwargs["socket_connect_timeout"] == 1.5
    # Operations are bounded by asyncio.timeout instead (no wait_for per send).
    assert kwargs["socket_timeout"] is None
    assert kwargs["retry"].get_retries() == 0

    unix = url_pool_factory("unix:///run/redis.sock?db=1")(1, 1.5)
    assert unix.connection_class is UnixDomainSocketConnection
    assert unix.connection_kwargs["path"] == "/run/redis.sock"


def test_resp3_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        create_backend(Settings(redis_url="redis://127.0.0.1:1/0?protocol=3"))


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:s3cret@redis:6379/2", "redis://user:***@redis:6379/2"),
        ("rediss://:s3cret@redis", "rediss://:***@redis"),
        ("redis://redis/0?password=s3cret&db=1", "redis://redis/0?password=***&db=1"),
        ("unix://u:s3cret@/run/redis.sock?db=3", "unix://u:***@/run/redis.sock?db=3"),
    ],
)
def test_a_logged_url_never_shows_its_password(url: str, shown: str) -> None:
    assert masked_url(url) == shown

"""The Redis backend: the registry in Redis keys, the bus on Redis pub/sub.

Theory of operation
-------------------
Connections (sockets to Redis), three kinds. The registry's are redis-py's, made by one *pool
factory* so that tests can hand in fakeredis connections; the bus opens real sockets of its own
from the Redis URL (``endpoint.py``):

* the registry's command pool (bounded, blocking up to the request timeout for a free slot);
* ONE publisher connection for the bus, a ``RespLink`` (see ``resp.py``). ``send`` writes its
  whole batch of PUBLISH commands in one write, at once, and the replies are matched to sends
  in order as they arrive, so the publishes of this node reach Redis, and so every
  subscriber, in the order they were made; sends are pipelined, never awaited;
* ONE subscriber connection per ``subscribe`` call, a ``RespLink`` too, rather than
  ``redis.asyncio.PubSub``, whose retry layer reconnects and re-subscribes silently and so
  would lose messages unnoticed. A lost subscriber connection makes ``wait_lost`` raise
  ``BackendUnavailable``; an idle one is probed with ``PING``.

Timeouts and errors: every connection is made within ``Settings.request_timeout`` (the
registry's have no ``socket_timeout``, see ``url_pool_factory``), with no retries (a retried
PUBLISH could duplicate or reorder), and every operation runs under one
``asyncio.timeout(request_timeout)`` (a publish gets one request timeout for its replies); the
node scripts ``reap``, ``leave`` and ``rejoin``, which run from background loops and may take
long on a big node, use two connections of their own with
``max(request_timeout, heartbeat_interval)``. Any Redis error, socket error or timeout becomes
``BackendUnavailable``, which then means "outcome unknown": the command may still have been
applied (a paused Redis runs what it had buffered when it resumes).

Atomicity: writes that touch several keys go in a MULTI/EXEC pipeline; ``heartbeat``,
``rejoin``, ``reap`` and ``leave`` are Lua scripts, so that of several survivors racing to reap
a node exactly one finds it lapsed and removes its state. The key schema is in ``keys.py`` and
``docs/redis-keys.md``.
"""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker_node.cluster.base import Bus, Registry
from broker_node.cluster.endpoint import RedisEndpoint
from broker_node.cluster.keys import TOMBSTONE_TTL_MS, RedisKeys
from broker_node.cluster.redis_bus import RedisBus
from broker_node.cluster.redis_registry import RedisRegistry
from broker_node.config import Settings
from broker_node.errors import ConfigurationError

__all__ = ["RedisBackend", "RedisBus", "RedisRegistry", "url_pool_factory"]

#: Makes a pool of at most ``max_connections`` connections to the cluster's Redis whose reads,
#: writes and connects each time out after ``timeout`` seconds.
PoolFactory = Callable[[int, float], ConnectionPool]

#: Connections of the registry's command pool.
DEFAULT_MAX_CONNECTIONS = 32
#: Connections for the node scripts (reap, leave, rejoin), which may run long.
MAINTENANCE_CONNECTIONS = 2


def url_pool_factory(url: str) -> PoolFactory:
    """Pools for ``url`` (``redis://``, ``rediss://``, ``unix://``; passwords, db and TLS
    options come from the URL, as redis-py's ``from_url`` parses it) with no retries."""

    def make(max_connections: int, timeout: float) -> ConnectionPool:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,  # waiting for a free connection of the pool
            # No socket_timeout: redis-py would wrap every send in asyncio.wait_for, which costs
            # a task per command and, on Python 3.11, can swallow a cancellation (gh-86296).
            # Every operation here already runs under asyncio.timeout (see _guard), and the
            # subscriber passes its own read timeout.
            socket_timeout=None,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            # One attempt: a retry could re-send a PUBLISH pipeline (duplicates, reordering)
            # and would multiply the time a caller waits.
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        # The subscriber reads RESP2 pub/sub replies; a URL's ?protocol= would win over ours.
        if str(pool.connection_kwargs.get("protocol")) != "2":
            raise ConfigurationError("the Redis URL must not ask for a protocol other than 2")
        return pool

    return make


class RedisBackend:
    """The registry and bus of one node on one Redis (``redis://``, ``rediss://``, ``unix://``).

    ``pool_factory`` replaces the URL (tests pass fakeredis pools); the backend owns the pools
    it makes and closes them in ``aclose``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        pool_factory: PoolFactory | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        maintenance_timeout: float | None = None,
        tombstone_ttl_ms: int = TOMBSTONE_TTL_MS,
    ) -> None:
        timeout = settings.request_timeout
        # Node scripts run from background loops, once per heartbeat interval at most.
        if maintenance_timeout is None:
            maintenance_timeout = max(timeout, settings.heartbeat_interval)
        if pool_factory is None:
            if settings.redis_url is None:
                raise ConfigurationError("the Redis backend needs redis_url")
            pool_factory = url_pool_factory(settings.redis_url)
        keys = RedisKeys(settings.redis_prefix)
        self.keys = keys
        self._registry = RedisRegistry(
            Redis.from_pool(pool_factory(max_connections, timeout)),
            keys,
            timeout=timeout,
            maintenance_client=Redis.from_pool(
                pool_factory(MAINTENANCE_CONNECTIONS, maintenance_timeout)
            ),
            maintenance_timeout=maintenance_timeout,
            tombstone_ttl_ms=tombstone_ttl_ms,
        )
        url = settings.redis_url
        self._bus = RedisBus(
            RedisEndpoint.from_url(url) if url is not None else None, keys, timeout=timeout
        )

    @property
    def registry(self) -> Registry:
        return self._registry

    @property
    def bus(self) -> Bus:
        return self._bus

    @property
    def standalone(self) -> bool:
        return False

    async def aclose(self) -> None:
        await self._bus.aclose()
        await self._registry.aclose()

"""The Redis backend: the registry in Redis keys, the bus on Redis pub/sub.

Theory of operation
-------------------
Connections (sockets to Redis), three kinds, all made by one *pool factory* so that tests can
hand in fakeredis connections:

* the registry's command pool (bounded, blocking up to the request timeout for a free slot);
* ONE publisher connection for the bus, driven by hand. ``publish`` sends its whole batch of
  PUBLISH commands in one write and reads the N replies, under a lock, so the publishes of
  this node reach Redis, and so every subscriber, in the order they were made;
* ONE subscriber connection per ``subscribe`` call, driven by hand (``SUBSCRIBE``, then reads)
  rather than through ``redis.asyncio.PubSub``, whose retry layer reconnects and re-subscribes
  silently and so would lose messages unnoticed. A lost subscriber connection ends the
  iteration with ``BackendUnavailable``; an idle one is probed with ``PING``.

Timeouts and errors: every connection has ``socket_connect_timeout`` equal to
``Settings.request_timeout`` (and no ``socket_timeout``, see ``url_pool_factory``), no retries
(a retried PUBLISH could duplicate or reorder), and every operation runs under one
``asyncio.timeout(request_timeout)``; the node
scripts ``reap``, ``leave`` and ``rejoin``, which run from background loops and may take long on
a big node, use two connections of their own with ``max(request_timeout, heartbeat_interval)``.
Any Redis error, socket error or timeout becomes ``BackendUnavailable``, which then means
"outcome unknown": the command may still have been applied (a paused Redis runs what it had
buffered when it resumes).

Atomicity: writes that touch several keys go in a MULTI/EXEC pipeline; ``heartbeat``,
``rejoin``, ``reap`` and ``leave`` are Lua scripts, so that of several survivors racing to reap
a node exactly one finds it lapsed and removes its state. The key schema is in ``keys.py`` and
``docs/redis-keys.md``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from broker_node.cluster.base import Bus, Heartbeat, Registry, Subscription
from broker_node.cluster.keys import TOMBSTONE_TTL_MS, RedisKeys
from broker_node.config import Settings
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.errors import BackendUnavailable, ConfigurationError
from shared.ids import ChannelId, ConnectionId, NodeId

logger = logging.getLogger(__name__)

#: Makes a pool of at most ``max_connections`` connections to the cluster's Redis whose reads,
#: writes and connects each time out after ``timeout`` seconds.
PoolFactory = Callable[[int, float], ConnectionPool]

#: Connections of the registry's command pool.
DEFAULT_MAX_CONNECTIONS = 32
#: Connections for the node scripts (reap, leave, rejoin), which may run long.
MAINTENANCE_CONNECTIONS = 2
#: Records written per pipeline by ``restore`` (each chunk gets its own request timeout).
RESTORE_CHUNK = 500

#: What escapes redis-py: its own errors, and socket errors or timeouts (TimeoutError is an
#: OSError) that it lets through.
_FAILURES = (RedisError, OSError)


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


@asynccontextmanager
async def _guard(operation: str, seconds: float) -> AsyncIterator[None]:
    """Bound an operation by ``seconds`` and turn every Redis failure into BackendUnavailable."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except _FAILURES as exc:
        raise BackendUnavailable(operation, exc) from exc


def _packed_publish(channel: str, payload: bytes) -> bytes:
    """``PUBLISH channel payload`` in RESP."""
    name = channel.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(name),
        name,
        len(payload),
        payload,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- Lua -------------------------------------------------------------------------------------
#
# KEYS of the node scripts: 1 nodes set, 2 heartbeat, 3 node's connection set, 4 node's channel
# set, 5 tombstone. ARGV: 1 node id, 2-6 the key family prefixes (conn, role, chan, node-conns,
# node-chans) to name other records' keys, 7 a TTL in ms. Keys built in the script are not
# declared in KEYS: fine on one Redis (and Sentinel), not on Redis Cluster unless the prefix
# holds a hash tag such as "{broker}".

_REMOVE_NODE_STATE = """
local function remove_node_state()
  local node = ARGV[1]
  local p_conn, p_role, p_chan = ARGV[2], ARGV[3], ARGV[4]
  local p_node_conns, p_node_chans = ARGV[5], ARGV[6]
  local removed = {}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local c = redis.call('HMGET', p_chan .. id, 'opener', 'opener_node', 'target', 'target_node')
    if c[1] and c[2] and c[3] and c[4] then
      redis.call('DEL', p_chan .. id)
      -- the other end's index too; an emptied set disappears by itself
      redis.call('SREM', p_node_chans .. c[2], id)
      redis.call('SREM', p_node_chans .. c[4], id)
      table.insert(removed, id)
      table.insert(removed, c[1])
      table.insert(removed, c[2])
      table.insert(removed, c[3])
      table.insert(removed, c[4])
    end
  end
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local c = redis.call('HMGET', p_conn .. id, 'node', 'role')
    if c[1] and c[2] then
      redis.call('DEL', p_conn .. id)
      redis.call('SREM', p_role .. c[2], id)
      redis.call('SREM', p_node_conns .. c[1], id)
    end
  end
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('SREM', KEYS[1], node)
  return removed
end
"""

# KEYS: 1 tombstone, 2 heartbeat, 3 nodes set. ARGV: 1 node id, 2 TTL ms.
# Returns 2 (fenced), 1 (rejoined: the node was not in the set) or 0 (renewed).
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 2
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return redis.call('SADD', KEYS[3], ARGV[1])
"""

# Only a registered node whose heartbeat has expired is reaped; a false reply (nil) tells the
# caller that it is alive again or that another survivor reaped it first.
_REAP = (
    _REMOVE_NODE_STATE
    + """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
  return false
end
local removed = remove_node_state()
redis.call('SET', KEYS[5], '1', 'PX', ARGV[7])
return removed
"""
)

_LEAVE = (
    _REMOVE_NODE_STATE
    + """
remove_node_state()
redis.call('DEL', KEYS[2])
return false
"""
)

_REJOIN = (
    _REMOVE_NODE_STATE
    + """
redis.call('DEL', KEYS[5])
remove_node_state()
redis.call('SET', KEYS[2], '1', 'PX', ARGV[7])
redis.call('SADD', KEYS[1], ARGV[1])
return false
"""
)

_HEARTBEAT_REPLIES = {0: Heartbeat.RENEWED, 1: Heartbeat.REJOINED, 2: Heartbeat.FENCED}


class RedisRegistry(Registry):
    """The registry in Redis keys (see ``keys.py``), over one command connection pool."""

    def __init__(
        self,
        client: Redis,
        keys: RedisKeys,
        *,
        timeout: float,
        maintenance_client: Redis | None = None,
        maintenance_timeout: float | None = None,
        tombstone_ttl_ms: int = TOMBSTONE_TTL_MS,
    ) -> None:
        self._client = client
        self._keys = keys
        self._timeout = timeout
        # reap, leave and rejoin run one script over all of a node's records (about 1 s per
        # 100,000 on a laptop): they get their own connections and a longer timeout, since a
        # reap that times out on our side still completes in Redis and its list would be lost.
        self._maintenance = maintenance_client if maintenance_client is not None else client
        self._maintenance_timeout = max(timeout, maintenance_timeout or timeout)
        self._tombstone_ttl_ms = tombstone_ttl_ms
        self._heartbeat: AsyncScript = client.register_script(_HEARTBEAT)
        self._reap: AsyncScript = self._maintenance.register_script(_REAP)
        self._leave: AsyncScript = self._maintenance.register_script(_LEAVE)
        self._rejoin: AsyncScript = self._maintenance.register_script(_REJOIN)

    def _guard(self, operation: str) -> AbstractAsyncContextManager[None]:
        return _guard(operation, self._timeout)

    def _maintenance_guard(self, operation: str) -> AbstractAsyncContextManager[None]:
        return _guard(operation, self._maintenance_timeout)

    # Connections and channels. Multi-key writes are MULTI/EXEC: all or nothing.

    async def add_connection(self, record: ConnectionRecord) -> None:
        async with self._guard("add_connection"):
            await self._write([record], [], transaction=True)

    async def remove_connection(self, record: ConnectionRecord) -> None:
        k = self._keys
        async with self._guard("remove_connection"), self._client.pipeline() as pipe:
            pipe.delete(k.connection(record.connection_id))
            pipe.srem(k.role(record.role), record.connection_id)
            pipe.srem(k.node_connections(record.node_id), record.connection_id)
            await pipe.execute()

    async def find_connection(self, connection_id: ConnectionId) -> ConnectionRecord | None:
        async with self._guard("find_connection"):
            node, role = await self._client.hmget(
                self._keys.connection(connection_id), ["node", "role"]
            )
        if node is None or role is None:
            return None
        return ConnectionRecord(connection_id, NodeId(_text(node)), _text(role))

    async def list_by_role(self, role: str) -> list[ConnectionId]:
        # SMEMBERS of the role's own set: the cost follows the answer, not the cluster.
        async with self._guard("list_by_role"):
            members = await self._client.smembers(self._keys.role(role))
        return [ConnectionId(_text(member)) for member in members]

    async def add_channel(self, record: ChannelRecord) -> None:
        async with self._guard("add_channel"):
            await self._write([], [record], transaction=True)

    async def remove_channel(self, record: ChannelRecord) -> None:
        k = self._keys
        async with self._guard("remove_channel"), self._client.pipeline() as pipe:
            pipe.delete(k.channel(record.channel_id))
            pipe.srem(k.node_channels(record.opener_node), record.channel_id)
            pipe.srem(k.node_channels(record.target_node), record.channel_id)
            await pipe.execute()

    async def _write(
        self,
        connections: Sequence[ConnectionRecord],
        channels: Sequence[ChannelRecord],
        *,
        transaction: bool,
    ) -> None:
        k = self._keys
        async with self._client.pipeline(transaction=transaction) as pipe:
            for conn in connections:
                pipe.hset(
                    k.connection(conn.connection_id),
                    mapping={"node": conn.node_id, "role": conn.role},
                )
                pipe.sadd(k.role(conn.role), conn.connection_id)
                pipe.sadd(k.node_connections(conn.node_id), conn.connection_id)
            for chan in channels:
                pipe.hset(
                    k.channel(chan.channel_id),
                    mapping={
                        "opener": chan.opener,
                        "opener_node": chan.opener_node,
                        "target": chan.target,
                        "target_node": chan.target_node,
                    },
                )
                pipe.sadd(k.node_channels(chan.opener_node), chan.channel_id)
                pipe.sadd(k.node_channels(chan.target_node), chan.channel_id)
            await pipe.execute()

    # Nodes.

    def _node_keys(self, node_id: NodeId) -> list[str]:
        k = self._keys
        return [
            k.nodes,
            k.heartbeat(node_id),
            k.node_connections(node_id),
            k.node_channels(node_id),
            k.tombstone(node_id),
        ]

    def _node_args(self, node_id: NodeId, ttl_ms: int) -> list[str | int]:
        k = self._keys
        return [
            node_id,
            k.connection_prefix,
            k.role_prefix,
            k.channel_prefix,
            k.node_connections_prefix,
            k.node_channels_prefix,
            ttl_ms,
        ]

    async def heartbeat(self, node_id: NodeId, ttl_ms: int) -> Heartbeat:
        k = self._keys
        async with self._guard("heartbeat"):
            reply = await self._heartbeat(
                keys=[k.tombstone(node_id), k.heartbeat(node_id), k.nodes],
                args=[node_id, ttl_ms],
            )
        return _HEARTBEAT_REPLIES[int(reply)]

    async def rejoin(self, node_id: NodeId, ttl_ms: int) -> None:
        async with self._maintenance_guard("rejoin"):
            await self._rejoin(keys=self._node_keys(node_id), args=self._node_args(node_id, ttl_ms))

    async def live_nodes(self) -> set[NodeId]:
        nodes = await self._liveness("live_nodes")
        return {node_id for node_id, alive in nodes if alive}

    async def lapsed_nodes(self) -> list[NodeId]:
        nodes = await self._liveness("lapsed_nodes")
        return [node_id for node_id, alive in nodes if not alive]

    async def _liveness(self, operation: str) -> list[tuple[NodeId, bool]]:
        """Each registered node, and whether its heartbeat key still exists."""
        k = self._keys
        async with self._guard(operation):
            nodes = sorted(NodeId(_text(node)) for node in await self._client.smembers(k.nodes))
            if not nodes:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for node_id in nodes:
                    pipe.exists(k.heartbeat(node_id))
                alive: list[Any] = await pipe.execute()
        return [(node_id, bool(exists)) for node_id, exists in zip(nodes, alive, strict=True)]

    async def reap(self, node_id: NodeId) -> list[ChannelRecord] | None:
        async with self._maintenance_guard("reap"):
            reply = await self._reap(
                keys=self._node_keys(node_id),
                args=self._node_args(node_id, self._tombstone_ttl_ms),
            )
        if reply is None:
            return None
        fields = [_text(field) for field in reply]
        return [
            ChannelRecord(
                channel_id=ChannelId(fields[i]),
                opener=ConnectionId(fields[i + 1]),
                opener_node=NodeId(fields[i + 2]),
                target=ConnectionId(fields[i + 3]),
                target_node=NodeId(fields[i + 4]),
            )
            for i in range(0, len(fields), 5)
        ]

    async def leave(self, node_id: NodeId) -> None:
        async with self._maintenance_guard("leave"):
            await self._leave(keys=self._node_keys(node_id), args=self._node_args(node_id, 0))

    async def restore(
        self,
        node_id: NodeId,
        connections: Sequence[ConnectionRecord],
        channels: Sequence[ChannelRecord],
    ) -> None:
        # Plain pipelines of idempotent writes (HSET, SADD): replaying a chunk is harmless, so
        # a node that fails half-way simply restores again.
        for start in range(0, len(connections), RESTORE_CHUNK):
            async with self._guard("restore"):
                await self._write(connections[start : start + RESTORE_CHUNK], [], transaction=False)
        for start in range(0, len(channels), RESTORE_CHUNK):
            async with self._guard("restore"):
                await self._write([], channels[start : start + RESTORE_CHUNK], transaction=False)

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        for client in {id(c): c for c in (self._client, self._maintenance)}.values():
            with suppress(*_FAILURES):
                await client.aclose()


class _RedisSubscription(Subscription):
    """Reads one subscriber connection; ends with BackendUnavailable when it is lost."""

    def __init__(self, connection: AbstractConnection, timeout: float) -> None:
        self._connection = connection
        self._timeout = timeout
        #: Whether anything arrived since the watchdog last looked.
        self._traffic = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        # Reads carry no timeout of their own (a timeout context per message is a large part
        # of the bus' cost); a watchdog probes an idle connection instead.
        self._traffic = True
        watchdog = asyncio.create_task(self._watch_idle(), name="subscriber-watchdog")
        try:
            while True:
                try:
                    reply = await connection.read_response(disable_decoding=True, timeout=math.inf)
                except _FAILURES as exc:
                    raise BackendUnavailable("subscription", exc) from exc
                self._traffic = True
                if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                    payload = reply[2]
                    if isinstance(payload, bytes):
                        yield payload
        finally:
            watchdog.cancel()

    async def _watch_idle(self) -> None:
        """After a timeout without traffic, PING; after another, drop the connection, which
        ends the read above with an error (a hung Redis or a dropped route closes nothing)."""
        pinged = False
        while True:
            await asyncio.sleep(self._timeout)
            if self._traffic:
                self._traffic = pinged = False
                continue
            if pinged:
                logger.debug("subscriber connection does not answer PING; dropping it")
                await self._connection.disconnect(nowait=True)
                return
            try:
                await self._connection.send_command("PING", check_health=False)
            except _FAILURES:
                await self._connection.disconnect(nowait=True)
                return
            pinged = True


class RedisBus(Bus):
    """Node inboxes on Redis pub/sub: one publisher connection, one subscriber per inbox."""

    def __init__(self, pool_factory: PoolFactory, keys: RedisKeys, *, timeout: float) -> None:
        self._pool_factory = pool_factory
        self._keys = keys
        self._timeout = timeout
        self._publisher_pool = pool_factory(1, timeout)
        self._publisher: AbstractConnection | None = None
        self._publish_lock = asyncio.Lock()
        self._subscribers: set[AbstractConnection] = set()

    async def publish(self, messages: Sequence[tuple[NodeId, bytes]]) -> list[int]:
        if not messages:
            return []
        inbox = self._keys.inbox
        # The whole batch as one write of RESP commands, then one read per reply, on a
        # connection driven by hand: redis-py's pipeline machinery costs several times more
        # CPU than the publishes themselves, and this is the bus' hot path.
        packed = b"".join(_packed_publish(inbox(node_id), payload) for node_id, payload in messages)
        # The lock is taken inside the timeout: a caller never waits longer than the request
        # timeout, behind a hung publish or not. One call's batch is sent and answered before
        # the next starts, so batches never interleave and stay in call order.
        async with _guard("publish", self._timeout), self._publish_lock:
            connection = self._publisher
            if connection is None:
                pool = self._publisher_pool
                connection = self._publisher = pool.connection_class(**pool.connection_kwargs)
            try:
                # Nothing is expected on this connection between batches: data or EOF there
                # means it went stale (e.g. Redis restarted while idle), so reconnect before
                # sending rather than lose the batch.
                if connection.is_connected and await connection.can_read():
                    raise RedisError("unexpected data on the publisher connection")
            except _FAILURES:
                await connection.disconnect(nowait=True)
            try:
                await connection.send_packed_command(packed, check_health=False)
                counts = [await connection.read_response() for _ in messages]
            except BaseException:
                # Replies may still be in flight: this connection can never be trusted again.
                self._publisher = None
                await connection.disconnect(nowait=True)
                raise
        return [int(count) for count in counts]

    @asynccontextmanager
    async def _subscribe(self, node_id: NodeId) -> AsyncIterator[Subscription]:
        channel = self._keys.inbox(node_id)
        # A connection of our own, outside any pool: nothing reconnects it behind our back.
        pool = self._pool_factory(1, self._timeout)
        connection = pool.connection_class(**pool.connection_kwargs)
        self._subscribers.add(connection)
        try:
            async with _guard("subscribe", self._timeout):
                await connection.send_command("SUBSCRIBE", channel)  # connects first
                reply = await connection.read_response(disable_decoding=True)
            if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
                raise BackendUnavailable("subscribe", RedisError(f"unexpected reply {reply!r}"))
            logger.debug("subscribed to %s", channel)
            yield _RedisSubscription(connection, self._timeout)
        finally:
            self._subscribers.discard(connection)
            with suppress(*_FAILURES):
                if connection.is_connected:
                    # Closing the socket unsubscribes on a real Redis; saying so first (without
                    # waiting for the reply) also serves servers and fakes that keep the
                    # subscription of a closed connection a little longer.
                    async with asyncio.timeout(self._timeout):
                        await connection.send_command("UNSUBSCRIBE", check_health=False)
                await connection.disconnect()

    def subscribe(self, node_id: NodeId) -> AbstractAsyncContextManager[Subscription]:
        return self._subscribe(node_id)

    async def aclose(self) -> None:
        # Closing a live subscriber's connection makes its iteration raise BackendUnavailable.
        for connection in list(self._subscribers):
            with suppress(*_FAILURES):
                await connection.disconnect()
        if self._publisher is not None:
            with suppress(*_FAILURES):
                await self._publisher.disconnect()
            self._publisher = None
        with suppress(*_FAILURES):
            await self._publisher_pool.aclose()


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
        self._bus = RedisBus(pool_factory, keys, timeout=timeout)

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

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

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any, Final

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from broker_node.cluster.base import (
    Bus,
    Deliver,
    Heartbeat,
    PublishResult,
    Registry,
    Subscription,
)
from broker_node.cluster.endpoint import RedisEndpoint
from broker_node.cluster.keys import TOMBSTONE_TTL_MS, RedisKeys
from broker_node.cluster.resp import Reply, RespLink, command, open_link
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

# Removes connections (KEYS[1] the node's connection set) and channels (KEYS[2] its channel
# set) named in ARGV after the count of connections (ARGV[7]); ARGV 1-6 as for the node scripts.
# A connection is removed only when its record says it is the node's, a channel only when it was
# opened from the node: another node's entries are that node's to keep or remove.
_PRUNE = """
local node = ARGV[1]
local p_conn, p_role, p_chan = ARGV[2], ARGV[3], ARGV[4]
local p_node_chans = ARGV[6]
local n_conns = tonumber(ARGV[7])
for i = 8, 7 + n_conns do
  local id = ARGV[i]
  local c = redis.call('HMGET', p_conn .. id, 'node', 'role')
  if c[1] == node and c[2] then
    redis.call('DEL', p_conn .. id)
    redis.call('SREM', p_role .. c[2], id)
  end
  redis.call('SREM', KEYS[1], id)
end
for i = 8 + n_conns, #ARGV do
  local id = ARGV[i]
  local c = redis.call('HMGET', p_chan .. id, 'opener_node', 'target_node')
  if c[1] == node and c[2] then
    redis.call('DEL', p_chan .. id)
    redis.call('SREM', p_node_chans .. c[1], id)
    redis.call('SREM', p_node_chans .. c[2], id)
  elseif not c[1] then
    redis.call('SREM', KEYS[2], id)
  end
end
return false
"""

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
        self._prune: AsyncScript = client.register_script(_PRUNE)

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

    async def remove_connections(self, records: Sequence[ConnectionRecord]) -> None:
        k = self._keys
        for start in range(0, len(records), RESTORE_CHUNK):
            async with (
                self._guard("remove_connections"),
                self._client.pipeline(transaction=False) as pipe,
            ):
                for record in records[start : start + RESTORE_CHUNK]:
                    pipe.delete(k.connection(record.connection_id))
                    pipe.srem(k.role(record.role), record.connection_id)
                    pipe.srem(k.node_connections(record.node_id), record.connection_id)
                await pipe.execute()

    async def remove_channels(self, records: Sequence[ChannelRecord]) -> None:
        k = self._keys
        for start in range(0, len(records), RESTORE_CHUNK):
            async with (
                self._guard("remove_channels"),
                self._client.pipeline(transaction=False) as pipe,
            ):
                for record in records[start : start + RESTORE_CHUNK]:
                    pipe.delete(k.channel(record.channel_id))
                    pipe.srem(k.node_channels(record.opener_node), record.channel_id)
                    pipe.srem(k.node_channels(record.target_node), record.channel_id)
                await pipe.execute()

    async def node_index(self, node_id: NodeId) -> tuple[set[ConnectionId], set[ChannelId]]:
        k = self._keys
        async with self._guard("node_index"), self._client.pipeline(transaction=False) as pipe:
            pipe.smembers(k.node_connections(node_id))
            pipe.smembers(k.node_channels(node_id))
            connections, channels = await pipe.execute()
        return (
            {ConnectionId(_text(member)) for member in connections},
            {ChannelId(_text(member)) for member in channels},
        )

    async def prune(
        self,
        node_id: NodeId,
        connection_ids: Sequence[ConnectionId],
        channel_ids: Sequence[ChannelId],
    ) -> None:
        k = self._keys
        base = self._node_args(node_id, 0)[:6]
        keys = [k.node_connections(node_id), k.node_channels(node_id)]
        for start in range(0, len(connection_ids), RESTORE_CHUNK):
            chunk = list(connection_ids[start : start + RESTORE_CHUNK])
            async with self._guard("prune"):
                await self._prune(keys=keys, args=[*base, len(chunk), *chunk])
        for start in range(0, len(channel_ids), RESTORE_CHUNK):
            ids = list(channel_ids[start : start + RESTORE_CHUNK])
            async with self._guard("prune"):
                await self._prune(keys=keys, args=[*base, 0, *ids])

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


class _PendingPublish:
    """One ``send`` call: its packed commands and the replies collected so far."""

    __slots__ = ("counts", "expected", "on_result", "packed", "since")

    def __init__(self, packed: bytes, expected: int, on_result: PublishResult, since: float):
        self.packed = packed
        self.expected = expected
        self.counts: list[int] = []
        self.on_result = on_result
        #: Loop time of the ``send``, then of the write: its deadline is one timeout later.
        self.since = since


def _report(pending: _PendingPublish, result: list[int] | BackendUnavailable) -> None:
    # The callback runs inside the connection's data_received or a timer: a bug there must not
    # take the publisher down with it.
    try:
        pending.on_result(result)
    except Exception:
        logger.exception("handling a publish outcome failed")


class _Publisher:
    """The bus' one publisher connection: writes pipelined, replies matched in order.

    A send is written at once when the connection is up and Redis keeps reading; otherwise it
    waits in ``_queued`` (in order) while a connection is made or the socket drains. Each send,
    written or queued, gets one request timeout: a reply later than that drops the connection
    (Redis hung, or the route is gone), and everything in flight is reported as failed.
    """

    def __init__(self, endpoint: RedisEndpoint | None, timeout: float) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._link: RespLink | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queued: deque[_PendingPublish] = deque()
        self._in_flight: deque[_PendingPublish] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def send(self, packed: bytes, expected: int, on_result: PublishResult) -> None:
        pending = _PendingPublish(packed, expected, on_result, self._loop.time())
        if self._closed:
            self._loop.call_soon(on_result, BackendUnavailable("publish (bus closed)"))
            return
        link = self._link
        if link is not None and not self._queued and not link.writing_paused and link.open:
            self._write(link, pending)
        else:
            self._queued.append(pending)
            if link is None or not link.open:
                self._connect_soon()
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check_deadlines)

    def _write(self, link: RespLink, pending: _PendingPublish) -> None:
        pending.since = self._loop.time()
        if pending.expected == 0 and not self._in_flight:
            self._loop.call_soon(_report, pending, [])
            return
        # An empty send waits in line too (nothing written): its outcome keeps call order.
        self._in_flight.append(pending)
        link.write(pending.packed)

    def _write_queued(self) -> None:
        link = self._link
        queued = self._queued
        while queued and link is not None and link.open and not link.writing_paused:
            self._write(link, queued.popleft())

    def _on_reply(self, reply: Reply) -> None:
        if type(reply) is not int or not self._in_flight:
            assert self._link is not None
            self._link.abort(f"unexpected reply {reply!r}")
            return
        in_flight = self._in_flight
        pending = in_flight[0]
        pending.counts.append(reply)
        if len(pending.counts) == pending.expected:
            in_flight.popleft()
            _report(pending, pending.counts)
            while in_flight and in_flight[0].expected == 0:
                _report(in_flight.popleft(), [])

    def _connect_soon(self) -> None:
        if self._connecting is None and not self._closed:
            self._connecting = asyncio.create_task(self._connect(), name="bus-publisher-connect")

    async def _connect(self) -> None:
        started = self._loop.time()
        link = RespLink("bus publisher", self._on_reply, on_writable=self._write_queued)
        try:
            async with asyncio.timeout(self._timeout):
                await open_link(self._endpoint, link)
        except asyncio.CancelledError:
            self._connecting = None
            raise
        except Exception as exc:  # every failure is reported to the senders
            self._connecting = None
            failure = exc if isinstance(exc, BackendUnavailable) else None
            if failure is None:
                if not isinstance(exc, TimeoutError | ConfigurationError):
                    logger.exception("connecting the bus publisher failed")
                failure = BackendUnavailable("publish (connect)", exc)
            # Sends made while this attempt was under way get an attempt of their own.
            self._fail_queued(failure, made_until=started)
            if self._queued:
                self._connect_soon()
            return
        self._connecting = None
        if self._closed:
            link.close()
            return
        self._link = link
        link.lost.add_done_callback(lambda lost: self._on_link_lost(link, lost.result()))
        self._write_queued()

    def _on_link_lost(self, link: RespLink, reason: BackendUnavailable) -> None:
        if self._link is link:
            self._link = None
        self._fail(self._in_flight, reason)
        if self._queued:
            self._connect_soon()

    def _fail_queued(self, reason: BackendUnavailable, *, made_until: float) -> None:
        """Fail the queued sends made up to ``made_until`` (loop time); they are in order."""
        queued = self._queued
        while queued and queued[0].since <= made_until:
            _report(queued.popleft(), reason)

    def _fail(self, pendings: deque[_PendingPublish], reason: BackendUnavailable) -> None:
        while pendings:
            _report(pendings.popleft(), reason)

    def _check_deadlines(self) -> None:
        self._timer = None
        now = self._loop.time()
        expired = now - self._timeout
        if self._in_flight and self._in_flight[0].since <= expired and self._link is not None:
            logger.warning("no reply from Redis to a publish within %.1fs", self._timeout)
            self._link.abort("no reply in time")  # fails what is in flight
        late = BackendUnavailable("publish (timed out waiting for a connection)")
        self._fail_queued(late, made_until=expired)
        oldest = [pendings[0].since for pendings in (self._in_flight, self._queued) if pendings]
        if oldest:
            delay = max(0.0, min(oldest) + self._timeout - now)
            self._timer = self._loop.call_later(delay, self._check_deadlines)

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with suppress(asyncio.CancelledError):
                await self._connecting
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        closed = BackendUnavailable("publish (bus closed)")
        if self._link is not None:
            self._link.close()
            self._link = None
        self._fail(self._in_flight, closed)
        self._fail(self._queued, closed)


class _RedisSubscription(Subscription):
    """One subscriber connection; an idle one is probed with PING, then dropped."""

    def __init__(self, link: RespLink, timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._pinged = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            timeout, self._watch_idle
        )

    async def wait_lost(self) -> None:
        raise await asyncio.shield(self._link.lost)

    def _watch_idle(self) -> None:
        # Reads carry no timeout of their own; a hung Redis or a dropped route closes nothing,
        # so after a timeout without traffic: PING; after another: drop the connection.
        self._timer = None
        link = self._link
        if not link.open:
            return
        if link.saw_traffic:
            link.saw_traffic = self._pinged = False
        elif self._pinged:
            logger.debug("subscriber connection does not answer PING; dropping it")
            link.abort("no answer to PING")
            return
        else:
            link.write(_PING)
            self._pinged = True
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._watch_idle)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_PING: Final = command(b"PING")


def _subscriber_replies(
    deliver: Deliver, confirmed: asyncio.Future[None]
) -> Callable[[Reply], None]:
    """What a subscriber connection does with each reply: payloads to ``deliver``."""

    def on_reply(reply: Reply) -> None:
        if type(reply) is list and len(reply) == 3:
            kind = reply[0]
            if kind == b"message":
                try:
                    deliver(reply[2])
                except Exception:
                    # One payload's failure is not the subscription's: log it, go on.
                    logger.exception("handling a bus payload failed")
                return
            if kind == b"subscribe":
                if not confirmed.done():
                    confirmed.set_result(None)
                return
        # Anything else (PING's ["pong", ""], UNSUBSCRIBE's confirmation) needs no action.

    return on_reply


class RedisBus(Bus):
    """Node inboxes on Redis pub/sub: one publisher connection, one subscriber per inbox.

    Both are ``RespLink``s (see ``resp.py``): a send is one write of PUBLISH commands whose
    replies are matched in order as they arrive, and a subscriber hands each payload to its
    callback straight from ``data_received``; no task runs per publish or per payload.
    """

    def __init__(self, endpoint: RedisEndpoint | None, keys: RedisKeys, *, timeout: float) -> None:
        self._keys = keys
        self._timeout = timeout
        # Its own sockets, outside any pool: nothing reconnects them behind our back. None:
        # no socket to open (a backend on fakeredis pools has a registry and no bus).
        self._endpoint = endpoint
        self._publisher: _Publisher | None = None
        self._subscribers: set[RespLink] = set()

    def send(self, messages: Sequence[tuple[NodeId, bytes]], on_result: PublishResult) -> None:
        if self._publisher is None:
            self._publisher = _Publisher(self._endpoint, self._timeout)
        inbox = self._keys.inbox
        packed = b"".join(_packed_publish(inbox(node_id), payload) for node_id, payload in messages)
        self._publisher.send(packed, len(messages), on_result)

    @asynccontextmanager
    async def _subscribe(self, node_id: NodeId, deliver: Deliver) -> AsyncIterator[Subscription]:
        channel = self._keys.inbox(node_id)
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link = RespLink("bus subscriber", _subscriber_replies(deliver, confirmed))
        self._subscribers.add(link)
        subscription: _RedisSubscription | None = None
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    await open_link(self._endpoint, link)
                    link.write(command(b"SUBSCRIBE", channel.encode()))
                    await asyncio.wait((confirmed, link.lost), return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError as exc:
                raise BackendUnavailable("subscribe", exc) from exc
            if not confirmed.done():
                raise link.lost.result()
            logger.debug("subscribed to %s", channel)
            subscription = _RedisSubscription(link, self._timeout)
            yield subscription
        finally:
            if subscription is not None:
                subscription.stop()
            self._subscribers.discard(link)
            if link.open:
                # Closing the socket unsubscribes on a real Redis; saying so first also serves
                # servers that keep the subscription of a closed connection a little longer.
                link.write(command(b"UNSUBSCRIBE"))
                link.close()
            else:
                link.abort("unsubscribed")

    def subscribe(
        self, node_id: NodeId, deliver: Deliver
    ) -> AbstractAsyncContextManager[Subscription]:
        return self._subscribe(node_id, deliver)

    async def aclose(self) -> None:
        # Closing a live subscriber's connection makes its ``wait_lost`` raise.
        for link in list(self._subscribers):
            link.abort("bus closed")
        if self._publisher is not None:
            await self._publisher.aclose()


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

"""The registry on Redis: connection, role and channel records, node liveness, and the Lua
scripts that reap, leave and rejoin atomically (the theory of operation is in ``redis.py``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from broker_node.cluster.base import Heartbeat, Registry
from broker_node.cluster.keys import TOMBSTONE_TTL_MS, RedisKeys
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.errors import BackendUnavailable
from shared.ids import ChannelId, ConnectionId, NodeId

logger = logging.getLogger(__name__)

#: Records written per pipeline by ``restore`` (each chunk gets its own request timeout).
RESTORE_CHUNK = 500

#: What escapes redis-py: its own errors, and socket errors or timeouts (TimeoutError is an
#: OSError) that it lets through.
_FAILURES = (RedisError, OSError)


@asynccontextmanager
async def _guard(operation: str, seconds: float) -> AsyncIterator[None]:
    """Bound an operation by ``seconds`` and turn every Redis failure into BackendUnavailable."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except _FAILURES as exc:
        raise BackendUnavailable(operation, exc) from exc


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
        await self.remove_connections([record])

    async def find_connection(self, connection_id: ConnectionId) -> ConnectionRecord | None:
        async with self._guard("find_connection"):
            node, role = await self._client.hmget(
                self._keys.connection(connection_id), ["node", "role"]
            )
        if node is None or role is None:
            return None
        return ConnectionRecord(connection_id, NodeId(_text(node)), _text(role))

    async def find_channel(self, channel_id: ChannelId) -> ChannelRecord | None:
        async with self._guard("find_channel"):
            fields = await self._client.hmget(
                self._keys.channel(channel_id), ["opener", "opener_node", "target", "target_node"]
            )
        texts = [_text(field) for field in fields if field is not None]
        if len(texts) != 4:
            return None
        opener, opener_node, target, target_node = texts
        return ChannelRecord(
            channel_id=channel_id,
            opener=ConnectionId(opener),
            opener_node=NodeId(opener_node),
            target=ConnectionId(target),
            target_node=NodeId(target_node),
        )

    async def list_by_role(self, role: str) -> list[ConnectionId]:
        # SMEMBERS of the role's own set: the cost follows the answer, not the cluster.
        async with self._guard("list_by_role"):
            members = await self._client.smembers(self._keys.role(role))
        return [ConnectionId(_text(member)) for member in members]

    async def add_channel(self, record: ChannelRecord) -> None:
        async with self._guard("add_channel"):
            await self._write([], [record], transaction=True)

    async def remove_channel(self, record: ChannelRecord) -> None:
        await self.remove_channels([record])

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

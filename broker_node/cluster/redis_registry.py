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
from redis.typing import EncodableT, FieldT

from broker_node.cluster.base import ClaimRefusal, Heartbeat, Registry
from broker_node.cluster.keys import TOMBSTONE_TTL_MS, RedisKeys
from broker_node.core.records import (
    AdoptedSession,
    ChannelRecord,
    ConnectionRecord,
    Reaped,
    SessionClaim,
    SessionKey,
)
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


def _channel_record(fields: Sequence[bytes | str]) -> ChannelRecord:
    channel_id, opener, opener_node, target, target_node, opener_resumes, target_resumes = map(
        _text, fields
    )
    return ChannelRecord(
        channel_id=ChannelId(channel_id),
        opener=ConnectionId(opener),
        opener_node=NodeId(opener_node),
        target=ConnectionId(target),
        target_node=NodeId(target_node),
        opener_resumes=bool(opener_resumes),
        target_resumes=bool(target_resumes),
    )


# --- Lua -------------------------------------------------------------------------------------
#
# KEYS of the node scripts: 1 nodes set, 2 heartbeat, 3 node's connection set, 4 node's channel
# set, 5 tombstone. ARGV: 1 node id, 2-6 the key family prefixes (conn, role, chan, node-conns,
# node-chans) to name other records' keys, 7 a TTL in ms. Keys built in the script are not
# declared in KEYS: fine on one Redis (and Sentinel), not on Redis Cluster unless the prefix
# holds a hash tag such as "{broker}".

_REMOVE_NODE_STATE = """
-- adopter: '' to remove everything; else the node that takes the dead node's resumable
-- sessions (connections with a 'tok'), detached since 'now' unless they were already, and the
-- channels whose every end on the dead node is such a session.
local function remove_node_state(adopter, now)
  local node = ARGV[1]
  local p_conn, p_role, p_chan = ARGV[2], ARGV[3], ARGV[4]
  local p_node_conns, p_node_chans = ARGV[5], ARGV[6]
  local adopted, kept = {}, {}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    local c = redis.call('HMGET', p_conn .. id, 'node', 'role', 'tok', 'win', 'det', 'ep')
    if c[1] and c[2] then
      if adopter ~= '' and c[3] then
        local det = c[5] or now
        redis.call('HSET', p_conn .. id, 'node', adopter, 'det', det)
        redis.call('SADD', p_node_conns .. adopter, id)
        kept[id] = true
        table.insert(adopted, {id, c[2], c[3], c[4], det, c[6] or '0'})
      else
        redis.call('DEL', p_conn .. id)
        redis.call('SREM', p_role .. c[2], id)
      end
      redis.call('SREM', p_node_conns .. c[1], id)
    end
  end
  -- where an end of a channel of the dead node is now: elsewhere all along, adopted, or
  -- taken over by a resume before the reap (false: it dies with the node)
  local function holder(end_id, end_node)
    if end_node ~= node then return end_node end
    if kept[end_id] then return adopter end
    local at = redis.call('HGET', p_conn .. end_id, 'node')
    if at and at ~= node then return at end
    return false
  end
  local removed, moved = {}, {}
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    local c = redis.call('HMGET', p_chan .. id, 'opener', 'opener_node', 'target', 'target_node',
      'opener_resumes', 'target_resumes')
    if c[1] and c[2] and c[3] and c[4] then
      local resumes = {c[5] or '', c[6] or ''}
      local opener_at = holder(c[1], c[2])
      local target_at = holder(c[3], c[4])
      if opener_at and target_at then
        c[2], c[4] = opener_at, target_at
        redis.call('HSET', p_chan .. id, 'opener_node', c[2], 'target_node', c[4])
        redis.call('SADD', p_node_chans .. c[2], id)
        redis.call('SADD', p_node_chans .. c[4], id)
        table.insert(moved, {id, c[1], c[2], c[3], c[4], resumes[1], resumes[2]})
      else
        redis.call('DEL', p_chan .. id)
        -- the other end's index too; an emptied set disappears by itself
        redis.call('SREM', p_node_chans .. c[2], id)
        redis.call('SREM', p_node_chans .. c[4], id)
        table.insert(removed, {id, c[1], c[2], c[3], c[4], resumes[1], resumes[2]})
      end
    end
  end
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('SREM', KEYS[1], node)
  return {removed, adopted, moved}
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
local reaped = remove_node_state(ARGV[8] or '', ARGV[9] or '0')
redis.call('SET', KEYS[5], '1', 'PX', ARGV[7])
return reaped
"""
)

_LEAVE = (
    _REMOVE_NODE_STATE
    + """
remove_node_state('', '0')
redis.call('DEL', KEYS[2])
return false
"""
)

_REJOIN = (
    _REMOVE_NODE_STATE
    + """
redis.call('DEL', KEYS[5])
remove_node_state('', '0')
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

# Sessions (issue 14). KEYS: 1 the connection's hash. ARGV: 1 token hash, 2 new token hash,
# 3 claiming node, 4 now (ms), 5 node-conns prefix, 6 connection id.
_CLAIM_SESSION = """
local c = redis.call('HMGET', KEYS[1], 'node', 'role', 'tok', 'win', 'det')
if not c[1] or not c[2] or not c[3] or c[3] ~= ARGV[1] then
  return {'unknown'}
end
if c[5] and tonumber(ARGV[4]) - tonumber(c[5]) >= tonumber(c[4]) * 1000 then
  return {'expired'}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'ep', 1)
redis.call('HSET', KEYS[1], 'node', ARGV[3], 'tok', ARGV[2])
redis.call('HDEL', KEYS[1], 'det')
redis.call('SREM', ARGV[5] .. c[1], ARGV[6])
redis.call('SADD', ARGV[5] .. ARGV[3], ARGV[6])
return {'ok', c[1], c[2], c[4], epoch}
"""

# KEYS: 1 the connection's hash. ARGV: 1 the node that must hold it, 2 detached-at (ms).
_MARK_DETACHED = """
if redis.call('HGET', KEYS[1], 'node') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'det', ARGV[2])
end
return false
"""

# KEYS: 1 the connection's hash, 2 its role set, 3 its node's connection set. ARGV: 1 the node
# that must hold it, 2 the connection id.
_END_SESSION = """
if redis.call('HGET', KEYS[1], 'node') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: 1 the connection's hash. ARGV: 1 the node that must hold it, 2 the node that takes it,
# 3 node-conns prefix, 4 the connection id.
_TRANSFER_SESSION = """
if redis.call('HGET', KEYS[1], 'node') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'node', ARGV[2])
redis.call('SREM', ARGV[3] .. ARGV[1], ARGV[4])
redis.call('SADD', ARGV[3] .. ARGV[2], ARGV[4])
return 1
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
        self._claim_session: AsyncScript = client.register_script(_CLAIM_SESSION)
        self._mark_detached: AsyncScript = client.register_script(_MARK_DETACHED)
        self._end_session: AsyncScript = client.register_script(_END_SESSION)
        self._transfer_session: AsyncScript = client.register_script(_TRANSFER_SESSION)

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
            node, role, token_hash, window = await self._client.hmget(
                self._keys.connection(connection_id), ["node", "role", "tok", "win"]
            )
        if node is None or role is None:
            return None
        session = None
        if token_hash is not None and window is not None:
            session = SessionKey(_text(token_hash), int(window))
        return ConnectionRecord(connection_id, NodeId(_text(node)), _text(role), session)

    async def find_channel(self, channel_id: ChannelId) -> ChannelRecord | None:
        async with self._guard("find_channel"):
            fields = await self._client.hmget(
                self._keys.channel(channel_id),
                [
                    "opener",
                    "opener_node",
                    "target",
                    "target_node",
                    "opener_resumes",
                    "target_resumes",
                ],
            )
        texts = [_text(field) for field in fields[:4] if field is not None]
        if len(texts) != 4:
            return None
        opener, opener_node, target, target_node = texts
        return ChannelRecord(
            channel_id=channel_id,
            opener=ConnectionId(opener),
            opener_node=NodeId(opener_node),
            target=ConnectionId(target),
            target_node=NodeId(target_node),
            opener_resumes=fields[4] is not None,
            target_resumes=fields[5] is not None,
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
                fields: dict[FieldT, EncodableT] = {"node": conn.node_id, "role": conn.role}
                if conn.session is not None:
                    fields["tok"] = conn.session.token_hash
                    fields["win"] = str(conn.session.window)
                pipe.hset(k.connection(conn.connection_id), mapping=fields)
                pipe.sadd(k.role(conn.role), conn.connection_id)
                pipe.sadd(k.node_connections(conn.node_id), conn.connection_id)
            for chan in channels:
                channel_fields: dict[FieldT, EncodableT] = {
                    "opener": chan.opener,
                    "opener_node": chan.opener_node,
                    "target": chan.target,
                    "target_node": chan.target_node,
                }
                if chan.opener_resumes:
                    channel_fields["opener_resumes"] = "1"
                if chan.target_resumes:
                    channel_fields["target_resumes"] = "1"
                pipe.hset(k.channel(chan.channel_id), mapping=channel_fields)
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
        reaped = await self._reap_with(node_id, "", 0)
        return None if reaped is None else reaped.removed

    async def reap_adopting(self, node_id: NodeId, adopter: NodeId, now_ms: int) -> Reaped | None:
        return await self._reap_with(node_id, adopter, now_ms)

    async def _reap_with(self, node_id: NodeId, adopter: str, now_ms: int) -> Reaped | None:
        async with self._maintenance_guard("reap"):
            reply = await self._reap(
                keys=self._node_keys(node_id),
                args=[*self._node_args(node_id, self._tombstone_ttl_ms), adopter, now_ms],
            )
        if reply is None:
            return None
        removed, adopted, moved = reply
        return Reaped(
            removed=[_channel_record(fields) for fields in removed],
            adopted=[
                AdoptedSession(
                    record=ConnectionRecord(
                        ConnectionId(_text(conn_id)),
                        NodeId(adopter),
                        _text(role),
                        SessionKey(_text(token_hash), int(window)),
                    ),
                    detached_at_ms=int(detached_at),
                    epoch=int(epoch),
                )
                for conn_id, role, token_hash, window, detached_at, epoch in adopted
            ],
            moved=[_channel_record(fields) for fields in moved],
        )

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

    # Sessions (issue 14).

    async def claim_session(
        self,
        connection_id: ConnectionId,
        token_hash: str,
        new_token_hash: str,
        node_id: NodeId,
        now_ms: int,
    ) -> SessionClaim | ClaimRefusal:
        k = self._keys
        async with self._guard("claim_session"):
            reply = await self._claim_session(
                keys=[k.connection(connection_id)],
                args=[
                    token_hash,
                    new_token_hash,
                    node_id,
                    now_ms,
                    k.node_connections_prefix,
                    connection_id,
                ],
            )
        status = _text(reply[0])
        if status != "ok":
            return ClaimRefusal(status)
        _, previous_node, role, window, epoch = reply
        return SessionClaim(NodeId(_text(previous_node)), _text(role), int(window), int(epoch))

    async def mark_detached(self, connection_id: ConnectionId, node_id: NodeId, at_ms: int) -> None:
        async with self._guard("mark_detached"):
            await self._mark_detached(
                keys=[self._keys.connection(connection_id)], args=[node_id, at_ms]
            )

    async def end_session(self, record: ConnectionRecord) -> bool:
        k = self._keys
        async with self._guard("end_session"):
            ended = await self._end_session(
                keys=[
                    k.connection(record.connection_id),
                    k.role(record.role),
                    k.node_connections(record.node_id),
                ],
                args=[record.node_id, record.connection_id],
            )
        return bool(ended)

    async def transfer_session(
        self, connection_id: ConnectionId, from_node: NodeId, to_node: NodeId
    ) -> bool:
        k = self._keys
        async with self._guard("transfer_session"):
            moved = await self._transfer_session(
                keys=[k.connection(connection_id)],
                args=[from_node, to_node, k.node_connections_prefix, connection_id],
            )
        return bool(moved)

    async def move_channels(self, records: Sequence[ChannelRecord], from_node: NodeId) -> None:
        k = self._keys
        for start in range(0, len(records), RESTORE_CHUNK):
            chunk = records[start : start + RESTORE_CHUNK]
            async with self._guard("move_channels"):
                await self._write([], chunk, transaction=False)
                stale = [
                    r.channel_id for r in chunk if from_node not in (r.opener_node, r.target_node)
                ]
                if stale:
                    await self._client.srem(k.node_channels(from_node), *stale)

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._client.ping()

    async def aclose(self) -> None:
        for client in {id(c): c for c in (self._client, self._maintenance)}.values():
            with suppress(*_FAILURES):
                await client.aclose()

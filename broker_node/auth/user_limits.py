"""Connections per user (``sub``), cluster-wide, counted atomically in Redis.

Each node owns one hash, ``{prefix}:user-conns:{node}`` (user -> its connections on that node).
Taking a slot runs one Lua script: it sums the user's count over the registered nodes whose
heartbeat is current, refuses at the limit, or increments this node's count, all in one atomic
step, so two nodes can never both take the last slot. A node that dies stops counting as soon as
its heartbeat lapses (before it is even reaped); its hash then expires on its own.

The node keeps its own counts and renews its hash's TTL every heartbeat interval, writing the
counts again when the hash is gone (an empty Redis came back) or a write of its own failed: the
count is right again within one interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from shared.ids import NodeId

# KEYS: 1 nodes set, 2 this node's hash. ARGV: 1 user, 2 limit, 3 heartbeat key prefix,
# 4 hash key prefix, 5 this node's id.
_ACQUIRE = """
local total = 0
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if node == ARGV[5] or redis.call('EXISTS', ARGV[3] .. node) == 1 then
    total = total + tonumber(redis.call('HGET', ARGV[4] .. node, ARGV[1]) or '0')
  end
end
if total >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
return 1
"""

# KEYS: 1 this node's hash. ARGV: 1 user.
_RELEASE = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""


# KEYS: 1 this node's hash. ARGV: 1 TTL ms, 2 "1" to rewrite even if present, 3.. user, count.
# A present hash is the truth (increments of slots being taken right now are in it): it is only
# kept alive, unless the node knows a write was lost.
_KEEP = """
if ARGV[2] == '1' or redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  if #ARGV > 2 then
    redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class UserCountKeys:
    prefix: str = "broker"

    @property
    def hash_prefix(self) -> str:
        return f"{self.prefix}:user-conns:"

    def node_hash(self, node_id: NodeId) -> str:
        return self.hash_prefix + node_id

    @property
    def nodes(self) -> str:
        # The registry's set of registered nodes and its heartbeat keys (cluster/keys.py).
        return f"{self.prefix}:nodes"

    @property
    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}:hb:"


class RedisUserCounts:
    """This node's side of the cluster-wide per-user counts."""

    def __init__(self, redis: Redis, keys: UserCountKeys, node_id: NodeId) -> None:
        self._redis = redis
        self._keys = keys
        self._node_id = node_id
        self._acquire: AsyncScript = redis.register_script(_ACQUIRE)
        self._release: AsyncScript = redis.register_script(_RELEASE)
        self._keep: AsyncScript = redis.register_script(_KEEP)

    async def acquire(self, user: str, limit: int) -> bool:
        """Take one of ``user``'s ``limit`` slots on this node, unless all are taken."""
        k = self._keys
        taken = await self._acquire(
            keys=[k.nodes, k.node_hash(self._node_id)],
            args=[user, limit, k.heartbeat_prefix, k.hash_prefix, self._node_id],
        )
        return bool(taken)

    async def release(self, user: str) -> None:
        await self._release(keys=[self._keys.node_hash(self._node_id)], args=[user])

    async def keep(self, counts: Mapping[str, int], ttl_ms: int, *, rewrite: bool) -> None:
        """Renew this node's hash for ``ttl_ms``; write ``counts`` into it when it is gone
        (an empty Redis) or when ``rewrite`` (a write of this node's was lost)."""
        pairs = [part for user, count in counts.items() for part in (user, count)]
        await self._keep(
            keys=[self._keys.node_hash(self._node_id)],
            args=[ttl_ms, "1" if rewrite else "0", *pairs],
        )

    async def aclose(self) -> None:
        await self._redis.aclose()

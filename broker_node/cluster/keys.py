"""Every Redis key and pub/sub channel of the cluster, named in one place.

All names start with one configurable prefix (``Settings.redis_prefix``) so that several
clusters can share a Redis and an operator can find (``SCAN MATCH broker:*``) what a cluster
stores. Each family is ``{prefix}:{literal}:`` followed by exactly one variable part, always
last and never escaped: two families differ in their literal, and within a family the variable
part is the whole rest of the name, so no role, node or id (which may contain ``:``) can make
two names collide. See ``docs/redis-keys.md`` for types, contents, writers and TTLs.

The Lua scripts in ``redis_registry.py`` derive keys of other records (a connection's role set, the
other end's channel index) inside Redis: they receive the family prefixes below as ``ARGV``
so that the naming still lives only here.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.ids import ChannelId, ConnectionId, NodeId

#: How long a reaped node stays fenced (its heartbeat answers FENCED) before it is forgotten.
TOMBSTONE_TTL_MS = 60 * 60 * 1000


@dataclass(frozen=True, slots=True)
class RedisKeys:
    """The names of one cluster's keys and channels under ``prefix``."""

    prefix: str = "broker"

    # Family prefixes (the variable part is appended as is).

    @property
    def connection_prefix(self) -> str:
        return f"{self.prefix}:conn:"

    @property
    def role_prefix(self) -> str:
        return f"{self.prefix}:role:"

    @property
    def channel_prefix(self) -> str:
        return f"{self.prefix}:chan:"

    @property
    def node_connections_prefix(self) -> str:
        return f"{self.prefix}:node-conns:"

    @property
    def node_channels_prefix(self) -> str:
        return f"{self.prefix}:node-chans:"

    @property
    def heartbeat_prefix(self) -> str:
        return f"{self.prefix}:hb:"

    @property
    def tombstone_prefix(self) -> str:
        return f"{self.prefix}:tomb:"

    @property
    def inbox_prefix(self) -> str:
        return f"{self.prefix}:inbox:"

    # Keys.

    def connection(self, connection_id: ConnectionId) -> str:
        """Hash ``node``, ``role``: one registered connection."""
        return self.connection_prefix + connection_id

    def role(self, role: str) -> str:
        """Set of connection ids with ``role`` (Redis deletes it when its last member goes)."""
        return self.role_prefix + role

    def channel(self, channel_id: ChannelId) -> str:
        """Hash ``opener``, ``opener_node``, ``target``, ``target_node``: one open channel."""
        return self.channel_prefix + channel_id

    def node_connections(self, node_id: NodeId) -> str:
        """Set of the ids of the connections held by ``node_id``."""
        return self.node_connections_prefix + node_id

    def node_channels(self, node_id: NodeId) -> str:
        """Set of the ids of the channels with at least one end on ``node_id``."""
        return self.node_channels_prefix + node_id

    @property
    def nodes(self) -> str:
        """Set of the node ids that are registered (alive, or lapsed and not yet reaped)."""
        return f"{self.prefix}:nodes"

    def heartbeat(self, node_id: NodeId) -> str:
        """String with a PX TTL: present while ``node_id`` is alive."""
        return self.heartbeat_prefix + node_id

    def tombstone(self, node_id: NodeId) -> str:
        """String with a PX TTL: ``node_id`` was reaped and is fenced."""
        return self.tombstone_prefix + node_id

    # Pub/sub channels.

    def inbox(self, node_id: NodeId) -> str:
        """The pub/sub channel that ``node_id`` (and only it) subscribes to."""
        return self.inbox_prefix + node_id

    @property
    def pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every key of this cluster (assumes a glob-free prefix)."""
        return f"{self.prefix}:*"

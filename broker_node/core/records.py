"""What the cluster registry stores about connections and channels."""

from __future__ import annotations

import msgspec

from shared.ids import ChannelId, ConnectionId, NodeId


class ConnectionRecord(msgspec.Struct, frozen=True):
    """A registered connection: who it is, where it lives, its role."""

    connection_id: ConnectionId
    node_id: NodeId
    role: str


class ChannelRecord(msgspec.Struct, frozen=True):
    """An open channel: its two ends and the node that holds each."""

    channel_id: ChannelId
    opener: ConnectionId
    opener_node: NodeId
    target: ConnectionId
    target_node: NodeId

    def peer_of(self, connection_id: ConnectionId) -> tuple[ConnectionId, NodeId] | None:
        """The other end of the channel, or None when ``connection_id`` is not an end."""
        if connection_id == self.opener:
            return self.target, self.target_node
        if connection_id == self.target:
            return self.opener, self.opener_node
        return None

    def ends(self) -> tuple[tuple[ConnectionId, NodeId], tuple[ConnectionId, NodeId]]:
        return (self.opener, self.opener_node), (self.target, self.target_node)

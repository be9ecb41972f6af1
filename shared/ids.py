"""Identifiers used on the wire and between nodes."""

from __future__ import annotations

import uuid
from typing import NewType

ConnectionId = NewType("ConnectionId", str)
ChannelId = NewType("ChannelId", str)
NodeId = NewType("NodeId", str)


def new_connection_id() -> ConnectionId:
    return ConnectionId(str(uuid.uuid4()))


def new_channel_id() -> ChannelId:
    return ChannelId(str(uuid.uuid4()))


def new_node_id() -> NodeId:
    return NodeId(uuid.uuid4().hex[:12])


#: Separates a configured node name from the incarnation that makes each start's id unique.
INCARNATION_SEPARATOR = "~"


def incarnation_id(name: str) -> NodeId:
    """The id of one start of the node configured as ``name`` (``--node-id``, e.g. a pod name):
    the name stays visible, and a restart under the same name is a node of its own, never
    the heir of its previous incarnation's registry state."""
    return NodeId(f"{name}{INCARNATION_SEPARATOR}{uuid.uuid4().hex[:6]}")


def node_name(node_id: NodeId) -> str:
    """The configured name within a node id (the whole id when it has no incarnation)."""
    name, separator, _ = node_id.rpartition(INCARNATION_SEPARATOR)
    return name if separator else node_id

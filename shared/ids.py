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

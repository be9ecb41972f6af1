"""What the core asks the shell to do. Decisions are values; the shell executes them in order."""

from __future__ import annotations

from typing import NamedTuple

from broker_node.core.envelopes import Envelope
from broker_node.core.records import ChannelRecord, ConnectionRecord
from shared.ids import ConnectionId, NodeId


class Send(NamedTuple):
    """Write a text frame to a local client."""

    connection_id: ConnectionId
    frame: bytes


class CloseClient(NamedTuple):
    """Close a local client's WebSocket."""

    connection_id: ConnectionId
    code: int
    reason: str


class Publish(NamedTuple):
    """Put an envelope on the bus for another node (order kept per node)."""

    node_id: NodeId
    envelope: Envelope


class ForgetChannel(NamedTuple):
    """Remove a channel from the cluster registry (in the background)."""

    record: ChannelRecord


class ForgetConnection(NamedTuple):
    """Remove a connection from the cluster registry (in the background)."""

    record: ConnectionRecord


Action = Send | CloseClient | Publish | ForgetChannel | ForgetConnection

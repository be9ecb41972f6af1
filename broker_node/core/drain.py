"""A drain's two decisions: when everything read is answered, and where sessions go.

A draining node stops reading its clients, waits until every request it read has its answer,
closes the clients and hands the resumable sessions still waiting here to the nodes that stay.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from broker_node.core.broker import BrokerCore
from shared.ids import ConnectionId, NodeId


def everything_answered(
    core: BrokerCore, *, requests_waiting: bool, envelopes_unpublished: int
) -> bool:
    """True when no request read so far waits for its answer: none waits in a client's
    backlog (its turn, or the registry: ``requests_waiting``), no cross-node message or open
    awaits another node, no same-node message awaits its recipient's socket, and no envelope
    waits to be published."""
    return not (
        requests_waiting
        or core.pending_counts() != (0, 0)
        # Same-node messages wait for their recipient's socket to take them.
        or any(conn.unconfirmed for conn in core.connections.values())
        or envelopes_unpublished
    )


def hand_off_targets(
    sessions: Sequence[ConnectionId], live: Iterable[NodeId], draining: NodeId
) -> list[tuple[ConnectionId, NodeId | None]]:
    """The live node each session left here goes to, round robin over the other live nodes
    in a fixed order; None when no other node is live (the session then ends here)."""
    peers = sorted(set(live) - {draining})
    if not peers:
        return [(session_id, None) for session_id in sessions]
    return [(session_id, peers[index % len(peers)]) for index, session_id in enumerate(sessions)]

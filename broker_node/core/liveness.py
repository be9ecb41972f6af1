"""Liveness rules: the heartbeat's TTL, what a beat's answer asks of the node, and whom a
liveness check judges (which lapsed nodes to reap, which peers are lost).

Theory of operation: every node renews its heartbeat key each heartbeat interval and checks
its peers each peer check interval. A beat answers RENEWED, REJOINED (the backend lost this
node: restore its entries) or FENCED (a survivor reaped this node: drop its clients and
start empty). After an outage or a rejoin, every node's heartbeat may have lapsed through
nobody's fault: nobody is judged for one node TTL (the grace window). Then a lapsed node
other than this one is reaped, and a node holding the other end of one of this node's
channels is lost once its heartbeat is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass
from typing import Final

from shared.ids import ChannelId, ConnectionId, NodeId

#: Peers' liveness is checked this often (or once per heartbeat, if that is more often): a
#: cheap SMEMBERS + EXISTS pipeline. It is the slack between a heartbeat key's TTL and the
#: node TTL, so that a dead node's peers are told within the node TTL (see ``heartbeat_ttl_ms``).
PEER_CHECK_INTERVAL: Final = 1.0


def peer_check_interval(heartbeat_interval: float) -> float:
    return min(PEER_CHECK_INTERVAL, heartbeat_interval)


def heartbeat_ttl_ms(*, node_ttl: float, heartbeat_interval: float) -> int:
    """The TTL of a node's heartbeat key: the node TTL less one peer check interval.

    A node killed right after renewing its key is gone from Redis one key TTL later; its
    peers notice at their next check, at most one interval after that: within the node
    TTL. When the heartbeat interval leaves no room for that slack, the key keeps the
    full node TTL (and the bound is the node TTL plus one check interval).
    """
    ttl = node_ttl - peer_check_interval(heartbeat_interval)
    if ttl <= heartbeat_interval:
        ttl = node_ttl
    return int(ttl * 1000)


@dataclass(frozen=True, slots=True)
class AfterBeat:
    """What the node does once a heartbeat answered, in this order."""

    #: This node was reaped: close its clients, drop queued removals, rejoin. Nothing else.
    fence: bool = False
    #: Give every node one node TTL to renew before judging anyone.
    start_grace: bool = False
    #: Write this node's entries back (the backend came back without them).
    restore: bool = False
    #: Say so in the log: the backend came back empty (a first start is not news).
    came_back_empty: bool = False
    #: Make the registry hold exactly this node's live entries (writes of unknown outcome).
    resync: bool = False
    #: Send again the close notices that may not have gone out.
    resend_close_notices: bool = False


def after_beat(
    *, fenced: bool, rejoined: bool, first: bool, after_outage: bool, dirty: bool
) -> AfterBeat:
    """What a beat's answer asks of the node (``dirty``: a registry write's outcome is
    unknown; ``after_outage``: the previous liveness round failed)."""
    if fenced:
        return AfterBeat(fence=True)
    return AfterBeat(
        # Every node's heartbeat may have lapsed while Redis was away (or vanished with an
        # empty Redis): give them a TTL to renew before judging them. Reaping a node now
        # would close its clients for an outage that was nobody's fault.
        start_grace=rejoined or after_outage,
        restore=rejoined,
        came_back_empty=rejoined and not first,
        # A restore writes every live entry anyway.
        resync=dirty and not rejoined,
        resend_close_notices=True,
    )


class GraceWindow:
    """The time before which nobody is judged lost (clock readings in seconds)."""

    def __init__(self, node_ttl: float) -> None:
        self._node_ttl = node_ttl
        self._until = 0.0

    def start(self, now: float) -> None:
        self._until = now + self._node_ttl

    def judging(self, now: float) -> bool:
        return now >= self._until


def nodes_to_reap(lapsed: Iterable[NodeId], me: NodeId) -> list[NodeId]:
    """The lapsed nodes this node reaps: all but itself (its own lapse is not its to judge)."""
    return [node_id for node_id in lapsed if node_id != me]


def lost_nodes(remote: Set[NodeId], live: Set[NodeId]) -> Set[NodeId]:
    """The nodes holding the other end of a channel here whose heartbeat is gone."""
    # Lapsed, reaped by anyone, or left. A resync never removes a heartbeat, and an empty
    # Redis is recognised by this node's own missing key before anyone is judged.
    return remote - live


@dataclass(frozen=True, slots=True)
class Stale:
    """What a resync removes: entries indexed under this node that are not live here."""

    connections: list[ConnectionId]
    channels: list[ChannelId]


def stale_entries(
    *,
    indexed_connections: Set[ConnectionId],
    indexed_channels: Set[ChannelId],
    live_connections: Set[ConnectionId],
    live_channels: Set[ChannelId],
    writing_connections: Set[ConnectionId],
    writing_channels: Set[ChannelId],
    opening_channels: Set[ChannelId],
) -> Stale:
    """The entries a resync removes (sorted, for a stable order of writes). An entry whose
    write is under way, or a channel whose open awaits the other end's node, is not live yet
    but will be: removing it would lose it."""
    return Stale(
        sorted(indexed_connections - live_connections - writing_connections),
        sorted(indexed_channels - live_channels - writing_channels - opening_channels),
    )

"""What the cluster registry stores about connections and channels."""

from __future__ import annotations

import enum

import msgspec

from shared.ids import ChannelId, ConnectionId, NodeId


class SessionKey(msgspec.Struct, frozen=True):
    """What the registry keeps of a resumable session (issue 14): the hash of its current
    resume token and its window in seconds."""

    token_hash: str
    window: int


class ConnectionRecord(msgspec.Struct, frozen=True):
    """A registered connection: who it is, where it lives, its role (and its session, when
    it is resumable)."""

    connection_id: ConnectionId
    node_id: NodeId
    role: str
    session: SessionKey | None = None


class ChannelRecord(msgspec.Struct, frozen=True):
    """An open channel: its two ends and the node that holds each."""

    channel_id: ChannelId
    opener: ConnectionId
    opener_node: NodeId
    target: ConnectionId
    target_node: NodeId
    #: Whether each end is a resumable session (issue 14): when its node is lost, the channel
    #: waits for the session's new node instead of closing.
    opener_resumes: bool = False
    target_resumes: bool = False

    def peer_of(self, connection_id: ConnectionId) -> tuple[ConnectionId, NodeId] | None:
        """The other end of the channel, or None when ``connection_id`` is not an end."""
        if connection_id == self.opener:
            return self.target, self.target_node
        if connection_id == self.target:
            return self.opener, self.opener_node
        return None

    def ends(self) -> tuple[tuple[ConnectionId, NodeId], tuple[ConnectionId, NodeId]]:
        return (self.opener, self.opener_node), (self.target, self.target_node)

    def resumes(self, end: ConnectionId) -> bool:
        """Whether ``end`` (an end of the channel) is a resumable session."""
        return self.opener_resumes if end == self.opener else self.target_resumes

    def moved(self, end: ConnectionId, node_id: NodeId) -> ChannelRecord:
        """This channel with ``end`` now held by ``node_id``."""
        if end == self.opener:
            return msgspec.structs.replace(self, opener_node=node_id)
        return msgspec.structs.replace(self, target_node=node_id)


class ClaimRefusal(enum.Enum):
    """Why a session could not be claimed."""

    #: No such session, or another token (a used one, a forged one).
    UNKNOWN = "unknown"
    #: Its window passed.
    EXPIRED = "expired"


class SessionClaim(msgspec.Struct, frozen=True):
    """A resume took a session over: the node that held it, its role, its new epoch."""

    previous_node: NodeId
    role: str
    window: int
    epoch: int


class AdoptedSession(msgspec.Struct, frozen=True):
    """A resumable session of a reaped node, now held (detached) by the reaper."""

    record: ConnectionRecord
    #: When it detached (the reaper's clock when it was attached at the node's death), ms.
    detached_at_ms: int
    epoch: int


class Reaped(msgspec.Struct, frozen=True):
    """What a reap did: channels removed (as they were), sessions adopted, and the channels
    kept because each of their ends on the dead node was adopted (with their new nodes)."""

    removed: list[ChannelRecord]
    adopted: list[AdoptedSession] = []
    moved: list[ChannelRecord] = []

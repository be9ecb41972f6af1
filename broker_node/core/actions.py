"""What the core asks the shell to do. Decisions are values; the shell executes them in order.

Actions and receipts are made for every frame on the hot path, so they are msgspec Structs:
built in C, several times faster than a ``NamedTuple`` (whose ``__new__`` is Python code).
They hold no reference back to anything that holds them, so they need no cycle collection
(``gc=False``).
"""

from __future__ import annotations

import msgspec

from broker_node.core.envelopes import Envelope
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.core.sessions import SessionLog
from shared.ids import ChannelId, ConnectionId, NodeId


class LocalReceipt(msgspec.Struct, frozen=True, gc=False):
    """Confirm a same-node message to its sender once the recipient's socket took the frame."""

    sender: ConnectionId
    request_id: int
    channel_id: ChannelId
    #: Payload bytes, counted against the sender's unconfirmed bytes.
    size: int
    #: The message's ``seq``, when its recipient is not a resumable session: written to its
    #: socket is as far as it can be followed, so the sender hears ``channel_acked`` then.
    acked_seq: int | None = None


class RemoteReceipt(msgspec.Struct, frozen=True, gc=False):
    """Confirm delivery ``seq`` to the sending node once the recipient's socket took the frame."""

    node_id: NodeId
    seq: int


#: What to confirm once a frame has been accepted by the kernel (or fail when it never was).
Receipt = LocalReceipt | RemoteReceipt


class Send(msgspec.Struct, frozen=True, gc=False):
    """Write a text frame to a local client; ``receipt`` settles once the kernel accepted it."""

    connection_id: ConnectionId
    frame: bytes
    receipt: Receipt | None = None


class CloseClient(msgspec.Struct, frozen=True, gc=False):
    """Close a local client's WebSocket."""

    connection_id: ConnectionId
    code: int
    reason: str


class Publish(msgspec.Struct, frozen=True, gc=False):
    """Put an envelope on the bus for another node (order kept per node)."""

    node_id: NodeId
    envelope: Envelope


class ForgetChannel(msgspec.Struct, frozen=True, gc=False):
    """Remove a channel from the cluster registry (in the background)."""

    record: ChannelRecord


class ForgetConnection(msgspec.Struct, frozen=True, gc=False):
    """Remove a connection from the cluster registry (in the background), then execute
    ``then``: the notices of its departure, which its peers must get only once the registry
    no longer lists it (whatever they do after a notice sees the connection gone)."""

    record: ConnectionRecord
    then: tuple[Action, ...] = ()


class PauseReading(msgspec.Struct, frozen=True, gc=False):
    """Stop reading a client's socket: it has too much in flight (TCP backpressure)."""

    connection_id: ConnectionId


class ResumeReading(msgspec.Struct, frozen=True, gc=False):
    """Read a client's socket again: enough of what it sent has been confirmed."""

    connection_id: ConnectionId


# --- session resume (issue 14) ----------------------------------------------------------


class KeepFrames(msgspec.Struct, frozen=True, gc=False):
    """From now on keep every frame written to this client in ``log`` (a resumable session)."""

    connection_id: ConnectionId
    log: SessionLog


class Replay(msgspec.Struct, frozen=True, gc=False):
    """Write frames a session kept (already in its log: not kept again)."""

    connection_id: ConnectionId
    frames: tuple[bytes, ...]


class Rebind(msgspec.Struct, frozen=True, gc=False):
    """The socket of ``from_id`` now serves session ``to_id`` (a resume); a socket that
    served ``to_id`` until now is closed with ``code`` and will not detach it."""

    from_id: ConnectionId
    to_id: ConnectionId
    code: int
    reason: str


class MarkDetached(msgspec.Struct, frozen=True, gc=False):
    """Record in the registry that the session's client went away at ``at_ms``."""

    record: ConnectionRecord
    at_ms: int


class EndSession(msgspec.Struct, frozen=True, gc=False):
    """A detached session's window passed: remove it from the registry if this node still
    holds it, and tell the core (``session_ended``)."""

    record: ConnectionRecord


class MoveChannels(msgspec.Struct, frozen=True, gc=False):
    """Rewrite these channels in the registry: their session end moved off ``from_node``."""

    records: tuple[ChannelRecord, ...]
    from_node: NodeId


class LoadSession(msgspec.Struct, frozen=True, gc=False):
    """The node that held a resumed session did not hand it over: find its channels in the
    registry (among ``previous_node``'s) and give them to ``install_lost``."""

    connection_id: ConnectionId
    previous_node: NodeId


Action = (
    Send
    | CloseClient
    | Publish
    | ForgetChannel
    | ForgetConnection
    | PauseReading
    | ResumeReading
    | KeepFrames
    | Replay
    | Rebind
    | MarkDetached
    | EndSession
    | MoveChannels
    | LoadSession
)

"""When a resumable bench client acknowledges broker frames, and what it says (pure).

The node keeps every frame it sent to a resumable session until the client acknowledges it
(issue 14), so a bench that measures what resume costs must acknowledge exactly as the SDK
does (``client/session.py``): an ``ack`` as soon as ``ACK_EVERY`` frames are unacknowledged,
or ``ACK_DELAY`` seconds after the first of them, whichever comes first. A receiver's ``ack``
also names, per channel whose count moved since its previous ``ack``, the highest ``seq`` it
processed in order: that becomes the sender's ``channel_acked``.

While a session is detached or resuming, nothing is acknowledged: the SDK sends nothing but
its ``resume`` until ``resumed``, and acknowledges right after.
"""

from __future__ import annotations

import enum

from client.bench.wire import encode_ack
from client.session import ACK_DELAY, ACK_EVERY

__all__ = ["ACK_DELAY", "ACK_EVERY", "AckDue", "AckTracker"]


class AckDue(enum.Enum):
    """What counting one frame asks of the shell."""

    #: Nothing (a timer is running already, or acks are paused).
    NOTHING = "nothing"
    #: Acknowledge now (``ACK_EVERY`` frames are unacknowledged).
    NOW = "now"
    #: The first unacknowledged frame: acknowledge ``ACK_DELAY`` seconds from now.
    LATER = "later"


class AckTracker:
    """The broker frames one resumable client processed and has not acknowledged yet."""

    __slots__ = ("_moved", "last_frame_id", "paused", "unacked")

    def __init__(self) -> None:
        #: The ``id`` of the last broker frame processed (0: none).
        self.last_frame_id = 0
        #: Frames processed since the last ``ack``.
        self.unacked = 0
        #: No acks while detached or resuming.
        self.paused = False
        self._moved: dict[str, int] = {}

    def frame(self, frame_id: int) -> AckDue:
        """Count a processed broker frame."""
        self.last_frame_id = frame_id
        self.unacked += 1
        if self.paused:
            return AckDue.NOTHING
        if self.unacked >= ACK_EVERY:
            return AckDue.NOW
        return AckDue.LATER if self.unacked == 1 else AckDue.NOTHING

    def processed(self, channel_id: str, seq: int) -> None:
        """The peer's messages on ``channel_id`` were processed in order up to ``seq``."""
        self._moved[channel_id] = seq

    @property
    def due(self) -> bool:
        """Whether an ``ack`` is owed now (what the ``ACK_DELAY`` timer asks)."""
        return self.unacked > 0 and not self.paused

    def ack(self, request_id: int) -> bytes:
        """The ``ack`` frame covering everything processed so far (request id ``request_id``)."""
        frame = encode_ack(request_id, self.last_frame_id, self._moved)
        self._moved = {}
        self.unacked = 0
        return frame

    def detach(self) -> None:
        """The socket is gone: nothing is acknowledged until the session is resumed."""
        self.paused = True

    def resume_from(self) -> int:
        """The ``lastId`` of a ``resume``, which acknowledges every frame processed so far
        (its ``channels`` say what was processed of each channel: the caller's count)."""
        self.unacked = 0
        self._moved = {}
        return self.last_frame_id

    def resumed(self) -> None:
        """``resumed`` came (it was counted as any frame): acks go on. The SDK acknowledges
        right away: :attr:`due` is true."""
        self.paused = False

"""Resumable sessions (issue 14): what a node keeps of a client across its sockets.

A session's node keeps every frame it sent to the client until the client acknowledges it
(``ack``, or ``lastId`` in ``resume``), so that a client that lost its socket gets, on any
node, every frame it had not processed. While the client is away (detached) the frames made
for it are kept the same way: that is how messages to it are held. The log is bounded by
frames and bytes; past either bound the session ends (the caller decides how).

Everything here is pure: time is a number passed in, frames are bytes made by the codec.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import deque
from dataclasses import dataclass
from typing import Final

from shared.ids import ConnectionId

#: Bytes of randomness in a resume token (128 bits).
TOKEN_BYTES: Final = 16


def new_resume_token() -> tuple[str, str]:
    """A fresh token for the client, and the hash that is all the cluster stores of it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# Frames are made by our own encoder: the tag first, then ``id``.
_FRAME_ID: Final = re.compile(rb'\{"type":"[a-z_]+","id":(\d+)')


def frame_id_of(frame: bytes) -> int:
    """The ``id`` of a frame this node encoded."""
    found = _FRAME_ID.match(frame)
    if found is None:
        raise ValueError(f"not a broker frame: {frame[:40]!r}")
    return int(found.group(1))


@dataclass(slots=True)
class _Retained:
    frame_id: int
    frame: bytes


class SessionLog:
    """The frames sent to one session and not yet acknowledged by its client, in id order."""

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._frames: deque[_Retained] = deque()
        self._bytes = 0
        #: Every frame up to this id was acknowledged (or never existed).
        self.acked_id = 0
        #: The highest request id read from the client (what a resume need not send again).
        self.last_request_id = 0

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def size(self) -> int:
        return self._bytes

    @property
    def last_id(self) -> int:
        """The id of the newest frame kept, or of the last one acknowledged."""
        return self._frames[-1].frame_id if self._frames else self.acked_id

    def append(self, frame: bytes) -> bool:
        """Keep a frame just sent (or held); False when that passes a bound (it is kept all
        the same: what to do about it is the caller's)."""
        retained = _Retained(frame_id_of(frame), frame)
        self._frames.append(retained)
        self._bytes += len(frame)
        return len(self._frames) <= self.max_frames and self._bytes <= self.max_bytes

    def ack(self, last_id: int) -> None:
        """The client processed every frame up to ``last_id``: forget them."""
        frames = self._frames
        while frames and frames[0].frame_id <= last_id:
            self._bytes -= len(frames.popleft().frame)
        self.acked_id = max(self.acked_id, last_id)

    def after(self, last_id: int) -> list[bytes]:
        """The frames kept with an id above ``last_id``, in order (what a resume replays)."""
        return [retained.frame for retained in self._frames if retained.frame_id > last_id]

    def frames(self) -> list[bytes]:
        """Every frame kept, in order (what a handover carries)."""
        return [retained.frame for retained in self._frames]

    def renumber(self, first_id: int) -> int:
        """Give the frames kept ids from ``first_id`` on (a session whose node was lost: its
        client has seen ids this node never knew); returns the next id."""
        frame_id = first_id
        for retained in self._frames:
            self._bytes -= len(retained.frame)
            retained.frame = renumbered(retained.frame, frame_id)
            retained.frame_id = frame_id
            self._bytes += len(retained.frame)
            frame_id += 1
        self.acked_id = first_id - 1
        return frame_id


@dataclass(slots=True)
class Session:
    """A resumable connection's session state on the node that holds it."""

    connection_id: ConnectionId
    #: SHA-256 of the current resume token (the token itself is never kept).
    token_hash: str
    #: Seconds a detached session waits for its client.
    window: int
    log: SessionLog
    #: When the client's socket went away (None while attached).
    detached_at: float | None = None
    #: Frames after the client's last acknowledgement may be missing: the node that held the
    #: session was lost, so a resume replays what is here and says it is not complete.
    lost: bool = False
    #: Bumped by each resume (the registry's copy fences a node that still thinks it holds it).
    epoch: int = 0

    @property
    def attached(self) -> bool:
        return self.detached_at is None

    def expires_at(self) -> float | None:
        """When a detached session ends, or None while attached."""
        if self.detached_at is None:
            return None
        return self.detached_at + self.window

    def expired(self, now: float) -> bool:
        deadline = self.expires_at()
        return deadline is not None and now >= deadline


_ID_FIELD: Final = re.compile(rb'^(\{"type":"[a-z_]+","id":)(\d+)')


def renumbered(frame: bytes, frame_id: int) -> bytes:
    """``frame`` with its ``id`` replaced."""
    return _ID_FIELD.sub(lambda found: found.group(1) + str(frame_id).encode(), frame, count=1)

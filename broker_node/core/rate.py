"""A connection's rate limits: how long it must wait before what it just sent is within them.

Two token buckets, one of frames and one of bytes, each filling at its ``rate`` per second up
to its ``burst`` and starting full. Pure: the caller passes the time. Tokens may go negative (a
debt), so that a frame larger than the burst still passes and the client then waits as long as
that frame is worth.

Both buckets are charged together, once per socket read: one call and a few float operations,
since it runs for nearly every frame. They share the time of their last charge; a bucket
charged nothing at a read is unchanged by it (it refills by as much either way, up to its
burst).
"""

from __future__ import annotations

from typing import Final

#: Limit names, as counted in ``broker_limit_refusals_total``.
REQUESTS_RATE: Final = "requests_rate"
BYTES_RATE: Final = "bytes_rate"

_UNLIMITED: Final = float("inf")


class RateLimits:
    """Frames and bytes per second of one connection, each with its burst; a rate of 0 is
    no limit."""

    __slots__ = (
        "_byte_burst",
        "_byte_rate",
        "_byte_tokens",
        "_frame_burst",
        "_frame_rate",
        "_frame_tokens",
        "_stamp",
        "exceeded",
    )

    def __init__(
        self,
        *,
        frames_per_second: float,
        frame_burst: float,
        bytes_per_second: float,
        byte_burst: float,
        now: float,
    ) -> None:
        # An unlimited bucket holds infinitely many tokens and never refills (rate 0): every
        # charge leaves it at infinity.
        self._frame_rate = frames_per_second
        self._frame_burst = frame_burst if frames_per_second > 0 else _UNLIMITED
        self._frame_tokens = self._frame_burst
        self._byte_rate = bytes_per_second
        self._byte_burst = byte_burst if bytes_per_second > 0 else _UNLIMITED
        self._byte_tokens = self._byte_burst
        self._stamp = now
        #: The limit that set the last wait (the longer one when both did).
        self.exceeded = ""

    def charge(self, frames: int, size: int, now: float) -> float:
        """Spend ``frames`` frames and ``size`` bytes; the seconds to wait until both buckets
        are out of debt (0: none)."""
        elapsed = now - self._stamp
        self._stamp = now
        frame_tokens = self._frame_tokens + elapsed * self._frame_rate
        if frame_tokens > self._frame_burst:
            frame_tokens = self._frame_burst
        frame_tokens -= frames
        self._frame_tokens = frame_tokens
        byte_tokens = self._byte_tokens + elapsed * self._byte_rate
        if byte_tokens > self._byte_burst:
            byte_tokens = self._byte_burst
        byte_tokens -= size
        self._byte_tokens = byte_tokens
        if frame_tokens >= 0 and byte_tokens >= 0:
            return 0.0
        frame_wait = -frame_tokens / self._frame_rate if frame_tokens < 0 else 0.0
        byte_wait = -byte_tokens / self._byte_rate if byte_tokens < 0 else 0.0
        if frame_wait > byte_wait:
            self.exceeded = REQUESTS_RATE
            return frame_wait
        self.exceeded = BYTES_RATE
        return byte_wait

"""A connection's rate limits: how long it must wait before what it just sent is within them.

Two token buckets, one of frames and one of bytes, each filling at its ``rate`` per second up
to its ``burst`` and starting full. Pure: the caller passes the time. Tokens may go negative (a
debt), so that a frame larger than the burst still passes and the client then waits as long as
that frame is worth.

Both buckets are charged together, once per socket read: one call and a few float operations,
since it runs for nearly every frame. Each bucket is kept as the time at which it will be full
again (the generic cell rate algorithm): a charge of n moves that time n / rate later, from
now at the earliest, and the bucket is in debt while that time is more than burst / rate
ahead. That is the token bucket exactly, with no refill to compute: a bucket charged nothing
at a read is unchanged by it.
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
        "_byte_cost",
        "_byte_full_at",
        "_byte_slack",
        "_frame_cost",
        "_frame_full_at",
        "_frame_slack",
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
        # An unlimited bucket (rate 0) costs nothing and allows any time ahead.
        limited = frames_per_second > 0
        self._frame_cost = 1 / frames_per_second if limited else 0.0
        self._frame_slack = frame_burst / frames_per_second if limited else _UNLIMITED
        self._frame_full_at = now
        limited = bytes_per_second > 0
        self._byte_cost = 1 / bytes_per_second if limited else 0.0
        self._byte_slack = byte_burst / bytes_per_second if limited else _UNLIMITED
        self._byte_full_at = now
        #: The limit that set the last wait (the longer one when both did).
        self.exceeded = ""

    def charge(self, frames: int, size: int, now: float) -> float:
        """Spend ``frames`` frames and ``size`` bytes; the seconds to wait until both buckets
        are out of debt (0: none)."""
        frame_full_at = self._frame_full_at
        if frame_full_at < now:
            frame_full_at = now
        frame_full_at += frames * self._frame_cost
        self._frame_full_at = frame_full_at
        byte_full_at = self._byte_full_at
        if byte_full_at < now:
            byte_full_at = now
        byte_full_at += size * self._byte_cost
        self._byte_full_at = byte_full_at
        frame_wait = frame_full_at - now - self._frame_slack
        byte_wait = byte_full_at - now - self._byte_slack
        if frame_wait <= 0 and byte_wait <= 0:
            return 0.0
        if frame_wait > byte_wait:
            self.exceeded = REQUESTS_RATE
            return frame_wait
        self.exceeded = BYTES_RATE
        return byte_wait

"""A token bucket: how long a client must wait before what it just sent is within its rate.

Pure: the caller passes the time. Tokens may go negative (a debt), so that a frame larger than
the burst still passes and the client then waits as long as that frame is worth.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Spend ``amount``; the seconds to wait until the bucket is out of debt (0: none)."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.tokens = (self.burst if tokens > self.burst else tokens) - amount
        self.stamp = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

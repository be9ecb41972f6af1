"""Pacing a fixed total rate: a token bucket drained once per loop tick (pure).

The generator does not sleep per message: a timer fires every tick (about 1 ms), the bucket
is refilled for the time that passed, and the tokens are handed out to the senders that have
room in their window of unconfirmed messages. Tokens that find no room stay in the bucket, up
to ``burst``, so a short stall of the broker is caught up and a long one is not turned into an
unbounded backlog (the offered rate is then simply not met, and the report says so).
"""

from __future__ import annotations

__all__ = ["TokenBucket", "distribute"]


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; times in seconds."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive (0 means unpaced: use no bucket)")
        self.rate = rate
        self.burst = max(burst, 1.0)
        self._tokens = 0.0
        self._last = now

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last refill."""
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._last = now

    @property
    def available(self) -> int:
        """Whole tokens that can be taken now."""
        return int(self._tokens)

    def take(self, n: int) -> None:
        """Spend ``n`` whole tokens (at most :attr:`available`)."""
        if n > self.available:
            raise ValueError(f"taking {n} tokens, only {self.available} available")
        self._tokens -= n


def distribute(tokens: int, room: list[int], start: int) -> list[int]:
    """Share ``tokens`` among senders with ``room[i]`` free window slots, fairly.

    Senders are served round-robin from index ``start`` (the caller rotates it every tick, so
    no sender is favoured when tokens are fewer than senders); nobody gets more than its room.
    Returns the grant per sender; the sum is ``min(tokens, sum(room))``.
    """
    n = len(room)
    grants = [0] * n
    if n == 0:
        return grants
    remaining = tokens
    left = list(room)
    while remaining > 0:
        open_ = [i for i in (((start + k) % n) for k in range(n)) if left[i] > 0]
        if not open_:
            break
        share, extra = divmod(remaining, len(open_))
        for rank, i in enumerate(open_):
            give = min(left[i], share + (1 if rank < extra else 0))
            grants[i] += give
            left[i] -= give
            remaining -= give
    return grants

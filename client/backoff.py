"""Reconnect delays: exponential backoff with full jitter.

The n-th delay (from 0) is drawn uniformly from ``[0, min(cap, base * 2**n)]``, the "full
jitter" of the AWS Architecture Blog's *Exponential Backoff and Jitter*: clients that lost the
same node spread their reconnects instead of stampeding the survivors together. With the
defaults (1 s base, 30 s cap) the ceilings are 1, 2, 4, 8, 16, 30, 30, ... seconds, the
schedule of the JS client before jitter.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["full_jitter"]


def full_jitter(
    base: float, cap: float, *, uniform: Callable[[float, float], float] = random.uniform
) -> Iterator[float]:
    """An endless sequence of delays; ``uniform`` is injectable for tests.

    Raises ``ValueError`` at once (not on the first ``next``) for a negative base or cap.
    """
    if base < 0 or cap < 0:
        raise ValueError("backoff base and cap must not be negative")
    return _delays(base, cap, uniform)


def _delays(base: float, cap: float, uniform: Callable[[float, float], float]) -> Iterator[float]:
    ceiling = min(base, cap)
    while True:
        yield uniform(0.0, ceiling)
        ceiling = min(cap, ceiling * 2) if ceiling > 0 else 0.0

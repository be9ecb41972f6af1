"""The token bucket behind the per-connection rate limits."""

from __future__ import annotations

import pytest

from broker_node.core.rate import TokenBucket


def test_within_the_burst_nothing_waits() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(5)] == [0.0] * 5


def test_past_the_burst_the_wait_is_the_debt_over_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    bucket.take(5, 0.0)
    assert bucket.take(2, 0.0) == pytest.approx(0.2)


def test_tokens_come_back_at_the_rate_up_to_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    bucket.take(5, 0.0)
    assert bucket.take(3, 0.3) == 0.0
    assert bucket.take(5, 100.0) == 0.0
    assert bucket.take(1, 100.0) == pytest.approx(0.1)


def test_a_take_larger_than_the_burst_passes_and_waits_longer() -> None:
    bucket = TokenBucket(rate=100, burst=10, now=0.0)
    assert bucket.take(60, 0.0) == pytest.approx(0.5)

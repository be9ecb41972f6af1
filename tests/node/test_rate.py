"""The token buckets behind the per-connection rate limits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_node.core.rate import BYTES_RATE, REQUESTS_RATE, RateLimits


def frames_only(rate: float, burst: float) -> RateLimits:
    return RateLimits(
        frames_per_second=rate, frame_burst=burst, bytes_per_second=0, byte_burst=0, now=0.0
    )


def bytes_only(rate: float, burst: float) -> RateLimits:
    return RateLimits(
        frames_per_second=0, frame_burst=0, bytes_per_second=rate, byte_burst=burst, now=0.0
    )


def test_within_the_burst_nothing_waits() -> None:
    limits = frames_only(rate=10, burst=5)
    assert [limits.charge(1, 0, 0.0) for _ in range(5)] == [0.0] * 5


def test_past_the_burst_the_wait_is_the_debt_over_the_rate() -> None:
    limits = frames_only(rate=10, burst=5)
    limits.charge(5, 0, 0.0)
    assert limits.charge(2, 0, 0.0) == pytest.approx(0.2)
    assert limits.exceeded == REQUESTS_RATE


def test_tokens_come_back_at_the_rate_up_to_the_burst() -> None:
    limits = frames_only(rate=10, burst=5)
    limits.charge(5, 0, 0.0)
    assert limits.charge(3, 0, 0.3) == 0.0
    assert limits.charge(5, 0, 100.0) == 0.0
    assert limits.charge(1, 0, 100.0) == pytest.approx(0.1)


def test_a_charge_larger_than_the_burst_passes_and_waits_longer() -> None:
    limits = bytes_only(rate=100, burst=10)
    assert limits.charge(0, 60, 0.0) == pytest.approx(0.5)
    assert limits.exceeded == BYTES_RATE


def test_reads_that_charge_a_bucket_nothing_leave_it_refilling_as_before() -> None:
    limits = RateLimits(
        frames_per_second=10, frame_burst=5, bytes_per_second=100, byte_burst=50, now=0.0
    )
    limits.charge(5, 0, 0.0)
    assert limits.charge(0, 10, 0.1) == 0.0
    assert limits.charge(0, 10, 0.2) == 0.0
    # 3 frames came back by 0.3 s, as with no read in between: 1 frame over, 0.1 s.
    assert limits.charge(4, 0, 0.3) == pytest.approx(0.1)
    # And no more than the burst, however many reads charged it nothing.
    assert limits.charge(0, 10, 100.0) == 0.0
    assert limits.charge(6, 0, 100.0) == pytest.approx(0.1)


def test_the_longer_wait_names_the_limit() -> None:
    limits = RateLimits(
        frames_per_second=10, frame_burst=1, bytes_per_second=100, byte_burst=10, now=0.0
    )
    # 4 frames over: 0.4 s; 10 bytes over: 0.1 s.
    assert limits.charge(5, 20, 0.0) == pytest.approx(0.4)
    assert limits.exceeded == REQUESTS_RATE
    # Then the bytes owe more: 110 bytes over (1.1 s) against 5 frames over (0.5 s).
    assert limits.charge(1, 100, 0.0) == pytest.approx(1.1)
    assert limits.exceeded == BYTES_RATE


def test_no_limit_never_waits() -> None:
    limits = RateLimits(frames_per_second=0, frame_burst=0, bytes_per_second=0, byte_burst=0, now=0)
    assert limits.charge(10**9, 10**12, 0.0) == 0.0


class TokenBucket:
    """The textbook bucket the limits must behave as: tokens refilled up to the burst."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, 0.0

    def charge(self, cost: float, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate) - cost
        self.stamp = now
        return max(0.0, -self.tokens / self.rate)


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(1, 1000),
    burst=st.floats(1, 50),
    steps=st.lists(
        st.tuples(st.integers(0, 60), st.one_of(st.just(0.0), st.floats(0, 0.05), st.floats(0, 2))),
        max_size=40,
    ),
)
def test_the_limits_wait_as_a_token_bucket_would(
    rate: float, burst: float, steps: list[tuple[int, float]]
) -> None:
    limits, bucket = frames_only(rate, burst), TokenBucket(rate, burst)
    now = 0.0
    for cost, elapsed in steps:
        now += elapsed
        expected = bucket.charge(cost, now)
        assert limits.charge(cost, 0, now) == pytest.approx(expected, rel=1e-6, abs=1e-6)

from __future__ import annotations

import pytest

from client.bench.pacing import TokenBucket, distribute


def test_bucket_earns_rate_per_second() -> None:
    bucket = TokenBucket(rate=5000, burst=1000, now=0.0)
    assert bucket.available == 0
    bucket.refill(0.001)
    assert bucket.available == 5
    bucket.take(5)
    assert bucket.available == 0
    bucket.refill(0.0015)
    bucket.refill(0.002)
    assert bucket.available == 5


def test_fractions_carry_over_between_ticks() -> None:
    bucket = TokenBucket(rate=300, burst=100, now=0.0)
    granted = 0
    for tick in range(1, 1001):  # 1 ms ticks for one second: 0.3 tokens per tick
        bucket.refill(tick / 1000)
        granted += bucket.available
        bucket.take(bucket.available)
    assert granted in (299, 300)


def test_saved_tokens_are_capped_by_burst() -> None:
    bucket = TokenBucket(rate=1000, burst=50, now=0.0)
    bucket.refill(10.0)
    assert bucket.available == 50


def test_time_going_backwards_earns_nothing() -> None:
    bucket = TokenBucket(rate=1000, burst=50, now=1.0)
    bucket.refill(0.5)
    assert bucket.available == 0


def test_bucket_refuses_bad_use() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1, now=0.0)
    bucket = TokenBucket(rate=10, burst=0, now=0.0)
    assert bucket.burst == 1.0
    with pytest.raises(ValueError, match="only 0"):
        bucket.take(1)


def test_distribute_shares_evenly_from_the_rotating_start() -> None:
    assert distribute(5, [64] * 10, start=0) == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert distribute(5, [64] * 10, start=7) == [1, 1, 0, 0, 0, 0, 0, 1, 1, 1]
    assert distribute(25, [64] * 10, start=3) == [2, 2, 2, 3, 3, 3, 3, 3, 2, 2]


def test_distribute_respects_room_and_gives_the_rest_to_others() -> None:
    grants = distribute(10, [0, 1, 64], start=0)
    assert grants == [0, 1, 9]
    assert distribute(100, [3, 0, 2], start=1) == [3, 0, 2]  # less room than tokens


def test_distribute_degenerate_cases() -> None:
    assert distribute(5, [], start=0) == []
    assert distribute(0, [4, 4], start=0) == [0, 0]
    assert distribute(5, [0, 0], start=1) == [0, 0]

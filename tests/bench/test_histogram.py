from __future__ import annotations

import random

import pytest

from client.bench.histogram import Histogram, bucket_index, bucket_upper


def test_small_values_have_exact_buckets() -> None:
    for value in range(128):
        assert bucket_upper(bucket_index(value)) == value


def test_negative_values_go_to_the_first_bucket() -> None:
    assert bucket_index(-5) == 0


@pytest.mark.parametrize("value", [128, 129, 255, 256, 1000, 12_345, 10**6, 2**40 + 3])
def test_bucket_bounds_hold_the_value_within_one_sixty_fourth(value: int) -> None:
    index = bucket_index(value)
    assert bucket_upper(index - 1) < value <= bucket_upper(index)
    assert bucket_upper(index) - value <= value / 64


def test_bucket_indexes_are_monotonic() -> None:
    previous = -1
    for value in range(0, 100_000, 7):
        index = bucket_index(value)
        assert index >= previous
        previous = index


def test_max_total_and_count() -> None:
    histogram = Histogram()
    for value in (30, 0, 10):
        histogram.record(value)
    assert (histogram.max, histogram.total, histogram.count) == (30, 40, 3)


def test_percentiles_of_exact_values_nearest_rank() -> None:
    histogram = Histogram()
    for value in range(1, 101):  # 1..100 µs: exact buckets
        histogram.record(value)
    assert histogram.percentile(50) == 50
    assert histogram.percentile(90) == 90
    assert histogram.percentile(99) == 99
    assert histogram.percentile(100) == 100
    assert histogram.percentile(0.001) == 1
    assert histogram.max == 100
    assert histogram.mean == 50.5


def test_percentiles_of_large_values_are_close_and_never_above_max() -> None:
    rng = random.Random(6)
    values = sorted(rng.randint(100, 5_000_000) for _ in range(10_000))
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    for p in (50, 90, 99):
        exact = values[int(p / 100 * len(values)) - 1]
        assert exact <= histogram.percentile(p) <= exact * (1 + 1 / 64)
    assert histogram.percentile(100) == values[-1] == histogram.max


def test_empty_histogram_and_bad_percentiles() -> None:
    histogram = Histogram()
    assert histogram.percentile(99) == 0
    assert histogram.mean == 0.0
    for p in (0, -1, 101):
        with pytest.raises(ValueError, match="percentile"):
            histogram.percentile(p)


def test_merge_equals_recording_everything_in_one() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for value in (5, 300, 7_000, 10**8):  # 10**8 µs grows the bucket list
        a.record(value)
        both.record(value)
    for value in (1, 2, 10**9):
        b.record(value)
        both.record(value)
    a.merge(b)
    assert a.to_pairs() == both.to_pairs()
    assert (a.count, a.total, a.max) == (both.count, both.total, both.max)
    small = Histogram()
    small.merge(a)  # merging a longer bucket list into a shorter one
    assert small.to_pairs() == both.to_pairs()


def test_round_trip_through_pairs() -> None:
    histogram = Histogram()
    for value in (3, 3, 900, 4_000_000_000):
        histogram.record(value)
    again = Histogram.from_pairs(histogram.to_pairs(), total=histogram.total, maximum=histogram.max)
    assert again.to_pairs() == histogram.to_pairs()
    assert again.count == 4
    assert again.percentile(99) == histogram.percentile(99) == 4_000_000_000

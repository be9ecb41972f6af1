"""Latency histograms that merge across processes, and their percentiles (pure).

Values are whole microseconds. Buckets are log-linear, as in HdrHistogram: below 128 µs every
microsecond has its own bucket; above, each power of two is split into 64 equal buckets, so a
reported percentile is at most 1/64 (1.6 %) above the true sample. The maximum is kept exactly.
Recording is a few integer operations and one list increment, cheap enough per message.
"""

from __future__ import annotations

from math import ceil

__all__ = ["Histogram", "bucket_index", "bucket_upper"]

_SUB_BITS = 6
_SUB = 1 << _SUB_BITS  # 64 buckets per power of two
_LINEAR = 2 * _SUB  # values below this have exact buckets


def bucket_index(value: int) -> int:
    """The bucket of a non-negative value (negative values go to bucket 0)."""
    if value < _LINEAR:
        return max(value, 0)
    shift = value.bit_length() - _SUB_BITS - 1
    return _LINEAR + (shift - 1) * _SUB + ((value >> shift) - _SUB)


def bucket_upper(index: int) -> int:
    """The highest value that falls in bucket ``index``."""
    if index < _LINEAR:
        return index
    shift, sub = divmod(index - _LINEAR, _SUB)
    shift += 1
    return ((sub + _SUB + 1) << shift) - 1


class Histogram:
    """Counts of microsecond values; ``percentile`` reports a bucket's upper bound (<= max)."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (_LINEAR + 16 * _SUB)  # up to ~2 s before growing
        self.count = 0
        self.total = 0
        self.max = 0

    def record(self, value: int) -> None:
        """Add one value in microseconds."""
        index = bucket_index(value)
        counts = self.counts
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1
        self.count += 1
        if value > 0:
            self.total += value
            if value > self.max:
                self.max = value

    def merge(self, other: Histogram) -> None:
        """Add every value of ``other`` to this histogram."""
        if len(other.counts) > len(self.counts):
            self.counts.extend([0] * (len(other.counts) - len(self.counts)))
        for index, n in enumerate(other.counts):
            if n:
                self.counts[index] += n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, p: float) -> int:
        """The nearest-rank ``p``-th percentile (0 < p <= 100); 0 for an empty histogram."""
        if not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], not {p}")
        if self.count == 0:
            return 0
        rank = max(1, ceil(p / 100 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(bucket_upper(index), self.max)
        raise AssertionError("counts do not add up to count")  # pragma: no cover

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def to_pairs(self) -> list[tuple[int, int]]:
        """A compact form for JSON and pipes: ``(bucket, count)`` for non-empty buckets."""
        return [(index, n) for index, n in enumerate(self.counts) if n]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[int, int]], *, total: int, maximum: int) -> Histogram:
        """Rebuild a histogram from :meth:`to_pairs` and its exact total and maximum."""
        histogram = cls()
        for index, n in pairs:
            if index >= len(histogram.counts):
                histogram.counts.extend([0] * (index + 1 - len(histogram.counts)))
            histogram.counts[index] += n
            histogram.count += n
        histogram.total = total
        histogram.max = maximum
        return histogram

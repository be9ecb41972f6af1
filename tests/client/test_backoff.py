"""Reconnect delays (pure)."""

from __future__ import annotations

import itertools

import pytest

from client.backoff import full_jitter


def test_ceilings_double_up_to_the_cap() -> None:
    ceilings = [
        high for high in itertools.islice(full_jitter(1.0, 30.0, uniform=lambda _, h: h), 8)
    ]
    assert ceilings == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_delays_are_drawn_from_zero_to_the_ceiling() -> None:
    calls: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        calls.append((low, high))
        return (low + high) / 2

    delays = list(itertools.islice(full_jitter(0.5, 1.0, uniform=record), 3))
    assert calls == [(0.0, 0.5), (0.0, 1.0), (0.0, 1.0)]
    assert delays == [0.25, 0.5, 0.5]


def test_real_randomness_stays_in_bounds() -> None:
    for delay in itertools.islice(full_jitter(0.01, 0.05), 50):
        assert 0.0 <= delay <= 0.05


def test_a_cap_below_the_base_wins_and_zero_is_allowed() -> None:
    assert next(full_jitter(5.0, 1.0, uniform=lambda _, h: h)) == 1.0
    assert list(itertools.islice(full_jitter(0.0, 1.0, uniform=lambda _, h: h), 3)) == [0.0] * 3


def test_negative_values_are_refused() -> None:
    with pytest.raises(ValueError):
        full_jitter(-1.0, 1.0)
    with pytest.raises(ValueError):
        full_jitter(1.0, -1.0)

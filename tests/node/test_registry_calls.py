"""Registry calls: bounded by the request timeout, timed, the backend's state followed."""

from __future__ import annotations

import asyncio
import logging

import pytest

from broker_node.core.stats import NodeStats
from broker_node.errors import BackendUnavailable
from broker_node.registry_calls import RegistryCalls


async def answer(value: int) -> int:
    return value


async def stall() -> None:
    await asyncio.Event().wait()


def calls_reporting(states: list[bool], stats: NodeStats | None = None) -> RegistryCalls:
    return RegistryCalls(
        stats=stats or NodeStats(),
        request_timeout=0.01,
        redis_url="redis://user:secret@redis:6379/0",
        on_state=states.append,
    )


async def test_a_call_returns_its_answer_and_is_timed() -> None:
    stats = NodeStats()
    calls = calls_reporting([], stats)
    assert await calls.call("find", answer(3)) == 3
    assert stats.registry_calls["find"][0] == 1
    assert stats.registry_calls["find"][2] == 0


async def test_a_call_past_the_timeout_is_backend_unavailable_and_the_backend_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    states: list[bool] = []
    stats = NodeStats()
    calls = calls_reporting(states, stats)
    with caplog.at_level(logging.WARNING, logger="broker_node"):
        for _ in range(2):
            with pytest.raises(BackendUnavailable):
                await calls.call("find", stall())
    assert states == [False]
    assert stats.registry_calls["find"][2] == 2
    # Once per transition, and the password is not in it.
    assert caplog.text.count("cluster backend lost") == 1
    assert "secret" not in caplog.text
    calls.backend_state(True)
    calls.backend_state(True)
    assert states == [False, True]
    assert calls.backend_up


async def test_a_call_that_fails_otherwise_counts_as_failed() -> None:
    states: list[bool] = []
    calls = calls_reporting(states)

    async def broken() -> None:
        raise BackendUnavailable("find")

    with pytest.raises(BackendUnavailable):
        await calls.call("find", broken())
    assert states == [False]


async def test_a_cancelled_call_says_nothing_about_the_backend() -> None:
    states: list[bool] = []
    calls = RegistryCalls(
        stats=NodeStats(), request_timeout=10.0, redis_url=None, on_state=states.append
    )
    task = asyncio.create_task(calls.call("find", stall()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert states == []
    assert calls.backend_name == "in memory"

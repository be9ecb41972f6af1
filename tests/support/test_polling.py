"""The polling helper: it returns as soon as the condition holds, and fails saying why."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.polling import WaitTimedOut, wait_for_value, wait_until, wait_until_sync


async def test_returns_the_first_accepted_answer_of_a_sync_or_async_probe() -> None:
    answers = iter(range(10))
    assert (
        await wait_for_value(lambda: next(answers), lambda n: n >= 3, timeout=5, message="3") == 3
    )

    async def later() -> int:
        await asyncio.sleep(0)
        return next(answers)

    assert await wait_for_value(later, lambda n: n % 2 == 1, timeout=5, message="odd") == 5


async def test_a_condition_that_never_holds_fails_with_the_last_answer() -> None:
    with pytest.raises(WaitTimedOut, match=r"waited 0.05 s for the answer; last seen: 'no'"):
        await wait_for_value(lambda: "no", lambda s: s == "yes", timeout=0.05, message="the answer")
    with pytest.raises(WaitTimedOut, match="the flag"):
        await wait_until(lambda: False, timeout=0.05, message="the flag", interval=0.01)


async def test_a_probe_that_hangs_is_cut_at_the_deadline() -> None:
    async def hangs() -> bool:
        await asyncio.Event().wait()
        return True

    with pytest.raises(WaitTimedOut, match="first probe never answered"):
        await wait_until(hangs, timeout=0.05, message="a hanging probe")


async def test_the_probe_s_own_timeout_is_not_taken_for_the_wait_s() -> None:
    async def times_out() -> bool:
        raise TimeoutError("the probe's own")

    with pytest.raises(TimeoutError, match="the probe's own"):
        await wait_until(times_out, timeout=5, message="never")


def test_the_sync_variant_waits_and_fails_alike() -> None:
    answers = iter([False, False, True])
    wait_until_sync(lambda: next(answers), timeout=5, message="the third answer")
    with pytest.raises(WaitTimedOut, match=r"waited 0\.03 s for nothing"):
        wait_until_sync(lambda: False, timeout=0.03, message="nothing")

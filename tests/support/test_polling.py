"""The polling helper: it returns as soon as the condition holds, and fails saying why."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tests.support.polling import (
    WaitTimedOut,
    wait_for_value,
    wait_until,
    wait_until_serving,
    wait_until_sync,
)


async def test_returns_the_first_accepted_answer() -> None:
    answers = iter(range(10))

    async def next_answer() -> int:
        await asyncio.sleep(0)
        return next(answers)

    assert await wait_for_value(next_answer, lambda n: n >= 3, timeout=5, message="3") == 3
    assert await wait_for_value(next_answer, lambda n: n % 2 == 1, timeout=5, message="odd") == 5


async def test_a_predicate_may_be_a_function_or_a_coroutine_function() -> None:
    flags = iter([False, True])
    await wait_until(lambda: next(flags), timeout=5, message="a function")

    async def holds() -> bool:
        return True

    await wait_until(holds, timeout=5, message="a coroutine function")


async def test_a_condition_that_never_holds_fails_with_the_last_answer() -> None:
    async def no() -> str:
        return "no"

    with pytest.raises(WaitTimedOut, match=r"waited 0.05 s for the answer; last seen: 'no'"):
        await wait_for_value(no, lambda s: s == "yes", timeout=0.05, message="the answer")
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


def test_a_process_that_exits_before_it_serves_fails_at_once_with_its_output() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="it exited with 3\nwhat it said"):
        wait_until_serving(
            process, lambda: False, timeout=30, message="a server", output=lambda: "what it said"
        )


def test_a_process_that_does_not_serve_in_time_fails_with_its_output() -> None:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(WaitTimedOut) as caught:
            wait_until_serving(
                process, lambda: False, timeout=0.05, message="a server", output=lambda: "so far"
            )
        assert caught.value.__notes__ == ["so far"]
    finally:
        process.kill()
        process.wait()

"""Bounded waits for a state that signals nothing: the one polling helper of the tests.

Prefer an event (an ``asyncio.Event`` a callback sets, a frame that arrives, a future): poll
only a state that lives in another process (a node's ``/metrics``, Redis keys, a child
process starting) or inside code under test that offers no hook. Every wait here is bounded
and, when the bound passes, fails with what it waited for and the last value it saw.

The probe is asked at once, then after 5 ms, doubling up to 50 ms between asks: a state that
changes soon is seen soon, and one that takes seconds costs twenty probes a second. Pass
``interval`` for a fixed pace instead.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, TypeVar

T = TypeVar("T")

FIRST_DELAY: Final = 0.005
LONGEST_DELAY: Final = 0.05


class WaitTimedOut(AssertionError):
    """A bounded wait ended before its condition held: the test fails, saying on what."""

    def __init__(self, message: str, *, timeout: float, last: str) -> None:
        super().__init__(f"waited {timeout:g} s for {message}; last seen: {last}")
        self.message = message
        self.timeout = timeout
        self.last = last


def _delays(interval: float | None) -> Iterator[float]:
    if interval is not None:
        return itertools.repeat(interval)
    return (min(FIRST_DELAY * 2**n, LONGEST_DELAY) for n in itertools.count())


async def wait_for_value(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool],
    *,
    timeout: float,
    message: str,
    interval: float | None = None,
    describe: Callable[[T], str] = repr,
) -> T:
    """Ask ``probe`` until ``accept`` holds for its answer, and return that answer.

    A probe that hangs is cut at the deadline as well. :class:`WaitTimedOut` after
    ``timeout`` seconds, naming ``message`` and the last answer (shown by ``describe``).
    """
    seen: list[T] = []
    delays = _delays(interval)
    try:
        async with asyncio.timeout(timeout) as scope:
            while True:
                value = await probe()
                seen[:] = [value]
                if accept(value):
                    return value
                await asyncio.sleep(next(delays))
    except TimeoutError:
        if not scope.expired():
            raise  # the probe's own timeout, not this wait's
        last = describe(seen[0]) if seen else "nothing (the first probe never answered)"
        raise WaitTimedOut(message, timeout=timeout, last=last) from None


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,
    message: str,
    interval: float | None = None,
) -> None:
    """Ask ``predicate`` (a function or a coroutine function) until it holds;
    :class:`WaitTimedOut` after ``timeout`` seconds."""

    async def ask() -> bool:
        answer = predicate()
        return bool(await answer) if inspect.isawaitable(answer) else answer

    await wait_for_value(ask, bool, timeout=timeout, message=message, interval=interval)


def wait_until_sync(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    message: str,
    interval: float | None = None,
) -> None:
    """:func:`wait_until` for code with no event loop (starting a child process).

    The predicate must bound its own blocking (a socket timeout): it is not interrupted.
    """
    deadline = time.monotonic() + timeout
    for delay in _delays(interval):
        if predicate():
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimedOut(message, timeout=timeout, last="False")
        time.sleep(min(delay, left))


def wait_until_serving(
    process: subprocess.Popen[bytes],
    answers: Callable[[], bool],
    *,
    timeout: float,
    message: str,
    output: Callable[[], str] = lambda: "",
) -> None:
    """:func:`wait_until_sync` for a child process just started, until ``answers`` holds:
    ``RuntimeError`` at once if the process exits first, :class:`WaitTimedOut` after
    ``timeout``; both carry what the process wrote (``output``)."""

    def serving() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{message}: it exited with {process.returncode}\n{output()}")
        return answers()

    try:
        wait_until_sync(serving, timeout=timeout, message=message)
    except WaitTimedOut as exc:
        exc.add_note(output())
        raise

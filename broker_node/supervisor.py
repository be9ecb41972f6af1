"""Supervised background loops: restarted with capped, jittered backoff; never silently dead."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

logger = logging.getLogger("broker_node.supervisor")

#: How long ``stop`` waits for the cancelled loops before cancelling the rest again.
CANCEL_RETRY_INTERVAL: Final = 0.1

BackoffFactory = Callable[[], Iterator[float]]


def jittered_backoff(base: float = 0.1, cap: float = 5.0) -> Iterator[float]:
    """Full-jitter exponential delays: uniform(0, min(cap, base * 2**n))."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * 2**attempt))
        attempt = min(attempt + 1, 30)


class Supervisor:
    """Runs named loops as tasks and restarts any that fail; ``stop`` cancels them all.

    ``on_state(name, up)`` tells the owner when a loop goes down and when it comes back, so
    that a node whose vital loop is down reports itself not ready.
    """

    def __init__(
        self,
        *,
        backoff: BackoffFactory = jittered_backoff,
        on_state: Callable[[str, bool], None] = lambda name, up: None,
    ) -> None:
        self._backoff = backoff
        self._on_state = on_state
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        if name in self._tasks:
            raise ValueError(f"loop {name!r} already runs")
        self._tasks[name] = asyncio.create_task(self._run(name, loop), name=name)

    async def _run(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        delays = self._backoff()
        while True:
            try:
                await loop()
                # A loop that returns is finished with its work; that is not a failure.
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("background loop %s failed; restarting", name, exc_info=True)
                self._on_state(name, False)
            await asyncio.sleep(next(delays))

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    async def stop(self) -> None:
        pending = set(self._tasks.values())
        self._tasks.clear()
        # A cancellation can get lost in library code: CPython < 3.12's asyncio.wait_for, which
        # redis-py uses to send every command, returns the result instead of raising when the
        # send completed just as the cancel came (gh-86296). The loop then carries on to its
        # next await and a single cancel() would leave stop() waiting for it forever: cancel
        # again until every loop has ended.
        while pending:
            for task in pending:
                task.cancel()
            done, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_INTERVAL)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved: _run logs failures itself

"""Small helpers of the SDK tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Poll a condition every 10 ms until it holds; fail after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - the condition belongs to code under test
            await asyncio.sleep(0.01)


def client_tasks() -> set[str]:
    """Names of the SDK's tasks still alive (after every client is closed: a leak)."""
    return {
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith("broker-client") and not task.done()
    }


async def eventually_async(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, interval: float = 0.1
) -> None:
    """``eventually`` for a condition that has to ask the broker."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the condition lives on the broker
            await asyncio.sleep(interval)

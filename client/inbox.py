"""Bounded, closable FIFOs for ``async for`` consumers (channel payloads, incoming channels)."""

from __future__ import annotations

import asyncio
import collections
from typing import Generic, TypeVar

__all__ = ["Ended", "Inbox", "InboxIterator"]

T = TypeVar("T")


class Ended(Exception):
    """An inbox was closed normally and is empty."""


class Inbox(Generic[T]):
    """A bounded FIFO that can be closed, for ``async for`` consumers."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._capacity = capacity
        self._closed = False
        self._error: BaseException | None = None
        self._changed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, item: T) -> bool:
        """Append unless full (``False``); items offered after ``close`` are dropped."""
        if self._closed:
            return True
        if len(self._items) >= self._capacity:
            return False
        self._items.append(item)
        self._changed.set()
        return True

    def __len__(self) -> int:
        return len(self._items)

    def take_all(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        return items

    def close(self, error: BaseException | None = None) -> None:
        """Consumers get what is buffered, then ``error`` (or the end of iteration)."""
        if not self._closed:
            self._closed = True
            self._error = error
            self._changed.set()

    async def get(self) -> T:
        while True:
            if self._items:
                return self._items.popleft()
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise Ended
            self._changed.clear()
            await self._changed.wait()


class InboxIterator(Generic[T]):
    """``async for`` over an inbox: stops when it is closed and drained."""

    def __init__(self, inbox: Inbox[T]) -> None:
        self._inbox = inbox

    def __aiter__(self) -> InboxIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._inbox.get()
        except Ended:
            raise StopAsyncIteration from None

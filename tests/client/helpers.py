"""Small helpers of the SDK tests."""

from __future__ import annotations

import asyncio

from client import Channel


def client_tasks() -> set[str]:
    """Names of the SDK's tasks still alive (after every client is closed: a leak)."""
    return {
        task.get_name()
        for task in asyncio.all_tasks()
        if task.get_name().startswith("broker-client") and not task.done()
    }


def closed_event(channel: Channel) -> asyncio.Event:
    """An event set once ``channel`` closes (its ``on_closed``, which this takes over)."""
    closed = asyncio.Event()
    if channel.closed:
        closed.set()
    channel.on_closed = closed.set
    return closed

"""The supervisor of the node's background loops."""

from __future__ import annotations

import asyncio

from broker_node.supervisor import Supervisor


async def test_stop_ends_a_loop_whose_cancellation_was_lost() -> None:
    # CPython < 3.12's asyncio.wait_for (redis-py sends every command with it) can swallow a
    # cancellation (gh-86296); the loop then goes on to wait for its next piece of work.
    swallowed = asyncio.Event()
    never = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.set()
        await never.wait()

    supervisor = Supervisor()
    supervisor.start("writer", loop)
    await asyncio.sleep(0)  # the loop is waiting
    async with asyncio.timeout(5):
        await supervisor.stop()
    assert swallowed.is_set()
    assert not supervisor.running("writer")

"""Real processes for the differential tests, started once per module and reused by every
example: one standalone node, and three nodes on the session's redis-server. The examples run
on one event loop of their own, since Hypothesis drives a state machine from synchronous code."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import pytest

from tests.support.cluster import Cluster, fast_args
from tests.support.nodes import NodeProcess
from tests.support.redis_server import RedisServer

T = TypeVar("T")

CLUSTER_SIZE = 3
#: Short failure detection, yet a TTL that a node starved of CPU for a moment on a loaded
#: two-core machine still keeps (a node reaped for a pause closes its clients with 1012).
NODE_ARGS = fast_args(heartbeat=0.3, ttl=3.0)


class Loop:
    """An event loop that synchronous code (a Hypothesis rule) runs coroutines on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Awaitable[T], timeout: float = 60.0) -> T:
        async def bounded() -> T:
            async with asyncio.timeout(timeout):
                return await coroutine

        return self.loop.run_until_complete(bounded())

    def close(self) -> None:
        async def cancel_left() -> None:
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

        self.loop.run_until_complete(cancel_left())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    made = Loop()
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def standalone() -> Iterator[NodeProcess]:
    with NodeProcess(node_id="standalone") as node:
        yield node


@pytest.fixture(scope="module")
def three_nodes(shared_redis_server: RedisServer) -> Iterator[Cluster]:
    """Three nodes on the session's Redis, emptied first: the checks count its keys. The fault
    tests replace nodes and restart Redis."""
    shared_redis_server.restart()
    with Cluster(shared_redis_server, args=NODE_ARGS) as made:
        made.launch(CLUSTER_SIZE)
        yield made

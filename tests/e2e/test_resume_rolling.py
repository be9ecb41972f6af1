"""End to end (issue 14): with resume on, a rolling restart of every node under load, and the
SIGKILL of one, lose nothing, duplicate nothing, reorder nothing, and no peer notices.

The compose topology as processes (Redis, 3 nodes, nginx running ``deploy/nginx.conf``); 20
resumable SDK clients in 10 pairs, each end sending the other sequenced integers as fast as
its confirmations come back (most pairs are cross-node: consecutive connections land on
different nodes). Then every receiver must hold exactly 0..n-1 of what its peer sent, in order;
no channel closed, no session was lost, every ``send()`` returned.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from client import Channel
from tests.e2e.topology import ComposeTopology
from tests.e2e.workload import sdk_client
from tests.support.nodes import http_get

pytestmark = pytest.mark.slow

NODE_ARGS = [
    "--heartbeat-interval", "0.5",
    "--node-ttl", "5",
    "--drain-timeout", "8",
    "--log-format", "json",
]  # fmt: skip
PAIRS = 10
#: Bound of each wait for the traffic to catch up (usually a second or two).
SETTLE = 30.0


@pytest.fixture
def node_args() -> list[str]:
    return NODE_ARGS


class End:
    """One resumable client: sends 0, 1, 2... on its channel and records what it receives."""

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.lost: list[str] = []
        self.resumes: list[bool] = []
        self.client = sdk_client(
            url,
            "pair",
            on_session_lost=self.lost.append,
            on_resumed=self.resumes.append,
        )
        self.channel: Channel | None = None
        self.sent = 0
        self.received: list[Any] = []
        self.errors: list[BaseException] = []

    async def send_until(self, stop: asyncio.Event) -> None:
        assert self.channel is not None
        try:
            while not stop.is_set():
                await self.channel.send(self.sent)
                self.sent += 1
                await asyncio.sleep(0.005)
        except BaseException as exc:  # every send must return: anything else is a failure
            self.errors.append(exc)
            raise

    async def receive(self) -> None:
        assert self.channel is not None
        async for payload in self.channel:
            self.received.append(payload)


async def pairs(url: str) -> list[tuple[End, End]]:
    made = []
    for n in range(PAIRS):
        opener, target = End(url, f"o{n}"), End(url, f"t{n}")
        await opener.client.connect()
        await target.client.connect()
        assert opener.client.resumable and target.client.resumable
        target_id = target.client.connection_id
        assert target_id is not None
        opener.channel = await opener.client.open_channel(target_id)
        target.channel = await anext(target.client.incoming_channels())
        made.append((opener, target))
    return made


async def run_through(topology: ComposeTopology, disrupt: Any) -> list[tuple[End, End]]:
    ends = await pairs(topology.url)
    stop = asyncio.Event()
    everyone = [end for pair in ends for end in pair]
    receivers = [asyncio.create_task(end.receive()) for end in everyone]
    senders = [asyncio.create_task(end.send_until(stop)) for end in everyone]
    try:
        await asyncio.sleep(1.0)
        await disrupt()
        await asyncio.sleep(1.0)
        stop.set()
        async with asyncio.timeout(SETTLE):
            await asyncio.gather(*senders)
        async with asyncio.timeout(SETTLE):
            while any(  # noqa: ASYNC110 - the traffic lives in other processes
                len(b.received) < a.sent or len(a.received) < b.sent for a, b in ends
            ):
                await asyncio.sleep(0.1)
    finally:
        for task in receivers + senders:
            task.cancel()
        await asyncio.gather(*receivers, *senders, return_exceptions=True)
    return ends


def check(ends: list[tuple[End, End]]) -> None:
    for a, b in ends:
        for sender, receiver in ((a, b), (b, a)):
            assert sender.errors == [], (sender.name, sender.errors)
            assert sender.lost == [] and receiver.lost == [], (sender.lost, receiver.lost)
            assert receiver.received == list(range(sender.sent)), (
                receiver.name,
                sender.sent,
                len(receiver.received),
                _first_difference(receiver.received, sender.sent),
            )
            assert sender.channel is not None and not sender.channel.closed
    assert sum(a.sent + b.sent for a, b in ends) > 0


def _first_difference(received: list[Any], sent: int) -> tuple[int, Any] | None:
    for index, (got, expected) in enumerate(zip(received, range(sent), strict=False)):
        if got != expected:
            return index, got
    return None


async def close_all(ends: list[tuple[End, End]]) -> None:
    await asyncio.gather(*(end.client.close() for pair in ends for end in pair))


def cross_node_messages(topology: ComposeTopology) -> float:
    total = 0.0
    for node in topology.nodes:
        _, body = http_get(node.http + "/metrics", 1.0)
        for line in body.splitlines():
            if line.startswith('broker_messages_routed_total{path="cross_node_out"} '):
                total += float(line.split()[1])
    return total


async def test_a_rolling_restart_under_load_loses_nothing(topology: ComposeTopology) -> None:
    async def roll() -> None:
        for index in range(len(topology.nodes)):
            await asyncio.to_thread(topology.restart, index)
            await asyncio.sleep(0.5)

    ends = await run_through(topology, roll)
    try:
        check(ends)
        assert cross_node_messages(topology) > 0
        resumed = sum(len(end.resumes) for pair in ends for end in pair)
        assert resumed >= PAIRS  # every client was on a restarted node at least once
        assert all(retired.exit_code == 0 for retired in topology.retired)
    finally:
        await close_all(ends)


async def test_a_killed_node_loses_nothing(topology: ComposeTopology) -> None:
    async def kill_one() -> None:
        topology.nodes[0].kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(topology.restart, 0)

    ends = await run_through(topology, kill_one)
    try:
        check(ends)
        assert any(not complete for pair in ends for end in pair for complete in end.resumes)
        assert cross_node_messages(topology) > 0
    finally:
        await close_all(ends)

"""Many channels, many tasks at once: per-channel order holds, standalone and across nodes."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from client import BrokerClient, Channel
from tests.client.helpers import client_tasks
from tests.support.cluster import Cluster

CHANNELS = 100
MESSAGES = 30


async def exercise(url_a: str, url_b: str) -> None:
    received: dict[str, list[Any]] = defaultdict(list)
    done = asyncio.Event()
    expected = CHANNELS * MESSAGES * 2

    def count() -> int:
        return sum(len(v) for v in received.values())

    def on_incoming(channel: Channel) -> None:
        def on_message(payload: Any) -> None:
            received[channel.channel_id].append(payload)
            if count() == expected:
                done.set()

        channel.on_message = on_message

    async with (
        BrokerClient(url_a, "sender", request_timeout=20) as sender,
        BrokerClient(url_b, "receiver", request_timeout=20, on_incoming_channel=on_incoming) as rx,
    ):
        assert rx.connection_id is not None
        target = rx.connection_id
        channels = await asyncio.gather(*(sender.open_channel(target) for _ in range(CHANNELS)))
        assert len({c.channel_id for c in channels}) == CHANNELS

        async def one_by_one(channel: Channel) -> None:
            # One task per channel, each awaiting every confirmation.
            for n in range(MESSAGES):
                await channel.send({"seq": n})

        async def pipelined(channel: Channel) -> None:
            # Many tasks per channel: started in order, so written in order.
            await asyncio.gather(*(channel.send({"seq": MESSAGES + n}) for n in range(MESSAGES)))

        await asyncio.gather(*(one_by_one(c) for c in channels))
        await asyncio.gather(*(pipelined(c) for c in channels))
        async with asyncio.timeout(30):
            await done.wait()
        for channel in channels:
            sequence = [p["seq"] for p in received[channel.channel_id]]
            assert sequence == list(range(MESSAGES * 2)), channel.channel_id
        await asyncio.gather(*(c.close() for c in channels))
    assert client_tasks() == set()


async def test_standalone(standalone: str) -> None:
    await exercise(standalone, standalone)


@pytest.mark.slow
async def test_across_nodes(cluster: Cluster) -> None:
    first, second = await cluster.start(2)
    await exercise(first.url, second.url)

"""The outbox: per-node batches, publish order, undeliverable envelopes reported."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from broker_node.cluster.memory import MemoryBackend
from broker_node.core.envelopes import Closed, Envelope, decode_batch
from broker_node.errors import BackendUnavailable
from broker_node.outbox import MAX_BATCH, Outbox
from shared.ids import ChannelId, ConnectionId, NodeId

A, B = NodeId("a"), NodeId("b")


def closed(n: int) -> Closed:
    return Closed(ChannelId(f"ch-{n}"), ConnectionId("c"))


class RecordingBus:
    """A bus that records each publish call (or fails them all)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[list[tuple[NodeId, list[Envelope]]]] = []
        self.fail = fail

    async def publish(self, messages: Sequence[tuple[NodeId, bytes]]) -> list[int]:
        if self.fail:
            raise BackendUnavailable("publish")
        self.calls.append([(node, decode_batch(payload)) for node, payload in messages])
        return [1] * len(messages)


async def run_until_idle(outbox: Outbox) -> None:
    async with asyncio.timeout(5):
        await asyncio.sleep(0)
        await outbox.wait_idle()


async def test_one_payload_per_node_in_put_order() -> None:
    bus = RecordingBus()
    outbox = Outbox(bus, on_undeliverable=lambda node, envelopes: None)
    task = asyncio.create_task(outbox.run())
    for n in range(5):
        outbox.put(A if n % 2 == 0 else B, closed(n))
    await run_until_idle(outbox)
    assert bus.calls == [[(A, [closed(0), closed(2), closed(4)]), (B, [closed(1), closed(3)])]]
    task.cancel()


async def test_large_backlogs_are_split_without_reordering() -> None:
    bus = RecordingBus()
    outbox = Outbox(bus, on_undeliverable=lambda node, envelopes: None)
    task = asyncio.create_task(outbox.run())
    for n in range(MAX_BATCH + 10):
        outbox.put(A, closed(n))
    await run_until_idle(outbox)
    [call] = bus.calls
    assert [len(envelopes) for _, envelopes in call] == [MAX_BATCH, 10]
    assert [e for _, envelopes in call for e in envelopes] == [
        closed(n) for n in range(MAX_BATCH + 10)
    ]
    task.cancel()


async def test_batch_delay_gathers_later_puts_into_the_same_publish() -> None:
    bus = RecordingBus()
    outbox = Outbox(bus, on_undeliverable=lambda node, envelopes: None, batch_delay=0.05)
    task = asyncio.create_task(outbox.run())
    outbox.put(A, closed(1))
    await asyncio.sleep(0.01)
    outbox.put(A, closed(2))
    await run_until_idle(outbox)
    assert bus.calls == [[(A, [closed(1), closed(2)])]]
    task.cancel()


async def test_unreachable_node_and_failed_publish_are_reported() -> None:
    backend = MemoryBackend()
    reported: list[tuple[NodeId, list[Envelope]]] = []
    outbox = Outbox(backend.bus, on_undeliverable=lambda node, envs: reported.append((node, envs)))
    task = asyncio.create_task(outbox.run())
    outbox.put(B, closed(1))  # nobody listens on B's inbox
    await run_until_idle(outbox)
    assert reported == [(B, [closed(1)])]

    failing = Outbox(RecordingBus(fail=True), on_undeliverable=lambda n, e: reported.append((n, e)))
    failing_task = asyncio.create_task(failing.run())
    failing.put(A, closed(2))
    await run_until_idle(failing)
    assert reported[-1] == (A, [closed(2)])
    task.cancel()
    failing_task.cancel()

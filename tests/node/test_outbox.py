"""The outbox: per-node batches, one send per loop turn, undeliverable envelopes reported."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from broker_node.cluster.base import PublishResult
from broker_node.cluster.memory import MemoryBackend
from broker_node.core.envelopes import Closed, Envelope, decode_batch
from broker_node.errors import BackendUnavailable
from broker_node.outbox import MAX_BATCH, Outbox
from shared.ids import ChannelId, ConnectionId, NodeId
from tests.support.polling import wait_until

A, B = NodeId("a"), NodeId("b")


def closed(n: int) -> Closed:
    return Closed(ChannelId(f"ch-{n}"), ConnectionId("c"))


class RecordingBus:
    """A bus that records each send (and answers it on the next turn, or fails it)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[list[tuple[NodeId, list[Envelope]]]] = []
        self.fail = fail

    def send(self, messages: Sequence[tuple[NodeId, bytes]], on_result: PublishResult) -> None:
        self.calls.append([(node, decode_batch(payload)[0]) for node, payload in messages])
        result: list[int] | BackendUnavailable = (
            BackendUnavailable("publish") if self.fail else [1] * len(messages)
        )
        asyncio.get_running_loop().call_soon(on_result, result)


def counting_outbox(bus: RecordingBus) -> tuple[Outbox, list[int]]:
    """An outbox on ``bus`` and the payload counts of the sends answered so far."""
    answered: list[int] = []
    outbox = Outbox(
        bus,
        on_undeliverable=lambda node, envelopes: None,
        on_published=lambda seconds, count: answered.append(count),
    )
    return outbox, answered


async def run_until_idle(outbox: Outbox) -> None:
    async with asyncio.timeout(5):
        await outbox.wait_idle()


async def test_one_send_per_turn_one_payload_per_node_in_put_order() -> None:
    bus = RecordingBus()
    outbox = Outbox(bus, on_undeliverable=lambda node, envelopes: None)
    for n in range(5):
        outbox.put(A if n % 2 == 0 else B, closed(n))
    assert bus.calls == []  # nothing goes out before the end of the turn
    await run_until_idle(outbox)
    assert bus.calls == [[(A, [closed(0), closed(2), closed(4)]), (B, [closed(1), closed(3)])]]


async def test_each_turn_sends_without_waiting_for_the_previous_outcome() -> None:
    bus = RecordingBus()
    outbox, outcomes = counting_outbox(bus)
    outbox.put(A, closed(1))
    await asyncio.sleep(0)  # the first send goes out; its outcome comes a turn later
    outbox.put(A, closed(2))
    await asyncio.sleep(0)
    assert len(bus.calls) == 2
    await run_until_idle(outbox)
    assert outcomes == [1, 1]
    assert len(outbox) == 0


async def test_large_backlogs_are_split_without_reordering() -> None:
    bus = RecordingBus()
    outbox = Outbox(bus, on_undeliverable=lambda node, envelopes: None)
    for n in range(MAX_BATCH + 10):
        outbox.put(A, closed(n))
    assert len(outbox) == MAX_BATCH + 10
    await run_until_idle(outbox)
    [call] = bus.calls
    assert [len(envelopes) for _, envelopes in call] == [MAX_BATCH, 10]
    assert [e for _, envelopes in call for e in envelopes] == [
        closed(n) for n in range(MAX_BATCH + 10)
    ]


async def test_batch_delay_gathers_later_puts_into_the_same_send() -> None:
    bus = RecordingBus()
    outbox = Outbox(bus, on_undeliverable=lambda node, envelopes: None, batch_delay=0.05)
    outbox.put(A, closed(1))
    await asyncio.sleep(0.01)  # a put later in the batch delay: the time is what is tested
    outbox.put(A, closed(2))
    await run_until_idle(outbox)
    assert bus.calls == [[(A, [closed(1), closed(2)])]]


async def test_unreachable_node_and_failed_send_are_reported() -> None:
    backend = MemoryBackend()
    reported: list[tuple[NodeId, list[Envelope]]] = []
    retried: list[int] = []
    outbox = Outbox(
        backend.bus,
        on_undeliverable=lambda node, envs: reported.append((node, envs)),
        on_retry=retried.append,
        retry_window=0.1,
    )
    outbox.put(B, closed(1))  # nobody listens on B's inbox: tried again for the window
    await run_until_idle(outbox)
    assert reported == [(B, [closed(1)])]
    assert sum(retried) >= 2

    unknown: list[tuple[NodeId, list[Envelope]]] = []
    failing = Outbox(
        RecordingBus(fail=True),
        on_undeliverable=lambda n, e: reported.append((n, e)),
        on_unknown=lambda n, e: unknown.append((n, e)),
    )
    failing.put(A, closed(2))
    failing.put(B, closed(3))
    await run_until_idle(failing)
    # Redis did not answer: the envelopes may still arrive, so they are not "undeliverable".
    assert reported[1:] == []
    assert unknown == [(A, [closed(2)]), (B, [closed(3)])]


async def test_a_node_that_subscribes_late_gets_everything_in_order() -> None:
    backend = MemoryBackend()
    reported: list[tuple[NodeId, list[Envelope]]] = []
    received: list[Envelope] = []
    retried: list[int] = []
    outbox = Outbox(
        backend.bus,
        on_undeliverable=lambda n, e: reported.append((n, e)),
        on_retry=retried.append,
        retry_window=5.0,
    )
    outbox.put(B, closed(1))
    await asyncio.sleep(0)  # the first send goes out on its own
    outbox.put(B, closed(2))
    # Both reached nobody and wait to be sent again; a later put waits behind them.
    await wait_until(lambda: sum(retried) >= 2, timeout=5, message="both envelopes retried")
    outbox.put(B, closed(3))
    async with backend.bus.subscribe(B, lambda payload: received.extend(decode_batch(payload)[0])):
        await run_until_idle(outbox)
    assert reported == []
    assert received == [closed(1), closed(2), closed(3)]


async def test_wait_idle_waits_for_the_outcome_not_just_the_send() -> None:
    outbox, answered = counting_outbox(RecordingBus())
    await run_until_idle(outbox)  # idle from the start
    outbox.put(A, closed(1))
    await run_until_idle(outbox)
    assert answered == [1]


async def test_a_flush_with_nothing_put_sends_nothing_and_stays_idle() -> None:
    bus = RecordingBus()
    outbox, answered = counting_outbox(bus)
    outbox.flush()
    await run_until_idle(outbox)
    assert bus.calls == [] and answered == [] and len(outbox) == 0

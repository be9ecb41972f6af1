"""The write scheduler without sockets: one flush per turn, receipts confirmed in one go."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from broker_node.connection import WriteScheduler
from broker_node.core.actions import Action, LocalReceipt, Receipt, Send
from shared.ids import ChannelId, ConnectionId

A, B = ConnectionId("a"), ConnectionId("b")


def receipt(request_id: int) -> LocalReceipt:
    return LocalReceipt(A, request_id, ChannelId("c"), 1)


class Core:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def written(self, receipts: Iterable[Receipt], *, held: bool = False) -> list[Action]:
        self.calls.append(("written", list(receipts)))
        return [Send(A, b"confirmed")]

    def unwritten(self, receipts: Iterable[Receipt], *, handed: bool) -> list[Action]:
        self.calls.append(("unwritten", list(receipts), handed))
        return []

    def unwritten_to(
        self, recipient: ConnectionId, receipts: Iterable[Receipt], *, handed: bool
    ) -> list[Action]:
        self.calls.append(("unwritten_to", recipient, list(receipts), handed))
        return []


class Sock:
    def __init__(self, scheduler: WriteScheduler, receipts: list[Receipt]) -> None:
        self.scheduler = scheduler
        self.receipts = receipts
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        # The kernel takes everything: its receipts are released during the flush.
        if self.receipts:
            released, self.receipts = self.receipts, []
            self.scheduler.receipts_written(released)


async def test_one_flush_per_turn_and_receipts_confirmed_together() -> None:
    core = Core()
    executed: list[list[Action]] = []
    scheduler = WriteScheduler(core, executed.append)
    scheduler.start(asyncio.get_running_loop())
    one, two = Sock(scheduler, [receipt(1)]), Sock(scheduler, [receipt(2)])
    scheduler.flush_soon(one)
    scheduler.flush_soon(two)
    assert one.flushes == two.flushes == 0
    await asyncio.sleep(0)
    assert one.flushes == two.flushes == 1
    assert core.calls == [("written", [receipt(1), receipt(2)])]
    assert executed == [[Send(A, b"confirmed")]]


async def test_flush_now_and_outside_a_flush() -> None:
    core = Core()
    executed: list[list[Action]] = []
    scheduler = WriteScheduler(core, executed.append)
    scheduler.start(asyncio.get_running_loop())
    scheduler.flush_now()  # nothing dirty: nothing to do
    sock = Sock(scheduler, [])
    scheduler.flush_soon(sock)
    scheduler.flush_now()
    assert sock.flushes == 1
    # Released outside a flush (the transport drained): confirmed at once.
    scheduler.receipts_written([receipt(3)])
    scheduler.receipts_unwritten([receipt(4)], handed=True, recipient=None)
    scheduler.receipts_unwritten([receipt(5)], handed=False, recipient=B)
    assert core.calls == [
        ("written", [receipt(3)]),
        ("unwritten", [receipt(4)], True),
        ("unwritten_to", B, [receipt(5)], False),
    ]
    await asyncio.sleep(0)
    assert sock.flushes == 1

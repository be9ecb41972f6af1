"""The bus link over the in-memory bus: subscription state, payloads in, close notices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from broker_node.bus_link import BusLink
from broker_node.cluster.memory import MemoryBackend
from broker_node.core.actions import Action
from broker_node.core.envelopes import Closed, Envelope, encode_batch
from broker_node.core.stats import NodeStats
from shared.ids import ChannelId, ConnectionId, NodeId
from tests.support.polling import wait_until

ME, PEER = NodeId("me"), NodeId("peer")
NOTICE = Closed(ChannelId("ch"), ConnectionId("c"))


class Link:
    def __init__(self) -> None:
        self.backend = MemoryBackend(standalone=False)
        self.stats = NodeStats()
        self.states: list[bool] = []
        self.arrived: list[Envelope] = []
        self.undeliverable: list[tuple[NodeId, list[Envelope]]] = []
        self.link = BusLink(
            node_id=ME,
            bus=self.backend.bus,
            stats=self.stats,
            backend_name="in memory",
            on_bus=self.on_bus,
            undeliverable=self.on_undeliverable,
            execute=lambda actions: None,
            on_subscribed=self.states.append,
            batch_delay=0.0,
            retry_window=0.0,
        )

    def on_bus(self, envelopes: list[Envelope]) -> list[Action]:
        self.arrived += envelopes
        return []

    def on_undeliverable(self, node_id: NodeId, envelopes: list[Envelope]) -> list[Action]:
        self.undeliverable.append((node_id, envelopes))
        return []


@pytest.fixture
async def link() -> AsyncIterator[Link]:
    link = Link()
    task = asyncio.create_task(link.link.subscriber_loop())
    async with asyncio.timeout(2):
        await link.link.wait_subscribed()
    yield link
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_subscribed_payloads_reach_the_core_and_bad_envelopes_are_counted(
    link: Link,
) -> None:
    assert link.states == [True]
    inbox = link.backend.hub.inboxes[ME]
    assert inbox.offer(encode_batch([NOTICE]))
    assert inbox.offer(b"\x93garbage")
    await wait_until(lambda: link.stats.bus_batches_in == 2, timeout=2, message="payloads")
    assert link.arrived == [NOTICE]
    assert link.stats.bus_envelopes_dropped >= 1


async def test_a_lost_subscription_is_made_again(link: Link) -> None:
    link.backend.hub.inboxes[ME].lose("cut")
    await wait_until(lambda: link.states == [True, False, True], timeout=2, message="again")
    assert link.link.subscribed


async def test_a_failed_subscriber_loop_is_reported_not_subscribed(link: Link) -> None:
    link.link.subscriber_down()
    link.link.subscriber_down()
    assert link.states == [True, False]


async def test_an_undeliverable_close_notice_is_sent_again(link: Link) -> None:
    link.link.outbox.put(PEER, NOTICE)
    await wait_until(lambda: bool(link.undeliverable), timeout=2, message="undeliverable")
    assert link.undeliverable == [(PEER, [NOTICE])]
    assert link.link.close_notices
    link.link.resend_close_notices()
    assert not link.link.close_notices
    await wait_until(lambda: len(link.undeliverable) == 2, timeout=2, message="again")
    assert link.stats.bus_publishes >= 2

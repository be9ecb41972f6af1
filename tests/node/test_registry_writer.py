"""The registry in the background, against the in-memory registry (and one that stalls)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from broker_node.cluster.memory import MemoryHub, MemoryRegistry
from broker_node.core.actions import (
    Action,
    CloseClient,
    EndSession,
    ForgetChannel,
    ForgetConnection,
)
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.core.stats import NodeStats
from broker_node.errors import BackendUnavailable
from broker_node.executor import RegistryWrites
from broker_node.registry_calls import RegistryCalls
from broker_node.registry_writer import RegistryWriter
from shared.ids import ChannelId, ConnectionId, NodeId
from tests.support.polling import wait_until

ME = NodeId("me")
GONE = ConnectionRecord(ConnectionId("gone"), ME, "role")
CHANNEL = ChannelRecord(ChannelId("ch"), GONE.connection_id, ME, ConnectionId("t"), ME)
NOTICE = CloseClient(ConnectionId("peer"), 1000, "bye")


class StallingRegistry(MemoryRegistry):
    """The memory registry, whose removals fail while ``failing``."""

    failing = False

    async def remove_connections(self, records: Sequence[ConnectionRecord]) -> None:
        if self.failing:
            raise BackendUnavailable("remove_connections")
        await super().remove_connections(records)


class Answers:
    def __init__(self) -> None:
        self.retried: list[ConnectionId] = []
        self.ended: list[tuple[ConnectionId, bool]] = []

    def session_ended(self, connection_id: ConnectionId, ended: bool) -> list[Action]:
        self.ended.append((connection_id, ended))
        return []

    def session_retry(self, connection_id: ConnectionId) -> list[Action]:
        self.retried.append(connection_id)
        return []

    def install_lost(
        self, session_id: ConnectionId, channels: list[ChannelRecord] | None
    ) -> list[Action]:
        return []


class Harness:
    def __init__(self) -> None:
        self.hub = MemoryHub()
        self.registry = StallingRegistry(self.hub)
        self.executed: list[Action] = []
        self.draining = False
        self.calls = RegistryCalls(
            stats=NodeStats(), request_timeout=1.0, redis_url=None, on_state=lambda up: None
        )
        self.answers = Answers()
        self.writer = RegistryWriter(
            node_id=ME,
            registry=self.registry,
            calls=self.calls,
            answers=self.answers,
            execute=self.executed.extend,
            draining=lambda: self.draining,
        )


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    harness = Harness()
    tasks = [
        asyncio.create_task(harness.writer.removal_loop()),
        asyncio.create_task(harness.writer.session_loop()),
    ]
    yield harness
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def registered(harness: Harness) -> None:
    await harness.registry.add_connection(GONE)
    await harness.registry.add_channel(CHANNEL)


async def test_removals_are_written_and_then_their_notices_go_out(harness: Harness) -> None:
    await registered(harness)
    harness.writer.forget(ForgetChannel(CHANNEL))
    harness.writer.forget(ForgetConnection(GONE, then=(NOTICE,)))
    assert harness.executed == []
    await wait_until(lambda: harness.executed == [NOTICE], timeout=2, message="notice")
    assert harness.hub.connections == {}
    assert harness.hub.channels == {}


async def test_while_draining_the_notices_do_not_wait(harness: Harness) -> None:
    harness.draining = True
    harness.writer.forget(ForgetConnection(GONE, then=(NOTICE,)))
    assert harness.executed == [NOTICE]


async def test_a_failed_removal_marks_the_registry_dirty(harness: Harness) -> None:
    await registered(harness)
    harness.registry.failing = True
    harness.writer.forget(ForgetConnection(GONE, then=(NOTICE,)))
    await wait_until(lambda: harness.writer.dirty, timeout=2, message="dirty")
    # The notices go anyway; the resync removes the entry later.
    assert harness.executed == [NOTICE]
    assert not harness.calls.backend_up
    harness.writer.clear_dirty()
    assert not harness.writer.dirty


async def test_a_fence_drops_queued_removals() -> None:
    harness = Harness()  # no loop runs: the removal stays queued
    harness.writer.forget(ForgetConnection(GONE, then=(NOTICE,)))
    harness.writer.mark_dirty()
    harness.writer.drop_queued_removals()
    assert harness.executed == [NOTICE]
    assert not harness.writer.dirty


def test_writes_under_way_are_known_while_they_last() -> None:
    writer = Harness().writer
    with writer.writing_connection(GONE.connection_id), writer.writing_channel(CHANNEL.channel_id):
        assert writer.writing_connections == {GONE.connection_id}
        assert writer.writing_channels == {CHANNEL.channel_id}
    assert not writer.writing_connections
    assert not writer.writing_channels


async def test_session_work_is_done_in_order_and_answered(harness: Harness) -> None:
    harness.writer.queue_session_work(EndSession(GONE))
    await harness.writer.wait_session_work()
    await wait_until(lambda: bool(harness.answers.ended), timeout=2, message="answer")
    assert harness.answers.ended == [(GONE.connection_id, False)]


def test_the_writer_is_what_its_consumers_expect() -> None:
    # The protocol the executor and the dispatcher take it as (checked by mypy).
    writer: RegistryWrites = Harness().writer
    writer.mark_dirty()

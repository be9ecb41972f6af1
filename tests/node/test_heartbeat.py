"""The heartbeat's registry work against the in-memory registry, with a restore that fails."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from broker_node.cluster.memory import MemoryHub, MemoryRegistry
from broker_node.core.actions import Action
from broker_node.core.broker import ResumeRules
from broker_node.core.records import ChannelRecord, ConnectionRecord, Reaped
from broker_node.core.stats import NodeStats
from broker_node.errors import BackendUnavailable
from broker_node.heartbeat import Closable, NodeHeartbeat
from broker_node.registry_calls import RegistryCalls
from broker_node.registry_writer import RegistryWriter
from shared.ids import ChannelId, ConnectionId, NodeId

ME = NodeId("me")
RECORD = ConnectionRecord(ConnectionId("c1"), ME, "role")


class FlakyRegistry(MemoryRegistry):
    """The memory registry, whose ``restore`` fails while ``failing``."""

    failing = False

    async def restore(
        self,
        node_id: NodeId,
        connections: Sequence[ConnectionRecord],
        channels: Sequence[ChannelRecord],
    ) -> None:
        if self.failing:
            raise BackendUnavailable("restore")
        await super().restore(node_id, connections, channels)


class OneConnection:
    """A core holding one registered connection and no channel."""

    resume: ResumeRules | None = None
    channels: Mapping[ChannelId, ChannelRecord] = {}

    def records(self) -> tuple[list[ConnectionRecord], list[ChannelRecord]]:
        return [RECORD], []

    def is_connected(self, connection_id: ConnectionId) -> bool:
        return connection_id == RECORD.connection_id

    def pending_channel_ids(self) -> set[ChannelId]:
        return set()

    def remote_nodes(self) -> set[NodeId]:
        return set()

    def adopt(self, reaped: Reaped, lost_node: NodeId) -> list[Action]:
        raise AssertionError("nobody is reaped here")

    def node_lost(self, node_id: NodeId) -> list[Action]:
        raise AssertionError("nobody is lost here")

    def session_ended(self, connection_id: ConnectionId, ended: bool) -> list[Action]:
        return []

    def session_retry(self, connection_id: ConnectionId) -> list[Action]:
        return []

    def install_lost(
        self, session_id: ConnectionId, channels: list[ChannelRecord] | None
    ) -> list[Action]:
        return []


class Subscribed:
    subscribed = True

    async def wait_subscribed(self) -> None:
        return None

    def resend_close_notices(self) -> None:
        return None


def build(registry: FlakyRegistry) -> tuple[NodeHeartbeat, RegistryWriter]:
    calls = RegistryCalls(
        stats=NodeStats(), request_timeout=1.0, redis_url=None, on_state=lambda up: None
    )
    core = OneConnection()
    writer = RegistryWriter(
        node_id=ME,
        registry=registry,
        calls=calls,
        answers=core,
        execute=lambda actions: None,
        draining=lambda: False,
    )
    clients: dict[ConnectionId, Closable] = {}
    heartbeat = NodeHeartbeat(
        node_id=ME,
        registry=registry,
        standalone=False,
        calls=calls,
        writer=writer,
        inbox=Subscribed(),
        core=core,
        execute=lambda actions: None,
        clients=clients,
        stats=NodeStats(),
        node_ttl=3.0,
        heartbeat_interval=1.0,
        request_timeout=1.0,
    )
    return heartbeat, writer


async def test_a_restore_that_fails_after_a_rejoin_is_done_by_a_later_beat() -> None:
    hub = MemoryHub()
    registry = FlakyRegistry(hub)
    heartbeat, writer = build(registry)
    await heartbeat.beat(first=True, after_outage=False)
    assert RECORD.connection_id in hub.connections

    # Redis comes back empty, and the restore after the rejoin fails.
    hub.wipe()
    registry.failing = True
    with pytest.raises(BackendUnavailable):
        await heartbeat.beat(first=False, after_outage=False)
    assert writer.dirty

    # The node is known again (RENEWED), yet its entries are written back.
    registry.failing = False
    await heartbeat.beat(first=False, after_outage=True)
    assert hub.connections == {RECORD.connection_id: RECORD}
    assert not writer.dirty

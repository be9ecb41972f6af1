"""The heartbeat's registry work against the in-memory registry, with a restore that fails."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import pytest

from broker_node.cluster.memory import MemoryHub, MemoryRegistry
from broker_node.core.actions import Action, CloseClient, ForgetConnection
from broker_node.core.broker import ResumeRules
from broker_node.core.records import ChannelRecord, ConnectionRecord, Reaped
from broker_node.core.stats import NodeStats
from broker_node.errors import BackendUnavailable
from broker_node.heartbeat import CLOSE_SERVICE_RESTART, NodeHeartbeat
from broker_node.registry_calls import RegistryCalls
from broker_node.registry_writer import RegistryWriter
from shared.ids import ChannelId, ConnectionId, NodeId

ME, PEER = NodeId("me"), NodeId("peer")
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

    def __init__(self) -> None:
        self.remote: set[NodeId] = set()
        self.lost: list[NodeId] = []

    def remote_nodes(self) -> set[NodeId]:
        return self.remote

    def adopt(self, reaped: Reaped, lost_node: NodeId) -> list[Action]:
        raise AssertionError("resume is off: nobody is adopted")

    def node_lost(self, node_id: NodeId) -> list[Action]:
        self.lost.append(node_id)
        return []

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


class Client:
    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


class Harness:
    def __init__(
        self, registry: FlakyRegistry, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stats = NodeStats()
        self.executed: list[Action] = []
        calls = RegistryCalls(
            stats=self.stats, request_timeout=1.0, redis_url=None, on_state=lambda up: None
        )
        self.core = OneConnection()
        self.writer = RegistryWriter(
            node_id=ME,
            registry=registry,
            calls=calls,
            answers=self.core,
            execute=self.executed.extend,
            draining=lambda: False,
        )
        self.client = Client()
        self.heartbeat = NodeHeartbeat(
            node_id=ME,
            registry=registry,
            standalone=False,
            calls=calls,
            writer=self.writer,
            inbox=Subscribed(),
            core=self.core,
            execute=self.executed.extend,
            clients={ConnectionId("c1"): self.client},
            stats=self.stats,
            node_ttl=3.0,
            heartbeat_interval=1.0,
            request_timeout=1.0,
            clock=clock,
        )


def build(registry: FlakyRegistry) -> tuple[NodeHeartbeat, RegistryWriter]:
    harness = Harness(registry)
    return harness.heartbeat, harness.writer


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


async def test_a_fenced_node_closes_its_clients_drops_queued_removals_and_rejoins() -> None:
    hub = MemoryHub()
    harness = Harness(FlakyRegistry(hub))
    await harness.heartbeat.beat(first=True, after_outage=False)
    notice = CloseClient(ConnectionId("peer"), 1000, "bye")
    harness.writer.forget(ForgetConnection(RECORD, then=(notice,)))
    hub.tombstones.add(ME)  # reaped by a survivor
    await harness.heartbeat.beat(first=False, after_outage=False)
    assert harness.client.closed == [(CLOSE_SERVICE_RESTART, "Node was reaped; reconnect")]
    assert harness.executed == [notice]
    assert ME not in hub.tombstones
    assert ME in await hub_live(hub)


async def hub_live(hub: MemoryHub) -> set[NodeId]:
    return await MemoryRegistry(hub).live_nodes()


async def test_a_check_reaps_lapsed_nodes_and_tells_the_core_of_lost_ones() -> None:
    now = [100.0]
    hub = MemoryHub(clock=lambda: now[0])
    registry = FlakyRegistry(hub)
    harness = Harness(registry, clock=lambda: now[0])
    await registry.heartbeat(PEER, 1000)
    # A new node rejoins: nobody is judged for one node TTL (3 s).
    await harness.heartbeat.beat(first=True, after_outage=False)
    harness.core.remote = {PEER}
    assert not await harness.heartbeat.check_liveness()
    now[0] = 103.0
    # The peer's key lapsed, and ours (2 s) too: nobody is judged before we renew.
    assert await harness.heartbeat.check_liveness()
    assert harness.stats.reaped_nodes == 0
    await harness.heartbeat.beat(first=False, after_outage=False)
    assert not await harness.heartbeat.check_liveness()
    assert harness.stats.reaped_nodes == 1
    assert PEER in hub.tombstones
    assert harness.core.lost == [PEER]

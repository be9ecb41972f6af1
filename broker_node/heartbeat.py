"""This node's heartbeat and its peers' liveness: renew, reap the lapsed, tell the core of
lost nodes, restore or resynchronise this node's registry entries, and obey a fence.

The rules are in ``broker_node.core.liveness``; this module makes the registry calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from broker_node.cluster.base import Heartbeat, Registry
from broker_node.core.actions import Action, ForgetChannel, ForgetConnection
from broker_node.core.broker import ResumeRules
from broker_node.core.liveness import (
    GraceWindow,
    after_beat,
    heartbeat_ttl_ms,
    lost_nodes,
    nodes_to_reap,
    peer_check_interval,
    stale_entries,
)
from broker_node.core.records import ChannelRecord, ConnectionRecord, Reaped
from broker_node.core.stats import NodeStats
from broker_node.errors import BackendUnavailable
from broker_node.registry_calls import RegistryCalls
from broker_node.registry_writer import RegistryWriter
from shared.ids import ChannelId, ConnectionId, NodeId

logger = logging.getLogger("broker_node.heartbeat")

#: Close code for clients of a node that was reaped while it could not reach Redis.
CLOSE_SERVICE_RESTART: Final = 1012


class NodeRecords(Protocol):
    """What the heartbeat needs of the core: this node's entries and its judgements."""

    @property
    def resume(self) -> ResumeRules | None: ...

    @property
    def channels(self) -> Mapping[ChannelId, ChannelRecord]: ...

    def records(self) -> tuple[list[ConnectionRecord], list[ChannelRecord]]: ...

    def is_connected(self, connection_id: ConnectionId) -> bool: ...

    def pending_channel_ids(self) -> set[ChannelId]: ...

    def remote_nodes(self) -> set[NodeId]: ...

    def adopt(self, reaped: Reaped, lost_node: NodeId) -> list[Action]: ...

    def node_lost(self, node_id: NodeId) -> list[Action]: ...


class Inbox(Protocol):
    """What the heartbeat needs of the bus link."""

    @property
    def subscribed(self) -> bool: ...

    async def wait_subscribed(self) -> None: ...

    def resend_close_notices(self) -> None: ...


class Closable(Protocol):
    def close(self, code: int, reason: str) -> None: ...


class NodeHeartbeat:
    """Runs the liveness loop of one node."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        registry: Registry,
        standalone: bool,
        calls: RegistryCalls,
        writer: RegistryWriter,
        inbox: Inbox,
        core: NodeRecords,
        execute: Callable[[list[Action]], None],
        clients: Mapping[ConnectionId, Closable],
        stats: NodeStats,
        node_ttl: float,
        heartbeat_interval: float,
        request_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._node_id = node_id
        self._registry = registry
        self._standalone = standalone
        self._calls = calls
        self._writer = writer
        self._inbox = inbox
        self._core = core
        self._execute = execute
        self._clients = clients
        self._stats = stats
        self._heartbeat_interval = heartbeat_interval
        self._request_timeout = request_timeout
        self._clock = clock
        self._grace = GraceWindow(node_ttl)
        self.peer_check_interval = peer_check_interval(heartbeat_interval)
        self.heartbeat_ttl_ms = heartbeat_ttl_ms(
            node_ttl=node_ttl, heartbeat_interval=heartbeat_interval
        )

    async def liveness_loop(self) -> None:
        first = True
        failed = False
        next_beat = 0.0
        while True:
            try:
                started = self._clock()
                if failed or started >= next_beat:
                    await self.beat(first=first, after_outage=failed)
                    next_beat = started + self._heartbeat_interval
                    first = failed = False
                if await self.check_liveness():
                    # Our own key was missing: Redis lost its state (or we stalled). Renew
                    # (which restores our entries) before judging anyone.
                    await self.beat(first=False, after_outage=False)
                    next_beat = started + self._heartbeat_interval
                self._calls.backend_state(True)
            except BackendUnavailable as exc:
                logger.debug("liveness round failed: %s", exc)
                failed = True
                self._calls.backend_state(False, exc)
            await asyncio.sleep(self.peer_check_interval)

    async def beat(self, *, first: bool, after_outage: bool) -> None:
        beat = await self._calls.call(
            "heartbeat", self._registry.heartbeat(self._node_id, self.heartbeat_ttl_ms)
        )
        then = after_beat(
            fenced=beat is Heartbeat.FENCED,
            rejoined=beat is Heartbeat.REJOINED,
            first=first,
            after_outage=after_outage,
            dirty=self._writer.dirty,
        )
        if then.fence:
            await self._fenced()
            return
        if then.start_grace:
            self._grace.start(self._clock())
        if then.came_back_empty:
            logger.warning("cluster backend came back empty; restoring this node's state")
        if then.restore:
            await self._restore()
        elif then.resync:
            await self._resync()
        if then.resend_close_notices:
            self._inbox.resend_close_notices()

    async def check_liveness(self) -> bool:
        """Reap lapsed nodes and close channels to nodes that are gone. True when this node's
        own heartbeat was found missing (nothing was judged then)."""
        if self._standalone or not self._grace.judging(self._clock()):
            return False
        registry = self._registry
        call = self._calls.call
        core = self._core
        live = await call("live_nodes", registry.live_nodes())
        if self._node_id not in live:
            return True
        lapsed = await call("lapsed_nodes", registry.lapsed_nodes())
        for node_id in nodes_to_reap(lapsed, self._node_id):
            if core.resume is None:
                removed = await call("reap", registry.reap(node_id))
                if removed is not None:
                    self._stats.reaped_nodes += 1
                    logger.info("reaped lost node %s (%d channels)", node_id, len(removed))
                continue
            reaped = await call(
                "reap",
                registry.reap_adopting(node_id, self._node_id, int(time.time() * 1000)),
            )
            if reaped is not None:
                self._stats.reaped_nodes += 1
                logger.info(
                    "reaped lost node %s (%d channels; %d sessions adopted)",
                    node_id,
                    len(reaped.removed),
                    len(reaped.adopted),
                )
                self._execute(core.adopt(reaped, node_id))
        for node_id in lost_nodes(core.remote_nodes(), live):
            self._stats.lost_nodes += 1
            logger.info("node %s is gone; closing this node's channels to it", node_id)
            self._execute(core.node_lost(node_id))
        return False

    async def _restore(self) -> None:
        # Entries written back are found by other nodes at once: this node's inbox must be
        # listened to by then, or what they send reaches nobody.
        if not self._standalone and not self._inbox.subscribed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._request_timeout):
                    await self._inbox.wait_subscribed()
        core = self._core
        writer = self._writer
        connections, channels = core.records()
        # Cleared before the write: a write that fails meanwhile marks it again.
        writer.clear_dirty()
        try:
            await self._calls.call(
                "restore", self._registry.restore(self._node_id, connections, channels)
            )
        except BaseException:
            # Nothing else would write the entries back: the node is known again, so the
            # next beat says RENEWED, not REJOINED. Marked dirty, they are resynchronised.
            writer.mark_dirty()
            raise
        # What left while the records were being written was removed before they landed:
        # remove it again.
        for connection in connections:
            if not core.is_connected(connection.connection_id):
                writer.forget(ForgetConnection(connection))
        for channel in channels:
            if channel.channel_id not in core.channels:
                writer.forget(ForgetChannel(channel))

    async def _resync(self) -> None:
        """After writes whose outcome is unknown: make the registry hold exactly this node's
        live entries, without a moment in which a live entry is missing (no leave + restore):
        remove what is indexed under the node and is not live, then write the live again."""
        logger.info("resynchronising this node's registry entries after failed writes")
        writer = self._writer
        writer.clear_dirty()
        core = self._core
        call = self._calls.call
        try:
            indexed_connections, indexed_channels = await call(
                "node_index", self._registry.node_index(self._node_id)
            )
            live_connections, live_channels = core.records()
            stale = stale_entries(
                indexed_connections=indexed_connections,
                indexed_channels=indexed_channels,
                live_connections={c.connection_id for c in live_connections},
                live_channels={c.channel_id for c in live_channels},
                writing_connections=writer.writing_connections,
                writing_channels=writer.writing_channels,
                opening_channels=core.pending_channel_ids(),
            )
            await call(
                "prune", self._registry.prune(self._node_id, stale.connections, stale.channels)
            )
            await self._restore()
        except BackendUnavailable:
            writer.mark_dirty()
            raise

    async def _fenced(self) -> None:
        logger.warning(
            "this node was reaped while it could not reach the cluster; "
            "closing its %d clients so they reconnect cleanly",
            len(self._clients),
        )
        for client in list(self._clients.values()):
            client.close(CLOSE_SERVICE_RESTART, "Node was reaped; reconnect")
        # What the reaper removed must not come back: drop queued removals and start empty.
        self._writer.drop_queued_removals()
        await self._calls.call(
            "rejoin", self._registry.rejoin(self._node_id, self.heartbeat_ttl_ms)
        )

"""A broker node: the server, the core, the cluster backend and the background loops.

Lifecycle: ``start`` subscribes to the node's bus inbox, announces the node (heartbeat) and
listens; ``stop`` drains: not ready, stop accepting, stop reading clients and answer every
request already read, close clients with 1001 (their channels' peers are notified), publish
what is left, leave the registry, exit within the drain timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Iterator
from typing import Final, TypeVar

from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response
from websockets.server import ServerProtocol

from broker_node.auth.service import NodeAuth
from broker_node.client_table import LIMIT_LOG_INTERVAL, ClientTable
from broker_node.cluster.base import Backend, Heartbeat
from broker_node.cluster.factory import create_backend, masked_url
from broker_node.config import Settings
from broker_node.connection import ClientConnection, WriteScheduler
from broker_node.core.actions import (
    EndSession,
    ForgetChannel,
    ForgetConnection,
    LoadSession,
    MarkDetached,
    MoveChannels,
)
from broker_node.core.broker import AuthRules, BrokerCore, ResumeRules
from broker_node.core.envelopes import Closed, CloseRequest, Envelope, decode_batch
from broker_node.core.records import ChannelRecord
from broker_node.core.stats import NodeStats
from broker_node.dispatch import Dispatcher
from broker_node.errors import BackendUnavailable
from broker_node.executor import Executor
from broker_node.health import http_response, serve_metrics_connection
from broker_node.metrics import metrics_registry
from broker_node.outbox import Outbox
from broker_node.supervisor import Supervisor
from shared.codec import CLOSE_GOING_AWAY
from shared.ids import ChannelId, ConnectionId, NodeId, node_name

logger = logging.getLogger("broker_node.node")

_T = TypeVar("_T")

#: How often cross-node work is checked against the request timeout.
EXPIRY_INTERVAL: Final = 0.25
#: Keepalive pings go out in this many slices per ping interval.
KEEPALIVE_SLICES: Final = 20
#: Peers' liveness is checked this often (or once per heartbeat, if that is more often): a
#: cheap SMEMBERS + EXISTS pipeline. It is the slack between a heartbeat key's TTL and the
#: node TTL, so that a dead node's peers are told within the node TTL (see ``heartbeat_ttl``).
PEER_CHECK_INTERVAL: Final = 1.0
#: How often a drain checks whether every request it read has been answered.
DRAIN_POLL: Final = 0.005
#: Registry removals written per round trip by the registry writer.
REMOVAL_BATCH: Final = 500
#: Close notices kept to send again after an outage, and how often each is tried.
MAX_CLOSED_RETRY: Final = 10_000
CLOSED_ATTEMPTS: Final = 3
#: Close code for clients of a node that was reaped while it could not reach Redis.
CLOSE_SERVICE_RESTART: Final = 1012


class BrokerNode:
    """One node of the cluster (or the whole broker, when standalone)."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.node_id: NodeId = settings.node_id
        self.backend = backend if backend is not None else create_backend(settings)
        self.registry = self.backend.registry
        self.standalone = self.backend.standalone
        self.stats = NodeStats()
        # Authentication (issue 13): off (the original protocol) unless a key is configured.
        self.node_auth = NodeAuth(settings, self.node_id)
        self.auth = self.node_auth.setup
        auth_rules = None
        if self.auth is not None:
            auth_rules = AuthRules(
                self.auth.policy, timeout=settings.auth_timeout, grace=settings.auth_grace
            )
        self.core = BrokerCore(
            self.node_id,
            max_role_length=settings.max_role_length,
            max_unconfirmed=settings.max_unconfirmed,
            request_timeout=settings.request_timeout,
            clock=time.monotonic,
            stats=self.stats,
            first_seq=time.time_ns() // 1000,
            max_unconfirmed_bytes=settings.unconfirmed_bytes_bound,
            auth=auth_rules,
            wall_clock=time.time,
            max_channels=settings.max_channels_per_connection,
            list_page_size=settings.max_list_page,
            resume=_resume_rules(settings),
        )
        self.outbox = Outbox(
            self.backend.bus,
            on_undeliverable=self._undeliverable,
            on_unknown=self._unknown,
            on_published=self._published,
            on_retry=self._retried,
            batch_delay=settings.bus_batch_delay,
            retry_window=settings.request_timeout,
        )
        self.client_table: ClientTable[ClientConnection] = ClientTable(
            settings,
            core=self.core,
            # Late-bound: the executor, built next, reads the table's clients.
            execute=lambda actions: self.execute(actions),
            auth=self.node_auth,
            stats=self.stats,
            keepalive_slices=KEEPALIVE_SLICES,
        )
        self.clients = self.client_table.clients
        self.sockets = self.client_table.sockets
        self.executor = Executor(
            clients=self.clients,
            core=self.core,
            publish=self.outbox.put,
            registry=self,
            rebind=self.client_table.rebind,
        )
        #: The executor's own method, not a wrapper: it is called for every message.
        self.execute = self.executor.execute
        self.writes = WriteScheduler(self.core, self.execute)
        self.dispatcher = Dispatcher(
            node_id=self.node_id,
            core=self.core,
            execute=self.execute,
            registry=self.registry,
            calls=self,
            writes=self,
            auth=self.node_auth,
            clients=self.clients,
            bad_frame=self.client_table.bad_frame,
            standalone=self.standalone,
            max_list_page=settings.max_list_page,
        )
        self.supervisor = Supervisor(on_state=self._loop_state)
        self.metrics = metrics_registry(self)
        self.server: asyncio.Server | None = None
        self.port: int = settings.port
        self.draining = False
        self.started = False
        self.subscribed = False
        self.backend_up = True
        self._registry_backlog: deque[ForgetChannel | ForgetConnection] = deque()
        #: Session resume's registry work (issue 14), done in order by the session writer.
        self._session_work: deque[MarkDetached | EndSession | MoveChannels | LoadSession] = deque()
        self._session_wake = asyncio.Event()
        #: Connections and channels whose registry write is under way: live for a resync.
        self._writing_connections: set[ConnectionId] = set()
        self._writing_channels: set[ChannelId] = set()
        self._registry_wake = asyncio.Event()
        self._registry_dirty = False
        self._subscribed_event = asyncio.Event()
        self._liveness_grace_until = 0.0
        self._closed_retry: list[tuple[NodeId, Closed, int]] = []
        self._closed_attempts: dict[tuple[NodeId, Closed], int] = {}
        self._stopped = asyncio.Event()
        self._no_sockets = self.client_table.no_sockets
        # --- hostile input and resource limits (issue 15)
        self._dropped_logged_at = -LIMIT_LOG_INTERVAL
        self.metrics_server: asyncio.Server | None = None

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.writes.start(asyncio.get_running_loop())
        self.supervisor.start("bus-subscriber", self._subscriber_loop)
        self.supervisor.start("registry-writer", self._registry_writer_loop)
        self.supervisor.start("session-writer", self._session_writer_loop)
        self.supervisor.start("expiry", self._expiry_loop)
        if self.settings.ping_interval > 0:
            self.supervisor.start("keepalive", self._keepalive_loop)
        await self.node_auth.start(
            self.supervisor,
            check_tokens=lambda: self.execute(self.core.check_tokens()),
            on_revoked=lambda: self.execute(self.core.revoke(self.node_auth.is_revoked)),
        )
        if not self.backend.standalone:
            logger.info("cluster backend %s", self._backend_name)
            # A fresh node waits for its inbox so that nobody publishes to it in vain.
            try:
                async with asyncio.timeout(self.settings.request_timeout * 2):
                    await self._subscribed_event.wait()
            except TimeoutError:
                logger.warning("bus subscription not ready yet; starting not-ready")
        self.supervisor.start("liveness", self._liveness_loop)
        try:
            await self._listen()
        except OSError:
            # A busy port or an unknown host: undo the start quietly, the caller says why.
            await self._abandon_start()
            raise
        self.started = True
        mode = "standalone" if self.backend.standalone else "cluster"
        logger.info(
            "listening on %s:%d (%s, node %s)", self.settings.host, self.port, mode, self.node_id
        )
        if node_name(self.node_id) != self.node_id:
            logger.info(
                "node name %s, this start's id %s: a restart under the same name is a new node",
                node_name(self.node_id),
                self.node_id,
            )

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: ClientConnection(self),
            self.settings.host,
            self.settings.port,
            reuse_address=True,
            backlog=1024,
        )
        sockets = self.server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        if self.settings.metrics_port is not None:
            self.metrics_server = await asyncio.start_server(
                lambda reader, writer: serve_metrics_connection(self, reader, writer),
                self.settings.metrics_host or self.settings.host,
                self.settings.metrics_port,
                reuse_address=True,
                limit=self.settings.max_header_bytes,
            )

    async def _abandon_start(self) -> None:
        self._stopped.set()
        self.draining = True
        if self.server is not None:
            self.server.close()
        await self.supervisor.stop()
        with contextlib.suppress(BackendUnavailable, TimeoutError):
            async with asyncio.timeout(self.settings.request_timeout):
                await self.registry.leave(self.node_id)
        await self.node_auth.aclose()
        await self.backend.aclose()

    async def __aenter__(self) -> BrokerNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Drain and stop; safe to call more than once."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.draining = True
        logger.info("draining: closing %d clients", len(self.clients))
        try:
            async with asyncio.timeout(self.settings.drain_timeout):
                await self._drain()
        except TimeoutError:
            logger.warning("drain timed out after %.1fs", self.settings.drain_timeout)
        if self.server is not None:
            self.server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        for sock in list(self.sockets):
            sock.abort()
        await self.supervisor.stop()
        await self.node_auth.aclose()
        await self.backend.aclose()
        logger.info("stopped")

    async def _drain(self) -> None:
        # The listening socket stays open until the end so that probes see /readyz answer
        # 503 (and the load balancer moves on) rather than a refused connection; new
        # WebSocket upgrades are refused with 503 meanwhile (see ClientConnection).
        await self._answer_what_was_read()
        # Resumable sessions are told to resume elsewhere (4100) and wait here, detached, to
        # be handed over; the other clients are closed as always.
        self.execute(self.core.drain_sessions())
        for client in list(self.clients.values()):
            client.close(CLOSE_GOING_AWAY, "Server shutting down")
            # Reading again lets the closing handshake complete; frames that arrive now are
            # past the close and never handled.
            client.resume_reading("drain")
        self.writes.flush_all()
        await self.outbox.wait_idle()
        # Give clients a moment to answer the closing handshake; then the TCP goes anyway.
        if self.sockets:
            self._no_sockets.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(2.0, self.settings.drain_timeout / 2)):
                    await self._no_sockets.wait()
        await self._hand_off_sessions()
        try:
            await self.registry.leave(self.node_id)
        except BackendUnavailable:
            logger.warning("could not remove this node's registry entries (Redis unavailable)")

    async def _hand_off_sessions(self) -> None:
        """Wait for the drained sessions' clients to resume elsewhere (each resume takes its
        session over), up to half the drain timeout; hand what is left to a live node, or end
        it when there is none."""
        core = self.core
        if core.resume is None:
            return
        deadline = time.monotonic() + self.settings.drain_timeout / 2
        # Polled, as the drain's other waits: several resumes come in from other nodes.
        while core.detached_sessions() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL * 10)
        left = core.detached_sessions()
        if not left:
            await self._wait_session_work()
            return
        peers: list[NodeId] = []
        if not self.standalone:
            with contextlib.suppress(BackendUnavailable):
                live = await self._registry_call("live_nodes", self.registry.live_nodes())
                peers = sorted(live - {self.node_id})
        for index, session_id in enumerate(left):
            if not peers:
                self.execute(core.session_ended(session_id, True))
                continue
            peer = peers[index % len(peers)]
            moved = False
            with contextlib.suppress(BackendUnavailable):
                moved = await self._registry_call(
                    "transfer_session",
                    self.registry.transfer_session(session_id, self.node_id, peer),
                )
            if moved:
                self.execute(core.hand_off(session_id, peer))
            else:
                self.execute(core.session_ended(session_id, True))
        await self.outbox.wait_idle()
        await self._wait_session_work()

    async def _wait_session_work(self) -> None:
        # Polled: the session writer empties its queue one registry call at a time.
        while self._session_work:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL)

    async def _answer_what_was_read(self) -> None:
        """Stop reading every client, then wait until every request read so far is answered:
        no request waits in a backlog, no cross-node message or open awaits another node,
        nothing waits to be published. What a client sends from now on is never read: it
        gets no reply and has no effect. Bounded by half the drain timeout (the rest is for
        closing); cross-node work is bounded by the request timeout anyway."""
        for client in list(self.clients.values()):
            client.pause_reading("drain")
        try:
            async with asyncio.timeout(self.settings.drain_timeout / 2):
                # Polled: the work finishes in the core, in backlogs and in the outbox, and no
                # one event says all of it is done; the drain runs once per process.
                while (  # noqa: ASYNC110
                    any(client.requests_pending for client in self.clients.values())
                    or self.core.pending_counts() != (0, 0)
                    # Same-node messages wait for their recipient's socket to take them.
                    or any(conn.unconfirmed for conn in self.core.connections.values())
                    or len(self.outbox)
                ):
                    await asyncio.sleep(DRAIN_POLL)
                await self.outbox.wait_idle()
        except TimeoutError:
            logger.warning(
                "drain: requests still unanswered after %.1fs", self.settings.drain_timeout / 2
            )
        self.writes.flush_all()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    @property
    def ready(self) -> bool:
        if not self.started or self.draining:
            return False
        if self.backend.standalone:
            return True
        return self.subscribed and self.backend_up

    def _loop_state(self, name: str, up: bool) -> None:
        if name == "bus-subscriber":
            self.subscribed = up

    # --- connections ------------------------------------------------------------------------

    @property
    def handshaking_count(self) -> int:
        return self.client_table.handshaking_count

    def http_response(self, ws: ServerProtocol, request: HttpRequest) -> Response:
        return http_response(self, ws, request)

    # --- executing decisions ----------------------------------------------------------------

    async def _registry_call(self, operation: str, call: Awaitable[_T]) -> _T:
        started = time.perf_counter()
        failed = True
        error: BaseException | None = None
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                result = await call
            failed = False
            return result
        except TimeoutError as exc:
            error = BackendUnavailable(operation, exc)
            raise error from exc
        except asyncio.CancelledError:
            # The node is stopping: that says nothing about the backend.
            failed = False
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.stats.registry_call(operation, time.perf_counter() - started, failed)
            if failed:
                self._backend_state(False, error)

    @property
    def _backend_name(self) -> str:
        url = self.settings.redis_url
        return masked_url(url) if url is not None else "in memory"

    def _backend_state(self, up: bool, error: BaseException | None = None) -> None:
        # Logged once per transition, never per request.
        if up and not self.backend_up:
            logger.info("cluster backend is back")
        elif not up and self.backend_up:
            logger.warning(
                "cluster backend lost (%s: %s); requests that need it fail until it is back",
                self._backend_name,
                error,
            )
        self.backend_up = up

    # --- the registry in the background -----------------------------------------------------

    # RegistryCaller (dispatch.py), served here until registry calls have their own module.
    call = _registry_call

    # RegistryWrites (executor.py), served here until the registry writer has its own module.
    def forget(self, action: ForgetChannel | ForgetConnection) -> None:
        self._forget(action)

    def queue_session_work(
        self, action: MarkDetached | EndSession | MoveChannels | LoadSession
    ) -> None:
        self._session_work.append(action)
        self._session_wake.set()

    def mark_dirty(self) -> None:
        self._registry_dirty = True

    @contextlib.contextmanager
    def writing_connection(self, connection_id: ConnectionId) -> Iterator[None]:
        self._writing_connections.add(connection_id)
        try:
            yield
        finally:
            self._writing_connections.discard(connection_id)

    @contextlib.contextmanager
    def writing_channel(self, channel_id: ChannelId) -> Iterator[None]:
        self._writing_channels.add(channel_id)
        try:
            yield
        finally:
            self._writing_channels.discard(channel_id)

    def _forget(self, action: ForgetChannel | ForgetConnection) -> None:
        # No bound: the queue holds at most one entry per connection and channel this node
        # had, and the writer takes it in batches.
        if (
            type(action) is ForgetConnection
            and action.then
            and (self.draining or not self.backend_up)
        ):
            # Leaving (the node's entries go with it) or Redis away (the removal waits for a
            # resync): the notices must not wait for that.
            self.execute(list(action.then))
            action = ForgetConnection(action.record)
        self._registry_backlog.append(action)
        self._registry_wake.set()

    def _notify_forgotten(self, batch: list[ForgetChannel | ForgetConnection]) -> None:
        for action in batch:
            if type(action) is ForgetConnection and action.then:
                self.execute(list(action.then))

    async def _registry_writer_loop(self) -> None:
        backlog = self._registry_backlog
        while True:
            await self._registry_wake.wait()
            self._registry_wake.clear()
            while backlog:
                batch = [backlog.popleft() for _ in range(min(REMOVAL_BATCH, len(backlog)))]
                channels = [a.record for a in batch if isinstance(a, ForgetChannel)]
                connections = [a.record for a in batch if isinstance(a, ForgetConnection)]
                try:
                    if channels:
                        await self._registry_call(
                            "remove_channels", self.registry.remove_channels(channels)
                        )
                    if connections:
                        await self._registry_call(
                            "remove_connections", self.registry.remove_connections(connections)
                        )
                except BackendUnavailable:
                    # Whatever is still queued is not live either: the resync, once the
                    # backend is back, removes it with every other entry that is not live.
                    batch += backlog
                    backlog.clear()
                    self._registry_dirty = True
                self._notify_forgotten(batch)

    async def _session_writer_loop(self) -> None:
        """Session resume's registry work, in order; each answer goes back to the core."""
        work = self._session_work
        registry = self.registry
        while True:
            await self._session_wake.wait()
            self._session_wake.clear()
            while work:
                action = work.popleft()
                try:
                    if type(action) is MarkDetached:
                        await self._registry_call(
                            "mark_detached",
                            registry.mark_detached(
                                action.record.connection_id, self.node_id, action.at_ms
                            ),
                        )
                    elif type(action) is EndSession:
                        ended = await self._registry_call(
                            "end_session", registry.end_session(action.record)
                        )
                        self.execute(self.core.session_ended(action.record.connection_id, ended))
                    elif type(action) is MoveChannels:
                        await self._registry_call(
                            "move_channels",
                            registry.move_channels(list(action.records), action.from_node),
                        )
                    elif type(action) is LoadSession:
                        channels = await self._session_channels(
                            action.connection_id, action.previous_node
                        )
                        self.execute(self.core.install_lost(action.connection_id, channels))
                except BackendUnavailable:
                    if type(action) is EndSession:
                        # Tried again at the next expiry check.
                        self.execute(self.core.session_retry(action.record.connection_id))
                    elif type(action) is LoadSession:
                        self.execute(self.core.install_lost(action.connection_id, None))
                    else:
                        self._registry_dirty = True

    async def _session_channels(
        self, session_id: ConnectionId, previous_node: NodeId
    ) -> list[ChannelRecord]:
        """The channels of a session, per the registry: among those indexed under the node
        that held it (and under this node, where a resume may have moved some already)."""
        found: list[ChannelRecord] = []
        ids: set[ChannelId] = set()
        for node_id in {previous_node, self.node_id}:
            _, channels = await self._registry_call("node_index", self.registry.node_index(node_id))
            ids |= channels
        for channel_id in sorted(ids):
            record = await self._registry_call(
                "find_channel", self.registry.find_channel(channel_id)
            )
            if record is not None and record.peer_of(session_id) is not None:
                found.append(record)
        return found

    # --- the bus ----------------------------------------------------------------------------

    async def _subscriber_loop(self) -> None:
        # A lost subscription is made again at once: while it is missing, what other nodes
        # send here reaches nobody (their outboxes retry for a while). Only repeated failures
        # wait, a little longer each time.
        failures = 0
        while True:
            try:
                bus = self.backend.bus
                async with bus.subscribe(self.node_id, self._on_bus_payload) as subscription:
                    if not self.subscribed:
                        logger.info("subscribed to this node's bus inbox")
                    self.subscribed = True
                    self._subscribed_event.set()
                    failures = 0
                    await subscription.wait_lost()
            except BackendUnavailable as exc:
                if self.subscribed:
                    logger.warning("bus subscription lost; resubscribing")
                elif not failures:
                    logger.warning(
                        "cannot subscribe to this node's bus inbox at %s (%s); retrying",
                        self._backend_name,
                        exc,
                    )
                self.subscribed = False
                self._subscribed_event.clear()
                if failures:
                    await asyncio.sleep(min(0.05 * 2**failures, 1.0))
                failures += 1

    def _on_bus_payload(self, payload: bytes) -> None:
        envelopes, dropped = decode_batch(payload)
        if dropped:
            # The others of the batch are still handled. Logged at most once per interval:
            # a flood of bad envelopes must not flood the log (the counter has them all).
            self.stats.bus_envelopes_dropped += dropped
            self._log_dropped_envelopes(dropped, len(payload))
        self.stats.bus_batches_in += 1
        self.execute(self.core.on_bus(envelopes))

    def _log_dropped_envelopes(self, dropped: int, size: int) -> None:
        now = time.monotonic()
        if now - self._dropped_logged_at >= LIMIT_LOG_INTERVAL:
            self._dropped_logged_at = now
            logger.warning(
                "dropped %d undecodable bus envelope(s) of a %d-byte payload (%d so far)",
                dropped,
                size,
                self.stats.bus_envelopes_dropped,
            )

    def _undeliverable(self, node_id: NodeId, envelopes: list[Envelope]) -> None:
        """``node_id`` did not listen on its inbox for a whole retry window."""
        self._keep_close_notices(node_id, envelopes)
        self.execute(self.core.undeliverable(node_id, envelopes))

    def _unknown(self, node_id: NodeId, envelopes: list[Envelope]) -> None:
        """Redis did not answer: these may or may not reach ``node_id``. What waits on them
        is answered when its deadline passes ("not confirmed in time": outcome unknown)."""
        self._keep_close_notices(node_id, envelopes)

    def _keep_close_notices(self, node_id: NodeId, envelopes: list[Envelope]) -> None:
        # A close notice that may not have gone out is sent again once Redis answers (it is
        # idempotent there): otherwise the far end could keep a channel that is gone. A few
        # attempts, then it is dropped (its node is likely gone too, and then its clients
        # were told).
        for envelope in envelopes:
            if isinstance(envelope, CloseRequest):
                envelope = Closed(envelope.channel_id, envelope.recipient)
            if isinstance(envelope, Closed) and len(self._closed_retry) < MAX_CLOSED_RETRY:
                attempts = self._closed_attempts.pop((node_id, envelope), 0) + 1
                if attempts <= CLOSED_ATTEMPTS:
                    self._closed_retry.append((node_id, envelope, attempts))

    def _retried(self, count: int) -> None:
        self.stats.bus_retries += count

    def _resend_closed(self) -> None:
        retry, self._closed_retry = self._closed_retry, []
        for node_id, envelope, attempts in retry:
            self._closed_attempts[(node_id, envelope)] = attempts
            self.outbox.put(node_id, envelope)
        # Attempts of notices that went through are not needed any more; keep the map small.
        if len(self._closed_attempts) > MAX_CLOSED_RETRY:
            self._closed_attempts.clear()

    def _published(self, seconds: float, count: int) -> None:
        self.stats.bus_publishes += count
        self.stats.bus_publish_seconds += seconds

    # --- time -------------------------------------------------------------------------------

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL)
            self.execute(self.core.expire())

    async def _keepalive_loop(self) -> None:
        # Clients are pinged a slice at a time, each slice once per interval: tens of thousands
        # of pings in one loop turn would stall every message behind them.
        interval = self.settings.ping_interval
        timeout = self.settings.ping_timeout
        loop = asyncio.get_running_loop()
        current = 0
        while True:
            await asyncio.sleep(interval / KEEPALIVE_SLICES)
            now = loop.time()
            for client in list(self.clients.values()):
                if client.keepalive_slice == current:
                    client.keepalive(now, timeout)
            current = (current + 1) % KEEPALIVE_SLICES

    # --- liveness: heartbeat, reaping, restore ----------------------------------------------

    @property
    def peer_check_interval(self) -> float:
        return min(PEER_CHECK_INTERVAL, self.settings.heartbeat_interval)

    @property
    def heartbeat_ttl_ms(self) -> int:
        """The TTL of this node's heartbeat key: the node TTL less one peer check interval.

        A node killed right after renewing its key is gone from Redis one key TTL later; its
        peers notice at their next check, at most one interval after that: within the node
        TTL. When the heartbeat interval leaves no room for that slack, the key keeps the
        full node TTL (and the bound is the node TTL plus one check interval).
        """
        settings = self.settings
        ttl = settings.node_ttl - self.peer_check_interval
        if ttl <= settings.heartbeat_interval:
            ttl = settings.node_ttl
        return int(ttl * 1000)

    async def _liveness_loop(self) -> None:
        first = True
        failed = False
        next_beat = 0.0
        while True:
            try:
                started = time.monotonic()
                if failed or started >= next_beat:
                    await self._beat(first=first, after_outage=failed)
                    next_beat = started + self.settings.heartbeat_interval
                    first = failed = False
                if await self._check_liveness():
                    # Our own key was missing: Redis lost its state (or we stalled). Renew
                    # (which restores our entries) before judging anyone.
                    await self._beat(first=False, after_outage=False)
                    next_beat = started + self.settings.heartbeat_interval
                self._backend_state(True)
            except BackendUnavailable as exc:
                logger.debug("liveness round failed: %s", exc)
                failed = True
                self._backend_state(False, exc)
            await asyncio.sleep(self.peer_check_interval)

    async def _beat(self, *, first: bool, after_outage: bool) -> None:
        registry = self.registry
        beat = await self._registry_call(
            "heartbeat", registry.heartbeat(self.node_id, self.heartbeat_ttl_ms)
        )
        if beat is Heartbeat.FENCED:
            await self._fenced()
            return
        if beat is Heartbeat.REJOINED or after_outage:
            # Every node's heartbeat may have lapsed while Redis was away (or vanished with an
            # empty Redis): give them a TTL to renew before judging them. Reaping a node now
            # would close its clients for an outage that was nobody's fault.
            self._liveness_grace_until = time.monotonic() + self.settings.node_ttl
        if beat is Heartbeat.REJOINED:
            if not first:
                logger.warning("cluster backend came back empty; restoring this node's state")
            await self._restore()
        elif self._registry_dirty:
            await self._resync()
        if self._closed_retry:
            self._resend_closed()

    async def _check_liveness(self) -> bool:
        """Reap lapsed nodes and close channels to nodes that are gone. True when this node's
        own heartbeat was found missing (nothing was judged then)."""
        if self.backend.standalone or time.monotonic() < self._liveness_grace_until:
            return False
        registry = self.registry
        live = await self._registry_call("live_nodes", registry.live_nodes())
        if self.node_id not in live:
            return True
        lapsed = await self._registry_call("lapsed_nodes", registry.lapsed_nodes())
        for node_id in lapsed:
            if node_id == self.node_id:
                continue
            if self.core.resume is None:
                removed = await self._registry_call("reap", registry.reap(node_id))
                if removed is not None:
                    self.stats.reaped_nodes += 1
                    logger.info("reaped lost node %s (%d channels)", node_id, len(removed))
                continue
            reaped = await self._registry_call(
                "reap",
                registry.reap_adopting(node_id, self.node_id, int(time.time() * 1000)),
            )
            if reaped is not None:
                self.stats.reaped_nodes += 1
                logger.info(
                    "reaped lost node %s (%d channels; %d sessions adopted)",
                    node_id,
                    len(reaped.removed),
                    len(reaped.adopted),
                )
                self.execute(self.core.adopt(reaped, node_id))
        # A node holding the other end of a channel here is lost once its heartbeat is gone
        # (lapsed, reaped by anyone, or left). A resync never removes a heartbeat, and an
        # empty Redis is recognised above by our own missing key.
        for node_id in self.core.remote_nodes() - live:
            self.stats.lost_nodes += 1
            logger.info("node %s is gone; closing this node's channels to it", node_id)
            self.execute(self.core.node_lost(node_id))
        return False

    async def _restore(self) -> None:
        # Entries written back are found by other nodes at once: this node's inbox must be
        # listened to by then, or what they send reaches nobody.
        if not self.backend.standalone and not self.subscribed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.request_timeout):
                    await self._subscribed_event.wait()
        core = self.core
        connections, channels = core.records()
        self._registry_dirty = False
        await self._registry_call(
            "restore", self.registry.restore(self.node_id, connections, channels)
        )
        # What left while the records were being written was removed before they landed:
        # remove it again.
        for connection in connections:
            if not core.is_connected(connection.connection_id):
                self._forget(ForgetConnection(connection))
        for channel in channels:
            if channel.channel_id not in core.channels:
                self._forget(ForgetChannel(channel))

    async def _resync(self) -> None:
        """After writes whose outcome is unknown: make the registry hold exactly this node's
        live entries, without a moment in which a live entry is missing (no leave + restore):
        remove what is indexed under the node and is not live, then write the live again."""
        logger.info("resynchronising this node's registry entries after failed writes")
        self._registry_dirty = False
        core = self.core
        try:
            indexed_connections, indexed_channels = await self._registry_call(
                "node_index", self.registry.node_index(self.node_id)
            )
            live_connections, live_channels = core.records()
            stale_connections = (
                indexed_connections
                - {c.connection_id for c in live_connections}
                - self._writing_connections
            )
            stale_channels = (
                indexed_channels
                - {c.channel_id for c in live_channels}
                - self._writing_channels
                - core.pending_channel_ids()
            )
            await self._registry_call(
                "prune",
                self.registry.prune(
                    self.node_id, sorted(stale_connections), sorted(stale_channels)
                ),
            )
            await self._restore()
        except BackendUnavailable:
            self._registry_dirty = True
            raise

    async def _fenced(self) -> None:
        logger.warning(
            "this node was reaped while it could not reach the cluster; "
            "closing its %d clients so they reconnect cleanly",
            len(self.clients),
        )
        for client in list(self.clients.values()):
            client.close(CLOSE_SERVICE_RESTART, "Node was reaped; reconnect")
        # What the reaper removed must not come back: drop queued removals and start empty.
        self._notify_forgotten(list(self._registry_backlog))
        self._registry_backlog.clear()
        self._registry_dirty = False
        await self._registry_call(
            "rejoin", self.registry.rejoin(self.node_id, self.heartbeat_ttl_ms)
        )


def _resume_rules(settings: Settings) -> ResumeRules | None:
    if settings.resume_window <= 0:
        return None
    return ResumeRules(
        settings.resume_window,
        settings.resume_max_frames,
        settings.resume_max_bytes,
        # A lost node is reaped within the node TTL; its adopter then says where each of its
        # sessions' channel ends went. Twice that, and the channel closes as before.
        orphan_timeout=2 * settings.node_ttl + settings.request_timeout,
    )

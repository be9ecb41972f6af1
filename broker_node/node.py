"""A broker node: the wiring of the server, the core, the cluster backend and the loops.

Lifecycle: ``start`` subscribes to the node's bus inbox, announces the node (heartbeat) and
listens; ``stop`` drains (see ``drain.py``): not ready, stop accepting, answer every request
already read, close clients with 1001, publish what is left, leave the registry, exit within
the drain timeout.

Who does what: a ``ClientConnection`` (connection.py) reads frames and hands each request to
the ``Dispatcher`` (dispatch.py), which asks the ``BrokerCore`` (core/, pure) for a decision,
consulting the registry through ``RegistryCalls`` when the node cannot decide alone; the
``Executor`` (executor.py) carries out the core's actions: frames to sockets (written once per
loop turn by the ``WriteScheduler``), envelopes to the ``BusLink``'s outbox, registry removals
and session work to the ``RegistryWriter``. The ``ClientTable`` keeps the sockets and
admission limits, the ``NodeHeartbeat`` the node's liveness, the ``StatusBoard`` the frozen
``NodeStatus`` that /readyz and /metrics read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response
from websockets.server import ServerProtocol

from broker_node.auth.service import NodeAuth
from broker_node.bus_link import BusLink
from broker_node.client_table import ClientTable
from broker_node.cluster.base import Backend
from broker_node.cluster.factory import create_backend
from broker_node.config import Settings
from broker_node.connection import ClientConnection, WriteScheduler
from broker_node.core.actions import Action
from broker_node.core.broker import AuthRules, BrokerCore, ResumeRules
from broker_node.core.stats import NodeStats
from broker_node.dispatch import Dispatcher
from broker_node.drain import Drain
from broker_node.errors import BackendUnavailable
from broker_node.executor import Executor
from broker_node.health import HealthEndpoints
from broker_node.heartbeat import NodeHeartbeat
from broker_node.metrics import NodeCollector, metrics_registry
from broker_node.registry_calls import RegistryCalls
from broker_node.registry_writer import RegistryWriter
from broker_node.status import NodeStatus, StatusBoard
from broker_node.supervisor import Supervisor
from broker_node.timers import KEEPALIVE_SLICES, expiry_loop, keepalive_loop
from shared.ids import NodeId, node_name

logger = logging.getLogger("broker_node.node")


class BrokerNode:
    """One node of the cluster (or the whole broker, when standalone)."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.node_id: NodeId = settings.node_id
        self.backend = backend if backend is not None else create_backend(settings)
        self.registry = self.backend.registry
        self.standalone = self.backend.standalone
        self.stats = NodeStats()
        #: What the node says about itself (/readyz, /metrics), replaced whole on each change.
        self.status_board = StatusBoard(NodeStatus(self.node_id, self.standalone))
        self.registry_calls = RegistryCalls(
            stats=self.stats,
            request_timeout=settings.request_timeout,
            redis_url=settings.redis_url,
            on_state=self.status_board.on_backend,
        )
        # Authentication (issue 13): off (the original protocol) unless a key is configured.
        self.node_auth = NodeAuth(settings, self.node_id)
        self.auth = self.node_auth.setup
        self.core = BrokerCore(
            self.node_id,
            max_role_length=settings.max_role_length,
            max_unconfirmed=settings.max_unconfirmed,
            request_timeout=settings.request_timeout,
            clock=time.monotonic,
            stats=self.stats,
            first_seq=time.time_ns() // 1000,
            max_unconfirmed_bytes=settings.unconfirmed_bytes_bound,
            auth=_auth_rules(self.node_auth, settings),
            wall_clock=time.time,
            max_channels=settings.max_channels_per_connection,
            list_page_size=settings.max_list_page,
            resume=_resume_rules(settings),
        )
        # The parts built before the executor reach it late-bound; none of them runs per
        # message (a bus batch is executed once, whatever its size).
        execute_late = self._execute_late
        self.bus_link = BusLink(
            node_id=self.node_id,
            bus=self.backend.bus,
            stats=self.stats,
            backend_name=self.registry_calls.backend_name,
            on_bus=self.core.on_bus,
            undeliverable=self.core.undeliverable,
            execute=execute_late,
            on_subscribed=self.status_board.on_subscribed,
            batch_delay=settings.bus_batch_delay,
            retry_window=settings.request_timeout,
        )
        self.outbox = self.bus_link.outbox
        self.registry_writer = RegistryWriter(
            node_id=self.node_id,
            registry=self.registry,
            calls=self.registry_calls,
            answers=self.core,
            execute=execute_late,
            draining=lambda: self.draining,
        )
        self.client_table: ClientTable[ClientConnection] = ClientTable(
            settings,
            core=self.core,
            execute=execute_late,
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
            registry=self.registry_writer,
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
            calls=self.registry_calls,
            writes=self.registry_writer,
            auth=self.node_auth,
            clients=self.clients,
            bad_frame=self.client_table.bad_frame,
            standalone=self.standalone,
            max_list_page=settings.max_list_page,
        )
        self.heartbeat = NodeHeartbeat(
            node_id=self.node_id,
            registry=self.registry,
            standalone=self.standalone,
            calls=self.registry_calls,
            writer=self.registry_writer,
            inbox=self.bus_link,
            core=self.core,
            execute=self.execute,
            clients=self.clients,
            stats=self.stats,
            node_ttl=settings.node_ttl,
            heartbeat_interval=settings.heartbeat_interval,
            request_timeout=settings.request_timeout,
        )
        self.supervisor = Supervisor(on_state=self._loop_state)
        self.metrics = metrics_registry(
            NodeCollector(
                self.status_board,
                self.stats,
                self.core,
                outbox_length=self.outbox.__len__,
                handshaking_count=lambda: self.client_table.handshaking_count,
            )
        )
        self.health = HealthEndpoints(
            self.status_board,
            self.metrics,
            metrics_on_client_port=settings.metrics_port is None,
            handshake_timeout=settings.handshake_timeout,
        )
        self.drain = Drain(
            node_id=self.node_id,
            standalone=self.standalone,
            drain_timeout=settings.drain_timeout,
            core=self.core,
            clients=self.clients,
            execute=self.execute,
            flush_all=self.writes.flush_all,
            outbox=self.outbox,
            registry=self.registry,
            calls=self.registry_calls,
            sockets=self.sockets,
            no_sockets=self.client_table.no_sockets,
            wait_session_work=self.registry_writer.wait_session_work,
        )
        self.server: asyncio.Server | None = None
        self.metrics_server: asyncio.Server | None = None
        self.port: int = settings.port
        self._stopped = asyncio.Event()

    def _execute_late(self, actions: list[Action]) -> None:
        self.execute(actions)

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self.writes.start(asyncio.get_running_loop())
        self.supervisor.start("bus-subscriber", self.bus_link.subscriber_loop)
        self.supervisor.start("registry-writer", self.registry_writer.removal_loop)
        self.supervisor.start("session-writer", self.registry_writer.session_loop)
        self.supervisor.start("expiry", lambda: expiry_loop(self.core.expire, self.execute))
        if self.settings.ping_interval > 0:
            self.supervisor.start(
                "keepalive",
                lambda: keepalive_loop(
                    self.clients,
                    interval=self.settings.ping_interval,
                    timeout=self.settings.ping_timeout,
                ),
            )
        await self.node_auth.start(
            self.supervisor,
            check_tokens=lambda: self.execute(self.core.check_tokens()),
            on_revoked=lambda: self.execute(self.core.revoke(self.node_auth.is_revoked)),
        )
        if not self.standalone:
            logger.info("cluster backend %s", self.registry_calls.backend_name)
            # A fresh node waits for its inbox so that nobody publishes to it in vain.
            try:
                async with asyncio.timeout(self.settings.request_timeout * 2):
                    await self.bus_link.wait_subscribed()
            except TimeoutError:
                logger.warning("bus subscription not ready yet; starting not-ready")
        self.supervisor.start("liveness", self.heartbeat.liveness_loop)
        try:
            await self._listen()
        except OSError:
            # A busy port or an unknown host: undo the start quietly, the caller says why.
            await self._abandon_start()
            raise
        self.status_board.update(started=True)
        mode = "standalone" if self.standalone else "cluster"
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
                self.health.serve_metrics_connection,
                self.settings.metrics_host or self.settings.host,
                self.settings.metrics_port,
                reuse_address=True,
                limit=self.settings.max_header_bytes,
            )

    async def _abandon_start(self) -> None:
        self._stopped.set()
        self.status_board.update(draining=True)
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
        self.status_board.update(draining=True)
        logger.info("draining: closing %d clients", len(self.clients))
        try:
            async with asyncio.timeout(self.settings.drain_timeout):
                await self.drain.run()
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

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    # --- what the connections and the tests read ------------------------------------------

    @property
    def status(self) -> NodeStatus:
        return self.status_board.current

    @property
    def ready(self) -> bool:
        return self.status_board.current.ready

    @property
    def draining(self) -> bool:
        return self.status_board.current.draining

    def http_response(self, ws: ServerProtocol, request: HttpRequest) -> Response:
        return self.health.http_response(ws, request)

    def _loop_state(self, name: str, up: bool) -> None:
        if name == "bus-subscriber" and not up:
            self.bus_link.subscriber_down()


def _auth_rules(node_auth: NodeAuth, settings: Settings) -> AuthRules | None:
    if node_auth.setup is None:
        return None
    return AuthRules(
        node_auth.setup.policy, timeout=settings.auth_timeout, grace=settings.auth_grace
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

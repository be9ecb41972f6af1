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
import resource
import time
from collections import Counter
from typing import Final

from websockets.frames import CloseCode
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response
from websockets.server import ServerProtocol

from broker_node.admission import client_address, origin_allowed, parse_networks
from broker_node.auth.identity import TokenRefusal
from broker_node.auth.service import NodeAuth
from broker_node.bus_link import BusLink
from broker_node.cluster.base import Backend
from broker_node.cluster.factory import create_backend
from broker_node.config import Settings
from broker_node.connection import ClientConnection
from broker_node.core.actions import (
    Action,
    CloseClient,
    EndSession,
    ForgetChannel,
    ForgetConnection,
    KeepFrames,
    LoadSession,
    MarkDetached,
    MoveChannels,
    PauseReading,
    Publish,
    Rebind,
    Receipt,
    Replay,
    ResumeReading,
    Send,
)
from broker_node.core.broker import REGISTRY_UNAVAILABLE, AuthRules, BrokerCore, ResumeRules
from broker_node.core.stats import NodeStats
from broker_node.drain import Drain
from broker_node.errors import BackendUnavailable
from broker_node.health import HealthEndpoints
from broker_node.heartbeat import NodeHeartbeat
from broker_node.logs import LIMIT_LOG_INTERVAL
from broker_node.metrics import NodeCollector, metrics_registry
from broker_node.registry_calls import RegistryCalls
from broker_node.registry_writer import RegistryWriter
from broker_node.status import NodeStatus, StatusBoard
from broker_node.supervisor import Supervisor
from broker_node.timers import KEEPALIVE_SLICES, expiry_loop, keepalive_loop
from shared.codec import Rejection, rejection_kind
from shared.ids import ChannelId, ConnectionId, NodeId, node_name
from shared.messages import (
    Ack,
    Close,
    ListByRole,
    Message,
    Open,
    Refresh,
    Register,
    Request,
    Resume,
)

logger = logging.getLogger("broker_node.node")

#: How many ids of a list_by_role reply weigh as much as one request against the rate limit.
LIST_IDS_PER_REQUEST: Final = 50
#: File descriptors kept for Redis connections, the listeners, logs and the like.
FD_RESERVE: Final = 32


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
        self.bus_link = BusLink(
            node_id=self.node_id,
            bus=self.backend.bus,
            stats=self.stats,
            backend_name=self.registry_calls.backend_name,
            on_bus=self.core.on_bus,
            undeliverable=self.core.undeliverable,
            execute=self.execute,
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
            execute=self.execute,
            draining=lambda: self.draining,
        )
        self.clients: dict[ConnectionId, ClientConnection] = {}
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
        self.sockets: set[ClientConnection] = set()
        self.supervisor = Supervisor(on_state=self._loop_state)
        self.metrics = metrics_registry(
            NodeCollector(
                self.status_board,
                self.stats,
                self.core,
                outbox_length=self.outbox.__len__,
                handshaking_count=lambda: self.handshaking_count,
            )
        )
        self.health = HealthEndpoints(
            self.status_board,
            self.metrics,
            metrics_on_client_port=settings.metrics_port is None,
            handshake_timeout=settings.handshake_timeout,
        )
        self.server: asyncio.Server | None = None
        self.port: int = settings.port
        self._dirty: list[ClientConnection] = []
        #: Frames the kernel accepted during this flush, to confirm in one go.
        self._written: list[Receipt] = []
        self._flush_scheduled = False
        self._flushing = False
        self._accepted = 0
        self._stopped = asyncio.Event()
        #: The running loop, kept at start: asyncio.get_running_loop() costs a system call.
        self._loop: asyncio.AbstractEventLoop
        self._no_sockets = asyncio.Event()
        # --- hostile input and resource limits (issue 15)
        self._limit_logged_at: dict[str, float] = {}
        #: Sockets still in their HTTP handshake, oldest first.
        self._handshaking: dict[ClientConnection, None] = {}
        self._ip_connections: Counter[str] = Counter()
        self._trusted_proxies = parse_networks(settings.trusted_proxies)
        self._socket_budget = _socket_budget()
        self.metrics_server: asyncio.Server | None = None
        self._drain = Drain(
            node_id=self.node_id,
            standalone=self.standalone,
            drain_timeout=settings.drain_timeout,
            core=self.core,
            clients=self.clients,
            execute=self.execute,
            flush_all=self._flush_all,
            outbox=self.outbox,
            registry=self.registry,
            registry_call=self.registry_calls.call,
            sockets=self.sockets,
            no_sockets=self._no_sockets,
            wait_session_work=self.registry_writer.wait_session_work,
        )

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
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
        if not self.backend.standalone:
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
                await self._drain.run()
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

    @property
    def status(self) -> NodeStatus:
        return self.status_board.current

    @property
    def ready(self) -> bool:
        return self.status_board.current.ready

    # Read by code still in this module (and connection.py); the status board holds them.
    @property
    def draining(self) -> bool:
        return self.status_board.current.draining

    @property
    def subscribed(self) -> bool:
        return self.status_board.current.subscribed

    @property
    def backend_up(self) -> bool:
        return self.status_board.current.backend_up

    def _loop_state(self, name: str, up: bool) -> None:
        if name == "bus-subscriber" and not up:
            self.bus_link.subscriber_down()

    # --- connections ------------------------------------------------------------------------

    def connection_opened(self, sock: ClientConnection) -> None:
        self.sockets.add(sock)
        self._handshaking[sock] = None
        if self._socket_budget is not None and len(self.sockets) > self._socket_budget:
            # Short of file descriptors: the oldest socket still in its handshake goes (often
            # a silent or dripping one), so that /healthz and real clients still get in.
            self.limit_reached("file_descriptors", sock)
            oldest = next(iter(self._handshaking))
            self.handshake_over(oldest)
            oldest.abort()

    @property
    def handshaking_count(self) -> int:
        return len(self._handshaking)

    def handshake_over(self, sock: ClientConnection) -> None:
        self._handshaking.pop(sock, None)

    def admit(self, sock: ClientConnection, request: HttpRequest) -> Response | None:
        """Refuse a WebSocket upgrade at a limit (before any state is made), or None."""
        settings = self.settings
        headers = request.headers
        if not origin_allowed(headers, settings.allowed_origins):
            self.limit_reached("origin", sock)
            return sock.ws.reject(403, "Origin not allowed\n")
        if len(self.clients) >= settings.max_connections:
            self.limit_reached("connections", sock)
            return sock.ws.reject(503, "Node is at its connection limit; try another\n")
        sock.client_ip = client_address(sock.peer, headers, self._trusted_proxies)
        per_ip = settings.max_connections_per_ip
        if per_ip and self._ip_connections[sock.client_ip] >= per_ip:
            self.limit_reached("connections_per_ip", sock)
            return sock.ws.reject(429, "Too many connections from this address\n")
        return None

    def client_accepted(
        self, sock: ClientConnection, *, legacy_errors: bool, token: str | None = None
    ) -> None:
        assert sock.connection_id is not None
        self._accepted += 1
        sock.keepalive_slice = self._accepted % KEEPALIVE_SLICES
        self._ip_connections[sock.client_ip] += 1
        sock.ip_counted = True
        self.clients[sock.connection_id] = sock
        self.core.connect(sock.connection_id, legacy_errors=legacy_errors)
        verified = self.node_auth.verify(token)
        if verified is not None:
            self.execute(self.core.authenticated(sock.connection_id, verified))

    def client_closing(self, sock: ClientConnection) -> None:
        cid = sock.connection_id
        if cid is not None and self.clients.get(cid) is sock:
            del self.clients[cid]
            # A client that closes with 1000 ends its session on purpose; any other end of
            # its socket leaves a resumable session detached, waiting for it.
            bye = sock.ws.close_rcvd
            gone = self.core.client_gone(cid, said_bye=bye is not None and bye.code == 1000)
            if not self.core.is_connected(cid):
                self.node_auth.drop_slot(cid)
            self.execute(gone)

    def connection_lost(self, sock: ClientConnection) -> None:
        self.sockets.discard(sock)
        self._handshaking.pop(sock, None)
        if sock.ip_counted:
            sock.ip_counted = False
            left = self._ip_connections[sock.client_ip] - 1
            if left > 0:
                self._ip_connections[sock.client_ip] = left
            else:
                del self._ip_connections[sock.client_ip]
        if not self.sockets:
            self._no_sockets.set()
        # Websockets closes with 1009 only for a frame or message over the size limit.
        close_sent = sock.ws.close_sent
        if close_sent is not None and close_sent.code == CloseCode.MESSAGE_TOO_BIG:
            self.bad_frame("too_big")
        self.client_closing(sock)

    def limit_reached(self, limit: str, sock: ClientConnection | None = None) -> None:
        """Count a refusal or pause at ``limit``; logged at most once per interval."""
        self.stats.limit_refusals[limit] += 1
        now = time.monotonic()
        if now - self._limit_logged_at.get(limit, -LIMIT_LOG_INTERVAL) >= LIMIT_LOG_INTERVAL:
            self._limit_logged_at[limit] = now
            logger.warning(
                "limit %s reached (%d times so far%s)",
                limit,
                self.stats.limit_refusals[limit],
                f", e.g. by {sock.peer}" if sock is not None and sock.peer else "",
            )

    def bad_frame(self, kind: str) -> None:
        self.stats.bad_frames[kind] += 1

    def http_response(self, ws: ServerProtocol, request: HttpRequest) -> Response:
        return self.health.http_response(ws, request)

    # --- executing decisions ----------------------------------------------------------------

    def execute(self, actions: list[Action]) -> None:
        clients = self.clients
        for action in actions:
            if type(action) is Send:
                client = clients.get(action.connection_id)
                if client is None:
                    # No socket: a detached session keeps it; otherwise it is not delivered.
                    self.execute(self.core.hold(action.connection_id, action.frame, action.receipt))
                    continue
                log = client.session_log
                if log is not None and not log.append(action.frame):
                    client.send(action.frame, action.receipt)
                    self.execute(self.core.session_overflow(action.connection_id))
                    continue
                client.send(action.frame, action.receipt)
            elif type(action) is Publish:
                self.outbox.put(action.node_id, action.envelope)
            elif type(action) is CloseClient:
                client = clients.get(action.connection_id)
                if client is not None:
                    client.close(action.code, action.reason)
            elif type(action) is ForgetChannel or type(action) is ForgetConnection:
                self.registry_writer.forget(action)
            elif type(action) is PauseReading:
                client = clients.get(action.connection_id)
                if client is not None:
                    client.pause_reading("flow")
            elif type(action) is ResumeReading:
                client = clients.get(action.connection_id)
                if client is not None:
                    client.resume_reading("flow")
            else:
                self._execute_session(action)

    def _execute_session(self, action: Action) -> None:
        """Session resume's actions (issue 14)."""
        clients = self.clients
        if type(action) is KeepFrames:
            client = clients.get(action.connection_id)
            if client is not None:
                client.session_log = action.log
        elif type(action) is Replay:
            client = clients.get(action.connection_id)
            if client is not None:
                for frame in action.frames:
                    client.send(frame)
        elif type(action) is Rebind:
            sock = clients.pop(action.from_id, None)
            if sock is None:
                return
            old = clients.get(action.to_id)
            sock.connection_id = action.to_id
            sock.session_log = None
            clients[action.to_id] = sock
            if old is not None:
                # Its departure must not detach the session: it is not the session's any more.
                old.connection_id = None
                old.close(action.code, action.reason)
        elif type(action) in (MarkDetached, EndSession, MoveChannels, LoadSession):
            self.registry_writer.queue_session_work(action)  # type: ignore[arg-type]

    def receipts_written(self, receipts: list[Receipt]) -> None:
        """The kernel accepted these frames: confirm them (batched while flushing)."""
        if self._flushing:
            self._written += receipts
        else:
            self.execute(self.core.written(receipts))

    def receipts_unwritten(
        self, receipts: list[Receipt], *, handed: bool, recipient: ConnectionId | None
    ) -> None:
        if recipient is None:
            self.execute(self.core.unwritten(receipts, handed=handed))
        else:
            self.execute(self.core.unwritten_to(recipient, receipts, handed=handed))

    def flush_soon(self, sock: ClientConnection) -> None:
        self._dirty.append(sock)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_all)

    def flush_now(self) -> None:
        """Write what this turn produced so far, rather than at the end of the turn."""
        if self._dirty and not self._flushing:
            self._flush_all()

    def _flush_all(self) -> None:
        # Confirmations of what the kernel took go out in the same turn: flushing may make
        # more frames (the senders' replies), which are flushed in turn.
        self._flushing = True
        try:
            while self._dirty:
                dirty, self._dirty = self._dirty, []
                for sock in dirty:
                    sock.flush()
                if self._written:
                    written, self._written = self._written, []
                    self.execute(self.core.written(written))
        finally:
            self._flushing = False
            self._flush_scheduled = False

    async def handle_request(self, cid: ConnectionId, request: Request | Rejection) -> None:
        """One request, in arrival order, possibly waiting for the registry."""
        core = self.core
        if not core.is_connected(cid):
            return
        if isinstance(request, Message):
            elsewhere = await self._open_elsewhere(cid, request.channelId)
            if elsewhere is not None:
                self.execute(core.message(cid, request, elsewhere=elsewhere))
            else:
                self.execute(core.fail_on_channel(cid, "message", request, REGISTRY_UNAVAILABLE))
        elif isinstance(request, Close):
            elsewhere = await self._open_elsewhere(cid, request.channelId)
            if elsewhere is not None:
                self.execute(core.close(cid, request, elsewhere=elsewhere))
            else:
                self.execute(core.fail_on_channel(cid, "close", request, REGISTRY_UNAVAILABLE))
        elif isinstance(request, Register):
            await self._register(cid, request)
        elif isinstance(request, ListByRole):
            await self._list_by_role(cid, request)
        elif isinstance(request, Open):
            await self._open(cid, request)
        elif isinstance(request, Refresh):
            verified = self.node_auth.verify(request.token)
            self.execute(core.refresh(cid, request, verified if verified is not None else _NO_AUTH))
        elif isinstance(request, Resume):
            await self._resume(cid, request)
        elif isinstance(request, Ack):
            self.execute(core.ack(cid, request))
        else:
            self.bad_frame(rejection_kind(request))
            self.execute(core.reject(cid, request))

    async def _open_elsewhere(self, cid: ConnectionId, channel_id: str) -> bool | None:
        """For a channel this node does not hold: is it open on other nodes, with ``cid`` not
        one of its ends? (That connection is then "not authorized", as on one node, rather
        than told the channel does not exist; an end of a channel this node no longer holds
        was closed already.) None when the registry cannot say."""
        if self.standalone or self.core.knows_channel(cid, channel_id):
            return False
        try:
            record = await self.registry_calls.call(
                "find_channel", self.registry.find_channel(ChannelId(channel_id))
            )
        except BackendUnavailable:
            return None
        return record is not None and record.peer_of(cid) is None

    async def _register(self, cid: ConnectionId, request: Register) -> None:
        plan = self.core.begin_register(cid, request, self.node_auth.verify(request.token))
        if isinstance(plan, list):
            self.execute(plan)
            return
        limit_error = await self.node_auth.take_slot(cid, self.core.identity_of(cid))
        if limit_error is not None:
            self.execute(self.core.finish_register(cid, request, limit_error))
            return
        error = None
        with self.registry_writer.writing_connection(cid):
            try:
                await self.registry_calls.call("add_connection", self.registry.add_connection(plan))
            except BackendUnavailable:
                error = REGISTRY_UNAVAILABLE
                # Outcome unknown: a stalled Redis runs the write when it resumes, which would
                # list a connection that was refused. Resynchronise once it answers.
                self.registry_writer.mark_dirty()
        if error is None and not self.core.is_connected(cid):
            self.registry_writer.forget(ForgetConnection(plan))
        if error is not None or not self.core.is_connected(cid):
            self.node_auth.drop_slot(cid)
        self.execute(self.core.finish_register(cid, request, error))

    async def _resume(self, cid: ConnectionId, request: Resume) -> None:
        plan = self.core.begin_resume(cid, request, self.node_auth.verify(request.token))
        if isinstance(plan, list):
            self.execute(plan)
            return
        claim = None
        with contextlib.suppress(BackendUnavailable):
            claim = await self.registry_calls.call(
                "claim_session",
                self.registry.claim_session(
                    plan.session_id,
                    plan.token_hash,
                    plan.new_token_hash,
                    self.node_id,
                    int(time.time() * 1000),
                ),
            )
        self.execute(self.core.claimed(cid, request, plan, claim))

    async def _list_by_role(self, cid: ConnectionId, request: ListByRole) -> None:
        refusal = self.core.begin_list(cid, request)
        if refusal is not None:
            self.execute(refusal)
            return
        ids = None
        with contextlib.suppress(BackendUnavailable):
            ids = await self.registry_calls.call(
                "list_by_role", self.registry.list_by_role(request.role)
            )
        self.execute(self.core.finish_list(cid, request, ids))
        client = self.clients.get(cid)
        if ids and client is not None:
            # A reply of many ids costs the node and Redis far more than one request: it
            # counts as one request per LIST_IDS_PER_REQUEST ids against the client's rate.
            page = min(len(ids), self.settings.max_list_page, request.limit or len(ids))
            client.add_request_cost(page // LIST_IDS_PER_REQUEST)

    async def _open(self, cid: ConnectionId, request: Open) -> None:
        core = self.core
        refusal = core.begin_open(cid, request)
        if refusal is not None:
            self.execute(refusal)
            return
        try:
            target = await self.registry_calls.call(
                "find_connection", self.registry.find_connection(ConnectionId(request.targetId))
            )
            plan = core.plan_open(cid, request, target)
            if isinstance(plan, list):
                self.execute(plan)
                return
            with self.registry_writer.writing_channel(plan.channel_id):
                try:
                    await self.registry_calls.call("add_channel", self.registry.add_channel(plan))
                except BackendUnavailable:
                    # As for register: the channel may still be written; resynchronise when back.
                    self.registry_writer.mark_dirty()
                    raise
        except BackendUnavailable:
            self.execute(core.fail_open(cid, request, REGISTRY_UNAVAILABLE))
            return
        self.execute(core.launch_open(cid, request, plan))


#: What a refresh is checked against on a node without authentication (the core refuses it).
_NO_AUTH: Final = TokenRefusal("authentication is off")


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


def _socket_budget() -> int | None:
    """Client sockets this process can hold, keeping some descriptors for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - FD_RESERVE, 1)

"""The node's sockets and clients: who is connected, who is still in its handshake, how many
per address, and the limits a new socket or upgrade meets.

A socket is in ``sockets`` from its first byte to its last; a client is in ``clients`` from its
WebSocket upgrade until it is gone. ``client_gone`` is the one way out of ``clients`` (the
socket closing from either side, or lost); a resume re-keys a socket (``rebind``) instead.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar

from websockets.frames import CloseCode
from websockets.http11 import Request as HttpRequest
from websockets.http11 import Response
from websockets.server import ServerProtocol

from broker_node.admission import client_address, origin_allowed, parse_networks
from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.config import Settings
from broker_node.core.actions import Action, Rebind
from broker_node.core.broker import BrokerCore
from broker_node.core.sessions import SessionLog
from broker_node.core.stats import NodeStats
from broker_node.logs import LIMIT_LOG_INTERVAL
from shared.ids import ConnectionId

# The node's logger, as before this moved out of node.py: operators filter on it.
logger = logging.getLogger("broker_node.node")

#: File descriptors kept for Redis connections, the listeners, logs and the like.
FD_RESERVE: Final = 32


class TableSocket(Protocol):
    """What the table reads and sets on a socket (connection.py's _Socket)."""

    ws: ServerProtocol
    connection_id: ConnectionId | None
    session_log: SessionLog | None
    peer: str
    client_ip: str
    ip_counted: bool
    keepalive_slice: int

    def abort(self) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


_Socket = TypeVar("_Socket", bound=TableSocket)


class TokenCheck(Protocol):
    def verify(self, token: str | None) -> Identity | TokenRefusal | None: ...
    def drop_slot(self, cid: ConnectionId) -> None: ...


class ClientTable(Generic[_Socket]):
    """The node's sockets and clients (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        core: BrokerCore,
        execute: Callable[[list[Action]], None],
        auth: TokenCheck,
        stats: NodeStats,
        keepalive_slices: int,
    ) -> None:
        self._settings = settings
        self._core = core
        self._execute = execute
        self._auth = auth
        self._stats = stats
        self._keepalive_slices = keepalive_slices
        self.clients: dict[ConnectionId, _Socket] = {}
        self.sockets: set[_Socket] = set()
        #: Set whenever the last socket is gone (the drain waits on it).
        self.no_sockets = asyncio.Event()
        self._accepted = 0
        self._limit_logged_at: dict[str, float] = {}
        #: Sockets still in their HTTP handshake, oldest first.
        self._handshaking: dict[_Socket, None] = {}
        self._ip_connections: Counter[str] = Counter()
        self._trusted_proxies = parse_networks(settings.trusted_proxies)
        self._socket_budget = socket_budget()

    # --- sockets ----------------------------------------------------------------------------

    def connection_opened(self, sock: _Socket) -> None:
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

    def handshake_over(self, sock: _Socket) -> None:
        self._handshaking.pop(sock, None)

    def connection_lost(self, sock: _Socket) -> None:
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
            self.no_sockets.set()
        # Websockets closes with 1009 only for a frame or message over the size limit.
        close_sent = sock.ws.close_sent
        if close_sent is not None and close_sent.code == CloseCode.MESSAGE_TOO_BIG:
            self.bad_frame("too_big")
        self.client_gone(sock)

    # --- clients ----------------------------------------------------------------------------

    def admit(self, sock: _Socket, request: HttpRequest) -> Response | None:
        """Refuse a WebSocket upgrade at a limit (before any state is made), or None."""
        settings = self._settings
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
        self, sock: _Socket, *, legacy_errors: bool, token: str | None = None
    ) -> None:
        assert sock.connection_id is not None
        self._accepted += 1
        sock.keepalive_slice = self._accepted % self._keepalive_slices
        self._ip_connections[sock.client_ip] += 1
        sock.ip_counted = True
        self.clients[sock.connection_id] = sock
        self._core.connect(sock.connection_id, legacy_errors=legacy_errors)
        verified = self._auth.verify(token)
        if verified is not None:
            self._execute(self._core.authenticated(sock.connection_id, verified))

    def client_gone(self, sock: _Socket) -> None:
        """The socket closes (from either side) or is lost: the client leaves, once."""
        cid = sock.connection_id
        if cid is not None and self.clients.get(cid) is sock:
            del self.clients[cid]
            # A client that closes with 1000 ends its session on purpose; any other end of
            # its socket leaves a resumable session detached, waiting for it.
            bye = sock.ws.close_rcvd
            gone = self._core.client_gone(cid, said_bye=bye is not None and bye.code == 1000)
            if not self._core.is_connected(cid):
                self._auth.drop_slot(cid)
            self._execute(gone)

    def rebind(self, action: Rebind) -> None:
        """A resume: the socket of ``from_id`` serves the session ``to_id`` from now on."""
        clients = self.clients
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

    # --- limits and bad input ---------------------------------------------------------------

    def limit_reached(self, limit: str, sock: _Socket | None = None) -> None:
        """Count a refusal or pause at ``limit``; logged at most once per interval."""
        self._stats.limit_refusals[limit] += 1
        now = time.monotonic()
        if now - self._limit_logged_at.get(limit, -LIMIT_LOG_INTERVAL) >= LIMIT_LOG_INTERVAL:
            self._limit_logged_at[limit] = now
            logger.warning(
                "limit %s reached (%d times so far%s)",
                limit,
                self._stats.limit_refusals[limit],
                f", e.g. by {sock.peer}" if sock is not None and sock.peer else "",
            )

    def bad_frame(self, kind: str) -> None:
        self._stats.bad_frames[kind] += 1


def socket_budget() -> int | None:
    """Client sockets this process can hold, keeping some descriptors for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - FD_RESERVE, 1)

"""One client's TCP connection: HTTP endpoints, the WebSocket handshake, frames in and out.

Built on websockets' Sans-I/O ``ServerProtocol`` driven from an ``asyncio.Protocol``: frames are
handled synchronously in ``data_received`` and outgoing frames are coalesced into one write per
connection per event-loop turn, except those a read of a single request makes, which go to
their sockets at once (see "Performance" in README.md). The adapter does the same few
steps for every frame: decode, let the core decide, execute; it holds no rule of the broker's
protocol.

Incoming frames take a fast path once the connection is open: a ``FrameScanner`` splits the
bytes received into frames, and each whole, unfragmented, masked text frame within the size
limit is unmasked and decoded right here, without websockets' general parser (which costs about
four times as much per frame). Every other frame (control frames, binary or fragmented
messages, reserved bits, unmasked or oversized frames) goes to websockets whole and in its
place in the stream, so websockets still answers pings, assembles fragments, enforces the
WebSocket protocol and runs the closing handshake. Websockets parses everything itself before
the handshake completes, and again from the moment it is no longer open (closing, or failed).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final, Protocol, cast
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Frame, Opcode
from websockets.http11 import Request as HttpRequest
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike

from broker_node.auth.handshake import RedactTokens, handshake_token, select_subprotocol
from broker_node.core.actions import Action, Receipt, RemoteReceipt
from broker_node.core.rate import RateLimits
from broker_node.core.sessions import SessionLog
from broker_node.frame_scanner import (
    FAST_PONG,
    FAST_TEXT,
    HAND_OVER,
    LAST_TEXT,
    NEED_MORE,
    FrameScanner,
)
from shared.codec import CLOSE_POLICY_VIOLATION, decode_request
from shared.ids import ConnectionId, new_connection_id
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

if TYPE_CHECKING:
    from websockets.http11 import Response

    from broker_node.config import Settings
    from broker_node.core.stats import NodeStats
    from shared.codec import Rejection

#: Requests (as opposed to the codec's refusals), whose id a session's log records.
_REQUEST_TYPES: Final = (Register, ListByRole, Open, Message, Close, Refresh, Resume, Ack)

logger = logging.getLogger("broker_node.connection")
_websockets_logger = logging.getLogger("websockets.server")
# Handshakes are logged at DEBUG with their URL and headers: tokens never reach the log.
_websockets_logger.addFilter(RedactTokens())

#: Requests of one client waiting behind a registry round trip before reading pauses.
MAX_BACKLOG: Final = 1024
#: How long a closing handshake may take before the TCP connection is dropped.
CLOSE_TIMEOUT: Final = 2.0
#: Bytes handed to the transport in one write at most: what waits behind a slow reader stays
#: here, as whole frames, so that it can be dropped (and its senders told) and a close frame
#: does not wait behind megabytes.
WRITE_CHUNK: Final = 256 * 1024

_TEXT: Final = Opcode.TEXT
_CONT: Final = Opcode.CONT
_BINARY: Final = Opcode.BINARY
_PONG: Final = Opcode.PONG
_OPEN: Final = State.OPEN
#: Close code for a client that stopped answering keepalive pings.
CLOSE_PING_TIMEOUT: Final = 1011


class SocketState(enum.Enum):
    """Where one TCP connection is in its life, as the node sees it.

    Theory of operation: a connection starts in HANDSHAKE, reading its HTTP request. It is
    answered once: with a plain HTTP response (health, metrics, a refusal, a bad request:
    HTTP, then the server closes), or with a WebSocket upgrade (OPEN: the client is in the
    node's table). An open client leaves the table when either side starts the closing
    handshake or the connection fails (CLOSING); CLOSED once the TCP connection is gone, from
    any state. Websockets keeps the WebSocket protocol's own state (``ws.state``); it is read
    where that is what matters (frames after a close frame, a close frame not sent twice).
    """

    HANDSHAKE = "handshake"
    HTTP = "http"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


#: Which states may follow each state; any other transition is a bug here.
SOCKET_TRANSITIONS: Final[dict[SocketState, frozenset[SocketState]]] = {
    SocketState.HANDSHAKE: frozenset({SocketState.HTTP, SocketState.OPEN, SocketState.CLOSED}),
    SocketState.HTTP: frozenset({SocketState.CLOSED}),
    SocketState.OPEN: frozenset({SocketState.CLOSING, SocketState.CLOSED}),
    SocketState.CLOSING: frozenset({SocketState.CLOSED}),
    SocketState.CLOSED: frozenset(),
}

_SOCKET_CLOSED: Final = SocketState.CLOSED
_SOCKET_OPEN: Final = SocketState.OPEN


def next_socket_state(current: SocketState, new: SocketState) -> SocketState:
    """``new``, if it may follow ``current``; a transition the table has not is a bug."""
    if new not in SOCKET_TRANSITIONS[current]:
        raise RuntimeError(f"socket state {current.name} -> {new.name}")
    return new


#: The answer to an HTTP request that is not a GET websockets can parse.
_BAD_REQUEST: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 52\r\n"
    b"Connection: close\r\n\r\nOnly GET: a WebSocket upgrade, /healthz or /readyz.\n"
)

#: An unmasked server-to-client ping with no payload.
PING_FRAME: Final = b"\x89\x00"


#: The headers of text frames shorter than 126 bytes (replies, most notifications), by length.
_SHORT_TEXT_HEADERS: Final = tuple(bytes((0x81, length)) for length in range(126))


def text_frame(data: bytes) -> bytes:
    """An unmasked, unfragmented server-to-client text frame (no extension is negotiated)."""
    length = len(data)
    if length < 126:
        return _SHORT_TEXT_HEADERS[length] + data
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big") + data
    return b"\x81\x7f" + length.to_bytes(8, "big") + data


def wants_legacy_errors(path: str) -> bool:
    """``?errors=legacy`` on the URL: failures as ``{"type": "error"}`` (original JS client)."""
    query = parse_qs(urlsplit(path).query)
    return "legacy" in query.get("errors", ())


class ReceiptOutcomes(Protocol):
    """The core's answers once frames with receipts were, or were never, taken by the kernel."""

    def written(self, receipts: Iterable[Receipt], *, held: bool = False) -> list[Action]: ...
    def unwritten(self, receipts: Iterable[Receipt], *, handed: bool) -> list[Action]: ...
    def unwritten_to(
        self, recipient: ConnectionId, receipts: Iterable[Receipt], *, handed: bool
    ) -> list[Action]: ...


class Flushable(Protocol):
    def flush(self) -> None: ...


class WriteScheduler:
    """Every connection's frames of one loop turn go out in one write per connection, at the
    end of the turn; the frames the kernel took meanwhile are confirmed in one go.

    While ``immediate`` is set (a read that held one whole request is handled), a frame for a
    socket with nothing queued is written at once instead, and confirmed as soon as the kernel
    took it: a same-node message is then delivered, confirmed and answered within the read
    that brought it, with no flush scheduled. Such a read seldom makes two frames for one
    socket (each is then a write of its own); a read of several requests, the bus's batches
    and timers keep the coalescing.
    """

    def __init__(self, core: ReceiptOutcomes, execute: Callable[[list[Action]], None]) -> None:
        self._core = core
        self._execute = execute
        self._dirty: list[Flushable] = []
        #: Frames the kernel accepted during this flush, to confirm in one go.
        self._written: list[Receipt] = []
        self._flush_scheduled = False
        self._flushing = False
        #: True while a read that held one whole request is handled: its frames are written
        #: as they are made (each to a socket with nothing queued), not at the end of the
        #: turn, since no other frame of this turn would have joined them.
        self.immediate = False
        #: The running loop, kept at start: asyncio.get_running_loop() costs a system call.
        self._loop: asyncio.AbstractEventLoop

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def receipts_written(self, receipts: list[Receipt]) -> None:
        """The kernel accepted these frames: confirm them (batched while flushing)."""
        if self._flushing:
            self._written += receipts
        else:
            self._execute(self._core.written(receipts))

    def receipts_unwritten(
        self, receipts: list[Receipt], *, handed: bool, recipient: ConnectionId | None
    ) -> None:
        if recipient is None:
            self._execute(self._core.unwritten(receipts, handed=handed))
        else:
            self._execute(self._core.unwritten_to(recipient, receipts, handed=handed))

    def flush_soon(self, sock: Flushable) -> None:
        self._dirty.append(sock)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush_all)

    def flush_now(self) -> None:
        """Write what this turn produced so far, rather than at the end of the turn."""
        if self._dirty and not self._flushing:
            self.flush_all()

    def flush_all(self) -> None:
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
                    self._execute(self._core.written(written))
        finally:
            self._flushing = False
            self._flush_scheduled = False


class SocketBook(Protocol):
    """The node's table of sockets and clients (client_table.py)."""

    def connection_opened(self, sock: ClientConnection) -> None: ...
    def handshake_over(self, sock: ClientConnection) -> None: ...
    def admit(self, sock: ClientConnection, request: HttpRequest) -> Response | None: ...
    def client_accepted(
        self, sock: ClientConnection, *, legacy_errors: bool, token: str | None = None
    ) -> None: ...
    def client_gone(self, sock: ClientConnection) -> None: ...
    def connection_lost(self, sock: ClientConnection) -> None: ...
    def limit_reached(self, limit: str, sock: ClientConnection | None = None) -> None: ...


class Requests(Protocol):
    """Where a client's requests go (dispatch.py)."""

    def try_now(self, cid: ConnectionId, request: Request | Rejection) -> bool: ...
    async def handle(self, cid: ConnectionId, request: Request | Rejection) -> None: ...
    def binary(self, cid: ConnectionId | None) -> None: ...


class ConnectionHost(Protocol):
    """What a connection needs of the node that accepted it."""

    @property
    def settings(self) -> Settings: ...
    @property
    def draining(self) -> bool: ...
    @property
    def auth(self) -> object | None: ...
    @property
    def stats(self) -> NodeStats: ...
    @property
    def writes(self) -> WriteScheduler: ...
    @property
    def client_table(self) -> SocketBook: ...
    @property
    def dispatcher(self) -> Requests: ...
    def http_response(self, ws: ServerProtocol, request: HttpRequest) -> Response: ...


class ClientConnection(asyncio.Protocol):
    """The adapter between one TCP connection and the node."""

    def __init__(self, node: ConnectionHost) -> None:
        self.node = node
        self._writes = node.writes
        self._table = node.client_table
        self._try_now = node.dispatcher.try_now
        self._handle = node.dispatcher.handle
        self.ws = ServerProtocol(
            max_size=node.settings.max_message_size,
            logger=_websockets_logger,
            select_subprotocol=select_subprotocol,
        )
        self.transport: asyncio.Transport | None = None
        self.connection_id: ConnectionId | None = None
        #: A resumable session's log: every frame written here is kept in it until the client
        #: acknowledges it (session resume, issue 14); None for other connections.
        self.session_log: SessionLog | None = None
        #: Frames not yet handed to the transport (built this loop turn, or waiting while the
        #: transport drains), written together by ``flush``; and their size.
        self.outgoing: list[bytes] = []
        self._outgoing_bytes = 0
        # Read for every frame, so kept here rather than looked up in the settings each time.
        self._max_outbound_buffer = node.settings.max_outbound_buffer
        self._max_json_depth = node.settings.max_json_depth
        #: Bytes handed to the transport so far; the kernel has accepted all of them whenever
        #: the transport's buffer is empty (``_writing_paused`` is False).
        self._handed = 0
        self._writing_paused = False
        #: Receipts of frames not yet accepted by the kernel, in order, and the offset (in
        #: handed bytes) at which each of those frames ends. Two lists, not one of pairs: no
        #: tuple per frame, and once the kernel took everything the list goes as it is.
        self._receipts: list[Receipt] = []
        self._receipt_ends: list[int] = []
        self._stall_timer: asyncio.TimerHandle | None = None
        self._fragments: list[BytesLike] | None = None
        self._backlog: deque[Request | Rejection] = deque()
        self._worker: asyncio.Task[None] | None = None
        #: Why reading from the socket is paused (e.g. "backlog"); empty: reading.
        self._read_paused_by: set[str] = set()
        self._close_timer: asyncio.TimerHandle | None = None
        self.state = SocketState.HANDSHAKE
        #: When the unanswered keepalive ping was sent (loop time), or None.
        self.ping_sent_at: float | None = None
        #: Which slice of the ping interval this client is pinged in (see the node's loop).
        self.keepalive_slice = 0
        #: Splits incoming bytes into frames while the fast path is on; None: websockets
        #: parses everything (see the module docstring).
        self._scanner: FrameScanner | None = None
        # --- hostile input and resource limits (issue 15)
        settings = node.settings
        # Kept: asyncio.get_running_loop() costs a getpid() system call each time, and the
        # rate limits read the clock on every read.
        self._loop = asyncio.get_running_loop()
        self._rates = (
            RateLimits(
                frames_per_second=settings.max_requests_per_second,
                frame_burst=settings.request_burst,
                bytes_per_second=settings.max_bytes_per_second,
                byte_burst=settings.byte_burst,
                now=self._loop.time(),
            )
            if settings.max_requests_per_second > 0 or settings.max_bytes_per_second > 0
            else None
        )
        #: Text frames handled since the rate limits were last charged.
        self._frames_seen = 0
        self._rate_timer: asyncio.TimerHandle | None = None
        #: The TCP peer's address, and the client's (differs behind a trusted proxy).
        self.peer = ""
        self.client_ip = ""
        #: Running until the HTTP request is in; the connection is dropped when it fires.
        self._handshake_timer: asyncio.TimerHandle | None = None
        #: Whether this connection counts toward its client address's connections.
        self.ip_counted = False
        #: Bytes read from the socket so far (tests wait on it to split reads where they mean to).
        self.bytes_received = 0
        #: The HTTP request gathered until its headers end (None once it is whole).
        self._head: bytearray | None = bytearray()

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        # Anything left in the transport's buffer pauses writing, and resume_writing says when
        # the kernel took all of it: that is when messages are confirmed to their senders.
        transport.set_write_buffer_limits(high=0)
        peer = transport.get_extra_info("peername")
        self.peer = self.client_ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        self._handshake_timer = asyncio.get_running_loop().call_later(
            self.node.settings.handshake_timeout, self._handshake_expired
        )
        self._table.connection_opened(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        scanner = self._scanner
        if scanner is not None:
            # Websockets has nothing to send, and its state is as it was, unless it was given
            # bytes (a closing handshake started here writes its own close frame).
            if self._receive_frames(scanner, data):
                self._write_protocol_data()
        elif self._head is not None:
            rest = self._receive_head(data)
            # After a 101, every byte goes to the scanner, which hands websockets each frame
            # it does not take whole: the two never share a frame. The scanner knows no
            # extension (none is negotiated: no compressed frames).
            if self.ws.state is _OPEN and not self.ws.extensions:
                scanner = self._scanner = FrameScanner(self.node.settings.max_message_size)
                if rest:
                    self._receive_frames(scanner, rest)
            elif rest:
                self._receive_via_websockets(rest)
            self._write_protocol_data()
        else:
            self._receive_via_websockets(data)
            self._write_protocol_data()
        rates = self._rates
        if rates is not None:
            wait = rates.charge(self._frames_seen, len(data), self._loop.time())
            self._frames_seen = 0
            if wait > 0:
                self._over_rate(rates, wait)

    def eof_received(self) -> bool | None:
        scanner = self._scanner
        if scanner is not None:
            self._scanner = None
            # A frame cut short by the EOF: websockets reports it as it always did.
            rest = scanner.take_rest()
            if rest:
                self._receive_via_websockets(rest)
        self.ws.receive_eof()
        self._write_protocol_data()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._become(SocketState.CLOSED)
        if self._close_timer is not None:
            self._close_timer.cancel()
        # The request being worked on is never cancelled: its registry write may already be on
        # the wire, and only its own worker knows to remove what it wrote once it completes
        # (bounded by the request timeout). Requests still queued behind it are dropped.
        if self._worker is not None and self._backlog:
            in_flight = self._backlog[0]
            self._backlog.clear()
            self._backlog.append(in_flight)
        else:
            self._backlog.clear()
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._drop_outgoing()
        if self._receipts:
            # Handed to the socket, never known to be taken by the kernel: outcome unknown.
            receipts, self._receipts = self._receipts, []
            self._receipt_ends.clear()
            self._writes.receipts_unwritten(receipts, handed=True, recipient=self.connection_id)
        if self._rate_timer is not None:
            self._rate_timer.cancel()
        self._handshake_over()
        self._table.connection_lost(self)

    def pause_writing(self) -> None:
        # The kernel did not take everything: the rest waits in the transport's buffer.
        self._writing_paused = True
        if self._stall_timer is None and self.ws.state is State.OPEN:
            timeout = self.node.settings.slow_consumer_timeout
            self._stall_timer = self._loop.call_later(timeout, self._stalled)

    def resume_writing(self) -> None:
        # The transport's buffer is empty: the kernel accepted every byte handed so far.
        self._writing_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._release(self._handed)
        self.flush()

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._writing_paused:
            self._close_slow_consumer("no progress")

    # --- HTTP and the handshake -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The TCP connection is gone."""
        return self.state is _SOCKET_CLOSED

    def _become(self, state: SocketState) -> None:
        self.state = next_socket_state(self.state, state)

    def _on_http_request(self, request: HttpRequest) -> None:
        if self.state is not SocketState.HANDSHAKE:
            # A pipelined request behind the first: websockets answers one request per
            # connection and then closes it (answering again would fail an assertion).
            return
        self._handshake_over()
        if request.headers.get("Upgrade", "").lower() != "websocket":
            self._become(SocketState.HTTP)
            self.ws.send_response(self.node.http_response(self.ws, request))
            return
        if self.node.draining:
            self._become(SocketState.HTTP)
            self.ws.send_response(self.ws.reject(503, "Node is draining\n"))
            return
        refusal = self._table.admit(self, request)
        if refusal is not None:
            self._become(SocketState.HTTP)
            self.ws.send_response(refusal)
            return
        response = self.ws.accept(request)
        if response.status_code != 101:
            self._become(SocketState.HTTP)
        self.ws.send_response(response)
        if response.status_code == 101:
            self._become(SocketState.OPEN)
            self.connection_id = new_connection_id()
            token = None
            if self.node.auth is not None:
                token = handshake_token(
                    request.path,
                    request.headers,
                    query_allowed=self.node.settings.auth_query_token,
                )
            self._table.client_accepted(
                self, legacy_errors=wants_legacy_errors(request.path), token=token
            )

    def _receive_head(self, data: bytes) -> bytes:
        """Gather the HTTP request; once whole, hand it to websockets alone.

        Websockets parses whatever follows a request as WebSocket frames, even when the
        request gets a plain HTTP answer: a second, pipelined request would fail that parse
        and then the answer to the first (an assertion in websockets' ``send_eof``). So the
        request goes first; the bytes behind it follow only if the upgrade was accepted.
        Returns the bytes to give websockets now.
        """
        head = self._head
        assert head is not None
        searched_from = max(len(head) - 3, 0)
        head += data
        end = head.find(b"\r\n\r\n", searched_from)
        limit = self.node.settings.max_header_bytes
        if end < 0 or end + 4 > limit:
            if len(head) > limit:
                self._head = None
                self._table.limit_reached("header_bytes", self)
                self._refuse_raw(431, "Request Header Fields Too Large")
            return b""
        self._head = None
        self._receive_via_websockets(bytes(head[: end + 4]))
        if self.state is SocketState.HANDSHAKE and self.transport is not None:
            # Not a request websockets accepts (another method, a malformed line): it closes
            # without a word; say why first.
            self._become(SocketState.HTTP)
            self._handshake_over()
            self.transport.write(_BAD_REQUEST)
        rest = bytes(head[end + 4 :])
        return rest if rest and self.ws.state is _OPEN else b""

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self.state is not _SOCKET_CLOSED:
            self._table.limit_reached("handshake_timeout", self)
            self.abort()

    def _handshake_over(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._table.handshake_over(self)

    def _refuse_raw(self, status: int, reason: str) -> None:
        # Websockets holds a request it has not finished parsing: answer without it.
        self._handshake_over()
        if self.transport is not None and self.state is SocketState.HANDSHAKE:
            self._become(SocketState.HTTP)
            body = f"{reason}\n".encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
            )
            self.transport.close()

    # --- frames in --------------------------------------------------------------------------

    def _receive_frames(self, scanner: FrameScanner, data: bytes) -> bool:
        """The fast path: frames one by one, in order, each to ``_on_open_text`` or to
        websockets. True when websockets was given bytes (it may have some to send)."""
        scanner.receive(data)
        ws = self.ws
        if ws.state is not _OPEN:
            return self._stop_scanning(scanner)
        verdict, frame = scanner.next_frame()
        if verdict == LAST_TEXT:
            # The usual read: one whole request. What it makes goes to each socket at once
            # instead of at the end of the loop turn (nothing else of this turn would join it).
            writes = self._writes
            writes.immediate = True
            try:
                self._on_open_text(frame)
            finally:
                writes.immediate = False
            return False
        on_open_text = self._on_open_text
        fed = False
        # Reading may pause on the way (a long backlog); every whole frame already received is
        # still handled now, in order, as websockets' parser did, and a partial one waits here.
        while True:
            if verdict in (FAST_TEXT, LAST_TEXT):
                on_open_text(frame)
            elif verdict == NEED_MORE:
                return fed
            elif verdict == FAST_PONG:
                self.ping_sent_at = None
            elif verdict == HAND_OVER:
                # Websockets keeps the unfinished frame: it owns the stream from here on.
                self._scanner = None
                self._receive_via_websockets(frame)
                return True
            else:
                self._receive_via_websockets(frame)
                fed = True
            if ws.state is not _OPEN:
                return self._stop_scanning(scanner)
            verdict, frame = scanner.next_frame()

    def _stop_scanning(self, scanner: FrameScanner) -> bool:
        """The connection is closing (from either side) or failed: websockets takes the rest."""
        self._scanner = None
        rest = scanner.take_rest()
        if rest:
            self._receive_via_websockets(rest)
        return True

    def _receive_via_websockets(self, data: bytes | bytearray) -> None:
        if self.ws.state is _OPEN:
            # This may be a close frame, or a frame that fails the connection: the replies to
            # the frames before it (confirmations of frames the kernel takes now) go first.
            self._writes.flush_now()
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if type(event) is Frame:
                self._on_frame(event)
            elif isinstance(event, HttpRequest):
                self._on_http_request(event)

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT:
            if frame.fin:
                self._on_text(frame.data)
            else:
                self._fragments = [frame.data]
        elif opcode is _CONT:
            if self._fragments is not None:
                self._fragments.append(frame.data)
                if frame.fin:
                    data = b"".join(self._fragments)
                    self._fragments = None
                    self._on_text(data)
            else:
                # A continuation of a binary message: its first frame was already refused.
                pass
        elif opcode is _PONG:
            self.ping_sent_at = None
        elif opcode is _BINARY:
            self.node.dispatcher.binary(self.connection_id)

    def _on_text(self, data: BytesLike) -> None:
        if self.ws.state is _OPEN:
            self._on_open_text(data)

    def _on_open_text(self, data: BytesLike) -> None:
        """A text message, websockets being open (the fast path has just checked it)."""
        cid = self.connection_id
        if cid is None or self.state is _SOCKET_CLOSED:
            return
        self._frames_seen += 1
        request = decode_request(data, self._max_json_depth)
        log = self.session_log
        if log is not None and isinstance(request, _REQUEST_TYPES):
            # What a resume need not send again: every request read so far.
            log.last_request_id = request.id
        if self._backlog or not self._try_now(cid, request):
            self._enqueue(request)

    def _enqueue(self, request: Request | Rejection) -> None:
        # Requests after one that waits for the registry wait too: replies keep request order
        # semantics (a close after an open sees the open's effect).
        self._backlog.append(request)
        if len(self._backlog) >= MAX_BACKLOG:
            self.pause_reading("backlog")
        if self._worker is None:
            self._worker = asyncio.create_task(self._work_backlog())

    @property
    def requests_pending(self) -> bool:
        """A request read from this client still waits for its turn or for the registry."""
        return bool(self._backlog)

    async def _work_backlog(self) -> None:
        try:
            while self._backlog and not self.closed:
                # Read each time: a resume binds this socket to its session's id.
                cid = self.connection_id
                assert cid is not None
                await self._handle(cid, self._backlog[0])
                if self.closed:
                    # The client left during the await: the request finished (and removed
                    # what it wrote, the core having forgotten the client); nothing else runs.
                    self._backlog.clear()
                    break
                self._backlog.popleft()
                if len(self._backlog) < MAX_BACKLOG // 2:
                    self.resume_reading("backlog")
        finally:
            self._worker = None

    # --- rate limits: over the rate, the socket is not read until the debt is paid -------

    def _over_rate(self, rates: RateLimits, wait: float) -> None:
        # Reading pauses rather than answering each request over the limit with an error:
        # TCP backpressure slows the client down, and no error storm goes back to it.
        if self._rate_timer is None and self.state is not _SOCKET_CLOSED:
            self._table.limit_reached(rates.exceeded, self)
            self.pause_reading("rate")
            self._rate_timer = self._loop.call_later(wait, self._rate_lifted)

    def add_request_cost(self, requests: int) -> None:
        """Count a costly request as ``requests`` more against the rate (at the next read)."""
        if self._rates is not None:
            self._frames_seen += requests

    def _rate_lifted(self) -> None:
        self._rate_timer = None
        self.resume_reading("rate")

    # --- reading paused and resumed --------------------------------------------------------

    @property
    def reading_paused(self) -> bool:
        return bool(self._read_paused_by)

    def pause_reading(self, reason: str) -> None:
        """Stop reading the socket for ``reason`` (TCP backpressure reaches the client);
        reading resumes once every reason has been lifted."""
        if reason in self._read_paused_by:
            return
        transport = self.transport
        if not self._read_paused_by and transport is not None and self.state is not _SOCKET_CLOSED:
            transport.pause_reading()
        self._read_paused_by.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason not in self._read_paused_by:
            return
        self._read_paused_by.discard(reason)
        transport = self.transport
        if not self._read_paused_by and transport is not None and self.state is not _SOCKET_CLOSED:
            transport.resume_reading()

    # --- frames out -------------------------------------------------------------------------

    def send(self, frame: bytes, receipt: Receipt | None = None) -> None:
        """Queue a text frame; it is written with the others at the end of this loop turn
        (or at once, while the scheduler says ``immediate`` and nothing is queued).

        ``receipt`` is settled through the node once the kernel accepted the whole frame, or
        failed if the connection ends first.
        """
        if self.state is not _SOCKET_OPEN:
            # (The socket's state leaves OPEN with websockets', before anything is sent.)
            if receipt is not None:
                self._writes.receipts_unwritten(
                    [receipt], handed=False, recipient=self.connection_id
                )
            return
        outgoing = self.outgoing
        writes = self._writes
        data = text_frame(frame)
        size = len(data)
        if not outgoing:
            if (
                writes.immediate
                and not self._writing_paused
                and type(receipt) is not RemoteReceipt
                and size <= self._max_outbound_buffer
            ):
                # Nothing queued before it: straight to the transport. (Frames from other
                # nodes wait for the end of the turn, so that their confirmations go back
                # together.)
                self._write_at_once(data, receipt)
                return
            # As WriteScheduler.flush_soon, inlined: once per connection per loop turn.
            writes._dirty.append(self)
            if not writes._flush_scheduled:
                writes._flush_scheduled = True
                self._loop.call_soon(writes.flush_all)
        outgoing.append(data)
        queued = self._outgoing_bytes + size
        self._outgoing_bytes = queued
        if receipt is not None:
            self._receipts.append(receipt)
            self._receipt_ends.append(self._handed + queued)
        if queued > self._max_outbound_buffer:
            self._close_slow_consumer("too much queued")

    def flush(self) -> None:
        """Hand queued frames to the transport while the kernel keeps taking them."""
        transport = self.transport
        if transport is None or self.state is _SOCKET_CLOSED:
            self._drop_outgoing()
            return
        outgoing = self.outgoing
        while outgoing and not self._writing_paused:
            size = self._outgoing_bytes
            if size <= WRITE_CHUNK:
                data = b"".join(outgoing) if len(outgoing) > 1 else outgoing[0]
                outgoing.clear()
            else:
                size = count = 0
                while count < len(outgoing) and (count == 0 or size < WRITE_CHUNK):
                    size += len(outgoing[count])
                    count += 1
                data = b"".join(outgoing[:count])
                del outgoing[:count]
            self._outgoing_bytes -= size
            self._handed += size
            transport.write(data)  # may call pause_writing
        receipts = self._receipts
        if receipts and not self._writing_paused and not transport.is_closing():
            # (A write that failed closed the transport: connection_lost settles them as
            # handed, outcome unknown.)
            ends = self._receipt_ends
            if ends[-1] <= self._handed:
                # The usual case, as _release: the kernel took every frame handed.
                self._receipts = []
                ends.clear()
                self._writes.receipts_written(receipts)
            else:
                self._release(self._handed)

    def _write_at_once(self, data: bytes, receipt: Receipt | None) -> None:
        """Hand one frame to the transport, nothing being queued before it."""
        transport = self.transport
        assert transport is not None
        self._handed += len(data)
        transport.write(data)  # may call pause_writing
        if receipt is None:
            return
        if self._writing_paused or transport.is_closing():
            # Settled once the transport's buffer drains (resume_writing), or by
            # connection_lost if the write failed.
            self._receipts.append(receipt)
            self._receipt_ends.append(self._handed)
        else:
            self._writes.receipts_written([receipt])

    def _write_now(self, data: bytes) -> None:
        """Write websockets' bytes (a close frame, a pong, an HTTP response) behind every
        frame queued before them."""
        transport = self.transport
        if transport is None:
            return
        if self.outgoing:
            data = b"".join(self.outgoing) + data
            self.outgoing.clear()
            self._outgoing_bytes = 0
        if not data:
            return
        self._handed += len(data)
        transport.write(data)
        if not self._writing_paused and self._receipts and not transport.is_closing():
            self._release(self._handed)

    def _release(self, accepted: int) -> None:
        ends = self._receipt_ends
        if not ends or ends[0] > accepted:
            return
        if ends[-1] <= accepted:
            released, self._receipts = self._receipts, []
            ends.clear()
        else:
            count = bisect_right(ends, accepted)
            released = self._receipts[:count]
            del self._receipts[:count]
            del ends[:count]
        self._writes.receipts_written(released)

    def _drop_outgoing(self) -> None:
        """Forget the frames not yet handed to the transport; their senders are told."""
        self.outgoing.clear()
        self._outgoing_bytes = 0
        ends = self._receipt_ends
        if ends and ends[-1] > self._handed:
            kept = bisect_right(ends, self._handed)
            dropped = self._receipts[kept:]
            del self._receipts[kept:]
            del ends[kept:]
            self._writes.receipts_unwritten(dropped, handed=False, recipient=self.connection_id)

    def _close_slow_consumer(self, why: str) -> None:
        if self.connection_id is None or self.ws.state is not State.OPEN:
            return
        self.node.stats.slow_consumers += 1
        logger.info("closing slow consumer %s (%s)", self.connection_id, why)
        # What never reached the socket is dropped, so that the close frame goes out right
        # behind what the transport holds (at most about one write chunk).
        self._drop_outgoing()
        self.close(CLOSE_POLICY_VIOLATION, "slow consumer")

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the node forgets the client at once."""
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
            self._write_protocol_data()
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.abort)
        self._leaving()

    def keepalive(self, now: float, timeout: float) -> None:
        """Ping the client, or close it if the previous ping went unanswered for ``timeout``."""
        if self.ws.state is not State.OPEN or self.connection_id is None:
            return
        if self.ping_sent_at is not None:
            # A client whose socket is not being read (flow control) cannot be heard answering.
            if now - self.ping_sent_at >= timeout and not self.reading_paused:
                logger.info("closing %s: no answer to a keepalive ping", self.connection_id)
                self.close(CLOSE_PING_TIMEOUT, "keepalive ping timeout")
            return
        self.ping_sent_at = now
        # Written as text frames are, bypassing websockets (which keeps no state for a ping
        # it did not send: the pong comes back as a frame like any other).
        # A control frame may go between data frames: it need not wait for the queued ones.
        if self.transport is not None:
            self.transport.write(PING_FRAME)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _write_protocol_data(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data:
                self._write_now(data)
            else:
                # End of stream: a server closes the TCP connection once its close frame or
                # HTTP response is written (transport.close flushes first).
                self._write_now(b"")
                transport.close()
        if self.ws.state is State.CLOSED or self.ws.close_expected():
            self._leaving()

    def _leaving(self) -> None:
        """Either side started the closing handshake, or the connection failed."""
        if self.state is SocketState.OPEN:
            self._become(SocketState.CLOSING)
        self._table.client_gone(self)

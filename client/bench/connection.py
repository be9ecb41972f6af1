"""One WebSocket client connection: websockets' Sans-I/O ``ClientProtocol`` on an
``asyncio.Protocol`` (the shell; it moves bytes and hides no protocol rule).

Incoming text frames go to ``on_text`` synchronously from ``data_received`` (no task or
future per frame). Outgoing frames are queued with :meth:`BenchConnection.send` and written
with one ``transport.write`` per :meth:`BenchConnection.flush`; ``data_received`` flushes once
after handling everything one read brought, so replies to a burst leave in one write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["BenchConnection", "ConnectionLost", "Data", "close_all", "open_connection"]

#: A frame's payload as websockets hands it over.
Data = bytes | bytearray | memoryview

#: A broker never sends us much; room for a frame of the largest payload we ask for.
MAX_FRAME = 16 * 1024 * 1024


class ConnectionLost(Exception):
    """The broker closed the connection, or the handshake failed."""


def _ignore(data: Data) -> None:
    """Default frame sink until the owner sets ``on_text``."""


class BenchConnection(asyncio.Protocol):
    """A client connection whose frames are handled as they arrive."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.protocol = ClientProtocol(parse_uri(url), max_size=MAX_FRAME)
        self.transport: asyncio.Transport | None = None
        self.on_text: Callable[[Data], None] = _ignore
        self.on_lost: Callable[[str], None] | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fragments: list[Data] = []
        self._dirty = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        self.protocol.send_request(self.protocol.connect())
        self._dirty = True
        self.flush()

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        on_text = self.on_text
        for event in protocol.events_received():
            if type(event) is Frame:
                opcode = event.opcode
                if opcode is Opcode.TEXT:
                    if event.fin:
                        on_text(event.data)
                    else:
                        self._fragments.append(event.data)
                elif opcode is Opcode.CONT:
                    self._fragments.append(event.data)
                    if event.fin:
                        on_text(b"".join(self._fragments))
                        self._fragments.clear()
                elif opcode is Opcode.CLOSE:
                    self._lost(
                        f"closed by the broker: {protocol.close_code} {protocol.close_reason}"
                    )
                # PING is answered by the protocol itself (a PONG in data_to_send); BINARY is
                # not part of the broker protocol and is ignored.
            elif isinstance(event, Response):
                self._handshake_done()
        self._dirty = True
        self.flush()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(f"connection lost: {exc}" if exc else "connection closed")
        if not self.opened.done():
            self.opened.set_exception(
                ConnectionLost(f"{self.url}: connection lost during handshake")
            )
        if not self.closed.done():
            self.closed.set_result(None)

    # --- the owner's API ----------------------------------------------------------------

    def send(self, frame: bytes) -> None:
        """Queue one text frame (written by the next :meth:`flush`)."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_text(frame)
            self._dirty = True

    def flush(self) -> None:
        """Write everything queued in one system call."""
        if self._dirty:
            self._dirty = False
            data = self.protocol.data_to_send()
            transport = self.transport
            if data and transport is not None and not transport.is_closing():
                if len(data) == 1:
                    transport.write(data[0])
                else:
                    transport.write(b"".join(data))
                if self.protocol.close_expected():
                    transport.close()

    async def close(self) -> None:
        """Close the WebSocket cleanly: send a close frame and wait for the TCP close.

        Bound the wait with ``asyncio.timeout`` (or use :func:`close_all`).
        """
        self.on_lost = None
        if self.transport is None or self.closed.done():
            return
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(1000)
            self._dirty = True
            self.flush()
        await asyncio.shield(self.closed)

    def abort(self) -> None:
        self.on_lost = None
        if self.transport is not None:
            self.transport.abort()

    # --- internals ----------------------------------------------------------------------

    def _handshake_done(self) -> None:
        if self.opened.done():
            return
        exc = self.protocol.handshake_exc
        if exc is None:
            self.opened.set_result(None)
        else:
            self.opened.set_exception(ConnectionLost(f"{self.url}: handshake failed: {exc}"))

    def _lost(self, why: str) -> None:
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(why)


async def open_connection(url: str) -> BenchConnection:
    """Connect and complete the WebSocket handshake; raises :class:`ConnectionLost`.

    Bound it with ``asyncio.timeout``: a cancelled handshake aborts the connection.
    """
    loop = asyncio.get_running_loop()
    connection = BenchConnection(url)
    uri = connection.protocol.uri
    if uri.secure:
        raise ConnectionLost("wss:// is not supported by the bench (measure over ws://)")
    try:
        await loop.create_connection(lambda: connection, uri.host, uri.port)
        await connection.opened
    except (OSError, InvalidHandshake) as exc:
        connection.abort()
        raise ConnectionLost(f"{url}: {exc!r}") from exc
    except asyncio.CancelledError:
        connection.abort()
        raise
    return connection


async def close_all(connections: list[BenchConnection]) -> None:
    """Close connections cleanly; whatever is still open when this is cancelled is aborted.

    Use it under ``asyncio.timeout``: a broker that does not answer the close frame must not
    hold the bench up.
    """
    try:
        await asyncio.gather(*(c.close() for c in connections))
    finally:
        for connection in connections:
            if not connection.closed.done():
                connection.abort()

"""Redis connections driven by hand, for the bus: an ``asyncio.Protocol`` and hiredis.

Why not redis.asyncio here: on the bus every cross-node message costs a publish and a read,
and redis-py's per-call machinery (a future per reply, a timeout scope, a lock, a task woken
per read) cost more CPU than the Redis round trip itself. A link parses replies with hiredis
right in ``data_received`` and hands them to a callback; writes go straight to the transport.

A link is *opened* by redis-py (so every URL option that works for the registry works here:
TLS, unix sockets, passwords, ACL users) and then its socket is taken over: the transport gets
our protocol instead of the stream reader's. Nothing else of redis-py is used afterwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, cast

import hiredis
from redis.exceptions import RedisError

from broker_node.errors import BackendUnavailable, ConfigurationError

logger = logging.getLogger(__name__)

#: A reply as hiredis gives it: bytes, int, None, a list of replies, or a ReplyError.
Reply = object
#: Makes the redis-py connection a link is opened with (see ``RedisBus``).
ConnectionMaker = Callable[[], object]

_CONNECT_FAILURES: Final = (RedisError, OSError)


def command(*parts: bytes) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        out.append(b"$%d\r\n%b\r\n" % (len(part), part))
    return b"".join(out)


class RespLink(asyncio.Protocol):
    """One Redis connection: commands written as they come, replies to ``on_reply``.

    ``lost`` resolves (with the reason as a ``BackendUnavailable``) when the connection ends,
    for whatever reason: the peer closed it, a socket error, unparsable data, or ``abort``.
    """

    def __init__(
        self,
        purpose: str,
        on_reply: Callable[[Reply], None],
        on_writable: Callable[[], None] = lambda: None,
    ) -> None:
        self.purpose = purpose
        self._on_reply = on_reply
        self._on_writable = on_writable
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[BackendUnavailable] = asyncio.get_running_loop().create_future()
        #: Whether anything arrived since ``saw_traffic`` was last cleared (idle watchdogs).
        self.saw_traffic = False
        #: The transport's buffer is above its high-water mark: Redis is not reading.
        self.writing_paused = False
        #: The stream writer the socket was opened with: asyncio closes the transport when an
        #: unclosed StreamWriter is collected (3.11.5+), so it lives as long as the link.
        self.opened_with: object = None

    @property
    def open(self) -> bool:
        return self._transport is not None and not self.lost.done()

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self.lost.done():
            self._transport.write(data)

    def abort(self, reason: str) -> None:
        """Drop the connection at once; ``lost`` resolves with ``reason``."""
        self._lose(reason, None)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Close after what was written is sent."""
        self._lose("closed", None)
        if self._transport is not None:
            self._transport.close()

    def _lose(self, reason: str, cause: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(BackendUnavailable(f"{self.purpose} ({reason})", cause))

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.lost.done():
            return
        self.saw_traffic = True
        reader = self._reader
        try:
            reader.feed(data)
            reply = reader.gets()
            while reply is not False:
                if isinstance(reply, hiredis.ReplyError):
                    logger.warning("%s: error from Redis: %s", self.purpose, reply)
                    self.abort(f"error from Redis: {reply}")
                    return
                self._on_reply(reply)
                if self.lost.done():
                    return
                reply = reader.gets()
        except hiredis.ProtocolError as exc:
            logger.warning("%s: unparsable data from Redis; dropping the connection", self.purpose)
            self._lose("protocol error", exc)
            if self._transport is not None:
                self._transport.abort()

    def eof_received(self) -> bool | None:
        self._lose("closed by Redis", None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose("connection lost", exc)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._on_writable()


async def open_link(make_connection: ConnectionMaker, link: RespLink) -> None:
    """Connect with redis-py (handshake included), then hand the socket to ``link``.

    Raises ``BackendUnavailable`` when Redis cannot be reached or refuses the handshake, and
    ``ConfigurationError`` for a connection that is not a socket (fakeredis, say).
    """
    connection = make_connection()
    try:
        await connection.connect()  # type: ignore[attr-defined]
    except BaseException as exc:
        # A handshake cut short (a timeout, a cancellation) leaves its socket open.
        half_open = getattr(connection, "_writer", None)
        if isinstance(half_open, asyncio.StreamWriter):
            half_open.close()
        if isinstance(exc, _CONNECT_FAILURES):
            raise BackendUnavailable(f"connect ({link.purpose})", exc) from exc
        raise
    # redis-py keeps the stream pair in these two attributes (redis.asyncio.connection); the
    # check below turns a change there into a clear error instead of a silent misbehaviour.
    reader = getattr(connection, "_reader", None)
    writer = getattr(connection, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        await connection.disconnect()  # type: ignore[attr-defined]
        raise ConfigurationError("the bus needs a socket connection to Redis")
    # Forget the streams first: redis-py would otherwise close the socket when its
    # connection object is collected.
    connection._reader = connection._writer = None  # type: ignore[attr-defined]
    leftover = bytes(reader._buffer)  # type: ignore[attr-defined]  # none expected, but kept
    transport = writer.transport
    if transport.is_closing() or reader.at_eof():
        transport.abort()
        raise BackendUnavailable(f"connect ({link.purpose})", ConnectionError("closed by Redis"))
    transport.set_protocol(link)
    link.opened_with = writer
    link.connection_made(transport)
    if leftover:
        link.data_received(leftover)

"""Redis connections driven by hand, for the bus: an ``asyncio.Protocol`` and hiredis.

Why not redis.asyncio here: on the bus every cross-node message costs a publish and a read,
and redis-py's per-call machinery (a future per reply, a timeout scope, a lock, a task woken
per read) cost more CPU than the Redis round trip itself. A link parses replies with hiredis
right in ``data_received`` and hands them to a callback; writes go straight to the transport.

A link opens its own socket with asyncio from the Redis URL, as redis-py parses it (see
``endpoint.py``: TCP, TLS, unix sockets, ACL users and passwords, db), and logs in with AUTH
and SELECT before anything else is written.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

import hiredis

from broker_node.cluster.endpoint import RedisEndpoint
from broker_node.errors import BackendUnavailable, ConfigurationError

logger = logging.getLogger(__name__)

#: A reply as hiredis gives it: bytes, int, None, a list of replies, or a ReplyError.
Reply = object


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
        #: Replies still owed to the login commands (see ``open_link``): they are not
        #: ``on_reply``'s.
        self._handshake_left = 0
        self._handshake_answered: asyncio.Future[None] | None = None

    @property
    def open(self) -> bool:
        return self._transport is not None and not self.lost.done()

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self.lost.done():
            self._transport.write(data)

    def expect_handshake(self, replies: int) -> asyncio.Future[None]:
        """The next ``replies`` replies answer the login; the future resolves after them."""
        self._handshake_left = replies
        answered = self._handshake_answered = asyncio.get_running_loop().create_future()
        return answered

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
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A peer that vanished (a dead host, a dropped route) is noticed by the kernel.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

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
                if self._handshake_left:
                    self._handshake_left -= 1
                    if not self._handshake_left and self._handshake_answered is not None:
                        self._handshake_answered.set_result(None)
                else:
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


async def open_link(endpoint: RedisEndpoint | None, link: RespLink) -> None:
    """Connect ``link`` to ``endpoint`` and log in (AUTH, SELECT) before anything else.

    Raises ``BackendUnavailable`` when Redis cannot be reached or refuses the handshake, and
    ``ConfigurationError`` when there is no socket to open (a backend on fakeredis pools).
    """
    if endpoint is None:
        raise ConfigurationError("the bus needs a socket connection to Redis")
    loop = asyncio.get_running_loop()
    try:
        if endpoint.path is not None:
            await loop.create_unix_connection(lambda: link, endpoint.path)
        else:
            await loop.create_connection(
                lambda: link,
                endpoint.host,
                endpoint.port,
                ssl=endpoint.tls,
                server_hostname=endpoint.host if endpoint.tls is not None else None,
            )
    except OSError as exc:  # ssl.SSLError included
        raise BackendUnavailable(f"connect ({link.purpose})", exc) from exc
    handshake = endpoint.handshake()
    if not handshake:
        return
    answered = link.expect_handshake(len(handshake))
    link.write(b"".join(command(*parts) for parts in handshake))
    try:
        await asyncio.wait((answered, link.lost), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Cut short (a timeout, a cancellation): the socket must not stay open.
        link.abort("handshake cut short")
        raise
    if not answered.done():
        raise link.lost.result()

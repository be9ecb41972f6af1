"""The bus on Redis pub/sub: one pipelined publisher connection, one subscriber per inbox,
both ``RespLink``s on sockets of their own (the theory of operation is in ``redis.py``)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Final

from broker_node.cluster.base import Bus, Deliver, PublishResult, Subscription
from broker_node.cluster.endpoint import RedisEndpoint
from broker_node.cluster.keys import RedisKeys
from broker_node.cluster.resp import Reply, RespLink, command, open_link
from broker_node.errors import BackendUnavailable, ConfigurationError
from shared.ids import NodeId

logger = logging.getLogger(__name__)


def _packed_publish(channel: str, payload: bytes) -> bytes:
    """``PUBLISH channel payload`` in RESP."""
    name = channel.encode()
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(name),
        name,
        len(payload),
        payload,
    )


class _PendingPublish:
    """One ``send`` call: its packed commands and the replies collected so far."""

    __slots__ = ("counts", "expected", "on_result", "packed", "since")

    def __init__(self, packed: bytes, expected: int, on_result: PublishResult, since: float):
        self.packed = packed
        self.expected = expected
        self.counts: list[int] = []
        self.on_result = on_result
        #: Loop time of the ``send``, then of the write: its deadline is one timeout later.
        self.since = since


def _report(pending: _PendingPublish, result: list[int] | BackendUnavailable) -> None:
    # The callback runs inside the connection's data_received or a timer: a bug there must not
    # take the publisher down with it.
    try:
        pending.on_result(result)
    except Exception:
        logger.exception("handling a publish outcome failed")


class _Publisher:
    """The bus' one publisher connection: writes pipelined, replies matched in order.

    A send is written at once when the connection is up and Redis keeps reading; otherwise it
    waits in ``_queued`` (in order) while a connection is made or the socket drains. Each send,
    written or queued, gets one request timeout: a reply later than that drops the connection
    (Redis hung, or the route is gone), and everything in flight is reported as failed.
    """

    def __init__(self, endpoint: RedisEndpoint | None, timeout: float) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._link: RespLink | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queued: deque[_PendingPublish] = deque()
        self._in_flight: deque[_PendingPublish] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def send(self, packed: bytes, expected: int, on_result: PublishResult) -> None:
        pending = _PendingPublish(packed, expected, on_result, self._loop.time())
        if self._closed:
            self._loop.call_soon(on_result, BackendUnavailable("publish (bus closed)"))
            return
        link = self._link
        if link is not None and not self._queued and not link.writing_paused and link.open:
            self._write(link, pending)
        else:
            self._queued.append(pending)
            if link is None or not link.open:
                self._connect_soon()
        if self._timer is None:
            self._timer = self._loop.call_later(self._timeout, self._check_deadlines)

    def _write(self, link: RespLink, pending: _PendingPublish) -> None:
        pending.since = self._loop.time()
        if pending.expected == 0 and not self._in_flight:
            self._loop.call_soon(_report, pending, [])
            return
        # An empty send waits in line too (nothing written): its outcome keeps call order.
        self._in_flight.append(pending)
        link.write(pending.packed)

    def _write_queued(self) -> None:
        link = self._link
        queued = self._queued
        while queued and link is not None and link.open and not link.writing_paused:
            self._write(link, queued.popleft())

    def _on_reply(self, reply: Reply) -> None:
        if type(reply) is not int or not self._in_flight:
            assert self._link is not None
            self._link.abort(f"unexpected reply {reply!r}")
            return
        in_flight = self._in_flight
        pending = in_flight[0]
        pending.counts.append(reply)
        if len(pending.counts) == pending.expected:
            in_flight.popleft()
            _report(pending, pending.counts)
            while in_flight and in_flight[0].expected == 0:
                _report(in_flight.popleft(), [])

    def _connect_soon(self) -> None:
        if self._connecting is None and not self._closed:
            self._connecting = asyncio.create_task(self._connect(), name="bus-publisher-connect")

    async def _connect(self) -> None:
        started = self._loop.time()
        link = RespLink("bus publisher", self._on_reply, on_writable=self._write_queued)
        try:
            async with asyncio.timeout(self._timeout):
                await open_link(self._endpoint, link)
        except asyncio.CancelledError:
            self._connecting = None
            raise
        except Exception as exc:  # every failure is reported to the senders
            self._connecting = None
            failure = exc if isinstance(exc, BackendUnavailable) else None
            if failure is None:
                if not isinstance(exc, TimeoutError | ConfigurationError):
                    logger.exception("connecting the bus publisher failed")
                failure = BackendUnavailable("publish (connect)", exc)
            # Sends made while this attempt was under way get an attempt of their own.
            self._fail_queued(failure, made_until=started)
            if self._queued:
                self._connect_soon()
            return
        self._connecting = None
        if self._closed:
            link.close()
            return
        self._link = link
        link.lost.add_done_callback(lambda lost: self._on_link_lost(link, lost.result()))
        self._write_queued()

    def _on_link_lost(self, link: RespLink, reason: BackendUnavailable) -> None:
        if self._link is link:
            self._link = None
        self._fail(self._in_flight, reason)
        if self._queued:
            self._connect_soon()

    def _fail_queued(self, reason: BackendUnavailable, *, made_until: float) -> None:
        """Fail the queued sends made up to ``made_until`` (loop time); they are in order."""
        queued = self._queued
        while queued and queued[0].since <= made_until:
            _report(queued.popleft(), reason)

    def _fail(self, pendings: deque[_PendingPublish], reason: BackendUnavailable) -> None:
        while pendings:
            _report(pendings.popleft(), reason)

    def _check_deadlines(self) -> None:
        self._timer = None
        now = self._loop.time()
        expired = now - self._timeout
        if self._in_flight and self._in_flight[0].since <= expired and self._link is not None:
            logger.warning("no reply from Redis to a publish within %.1fs", self._timeout)
            self._link.abort("no reply in time")  # fails what is in flight
        late = BackendUnavailable("publish (timed out waiting for a connection)")
        self._fail_queued(late, made_until=expired)
        oldest = [pendings[0].since for pendings in (self._in_flight, self._queued) if pendings]
        if oldest:
            delay = max(0.0, min(oldest) + self._timeout - now)
            self._timer = self._loop.call_later(delay, self._check_deadlines)

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with suppress(asyncio.CancelledError):
                await self._connecting
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        closed = BackendUnavailable("publish (bus closed)")
        if self._link is not None:
            self._link.close()
            self._link = None
        self._fail(self._in_flight, closed)
        self._fail(self._queued, closed)


class _RedisSubscription(Subscription):
    """One subscriber connection; an idle one is probed with PING, then dropped."""

    def __init__(self, link: RespLink, timeout: float) -> None:
        self._link = link
        self._timeout = timeout
        self._pinged = False
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            timeout, self._watch_idle
        )

    async def wait_lost(self) -> None:
        raise await asyncio.shield(self._link.lost)

    def _watch_idle(self) -> None:
        # Reads carry no timeout of their own; a hung Redis or a dropped route closes nothing,
        # so after a timeout without traffic: PING; after another: drop the connection.
        self._timer = None
        link = self._link
        if not link.open:
            return
        if link.saw_traffic:
            link.saw_traffic = self._pinged = False
        elif self._pinged:
            logger.debug("subscriber connection does not answer PING; dropping it")
            link.abort("no answer to PING")
            return
        else:
            link.write(_PING)
            self._pinged = True
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._watch_idle)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


_PING: Final = command(b"PING")


def _subscriber_replies(
    deliver: Deliver, confirmed: asyncio.Future[None]
) -> Callable[[Reply], None]:
    """What a subscriber connection does with each reply: payloads to ``deliver``."""

    def on_reply(reply: Reply) -> None:
        if type(reply) is list and len(reply) == 3:
            kind = reply[0]
            if kind == b"message":
                try:
                    deliver(reply[2])
                except Exception:
                    # One payload's failure is not the subscription's: log it, go on.
                    logger.exception("handling a bus payload failed")
                return
            if kind == b"subscribe":
                if not confirmed.done():
                    confirmed.set_result(None)
                return
        # Anything else (PING's ["pong", ""], UNSUBSCRIBE's confirmation) needs no action.

    return on_reply


class RedisBus(Bus):
    """Node inboxes on Redis pub/sub: one publisher connection, one subscriber per inbox.

    Both are ``RespLink``s (see ``resp.py``): a send is one write of PUBLISH commands whose
    replies are matched in order as they arrive, and a subscriber hands each payload to its
    callback straight from ``data_received``; no task runs per publish or per payload.
    """

    def __init__(self, endpoint: RedisEndpoint | None, keys: RedisKeys, *, timeout: float) -> None:
        self._keys = keys
        self._timeout = timeout
        # Its own sockets, outside any pool: nothing reconnects them behind our back. None:
        # no socket to open (a backend on fakeredis pools has a registry and no bus).
        self._endpoint = endpoint
        self._publisher: _Publisher | None = None
        self._subscribers: set[RespLink] = set()

    def send(self, messages: Sequence[tuple[NodeId, bytes]], on_result: PublishResult) -> None:
        if self._publisher is None:
            self._publisher = _Publisher(self._endpoint, self._timeout)
        inbox = self._keys.inbox
        packed = b"".join(_packed_publish(inbox(node_id), payload) for node_id, payload in messages)
        self._publisher.send(packed, len(messages), on_result)

    @asynccontextmanager
    async def _subscribe(self, node_id: NodeId, deliver: Deliver) -> AsyncIterator[Subscription]:
        channel = self._keys.inbox(node_id)
        confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        link = RespLink("bus subscriber", _subscriber_replies(deliver, confirmed))
        self._subscribers.add(link)
        subscription: _RedisSubscription | None = None
        try:
            try:
                async with asyncio.timeout(self._timeout):
                    await open_link(self._endpoint, link)
                    link.write(command(b"SUBSCRIBE", channel.encode()))
                    await asyncio.wait((confirmed, link.lost), return_when=asyncio.FIRST_COMPLETED)
            except TimeoutError as exc:
                raise BackendUnavailable("subscribe", exc) from exc
            if not confirmed.done():
                raise link.lost.result()
            logger.debug("subscribed to %s", channel)
            subscription = _RedisSubscription(link, self._timeout)
            yield subscription
        finally:
            if subscription is not None:
                subscription.stop()
            self._subscribers.discard(link)
            if link.open:
                # Closing the socket unsubscribes on a real Redis; saying so first also serves
                # servers that keep the subscription of a closed connection a little longer.
                link.write(command(b"UNSUBSCRIBE"))
                link.close()
            else:
                link.abort("unsubscribed")

    def subscribe(
        self, node_id: NodeId, deliver: Deliver
    ) -> AbstractAsyncContextManager[Subscription]:
        return self._subscribe(node_id, deliver)

    async def aclose(self) -> None:
        # Closing a live subscriber's connection makes its ``wait_lost`` raise.
        for link in list(self._subscribers):
            link.abort("bus closed")
        if self._publisher is not None:
            await self._publisher.aclose()

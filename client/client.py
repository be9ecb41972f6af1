"""The asyncio SDK: ``BrokerClient`` and ``Channel``, a thin shell over ``websockets``.

Every protocol decision lives in ``client.session``; this module only moves frames between
the WebSocket and the session, keeps futures for pending requests, and runs callbacks.

Theory of operation
-------------------
* **One connection, one reader.** Each WebSocket gets a ``Session`` and exactly one reader
  task. The reader feeds frames to the session and acts on the events it returns: it resolves
  request futures, creates ``Channel`` objects, delivers payloads. However the reader ends
  (the socket closed, ``close()``, cancellation, a bug), its ``finally`` fails every pending
  request with ``ConnectionLost`` at once and reports every channel closed.
* **Requests** are written in call order (the frame reaches the socket's buffer before the
  first ``await``), so sends from one task arrive in order, and concurrent tasks interleave
  whole frames. Each request waits for its reply at most ``request_timeout`` seconds.
* **Reconnect.** With ``maintain_connection=True`` a supervisor task connects, registers, waits
  for the connection to end, sleeps a full-jitter delay (``client.backoff``) and starts over. It
  always sleeps between attempts (it never spins); the delay ceiling doubles from
  ``backoff_base`` to ``backoff_cap`` and starts again from ``backoff_base`` after a
  connection that stayed up for ``backoff_cap`` seconds. ``close()`` cancels it.
* **Bounded buffers, no silent loss.** Messages of a channel with no ``on_message`` callback
  wait in a per-channel buffer of ``channel_buffer`` messages for ``async for``. If the buffer
  is full when a message arrives, the channel is closed (reason ``OVERFLOW``, the broker and
  the peer are told): the consumer reads what was buffered and then gets ``ChannelClosed``.
  The sender had already been told "delivered", so dropping a message quietly would be a lie,
  and stopping the reader would stall every other channel and request on the connection.
  Incoming channels with no ``on_incoming_channel`` wait in a buffer of ``incoming_buffer``
  channels for ``incoming_channels()``; when it is full a new channel is refused (closed).
* **Tokens** (brokers with authentication on): ``token=`` a string, or a function (sync or
  async) returning one. A function is called on every connection attempt, so each reconnect
  registers with a fresh token; when the broker says when the token expires, the function is
  called again before that (at ``token_refresh_ratio`` of the lifetime) and the new token is
  sent in a ``refresh`` request on the same connection. A refresh belongs to the connection it
  was started on and ends with it, so a late token never lands on a newer connection. A close
  with 4003 ("token invalid") stops reconnecting; 4001 ("reconnect with a new token") does not.
* **Callbacks** run on the reader task, in frame order, and must not block. A callback may be
  a coroutine function: its coroutine is run as a task the client tracks and cancels in
  ``close()``. Exceptions raised by callbacks are logged and never break the connection.

Everything is safe to call from many tasks of one event loop at once; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final, Generic, TypeVar, assert_never

import msgspec
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.uri import parse_uri

from client.backoff import full_jitter
from client.errors import (
    BrokerError,
    ChannelClosed,
    CloseReason,
    ConnectFailed,
    ConnectionLost,
    NotConnected,
    ProtocolViolation,
    RequestFailed,
    RequestTimeout,
)
from client.session import (
    UNEXPECTED_REPLY,
    AbandonedChannel,
    ChannelEnded,
    ChannelIncoming,
    ChannelPayload,
    Event,
    Listed,
    Opened,
    OutgoingRequest,
    RegisteredAs,
    ReplyValue,
    RequestRejected,
    RequestSucceeded,
    Session,
    TokenRefreshed,
    Violation,
    encode_payload,
)
from shared.ids import ChannelId, ConnectionId
from shared.messages import CLOSE_TOKEN_INVALID

__all__ = ["BrokerClient", "Channel"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A callback may return anything; an awaitable it returns is run as a tracked task.
Callback0 = Callable[[], object]
MessageCallback = Callable[[Any], object]
ChannelCallback = Callable[["Channel"], object]
#: A token, or what gives one (called on every connection attempt and before expiry).
TokenSource = str | Callable[[], str | Awaitable[str]]

DEFAULT_CHANNEL_BUFFER: Final = 1024
DEFAULT_INCOMING_BUFFER: Final = 256
#: The shortest wait before a token refresh.
MIN_REFRESH_DELAY: Final = 1.0
#: How long ``close()`` waits for the WebSocket closing handshake before dropping the TCP link.
CLOSE_TIMEOUT: Final = 2.0


class _Ended(Exception):
    """An inbox was closed normally and is empty."""


class _Inbox(Generic[T]):
    """A bounded FIFO that can be closed, for ``async for`` consumers."""

    def __init__(self, capacity: int) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._capacity = capacity
        self._closed = False
        self._error: BaseException | None = None
        self._changed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, item: T) -> bool:
        """Append unless full (``False``); items offered after ``close`` are dropped."""
        if self._closed:
            return True
        if len(self._items) >= self._capacity:
            return False
        self._items.append(item)
        self._changed.set()
        return True

    def __len__(self) -> int:
        return len(self._items)

    def take_all(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        return items

    def close(self, error: BaseException | None = None) -> None:
        """Consumers get what is buffered, then ``error`` (or the end of iteration)."""
        if not self._closed:
            self._closed = True
            self._error = error
            self._changed.set()

    async def get(self) -> T:
        while True:
            if self._items:
                return self._items.popleft()
            if self._closed:
                if self._error is not None:
                    raise self._error
                raise _Ended
            self._changed.clear()
            await self._changed.wait()


class _InboxIterator(Generic[T]):
    """``async for`` over an inbox: stops when it is closed and drained."""

    def __init__(self, inbox: _Inbox[T]) -> None:
        self._inbox = inbox

    def __aiter__(self) -> _InboxIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._inbox.get()
        except _Ended:
            raise StopAsyncIteration from None


class Channel:
    """One end of a channel between two connections; made by the client, never by hand.

    Receive with ``on_message`` (a callback) or ``async for payload in channel``; while a
    ``request()`` waits, the next message answers it instead. ``on_closed`` is called once
    when the channel closes, whatever the reason (``close_reason``).
    """

    def __init__(
        self,
        link: _Link,
        channel_id: ChannelId,
        peer_id: ConnectionId,
        *,
        buffer: int,
    ) -> None:
        self._link = link
        self._channel_id = channel_id
        self._peer_id = peer_id
        self._inbox: _Inbox[Any] = _Inbox(buffer)
        self._on_message: MessageCallback | None = None
        #: Called (no arguments) once, when the channel closes.
        self.on_closed: Callback0 | None = None
        self._close_reason: CloseReason | None = None
        self._response: asyncio.Future[Any] | None = None
        self._request_lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = "open" if self._close_reason is None else f"closed: {self._close_reason.value}"
        return f"<Channel {self._channel_id} peer={self._peer_id} {state}>"

    @property
    def channel_id(self) -> ChannelId:
        return self._channel_id

    @property
    def peer_id(self) -> ConnectionId:
        """The connection at the other end."""
        return self._peer_id

    @property
    def closed(self) -> bool:
        return self._close_reason is not None

    @property
    def close_reason(self) -> CloseReason | None:
        """Why the channel closed, or ``None`` while it is open."""
        return self._close_reason

    @property
    def on_message(self) -> MessageCallback | None:
        """Called with each payload (any JSON value). Setting it hands it what was buffered."""
        return self._on_message

    @on_message.setter
    def on_message(self, callback: MessageCallback | None) -> None:
        self._on_message = callback
        if callback is not None:
            for payload in self._inbox.take_all():
                self._link.client._invoke(callback, payload)

    async def send(self, payload: object) -> None:
        """Send ``payload`` to the peer; returns when the broker confirms delivery.

        Raises ``InvalidPayload`` (nothing sent) if it is not JSON-serialisable,
        ``ChannelClosed`` if the channel is closed, ``RequestFailed`` on
        ``channel_message_failed``, ``RequestTimeout``, or ``ConnectionLost``.
        """
        raw = encode_payload(payload)  # InvalidPayload before anything else
        if self._close_reason is not None:
            raise ChannelClosed(self._channel_id, self._close_reason)
        await self._link.request(self._link.session.send(self._channel_id, raw), "send")

    async def request(
        self,
        payload: object,
        timeout: float | None = None,
    ) -> Any:
        """Send ``payload`` and return the next message the peer sends on this channel.

        The JS client's ``sendWithResponse``. ``timeout`` (default: the client's
        ``request_timeout``) bounds the whole exchange; ``RequestTimeout`` when it passes,
        ``ChannelClosed`` if the channel closes first. Concurrent calls on one channel take
        turns, since a reply is only "the next message".
        """
        limit = self._link.client.request_timeout if timeout is None else timeout
        async with self._request_lock:
            if self._close_reason is not None:
                raise ChannelClosed(self._channel_id, self._close_reason)
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            # Armed before sending: the peer's answer may overtake our own confirmation.
            self._response = waiter
            try:
                async with asyncio.timeout(limit):
                    await self.send(payload)
                    return await waiter
            except RequestTimeout:
                raise
            except TimeoutError:
                raise RequestTimeout("channel request", limit) from None
            finally:
                self._response = None
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()  # retrieved: send() may have raised first

    async def close(self) -> None:
        """Close the channel; the peer gets ``channel_closed_notification``.

        Idempotent. The channel stops delivering at once; this returns when the broker has
        confirmed. A channel that is already gone on the broker, or a connection that is
        gone, is not an error; ``RequestTimeout`` if the broker does not answer.
        """
        if self._close_reason is not None:
            return
        self._end(CloseReason.LOCAL)
        request = self._link.session.close_channel(self._channel_id)
        if request is None:
            return
        with contextlib.suppress(RequestFailed, NotConnected):
            await self._link.request(request, "close")

    def __aiter__(self) -> _InboxIterator[Any]:
        """Iterate over incoming payloads; ends when the channel closes.

        After an ``OVERFLOW`` close, iteration yields what was buffered and then raises
        ``ChannelClosed``, since messages were lost.
        """
        return _InboxIterator(self._inbox)

    # --- called by the connection ---------------------------------------------------------

    def _deliver(self, raw: msgspec.Raw) -> None:
        payload = msgspec.json.decode(raw)
        if self._response is not None and not self._response.done():
            self._response.set_result(payload)
        elif self._on_message is not None:
            self._link.client._invoke(self._on_message, payload)
        elif not self._inbox.offer(payload):
            log.warning(
                "channel %s: %d messages unread; closing it (overflow)",
                self._channel_id,
                len(self._inbox),
            )
            self._end(CloseReason.OVERFLOW)
            self._link.close_in_background(self._channel_id)

    def _end(self, reason: CloseReason) -> None:
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._link.forget(self._channel_id)
        error = ChannelClosed(self._channel_id, reason)
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
        self._inbox.close(error if reason is CloseReason.OVERFLOW else None)
        if self.on_closed is not None:
            self._link.client._invoke(self.on_closed)


class _Link:
    """One WebSocket connection: its session, its reader task, its pending requests."""

    def __init__(self, client: BrokerClient, ws: ClientConnection) -> None:
        self.client = client
        self.ws = ws
        self.session = Session()
        self.channels: dict[ChannelId, Channel] = {}
        self.futures: dict[int, asyncio.Future[ReplyValue | Channel]] = {}
        self.ended = asyncio.Event()
        #: The close code the broker sent, once the connection ended.
        self.close_code: int | None = None
        self.refresher: asyncio.Task[None] | None = None
        self.reader = asyncio.create_task(self._read(), name=f"broker-client-reader {client.url}")

    async def request(self, request: OutgoingRequest, operation: str) -> ReplyValue | Channel:
        timeout = self.client.request_timeout
        future: asyncio.Future[ReplyValue | Channel] = asyncio.get_running_loop().create_future()
        self.futures[request.request_id] = future
        try:
            async with asyncio.timeout(timeout):
                try:
                    # Sends the frame before the first await: call order is wire order.
                    await self.ws.send(request.frame, text=True)
                except ConnectionClosed as exc:
                    raise ConnectionLost() from exc
                return await future
        except BaseException as exc:
            if future.done() and not future.cancelled() and future.exception() is None:
                result = future.result()
                if isinstance(result, Channel):  # opened, but the opener gave up
                    self.client._spawn(result.close())
            if isinstance(exc, TimeoutError) and not isinstance(exc, BrokerError):
                raise RequestTimeout(operation, timeout) from None
            raise
        finally:
            del self.futures[request.request_id]
            if not future.done():
                self.session.abandon(request.request_id)
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: we may have raised something else

    def forget(self, channel_id: ChannelId) -> None:
        self.channels.pop(channel_id, None)

    def close_in_background(self, channel_id: ChannelId) -> None:
        request = self.session.close_channel(channel_id)
        if request is not None:
            self.client._spawn(self._close_quietly(request))

    async def _close_quietly(self, request: OutgoingRequest) -> None:
        with contextlib.suppress(RequestFailed, RequestTimeout, NotConnected):
            await self.request(request, "close")

    async def close(self) -> None:
        """Close the WebSocket (1000) and wait for the reader to finish its cleanup."""
        try:
            await self.ws.close()
        finally:
            if not self.reader.done():
                self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.reader)

    async def _read(self) -> None:
        try:
            while True:
                frame = await self.ws.recv(decode=False)
                try:
                    self._handle(self.session.receive(frame))
                except Exception:
                    log.exception("error while handling a broker frame")
        except ConnectionClosed as exc:
            log.info("connection to %s closed: %s", self.client.url, exc)
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
        except Exception:
            log.exception("reader of %s failed", self.client.url)
        finally:
            self._end()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            match event:
                case RequestSucceeded(request_id=request_id, value=value):
                    result: ReplyValue | Channel = value
                    if isinstance(value, Opened):
                        result = self._new_channel(value.channel_id, value.peer_id)
                    future = self.futures.get(request_id)
                    if future is not None and not future.done():
                        future.set_result(result)
                    elif isinstance(result, Channel):
                        # The opener stopped waiting after the reply was on its way.
                        self.client._spawn(result.close())
                case RequestRejected(request_id=request_id, kind=kind, reply_type=rt, error=err):
                    future = self.futures.get(request_id)
                    if future is not None and not future.done():
                        failure: BrokerError = (
                            ProtocolViolation(err)
                            if rt == UNEXPECTED_REPLY
                            else RequestFailed(rt, err, request_type=kind)
                        )
                        future.set_exception(failure)
                case ChannelIncoming(channel_id=channel_id, peer_id=peer_id):
                    self.client._incoming(self._new_channel(channel_id, peer_id))
                case ChannelPayload(channel_id=channel_id, payload=payload):
                    channel = self.channels.get(channel_id)
                    if channel is not None:
                        channel._deliver(payload)
                case ChannelEnded(channel_id=channel_id):
                    channel = self.channels.get(channel_id)
                    if channel is not None:
                        channel._end(CloseReason.PEER)
                case AbandonedChannel(channel_id=channel_id):
                    self.close_in_background(channel_id)
                case Violation(description=description, serious=serious):
                    if serious:
                        log.warning("broker %s: %s", self.client.url, description)
                    else:
                        log.debug("broker %s: %s", self.client.url, description)
                case _:  # pragma: no cover - mypy proves every event is handled
                    assert_never(event)

    def _new_channel(self, channel_id: ChannelId, peer_id: ConnectionId) -> Channel:
        channel = Channel(self, channel_id, peer_id, buffer=self.client.channel_buffer)
        self.channels[channel_id] = channel
        return channel

    def _end(self) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
        ending = self.session.connection_lost()
        for request_id in ending.failed_requests:
            future = self.futures.get(request_id)
            if future is not None and not future.done():
                future.set_exception(ConnectionLost())
        for channel in list(self.channels.values()):
            channel._end(CloseReason.CONNECTION)
        self.channels.clear()
        self.ended.set()
        self.client._link_ended(self)


class BrokerClient:
    """A connection to the broker under one role; see the module docstring for semantics.

    ``url`` is the broker's (or its load balancer's) WebSocket URL. ``role`` is registered on
    every (re)connection. ``request_timeout`` bounds each request, ``connect_timeout`` each
    connection attempt (handshake included). With ``maintain_connection`` the client
    reconnects after every drop, with full-jitter backoff from ``backoff_base`` to
    ``backoff_cap`` seconds. ``connect_options`` go to ``websockets.asyncio.client.connect``
    (``additional_headers``, ``ssl``, ``proxy``, ...).

    Callbacks: ``on_connected()`` after each registration, ``on_disconnected()`` when a
    registered connection ends (``close()`` included), ``on_incoming_channel(channel)``.
    """

    def __init__(
        self,
        url: str,
        role: str,
        *,
        request_timeout: float = 3.0,
        connect_timeout: float = 10.0,
        maintain_connection: bool = False,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        channel_buffer: int = DEFAULT_CHANNEL_BUFFER,
        incoming_buffer: int = DEFAULT_INCOMING_BUFFER,
        on_connected: Callback0 | None = None,
        on_disconnected: Callback0 | None = None,
        on_incoming_channel: ChannelCallback | None = None,
        connect_options: Mapping[str, Any] | None = None,
        token: TokenSource | None = None,
        token_refresh_ratio: float = 0.8,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {url!r}") from exc
        if request_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if channel_buffer < 1 or incoming_buffer < 1:
            raise ValueError("buffers must hold at least one item")
        if not 0 < token_refresh_ratio < 1:
            raise ValueError("token_refresh_ratio must be between 0 and 1")
        full_jitter(backoff_base, backoff_cap)  # validates now rather than on the first drop
        self.url = url
        self.role = role
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.maintain_connection = maintain_connection
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.channel_buffer = channel_buffer
        self.incoming_buffer = incoming_buffer
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self._on_incoming_channel = on_incoming_channel
        self._connect_options: dict[str, Any] = dict(connect_options or {})
        self._token = token
        self.token_refresh_ratio = token_refresh_ratio
        self._link: _Link | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._incoming_inbox: _Inbox[Channel] = _Inbox(incoming_buffer)
        self._tasks: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"<BrokerClient {self.url} role={self.role!r} id={self.connection_id}>"

    # --- lifecycle ------------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and register; returns once registered. A no-op while connected.

        Without ``maintain_connection`` a failure raises (``ConnectFailed``,
        ``RequestFailed`` for ``register_failed``, ``RequestTimeout``). With it, attempts
        repeat with backoff until one succeeds; bound the wait with ``asyncio.timeout()``,
        and if ``connect()`` is cancelled or fails the background reconnecting stops too.
        """
        async with self._connect_lock:
            if self._link is not None:
                return
            if self._incoming_inbox.closed:
                self._incoming_inbox = _Inbox(self.incoming_buffer)
            if not self.maintain_connection:
                self._adopt(await self._open())
                return
            if self._supervisor is None or self._supervisor.done():
                first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._supervisor = asyncio.create_task(
                    self._supervise(first), name=f"broker-client-supervisor {self.url}"
                )
                try:
                    await first
                except BaseException:
                    await self.close()
                    raise
            else:  # pragma: no cover - the supervisor is only ever started here
                await self._connected.wait()

    async def close(self) -> None:
        """Disconnect, stop reconnecting, close every channel locally; idempotent.

        Pending requests fail with ``ConnectionLost``; iterators end. The broker closes the
        channels of this connection and notifies their peers.
        """
        await self._stop_supervisor()
        link = self._link
        if link is not None:
            await link.close()
        self._incoming_inbox.close()
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> BrokerClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_connected(self) -> None:
        """Wait until the client is registered (e.g. after a reconnect)."""
        await self._connected.wait()

    @property
    def connection_id(self) -> ConnectionId | None:
        """The id the broker assigned to the current connection; ``None`` while disconnected."""
        link = self._link
        return link.session.connection_id if link is not None else None

    @property
    def connected(self) -> bool:
        """Registered right now."""
        return self._link is not None

    @property
    def pending_requests(self) -> int:
        """Requests sent on the current connection and not answered yet."""
        link = self._link
        return len(link.futures) if link is not None else 0

    # --- operations -----------------------------------------------------------------------

    async def list_by_role(self, role: str) -> list[ConnectionId]:
        """Every live connection registered with ``role``, on every node.

        A node answers at most a page of ids (1,000 by default), sorted, saying when more
        follow; the pages are requested one after another and joined here.
        """
        ids: list[ConnectionId] = []
        after: str | None = None
        while True:
            link = self._require_link()
            request = link.session.list_by_role(role, after=after)
            result = await link.request(request, "list_by_role")
            assert isinstance(result, Listed)
            ids += result.ids
            if not result.more or not result.ids:
                return ids
            after = result.ids[-1]

    async def open_channel(self, target_id: str) -> Channel:
        """Open a channel to the connection ``target_id``; it gets an incoming channel.

        ``RequestFailed`` (``channel_open_failed``) if the target is unknown.
        """
        link = self._require_link()
        result = await link.request(link.session.open_channel(target_id), "open")
        assert isinstance(result, Channel)
        return result

    def incoming_channels(self) -> _InboxIterator[Channel]:
        """Channels other connections open to this one, while no ``on_incoming_channel`` is set.

        Ends on ``close()``, or when the connection ends and the client does not reconnect.
        Reconnections do not end it.
        """
        return _InboxIterator(self._incoming_inbox)

    @property
    def on_incoming_channel(self) -> ChannelCallback | None:
        """Called with each incoming ``Channel``. Setting it hands it what was buffered."""
        return self._on_incoming_channel

    @on_incoming_channel.setter
    def on_incoming_channel(self, callback: ChannelCallback | None) -> None:
        self._on_incoming_channel = callback
        if callback is not None:
            for channel in self._incoming_inbox.take_all():
                self._invoke(callback, channel)

    # --- internals ------------------------------------------------------------------------

    def _require_link(self) -> _Link:
        if self._link is None:
            raise NotConnected()
        return self._link

    async def _open(self) -> _Link:
        """One connection attempt: WebSocket handshake, then ``register``."""
        options: dict[str, Any] = {"close_timeout": CLOSE_TIMEOUT, "open_timeout": None}
        options.update(self._connect_options)
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await ws_connect(self.url, **options)
        except TimeoutError as exc:
            raise ConnectFailed(
                self.url, f"no handshake within {self.connect_timeout:g} s"
            ) from exc
        except (OSError, InvalidHandshake) as exc:
            raise ConnectFailed(self.url, str(exc) or type(exc).__name__) from exc
        link = _Link(self, ws)
        try:
            token = await self._fresh_token()
            result = await link.request(link.session.register(self.role, token), "register")
        except BaseException:
            await link.close()
            raise
        assert isinstance(result, RegisteredAs)
        self._schedule_refresh(link, result.expires_in)
        return link

    async def _fresh_token(self) -> str | None:
        source = self._token
        if source is None or isinstance(source, str):
            return source
        token = source()
        if inspect.isawaitable(token):
            token = await token
        return token

    def _schedule_refresh(self, link: _Link, expires_in: int | None) -> None:
        if expires_in is None or self._token is None or isinstance(self._token, str):
            return
        link.refresher = asyncio.create_task(
            # At least a second apart: a token that is (nearly) expired when it arrives
            # must not make the client ask for tokens in a tight loop.
            self._refresh_later(
                link, max(MIN_REFRESH_DELAY, expires_in * self.token_refresh_ratio)
            ),
            name=f"broker-client-refresh {self.url}",
        )

    async def _refresh_later(self, link: _Link, delay: float) -> None:
        # Runs on the connection it was made for and is cancelled when that one ends.
        await asyncio.sleep(delay)
        try:
            token = await self._fresh_token()
            assert token is not None
            result = await link.request(link.session.refresh(token), "refresh")
        except (BrokerError, OSError) as exc:
            log.warning("token refresh with %s failed: %s", self.url, exc)
            return
        assert isinstance(result, TokenRefreshed)
        self._schedule_refresh(link, result.expires_in)

    def _adopt(self, link: _Link) -> None:
        if link.ended.is_set():  # dropped between registering and here
            raise ConnectionLost()
        self._link = link
        self._connected.set()
        log.info("registered with %s as %s (role %r)", self.url, self.connection_id, self.role)
        if self.on_connected is not None:
            self._invoke(self.on_connected)

    def _link_ended(self, link: _Link) -> None:
        if link is not self._link:
            return  # a connection that never finished registering
        self._link = None
        self._connected.clear()
        if not self.maintain_connection or self._supervisor is None:
            self._incoming_inbox.close()
        if self.on_disconnected is not None:
            self._invoke(self.on_disconnected)

    async def _supervise(self, first: asyncio.Future[None]) -> None:
        try:
            await self._reconnect_forever(first)
        except Exception as exc:  # a bug: say so loudly rather than die silently
            log.exception("the reconnect loop of %s failed", self.url)
            if not first.done():
                first.set_exception(exc)
            self._incoming_inbox.close()

    async def _reconnect_forever(self, first: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        delays = full_jitter(self.backoff_base, self.backoff_cap)
        while True:
            try:
                link = await self._open()
                self._adopt(link)
            except asyncio.CancelledError:
                raise
            except RequestFailed as exc:
                if self._token_may_be_renewed(exc):
                    log.warning("broker %s: token expired; retrying with a new one", self.url)
                else:
                    # register_failed: the broker refuses our role; retrying cannot help.
                    log.error("broker %s refused registration: %s", self.url, exc)
                    if not first.done():
                        first.set_exception(exc)
                    self._incoming_inbox.close()
                    return
            except Exception as exc:
                log.warning("connecting to %s failed: %s", self.url, exc)
            else:
                if not first.done():
                    first.set_result(None)
                started = loop.time()
                await link.ended.wait()
                if link.close_code == CLOSE_TOKEN_INVALID:
                    log.error("broker %s: token invalid or revoked; not reconnecting", self.url)
                    self._incoming_inbox.close()
                    return
                if loop.time() - started >= self.backoff_cap:
                    delays = full_jitter(self.backoff_base, self.backoff_cap)
            delay = next(delays)
            log.info("reconnecting to %s in %.2f s", self.url, delay)
            await asyncio.sleep(delay)

    def _token_may_be_renewed(self, exc: RequestFailed) -> bool:
        return callable(self._token) and "Invalid token: expired" in str(exc)

    async def _stop_supervisor(self) -> None:
        supervisor, self._supervisor = self._supervisor, None
        current = asyncio.current_task()
        if supervisor is None or supervisor is current:
            return
        supervisor.cancel()
        cancelling = current.cancelling() if current is not None else 0
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        # suppress() must swallow the supervisor's cancellation, not a new one of ours.
        if current is not None and current.cancelling() > cancelling:
            raise asyncio.CancelledError

    def _incoming(self, channel: Channel) -> None:
        if self._on_incoming_channel is not None:
            self._invoke(self._on_incoming_channel, channel)
        elif not self._incoming_inbox.offer(channel):
            log.warning(
                "%d incoming channels unread; refusing %s", self.incoming_buffer, channel.channel_id
            )
            channel._end(CloseReason.OVERFLOW)
            channel._link.close_in_background(channel.channel_id)

    def _invoke(self, callback: Callable[..., object], *args: Any) -> None:
        try:
            result = callback(*args)
        except Exception:
            log.exception("callback %r raised", callback)
            return
        if inspect.isawaitable(result):
            self._spawn(result)

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task: asyncio.Future[Any]
        if inspect.iscoroutine(awaitable):
            task = asyncio.get_running_loop().create_task(awaitable, name="broker-client-task")
        else:
            task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

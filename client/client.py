"""The asyncio SDK: ``BrokerClient`` and ``Channel``, a thin shell over ``websockets``.

Every protocol decision lives in ``client.session``; this module only moves frames between
the WebSocket and the session, keeps futures for pending requests, runs timers and callbacks.

Theory of operation
-------------------
* **One session, one socket at a time.** A ``_Link`` holds one broker session (its
  ``Session``, channels and pending calls) and its current WebSocket (``_Socket``): a reader
  task that feeds every frame to the session and acts on the events it returns (it resolves
  request futures, creates ``Channel`` objects, delivers payloads), and one sequence of
  writes: what the session hands out leaves in order (written by the caller that made it
  when nothing waits before it, else by a writer task).
* **The end.** However a connection of a session that cannot resume ends (the socket closed,
  ``close()``, cancellation, a bug), the reader's ``finally`` fails every pending request with
  ``ConnectionLost`` at once and reports every channel closed.
* **Resume.** When the broker grants a resumable session (``resume=True``, the default, and a
  broker that supports it), a dropped connection only detaches it: pending calls keep waiting
  (their timeouts stop, then start over once resumed), new calls are queued, channels stay
  open, and a resume task reconnects with full-jitter backoff (at once after close code 4100,
  a draining node) and sends ``resume``. ``on_resumed(complete)`` runs when it succeeds. If it
  fails (``resume_failed``, the window passed, or a close code after which resuming cannot
  help), ``on_session_lost(reason)`` runs and the session ends as above. Acknowledgements
  (``ack``, after ``ScheduleAck``) and the per-channel safety net (``resend_stalled``, every
  ``TICK`` seconds) run on timers of the event loop.
* **Requests** are written in call order (the frame reaches the socket's buffer, or the
  queue before it, before the first ``await``), so sends from one task arrive in order, and
  concurrent tasks interleave whole frames. Each request
  waits for its reply at most ``request_timeout`` seconds of attached time. In a resumable
  session a ``send()`` first waits while its channel holds ``max_unacked_messages``
  unacknowledged messages (flow control).
* **Reconnect.** With ``maintain_connection=True`` a supervisor task connects, registers, waits
  for the session to end, sleeps a full-jitter delay (``client.backoff``) and starts over. It
  always sleeps between attempts (it never spins); the delay ceiling doubles from
  ``backoff_base`` to ``backoff_cap`` and starts again from ``backoff_base`` after a
  session that stayed up for ``backoff_cap`` seconds. ``close()`` cancels it.
* **Bounded buffers, no silent loss.** Messages of a channel with no ``on_message`` callback
  wait in a per-channel buffer of ``channel_buffer`` messages for ``async for``. If the buffer
  is full when a message arrives, the channel is closed (reason ``OVERFLOW``, the broker and
  the peer are told): the consumer reads what was buffered and then gets ``ChannelClosed``.
  The sender had already been told "delivered", so dropping a message quietly would be a lie,
  and stopping the reader would stall every other channel and request on the connection.
  Incoming channels with no ``on_incoming_channel`` wait in a buffer of ``incoming_buffer``
  channels for ``incoming_channels()``; when it is full a new channel is refused (closed).
* **Tokens** (brokers with authentication on): ``token=`` a string, or a function (sync or
  async) returning one. A function is called on every connection attempt (a resume
  included), so each one carries a fresh token; when the broker says when the token expires,
  the function is called again before that (at ``token_refresh_ratio`` of the lifetime) and
  the new token is sent in a ``refresh`` request on the same connection. A refresh belongs to
  the connection it was started on and ends with it, so a late token never lands on a newer
  connection. A close with 4003 ("token invalid") stops reconnecting; 4001 ("reconnect with a
  new token") does not.
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
from typing import Any, Final, assert_never

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
from client.events import (
    AbandonedChannel,
    ChannelEnded,
    ChannelIncoming,
    ChannelPayload,
    Detached,
    Ending,
    Event,
    Listed,
    Opened,
    OutgoingRequest,
    RegisteredAs,
    ReplyValue,
    RequestLost,
    RequestRejected,
    RequestSucceeded,
    ScheduleAck,
    SendWindowOpened,
    SessionLost,
    SessionResumed,
    TokenRefreshed,
    Violation,
)
from client.inbox import Inbox, InboxIterator
from client.session import (
    DEFAULT_MAX_UNACKED,
    UNEXPECTED_REPLY,
    Session,
    encode_payload,
)
from shared.ids import ChannelId, ConnectionId
from shared.messages import CLOSE_TOKEN_INVALID

__all__ = ["BrokerClient", "Channel"]

log = logging.getLogger(__name__)

#: A callback may return anything; an awaitable it returns is run as a tracked task.
Callback0 = Callable[[], object]
MessageCallback = Callable[[Any], object]
ChannelCallback = Callable[["Channel"], object]
ResumedCallback = Callable[[bool], object]
SessionLostCallback = Callable[[str], object]
#: A token, or what gives one (called on every connection attempt and before expiry).
TokenSource = str | Callable[[], str | Awaitable[str]]

DEFAULT_CHANNEL_BUFFER: Final = 1024
DEFAULT_INCOMING_BUFFER: Final = 256
#: The shortest wait before a token refresh.
MIN_REFRESH_DELAY: Final = 1.0
#: How long ``close()`` waits for the WebSocket closing handshake before dropping the TCP link.
CLOSE_TIMEOUT: Final = 2.0
#: Seconds between two calls of ``Session.resend_stalled`` (the per-channel safety net).
TICK: Final = 1.0


class Channel:
    """One end of a channel between two connections; made by the client, never by hand.

    Receive with ``on_message`` (a callback) or ``async for payload in channel``; while a
    ``request()`` waits, the next message answers it instead. ``on_closed`` is called once
    when the channel closes, whatever the reason (``close_reason``). A resumable session's
    channels carry on across a resume.
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
        self._inbox: Inbox[Any] = Inbox(buffer)
        self._on_message: MessageCallback | None = None
        #: Called (no arguments) once, when the channel closes.
        self.on_closed: Callback0 | None = None
        self._close_reason: CloseReason | None = None
        self._response: asyncio.Future[Any] | None = None
        self._request_lock = asyncio.Lock()
        #: Set when a send blocked by flow control may go on (or the channel closed).
        self._window = asyncio.Event()

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
        ``channel_message_failed``, ``RequestTimeout``, or ``ConnectionLost``. In a
        resumable session it carries on across a resume, waits while the channel holds
        ``max_unacked_messages`` unacknowledged messages, and a failure the message may
        survive (its recipient's node was lost, say) makes the SDK send it again instead.
        """
        raw = encode_payload(payload)  # InvalidPayload before anything else
        session = self._link.session
        while True:
            if self._close_reason is not None:
                raise ChannelClosed(self._channel_id, self._close_reason)
            if not session.send_blocked(self._channel_id):
                break
            self._window.clear()
            await self._window.wait()
        await self._link.request(session.send(self._channel_id, raw), "send")

    async def request(
        self,
        payload: object,
        timeout: float | None = None,
    ) -> Any:
        """Send ``payload`` and return the next message the peer sends on this channel.

        The JS client's ``sendWithResponse``. ``timeout`` (default: the client's
        ``request_timeout``) bounds the whole exchange (its clock stops while a resumable
        session is detached); ``RequestTimeout`` when it passes, ``ChannelClosed`` if the
        channel closes first. Concurrent calls on one channel take turns, since a reply is
        only "the next message".
        """
        limit = self._link.client.request_timeout if timeout is None else timeout
        async with self._request_lock:
            if self._close_reason is not None:
                raise ChannelClosed(self._channel_id, self._close_reason)
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            # Armed before sending: the peer's answer may overtake our own confirmation.
            self._response = waiter
            try:
                async with self._link.timeout(limit):
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

    def __aiter__(self) -> InboxIterator[Any]:
        """Iterate over incoming payloads; ends when the channel closes.

        After an ``OVERFLOW`` close, iteration yields what was buffered and then raises
        ``ChannelClosed``, since messages were lost.
        """
        return InboxIterator(self._inbox)

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
        self._window.set()
        if self.on_closed is not None:
            self._link.client._invoke(self.on_closed)


class _Socket:
    """One WebSocket of a session: a reader feeding the session, and one sequence of writes.

    Frames leave in the order the session made them, even when a batch (a resume's requests
    sent again) meets backpressure halfway: a caller that may wait writes at once when
    nothing is queued or being written (no task switch on the common path); frames from
    code that cannot wait (the reader, timers), or that come while a write is under way,
    queue for the writer task.
    """

    def __init__(self, link: _Link, ws: ClientConnection) -> None:
        self.ws = ws
        self._frames: collections.deque[bytes] = collections.deque()
        self._more = asyncio.Event()
        self._writing = False
        url = link.client.url
        self.reader = asyncio.create_task(link._read(self), name=f"broker-client-reader {url}")
        self.writer = asyncio.create_task(self._write(), name=f"broker-client-writer {url}")

    def write(self, frames: list[bytes]) -> None:
        """Queue ``frames`` for the writer task."""
        self._frames.extend(frames)
        self._more.set()

    async def write_now(self, frames: list[bytes]) -> None:
        """Write ``frames`` from this task, unless others go first (then queue them)."""
        if self._frames or self._writing:
            self.write(frames)
            return
        self._writing = True
        unwritten = collections.deque(frames)
        try:
            while unwritten:
                # websockets writes a frame before it waits for the buffer to drain.
                await self.ws.send(unwritten.popleft(), text=True)
        except ConnectionClosed:
            unwritten.clear()  # the reader reports the end
        finally:
            self._writing = False
            self._frames.extendleft(reversed(unwritten))  # cancelled halfway: the writer goes on
            if self._frames:
                self._more.set()

    async def _write(self) -> None:
        try:
            while True:
                await self._more.wait()
                self._more.clear()
                if self._writing:
                    continue  # write_now() is under way; it wakes us again when done
                self._writing = True
                try:
                    while self._frames:
                        await self.ws.send(self._frames.popleft(), text=True)
                finally:
                    self._writing = False
        except ConnectionClosed:
            pass  # the reader reports the end

    async def close(self) -> None:
        """Close the WebSocket (1000) and wait for the reader to finish its cleanup."""
        try:
            await self.ws.close()
        finally:
            if not self.reader.done():
                self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.reader)
            await asyncio.wait({self.writer})  # cancelled by the reader's cleanup


class _PausableTimeout:
    """``asyncio.timeout(seconds)`` whose clock stops while the session is detached and
    starts over when it is attached again (its request is then sent again, or its reply
    comes with the replayed frames)."""

    def __init__(self, link: _Link, seconds: float) -> None:
        self._link = link
        self._seconds = seconds
        self._timeout = asyncio.timeout(seconds)

    async def __aenter__(self) -> asyncio.Timeout:
        await self._timeout.__aenter__()
        self._link._timeouts[self._timeout] = self._seconds
        if self._link.session.detached:
            self._timeout.reschedule(None)
        return self._timeout

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        del self._link._timeouts[self._timeout]
        await self._timeout.__aexit__(exc_type, exc, tb)


class _Link:
    """One broker session: its ``Session``, channels and pending calls, over one WebSocket at
    a time (several, one after another, when a resumable session resumes)."""

    def __init__(self, client: BrokerClient, ws: ClientConnection) -> None:
        self.client = client
        self.session = Session(
            request_resume=client.resume, max_unacked=client.max_unacked_messages
        )
        self.channels: dict[ChannelId, Channel] = {}
        self.futures: dict[int, asyncio.Future[ReplyValue | Channel]] = {}
        #: Set once the session ended (never set by a resumable session's detaching).
        self.ended = asyncio.Event()
        #: The close code the broker sent, once the last connection ended.
        self.close_code: int | None = None
        self.refresher: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        #: Running request timeouts, with their length (see ``_PausableTimeout``).
        self._timeouts: dict[asyncio.Timeout, float] = {}
        #: The timeout of each request waited for, by request id.
        self._request_timeouts: dict[int, asyncio.Timeout] = {}
        self._closing = False
        self._detached_at = 0.0
        self._resumer: asyncio.Task[None] | None = None
        #: The answer to the resume on its way: True resumed, False not (dropped, lost).
        self._resume_outcome: asyncio.Future[bool] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self.socket: _Socket | None = _Socket(self, ws)

    # --- requests -------------------------------------------------------------------------

    async def request(self, request: OutgoingRequest, operation: str) -> ReplyValue | Channel:
        future = self._future(request)
        frames = self._frames_out()
        if frames and self.socket is not None:
            await self.socket.write_now(frames)  # call order is wire order
        return await self.wait(request.request_id, future, operation)

    def expect(self, request: OutgoingRequest) -> asyncio.Future[ReplyValue | Channel]:
        """Register the reply's future and hand the request to the writer task."""
        future = self._future(request)
        self.flush()
        return future

    def _future(self, request: OutgoingRequest) -> asyncio.Future[ReplyValue | Channel]:
        future: asyncio.Future[ReplyValue | Channel] = self._loop.create_future()
        self.futures[request.request_id] = future
        return future

    async def wait(
        self, request_id: int, future: asyncio.Future[ReplyValue | Channel], operation: str
    ) -> ReplyValue | Channel:
        timeout = self.client.request_timeout
        try:
            async with self.timeout(timeout) as running:
                self._request_timeouts[request_id] = running
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
            del self.futures[request_id]
            self._request_timeouts.pop(request_id, None)
            if not future.done():
                self.session.abandon(request_id)
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: we may have raised something else

    def timeout(self, seconds: float) -> _PausableTimeout:
        """A timeout that counts only while the session is attached."""
        return _PausableTimeout(self, seconds)

    def flush(self) -> None:
        """Hand every frame the session made to the writer task."""
        frames = self._frames_out()
        if frames and self.socket is not None:
            self.socket.write(frames)

    def _frames_out(self) -> list[bytes]:
        # A request sent again (a message after a failure it may survive, say) waits for
        # its new answer a full timeout.
        for request_id in self.session.take_resent():
            timeout = self._request_timeouts.get(request_id)
            if timeout is not None and not timeout.expired():
                timeout.reschedule(self._loop.time() + self.client.request_timeout)
        return self.session.frames_to_send()

    def forget(self, channel_id: ChannelId) -> None:
        self.channels.pop(channel_id, None)

    def close_in_background(self, channel_id: ChannelId) -> None:
        request = self.session.close_channel(channel_id)
        if request is not None:
            future = self.expect(request)
            self.client._spawn(self._close_quietly(request.request_id, future))

    async def _close_quietly(
        self, request_id: int, future: asyncio.Future[ReplyValue | Channel]
    ) -> None:
        with contextlib.suppress(RequestFailed, RequestTimeout, NotConnected):
            await self.wait(request_id, future, "close")

    @property
    def attached(self) -> bool:
        """Registered (or resumed) on a live connection."""
        return self.socket is not None and not self.session.detached

    async def close(self) -> None:
        """End the session: close the WebSocket (1000), stop resuming, clean up."""
        self._closing = True
        resumer = self._resumer
        if resumer is not None and resumer is not asyncio.current_task():
            resumer.cancel()
            await asyncio.wait({resumer})  # its cancellation, not ours, is swallowed
        if self.socket is not None:
            await self.socket.close()
        self._end(self.session.connection_lost())

    # --- frames in ------------------------------------------------------------------------

    async def _read(self, socket: _Socket) -> None:
        code: int | None = None
        try:
            while True:
                frame = await socket.ws.recv(decode=False)
                try:
                    self._handle(self.session.receive(frame))
                except Exception:
                    log.exception("error while handling a broker frame")
                self.flush()
        except ConnectionClosed as exc:
            log.info("connection to %s closed: %s", self.client.url, exc)
            code = exc.rcvd.code if exc.rcvd is not None else None
        except Exception:
            log.exception("reader of %s failed", self.client.url)
        finally:
            self._socket_ended(socket, code)

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
                    failure: BrokerError = (
                        ProtocolViolation(err)
                        if rt == UNEXPECTED_REPLY
                        else RequestFailed(rt, err, request_type=kind)
                    )
                    self._fail(request_id, failure)
                case RequestLost(request_id=request_id, reason=reason):
                    self._fail(request_id, ConnectionLost(reason))
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
                case ScheduleAck(delay=delay):
                    if self._ack_timer is None:
                        self._ack_timer = self._loop.call_later(delay, self._ack_due)
                case SendWindowOpened(channel_id=channel_id):
                    channel = self.channels.get(channel_id)
                    if channel is not None:
                        channel._window.set()
                case SessionResumed(complete=complete, expires_in=expires_in):
                    self._resumed(complete, expires_in)
                case SessionLost():
                    self._lose(event)
                case _:  # pragma: no cover - mypy proves every event is handled
                    assert_never(event)

    def _fail(self, request_id: int, error: BrokerError) -> None:
        future = self.futures.get(request_id)
        if future is not None and not future.done():
            future.set_exception(error)

    def _new_channel(self, channel_id: ChannelId, peer_id: ConnectionId) -> Channel:
        channel = Channel(self, channel_id, peer_id, buffer=self.client.channel_buffer)
        self.channels[channel_id] = channel
        return channel

    # --- timers ---------------------------------------------------------------------------

    def _ack_due(self) -> None:
        self._ack_timer = None
        if self.session.ack() is not None:
            self.flush()

    def start_ticker(self) -> None:
        """Run the session's safety net every ``TICK`` seconds while it is resumable."""
        if self.session.resumable and self._ticker is None:
            self._ticker = self._loop.call_later(TICK, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        self.session.resend_stalled(self._loop.time())
        self.flush()
        if self.attached:
            self.start_ticker()

    def _stop_timers(self) -> None:
        for handle in (self._ack_timer, self._ticker):
            if handle is not None:
                handle.cancel()
        self._ack_timer = self._ticker = None
        if self.refresher is not None:
            self.refresher.cancel()

    # --- the connection ending, resuming --------------------------------------------------

    def _socket_ended(self, socket: _Socket, code: int | None) -> None:
        socket.writer.cancel()
        if socket is not self.socket:
            return
        self.socket = None
        self.close_code = code
        if self.ended.is_set():
            return
        if self._closing:
            self._end(self.session.connection_lost())
            return
        outcome = self.session.connection_closed(code)
        match outcome:
            case Detached(immediately=immediately):
                self._detach(immediately)
            case SessionLost():
                self._lose(outcome)
            case Ending():
                self._end(outcome)
            case _:  # pragma: no cover - mypy proves every outcome is handled
                assert_never(outcome)

    def _detach(self, immediately: bool) -> None:
        for timeout in self._timeouts:
            if not timeout.expired():
                timeout.reschedule(None)
        self._stop_timers()
        self._settle_resume(False)  # a resume attempt's connection dropped: it goes on
        if self._resumer is None:
            # Detached since now: the window is counted from the first drop, not per attempt.
            self._detached_at = self._loop.time()
            self.client._link_detached(self)
            self._resumer = asyncio.create_task(
                self._resume(immediately), name=f"broker-client-resume {self.client.url}"
            )

    async def _resume(self, immediately: bool) -> None:
        client = self.client
        delays = full_jitter(client.backoff_base, client.backoff_cap)
        delay = 0.0 if immediately else next(delays)
        while True:
            await asyncio.sleep(delay)
            delay = next(delays)
            lost = self.session.expire(self._loop.time() - self._detached_at)
            if lost is not None:
                self._lose(lost)
                return
            try:
                token = await client._fresh_token()
                ws = await client._connect_ws()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("resuming the session with %s failed: %s", client.url, exc)
                continue
            if await self._try_resume(ws, token):
                return

    async def _try_resume(self, ws: ClientConnection, token: str | None) -> bool:
        outcome: asyncio.Future[bool] = self._loop.create_future()
        self._resume_outcome = outcome
        socket = self.socket = _Socket(self, ws)
        self.session.resume(token)
        self.flush()
        try:
            async with asyncio.timeout(self.client.connect_timeout):
                return await asyncio.shield(outcome)
        except TimeoutError:
            log.warning(
                "%s did not answer resume in %g s", self.client.url, self.client.connect_timeout
            )
            await socket.close()  # its reader detaches the session again
            return False

    def _settle_resume(self, resumed: bool) -> None:
        outcome, self._resume_outcome = self._resume_outcome, None
        if outcome is not None and not outcome.done():
            outcome.set_result(resumed)

    def _resumed(self, complete: bool, expires_in: int | None) -> None:
        now = self._loop.time()
        for timeout, seconds in self._timeouts.items():
            if not timeout.expired():
                timeout.reschedule(now + seconds)
        # The resume task is done; a drop from now on needs a new one.
        self._resumer = None
        self._settle_resume(True)
        self.start_ticker()
        self.client._schedule_refresh(self, expires_in)
        self.client._link_resumed(self, complete)

    def _lose(self, lost: SessionLost) -> None:
        log.warning("session with %s lost: %s", self.client.url, lost.reason)
        self.client._session_lost(self, lost.reason)
        self._end(lost.ending)
        socket = self.socket
        if socket is not None:  # a connection that answered resume_failed
            self.client._spawn(socket.close())

    def _end(self, ending: Ending) -> None:
        if self.ended.is_set():
            return
        self._stop_timers()
        resumer = self._resumer
        if resumer is not None and resumer is not asyncio.current_task():
            resumer.cancel()
        self._settle_resume(False)
        for request_id in ending.failed_requests:
            self._fail(request_id, ConnectionLost())
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

    With ``resume`` (the default) the client asks for a resumable session; when the broker
    grants one, a dropped connection is resumed on a new one (with the same backoff), and
    only a session that cannot be resumed ends. ``max_unacked_messages`` bounds, per
    channel, the messages kept until the peer acknowledges them (a ``send()`` beyond it
    waits). ``resume=False`` registers exactly as a client without resume does.

    Callbacks: ``on_connected()`` after each registration, ``on_disconnected()`` when a
    registered session ends (``close()`` included), ``on_incoming_channel(channel)``,
    ``on_resumed(complete)`` after each resume (``complete`` false: the node that held the
    session was lost, see docs/sdk.md), ``on_session_lost(reason)`` when a resumable session
    ends other than by ``close()`` (``on_disconnected()`` follows).
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
        resume: bool = True,
        max_unacked_messages: int = DEFAULT_MAX_UNACKED,
        on_resumed: ResumedCallback | None = None,
        on_session_lost: SessionLostCallback | None = None,
    ) -> None:
        try:
            parse_uri(url)
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {url!r}") from exc
        if request_timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if channel_buffer < 1 or incoming_buffer < 1 or max_unacked_messages < 1:
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
        self.resume = resume
        self.max_unacked_messages = max_unacked_messages
        self.on_resumed = on_resumed
        self.on_session_lost = on_session_lost
        self._link: _Link | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._incoming_inbox: Inbox[Channel] = Inbox(incoming_buffer)
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
                self._incoming_inbox = Inbox(self.incoming_buffer)
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
        """The id the broker assigned to the current session; ``None`` while disconnected.

        A resumable session keeps its id while it resumes.
        """
        link = self._link
        return link.session.connection_id if link is not None else None

    @property
    def connected(self) -> bool:
        """Registered (or resumed) on a live connection right now."""
        return self._link is not None and self._link.attached

    @property
    def resumable(self) -> bool:
        """The broker granted the current session resume (see ``resume``)."""
        return self._link is not None and self._link.session.resumable

    @property
    def pending_requests(self) -> int:
        """Requests made in the current session and not answered yet."""
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

    def incoming_channels(self) -> InboxIterator[Channel]:
        """Channels other connections open to this one, while no ``on_incoming_channel`` is set.

        Ends on ``close()``, or when the connection ends and the client does not reconnect.
        Reconnections do not end it.
        """
        return InboxIterator(self._incoming_inbox)

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
        link = _Link(self, await self._connect_ws())
        try:
            token = await self._fresh_token()
            result = await link.request(link.session.register(self.role, token), "register")
        except BaseException:
            await link.close()
            raise
        assert isinstance(result, RegisteredAs)
        self._schedule_refresh(link, result.expires_in)
        link.start_ticker()
        return link

    async def _connect_ws(self) -> ClientConnection:
        """The WebSocket handshake, within ``connect_timeout``."""
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
        return ws

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
        if link.attached:  # else it resumes, and says so
            self._connected.set()
        log.info(
            "registered with %s as %s (role %r%s)",
            self.url,
            self.connection_id,
            self.role,
            ", resumable" if link.session.resumable else "",
        )
        if self.on_connected is not None:
            self._invoke(self.on_connected)

    def _link_detached(self, link: _Link) -> None:
        if link is self._link:
            self._connected.clear()
        log.info("connection to %s lost; resuming session %s", self.url, self.connection_id)

    def _link_resumed(self, link: _Link, complete: bool) -> None:
        if link is not self._link:
            return  # resumed before registering finished: _adopt() follows
        self._connected.set()
        log.info(
            "session %s resumed on %s%s",
            link.session.connection_id,
            self.url,
            "" if complete else " (its node was lost: channels reconciled)",
        )
        if self.on_resumed is not None:
            self._invoke(self.on_resumed, complete)

    def _session_lost(self, link: _Link, reason: str) -> None:
        if link is self._link and self.on_session_lost is not None:
            self._invoke(self.on_session_lost, reason)

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

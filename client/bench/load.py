"""The load of one generator process: sender/receiver pairs and idle connections (a shell).

Setup, for every pair: connect and register a receiver and a sender, the sender opens a
channel to the receiver, and the receiver's ``incoming_channel`` is awaited. Then, from the
start time the coordinator gives, senders keep at most ``window`` messages unconfirmed: unpaced,
each confirmation lets the next message go at once; paced, a timer every ``tick`` seconds
hands out the tokens of one :class:`~client.bench.pacing.TokenBucket` (the worker's share of
the total rate). After the window, sending stops and the worker drains: it waits for every
confirmation and every delivery, up to ``drain_timeout``. What is still missing then is
counted (unconfirmed sends, lost messages).

With ``resume`` every pair speaks what the SDK speaks in a resumable session: both ends
register with ``"resume": true``, senders put the channel's ``seq`` on every message, and
both ends acknowledge broker frames as :mod:`client.bench.acks` says (receivers naming the
``seq`` they processed, which the node turns into ``channel_acked`` for the sender); the drain
then also waits until every message is covered by a ``channel_acked``. With ``detached``
(``resume`` too) the receivers drop their sockets at the start (no close frame), so that the
node holds every message of the run for them; after the window, once every send is
confirmed, they resume on the node they left and read the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from client.bench.acks import ACK_DELAY, AckDue, AckTracker
from client.bench.connection import (
    BenchConnection,
    ConnectionLost,
    Data,
    close_all,
    open_connection,
)
from client.bench.histogram import Histogram
from client.bench.pacing import TokenBucket, distribute
from client.bench.procfs import self_cpu_seconds
from client.bench.results import HistogramData, WorkerResult
from client.bench.sequence import SequenceChecker
from client.bench.wire import (
    BrokerFrame,
    FrameKind,
    MessageFrameBuilder,
    classify,
    decode_frame,
    encode_request,
)

__all__ = ["Counters", "LoadConfig", "Worker", "connect_registered"]

#: How many errors are kept as text (the rest are only counted).
ERROR_SAMPLES = 20


class LoadConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What one generator process does (sent to worker processes as JSON)."""

    #: (sender URL, receiver URL) of each pair this worker drives.
    pairs: list[tuple[str, str]]
    #: URL of each idle registered connection this worker holds open.
    idle: list[str] = []
    window: int = 64
    payload_size: int = 100
    #: This worker's share of the total paced rate, messages/s; 0 = unpaced.
    rate: float = 0.0
    tick: float = 0.001
    request_timeout: float = 10.0
    drain_timeout: float = 5.0
    connect_concurrency: int = 100
    role_prefix: str = "bench"
    #: Resumable sessions, as the SDK's (issue 14).
    resume: bool = False
    #: The receivers are away (detached) while the senders send; they resume after.
    detached: bool = False


@dataclass(slots=True)
class Counters:
    """Live counts of one worker (read by the progress line)."""

    sent: int = 0
    confirmed: int = 0
    delivered: int = 0
    failed: int = 0
    corrupt: int = 0
    sent_window: int = 0
    confirmed_window: int = 0
    delivered_window: int = 0
    # Session resume.
    held: int = 0
    held_window: int = 0
    acks_sent: int = 0
    channel_acked: int = 0
    replayed: int = 0
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < ERROR_SAMPLES and text not in self.errors:
            self.errors.append(text)


class Window:
    """The measured interval in ``time.monotonic_ns()`` units (empty until set)."""

    __slots__ = ("end_ns", "start_ns")

    def __init__(self) -> None:
        self.start_ns = 1 << 62
        self.end_ns = 1 << 62


class Endpoint:
    """A registered connection: control requests by ``replyTo``, frames to its owner.

    With ``resume`` it is a resumable session: every broker frame it handles is counted
    (``counted``) and acknowledged as the SDK does.
    """

    def __init__(
        self, connection: BenchConnection, counters: Counters, *, resume: bool = False
    ) -> None:
        self.connection = connection
        self.counters = counters
        self.next_id = 1
        self.connection_id = ""
        self.pending: dict[int, asyncio.Future[BrokerFrame]] = {}
        self.alive = True
        self.acks = AckTracker() if resume else None
        self.resume_token = ""
        self._ack_timer: asyncio.TimerHandle | None = None
        self.attach(connection)

    def attach(self, connection: BenchConnection) -> None:
        """Make ``connection`` this endpoint's socket (a new one after a resume)."""
        self.connection = connection
        self.alive = True
        connection.on_text = self.on_text
        connection.on_lost = self.on_lost

    def counted(self, frame: BrokerFrame) -> None:
        """A resumable session handled broker frame ``frame``: acknowledge when it is due."""
        acks = self.acks
        if acks is None or frame.id is None:
            return
        due = acks.frame(frame.id)
        if due is AckDue.NOW:
            self.send_ack()  # data_received flushes after this read
        elif due is AckDue.LATER and self._ack_timer is None:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(ACK_DELAY, self._ack_delay_passed)

    def send_ack(self) -> None:
        """Queue an ``ack`` of everything handled so far (the caller flushes)."""
        assert self.acks is not None
        request_id = self.next_id
        self.next_id += 1
        self.connection.send(self.acks.ack(request_id))
        self.counters.acks_sent += 1

    def _ack_delay_passed(self) -> None:
        self._ack_timer = None
        if self.alive and self.acks is not None and self.acks.due:
            self.send_ack()
            self.connection.flush()

    def stop_acks(self) -> None:
        """No more acknowledgements from this socket (it is dropped, or closing)."""
        if self.acks is not None:
            self.acks.detach()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None

    async def request(self, request_type: str, **fields: object) -> BrokerFrame:
        """Send a control request and await its reply (a failed reply raises).

        Callers bound the wait with ``asyncio.timeout``.
        """
        request_id = self.next_id
        self.next_id += 1
        future: asyncio.Future[BrokerFrame] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        self.connection.send(encode_request(request_type, request_id, **fields))
        self.connection.flush()
        try:
            reply = await future
        finally:
            self.pending.pop(request_id, None)
        if classify(reply) is FrameKind.REPLY_FAILED:
            raise ConnectionLost(f"{request_type} failed: {reply.error or reply.type}")
        return reply

    def decode(self, data: Data) -> BrokerFrame | None:
        try:
            return decode_frame(data)
        except msgspec.DecodeError as exc:
            self.counters.corrupt += 1
            self.counters.error(f"undecodable frame ({exc}): {data[:120]!r}")
            return None

    def on_text(self, data: Data) -> None:
        frame = self.decode(data)
        if frame is not None:
            self.on_frame(frame)
            self.counted(frame)

    def on_frame(self, frame: BrokerFrame) -> None:
        if frame.replyTo is not None:
            future = self.pending.get(frame.replyTo)
            if future is not None and not future.done():
                future.set_result(frame)
                return
        kind = classify(frame)
        if kind is FrameKind.ERROR:
            self.counters.failed += 1
            self.counters.error(f"error frame: {frame.error}")
        elif kind is FrameKind.CHANNEL_CLOSED:
            self.counters.error("unexpected channel_closed_notification")
            self.counters.failed += 1

    def on_lost(self, why: str) -> None:
        self.alive = False
        self.stop_acks()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionLost(why))

    async def register(self, role: str) -> None:
        if self.acks is None:
            reply = await self.request("register", role=role)
        else:
            reply = await self.request("register", role=role, resume=True)
            if not reply.resumeToken:
                raise ConnectionLost("register: no resumeToken (is resume off on the node?)")
            self.resume_token = reply.resumeToken
        if not reply.connectionId:
            raise ConnectionLost(f"register: no connectionId in {reply}")
        self.connection_id = reply.connectionId


class Receiver(Endpoint):
    """The receiving end of a pair: checks sequence numbers and delivery latency."""

    def __init__(
        self,
        connection: BenchConnection,
        counters: Counters,
        window: Window,
        latency: Histogram,
        *,
        resume: bool = False,
    ) -> None:
        super().__init__(connection, counters, resume=resume)
        self.window = window
        self.latency = latency
        self.checkers: dict[str, SequenceChecker] = {}
        self.incoming: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.unknown_channel = 0
        #: Between a ``resume`` and its ``resumed``: messages now are replayed ones.
        self.resuming = False

    def on_text(self, data: Data) -> None:
        frame = self.decode(data)
        if frame is None:
            return
        payload = frame.payload
        if payload is not None and frame.type == "channel_message":
            now = time.monotonic_ns()
            checker = self.checkers.get(frame.channelId or "")
            if checker is None:
                # A message for a channel we were not told about (the spec forbids it).
                self.unknown_channel += 1
                self.counters.corrupt += 1
                self.counters.error(f"channel_message before incoming_channel: {frame.channelId}")
                self.counted(frame)
                return
            checker.observe(payload.s)
            counters = self.counters
            counters.delivered += 1
            window = self.window
            if window.start_ns <= now < window.end_ns:
                counters.delivered_window += 1
                self.latency.record((now - payload.t) // 1000)
            acks = self.acks
            if acks is not None:
                acks.processed(frame.channelId or "", checker.in_order)
                if self.resuming:
                    counters.replayed += 1
        elif frame.type == "incoming_channel" and frame.replyTo is None:
            channel_id = frame.channelId or ""
            self.checkers.setdefault(channel_id, SequenceChecker())
            if not self.incoming.done():
                self.incoming.set_result(channel_id)
        else:
            self.on_frame(frame)
        self.counted(frame)

    def drop(self) -> None:
        """Lose the socket without a close frame: the node detaches the session."""
        self.stop_acks()
        self.connection.abort()

    async def resume(self) -> None:
        """Resume the session on a new socket to the same node, and read the replay
        (bound it with ``asyncio.timeout``)."""
        acks = self.acks
        assert acks is not None
        self.attach(await open_connection(self.connection.url))
        processed = {channel: checker.in_order for channel, checker in self.checkers.items()}
        self.resuming = True
        try:
            reply = await self.request(
                "resume",
                connectionId=self.connection_id,
                resumeToken=self.resume_token,
                lastId=acks.resume_from(),
                channels=processed,
            )
        finally:
            self.resuming = False
        if not reply.resumeToken or reply.complete is False:
            raise ConnectionLost(f"resume: an incomplete answer {reply}")
        self.resume_token = reply.resumeToken
        acks.resumed()
        if acks.due:
            self.send_ack()
            self.connection.flush()


class Sender(Endpoint):
    """The sending end of a pair: numbers, times and confirms its messages."""

    def __init__(
        self,
        connection: BenchConnection,
        counters: Counters,
        window: Window,
        latency: Histogram,
        *,
        max_unconfirmed: int,
        payload_size: int,
        resume: bool = False,
    ) -> None:
        super().__init__(connection, counters, resume=resume)
        self.window = window
        self.latency = latency
        self.max_unconfirmed = max_unconfirmed
        self.payload_size = payload_size
        self.inflight: dict[int, int] = {}
        self.seq = 0
        #: What the receiver acknowledged it processed (``channel_acked``).
        self.acked_seq = 0
        self.channel_id = ""
        self.builder: MessageFrameBuilder | None = None
        #: Unpaced: send again as soon as a confirmation frees a slot.
        self.saturate = False
        self.sending = False

    async def open_channel(self, target_id: str) -> str:
        reply = await self.request("open", targetId=target_id)
        if not reply.channelId:
            raise ConnectionLost(f"open: no channelId in {reply}")
        self.channel_id = reply.channelId
        self.builder = MessageFrameBuilder(
            reply.channelId, self.payload_size, with_seq=self.acks is not None
        )
        return reply.channelId

    @property
    def room(self) -> int:
        return self.max_unconfirmed - len(self.inflight) if self.alive else 0

    def send_messages(self, n: int) -> None:
        """Queue ``n`` messages (the caller flushes)."""
        builder = self.builder
        assert builder is not None
        send = self.connection.send
        inflight = self.inflight
        now = time.monotonic_ns()
        window = self.window
        for _ in range(n):
            request_id = self.next_id
            self.next_id = request_id + 1
            self.seq += 1
            inflight[request_id] = now
            send(builder.build(request_id, self.seq, now))
        self.counters.sent += n
        if window.start_ns <= now < window.end_ns:
            self.counters.sent_window += n

    def on_text(self, data: Data) -> None:
        frame = self.decode(data)
        if frame is None:
            return
        reply_to = frame.replyTo
        sent_ns = self.inflight.pop(reply_to, None) if reply_to is not None else None
        if sent_ns is None:
            if frame.type == "channel_acked" and frame.seq is not None:
                self.acked_seq = max(self.acked_seq, frame.seq)
                self.counters.channel_acked += 1
            else:
                self.on_frame(frame)
            self.counted(frame)
            return
        counters = self.counters
        if classify(frame) is FrameKind.REPLY_FAILED:
            counters.failed += 1
            counters.error(f"message failed: {frame.error or frame.type}")
        else:
            counters.confirmed += 1
            now = time.monotonic_ns()
            window = self.window
            in_window = window.start_ns <= now < window.end_ns
            if in_window:
                counters.confirmed_window += 1
                self.latency.record((now - sent_ns) // 1000)
            if frame.held:
                counters.held += 1
                counters.held_window += in_window
        self.counted(frame)
        if self.saturate and self.sending:
            self.send_messages(1)  # data_received flushes after this read

    def on_lost(self, why: str) -> None:
        if self.sending:
            self.counters.error(f"sender {why}")
        super().on_lost(why)


async def connect_registered(url: str, role: str, counters: Counters | None = None) -> Endpoint:
    """Open a connection and register it with ``role`` (bound it with ``asyncio.timeout``)."""
    connection = await open_connection(url)
    endpoint = Endpoint(connection, counters if counters is not None else Counters())
    try:
        await endpoint.register(role)
    except BaseException:
        connection.abort()
        raise
    return endpoint


class Worker:
    """Drives the pairs and idle connections of one generator process."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.counters = Counters()
        self.window = Window()
        self.confirm_latency = Histogram()
        self.delivery_latency = Histogram()
        self.senders: list[Sender] = []
        self.receivers: list[Receiver] = []
        self.idle: list[Endpoint] = []
        self._cpu_start = 0.0
        self._cpu_end = 0.0
        self._resume_seconds = 0.0

    async def setup(self, progress: Callable[[str], None] | None = None) -> None:
        """Connect, register and open every channel; then the idle connections."""
        config = self.config
        limit = asyncio.Semaphore(config.connect_concurrency)
        timeout = config.request_timeout

        async def pair(sender_url: str, receiver_url: str) -> None:
            async with limit, asyncio.timeout(timeout):
                rx_connection = await open_connection(receiver_url)
                receiver = Receiver(
                    rx_connection,
                    self.counters,
                    self.window,
                    self.delivery_latency,
                    resume=config.resume,
                )
                self.receivers.append(receiver)
                await receiver.register(f"{config.role_prefix}-receiver")
                tx_connection = await open_connection(sender_url)
                sender = Sender(
                    tx_connection,
                    self.counters,
                    self.window,
                    self.confirm_latency,
                    max_unconfirmed=config.window,
                    payload_size=config.payload_size,
                    resume=config.resume,
                )
                self.senders.append(sender)
                await sender.register(f"{config.role_prefix}-sender")
                channel_id = await sender.open_channel(receiver.connection_id)
                told = await receiver.incoming
                if told != channel_id:
                    raise ConnectionLost(f"incoming_channel {told} != channel_opened {channel_id}")

        async def idle(url: str) -> None:
            async with limit, asyncio.timeout(timeout):
                endpoint = await connect_registered(
                    url, f"{config.role_prefix}-idle", self.counters
                )
                self.idle.append(endpoint)
                if progress is not None and len(self.idle) % 500 == 0:
                    progress(f"idle connections: {len(self.idle)}/{len(config.idle)}")

        async with asyncio.TaskGroup() as group:
            for sender_url, receiver_url in config.pairs:
                group.create_task(pair(sender_url, receiver_url))
        # Sort so that pair i is senders[i] / receivers[i] regardless of completion order.
        self.senders.sort(key=lambda s: s.channel_id)
        async with asyncio.TaskGroup() as group:
            for url in config.idle:
                group.create_task(idle(url))

    async def run(self, start_at: float, warmup: float, duration: float) -> WorkerResult:
        """Load from ``start_at`` (``time.monotonic()``), measure after ``warmup``, then drain."""
        config = self.config
        start_ns = int((start_at + warmup) * 1e9)
        self.window.start_ns = start_ns
        self.window.end_ns = start_ns + int(duration * 1e9)
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        if config.detached:
            # Before the first message: every message of the run is held for its receiver.
            for receiver in self.receivers:
                receiver.drop()
        for sender in self.senders:
            sender.sending = True
            sender.saturate = config.rate <= 0
        pacer = None
        if config.rate > 0:
            pacer = asyncio.create_task(self._pace())
        else:
            for sender in self.senders:
                sender.send_messages(sender.room)
                sender.connection.flush()
        cpu_task = asyncio.create_task(self._sample_cpu(start_at + warmup, duration))
        await asyncio.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
        for sender in self.senders:
            sender.sending = False
        if pacer is not None:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer
        await cpu_task
        if config.detached:
            await self._until(self._sends_settled)
            await self._resume_receivers()
        await self._drain()
        return self._result(duration)

    async def _resume_receivers(self) -> None:
        """Every receiver resumes where it was and reads what was held for it."""
        config = self.config
        limit = asyncio.Semaphore(config.connect_concurrency)

        async def resume(receiver: Receiver) -> None:
            async with limit:
                try:
                    async with asyncio.timeout(config.request_timeout):
                        await receiver.resume()
                except (ConnectionLost, TimeoutError) as exc:
                    self.counters.failed += 1
                    self.counters.error(f"resume failed: {type(exc).__name__}: {exc}")

        started = time.monotonic()
        await asyncio.gather(*(resume(receiver) for receiver in self.receivers))
        self._resume_seconds = time.monotonic() - started

    async def _sample_cpu(self, start: float, duration: float) -> None:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        self._cpu_start = self_cpu_seconds()
        await asyncio.sleep(max(0.0, start + duration - time.monotonic()))
        self._cpu_end = self_cpu_seconds()

    async def _pace(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        bucket = TokenBucket(config.rate, burst=max(1.0, config.rate * 0.05), now=loop.time())
        senders = self.senders
        turn = 0
        while True:
            await asyncio.sleep(config.tick)
            bucket.refill(loop.time())
            tokens = bucket.available
            if not tokens:
                continue
            grants = distribute(tokens, [s.room for s in senders], turn)
            turn = (turn + 1) % max(1, len(senders))
            granted = 0
            for sender, grant in zip(senders, grants, strict=True):
                if grant:
                    sender.send_messages(grant)
                    sender.connection.flush()
                    granted += grant
            bucket.take(granted)

    def _sends_settled(self) -> bool:
        return not any(s.inflight for s in self.senders if s.alive)

    def _drained(self) -> bool:
        # A confirmation means the frame was written to the recipient's socket (or held for
        # it): once every send is answered, deliveries still missing are on their way (or
        # lost). A resumable sender also waits for its receiver's acknowledgement.
        if not self._sends_settled() or self.counters.delivered < self.counters.confirmed:
            return False
        return not self.config.resume or all(s.acked_seq >= s.seq for s in self.senders if s.alive)

    async def _drain(self) -> None:
        await self._until(self._drained)

    async def _until(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` is true, at most ``drain_timeout``."""
        deadline = time.monotonic() + self.config.drain_timeout
        while time.monotonic() < deadline:
            if done():
                return
            await asyncio.sleep(0.01)

    def _result(self, duration: float) -> WorkerResult:
        counters = self.counters
        lost = duplicates = reordered = 0
        for sender, receiver in self._pairs():
            checker = receiver.checkers.get(sender.channel_id)
            if checker is None:  # pragma: no cover - setup awaited incoming_channel
                lost += sender.seq
                continue
            counts = checker.counts(sender.seq)
            lost += counts.lost
            duplicates += counts.duplicates
            reordered += counts.reordered
        unconfirmed = sum(len(s.inflight) for s in self.senders)
        if unconfirmed:
            counters.error(f"{unconfirmed} sends never confirmed")
        unacknowledged = 0
        if self.config.resume:
            unacknowledged = sum(s.seq - s.acked_seq for s in self.senders)
            if unacknowledged:
                counters.error(f"{unacknowledged} messages never covered by channel_acked")
        if lost:
            counters.error(f"{lost} messages never delivered")
        return WorkerResult(
            pairs=len(self.senders),
            idle_connections=len(self.idle),
            window_seconds=duration,
            sent_window=counters.sent_window,
            confirmed_window=counters.confirmed_window,
            delivered_window=counters.delivered_window,
            sent_total=counters.sent,
            confirmed_total=counters.confirmed,
            delivered_total=counters.delivered,
            failed=counters.failed,
            unconfirmed=unconfirmed,
            lost=lost,
            duplicates=duplicates,
            reordered=reordered,
            corrupt=counters.corrupt,
            errors=list(counters.errors),
            confirm_latency=HistogramData.of(self.confirm_latency),
            delivery_latency=HistogramData.of(self.delivery_latency),
            generator_cpu_seconds=self._cpu_end - self._cpu_start,
            held_window=counters.held_window,
            held_total=counters.held,
            acks_sent=counters.acks_sent,
            channel_acked=counters.channel_acked,
            unacknowledged=unacknowledged,
            replayed=counters.replayed,
            resume_seconds=self._resume_seconds,
        )

    def _pairs(self) -> list[tuple[Sender, Receiver]]:
        by_channel = {channel: r for r in self.receivers for channel in r.checkers}
        return [(s, by_channel[s.channel_id]) for s in self.senders if s.channel_id in by_channel]

    async def close(self) -> None:
        """Close every connection (close frames; whatever lingers after 2 s is aborted)."""
        endpoints: list[Endpoint] = [*self.senders, *self.receivers, *self.idle]
        for endpoint in endpoints:
            endpoint.stop_acks()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await close_all([e.connection for e in endpoints])

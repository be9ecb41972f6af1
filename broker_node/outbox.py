"""The node's side of the bus: envelopes batched per destination, sent at the end of the turn.

Everything the core asks to publish during one loop turn goes out in one ``Bus.send`` at the
end of that turn (or after ``batch_delay``): one payload per destination node, all of them in
one write. Sends are pipelined, never awaited, and a bus keeps them in order, so a node's
envelopes reach each destination in the order the core produced them; that order is what keeps
messages ordered per channel. Outcomes come back through callbacks: envelopes a node did not
receive (nobody listening, even after retries) go to ``on_undeliverable``; envelopes whose fate
is unknown (Redis did not answer in time) go to ``on_unknown``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from broker_node.cluster.base import PublishResult
from broker_node.core.envelopes import Envelope, encode_batch
from broker_node.errors import BackendUnavailable
from shared.ids import NodeId

logger = logging.getLogger("broker_node.outbox")

#: Envelopes in one bus payload; a larger backlog goes out as several payloads.
MAX_BATCH: Final = 512


class Sender(Protocol):
    """What the outbox needs of a bus (``Bus.send``)."""

    def send(self, messages: Sequence[tuple[NodeId, bytes]], on_result: PublishResult) -> None: ...


#: Called with envelopes whose node certainly did not receive them (nobody listened on its
#: inbox, retried until the retry window passed).
Undeliverable = Callable[[NodeId, list[Envelope]], None]
#: Called with envelopes whose fate is unknown (Redis did not answer: they may still arrive).
Unknown = Callable[[NodeId, list[Envelope]], None]

#: First pause before sending again to a node that was not listening; it doubles up to the max.
RETRY_DELAY: Final = 0.02
MAX_RETRY_DELAY: Final = 0.25


class Outbox:
    """Batches envelopes per node and sends them once per loop turn.

    A payload that reached no subscriber (its node is between two subscriptions: Redis came
    back empty, its subscriber connection was cut) is sent again, in order and ahead of what
    was put for that node since, until ``retry_window`` after it was first sent; meanwhile
    nothing else goes to that node. Only then is it reported undeliverable: a message never
    fails for a gap the cluster repairs by itself.
    """

    def __init__(
        self,
        bus: Sender,
        *,
        on_undeliverable: Undeliverable,
        on_unknown: Unknown = lambda node_id, envelopes: None,
        on_published: Callable[[float, int], None] = lambda seconds, count: None,
        on_retry: Callable[[int], None] = lambda count: None,
        batch_delay: float = 0.0,
        retry_window: float = 0.0,
    ) -> None:
        self._bus = bus
        self._batch_delay = batch_delay
        self._retry_window = retry_window
        self._on_undeliverable = on_undeliverable
        self._on_unknown = on_unknown
        self._on_published = on_published
        self._on_retry = on_retry
        self._pending: dict[NodeId, list[Envelope]] = {}
        self._size = 0
        self._flush_scheduled = False
        #: Per node not listening: envelopes to send again (with when each was first sent),
        #: the loop time before which nothing goes to it, and the current delay.
        self._retry: dict[NodeId, list[tuple[Envelope, float]]] = {}
        self._held_until: dict[NodeId, float] = {}
        self._delay: dict[NodeId, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        #: Sends whose outcome has not come back yet.
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: The running loop, kept at the first put: asyncio.get_running_loop() costs a system
        #: call (getpid) each time, and put and flush run for every message at low load.
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return self._size + sum(len(retry) for retry in self._retry.values())

    def put(self, node_id: NodeId, envelope: Envelope) -> None:
        queue = self._pending.get(node_id)
        if queue is None:
            self._pending[node_id] = [envelope]
        else:
            queue.append(envelope)
        self._size += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._idle.clear()
            # Callbacks scheduled now run after this turn's I/O callbacks: what the other
            # clients' frames of this turn produce joins the same send.
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            if self._batch_delay > 0:
                loop.call_later(self._batch_delay, self.flush)
            else:
                loop.call_soon(self.flush)

    async def wait_idle(self) -> None:
        """Until everything put so far has been sent and answered (or reported)."""
        await self._idle.wait()

    def flush(self) -> None:
        """Send what is pending now (normally called by the loop, once per turn)."""
        self._flush_scheduled = False
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        # Per batch: its node, its envelopes, and when each was first sent (one time for all
        # when none is a retry: the common case pays no tuple per envelope).
        batches: list[tuple[NodeId, list[Envelope], list[float] | float]] = []
        nodes = list(self._pending)
        if self._retry:
            nodes += [node_id for node_id in self._retry if node_id not in self._pending]
        for node_id in nodes:
            held_until = self._held_until.get(node_id)
            if held_until is not None:
                if now < held_until:
                    continue
                del self._held_until[node_id]
            retry = self._retry.pop(node_id, None)
            envelopes = self._pending.pop(node_id, None) or []
            self._size -= len(envelopes)
            if retry is None and len(envelopes) <= MAX_BATCH:
                # The usual case: one batch, nothing to send again before it.
                batches.append((node_id, envelopes, now))
                continue
            firsts: list[float] | float = now
            if retry is not None:
                firsts = [first for _, first in retry] + [now] * len(envelopes)
                envelopes = [envelope for envelope, _ in retry] + envelopes
            for start in range(0, len(envelopes), MAX_BATCH):
                chunk = firsts if isinstance(firsts, float) else firsts[start : start + MAX_BATCH]
                batches.append((node_id, envelopes[start : start + MAX_BATCH], chunk))
        if not batches:
            self._settle()
            return
        payloads = [(node_id, encode_batch(envelopes)) for node_id, envelopes, _ in batches]
        started = time.perf_counter()

        def on_result(result: list[int] | BackendUnavailable) -> None:
            self._in_flight -= 1
            self._on_published(time.perf_counter() - started, len(payloads))
            if isinstance(result, BackendUnavailable):
                logger.debug("publish failed: %s", result)
                for node_id, envelopes, _ in batches:
                    self._on_unknown(node_id, envelopes)
            else:
                for (node_id, envelopes, firsts), count in zip(batches, result, strict=True):
                    if count == 0:
                        if isinstance(firsts, float):
                            firsts = [firsts] * len(envelopes)
                        self._not_listening(node_id, list(zip(envelopes, firsts, strict=True)))
                    else:
                        self._delay.pop(node_id, None)
            self._settle()

        self._in_flight += 1
        self._bus.send(payloads, on_result)

    def _not_listening(self, node_id: NodeId, items: list[tuple[Envelope, float]]) -> None:
        now = asyncio.get_running_loop().time()
        window = self._retry_window
        expired = [envelope for envelope, first in items if now - first >= window]
        if expired:
            self._on_undeliverable(node_id, expired)
        kept = [item for item in items if now - item[1] < window]
        if not kept:
            return
        self._on_retry(len(kept))
        self._retry.setdefault(node_id, []).extend(kept)
        delay = self._delay.get(node_id, RETRY_DELAY / 2) * 2
        self._delay[node_id] = min(delay, MAX_RETRY_DELAY)
        self._held_until[node_id] = now + self._delay[node_id]
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._timer is not None or not self._held_until:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, min(self._held_until.values()) - loop.time())
        self._timer = loop.call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._timer = None
        self.flush()
        self._schedule_retry()

    def _settle(self) -> None:
        if self._in_flight == 0 and not self._pending and not self._retry:
            self._idle.set()

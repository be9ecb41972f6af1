"""The node's side of the bus: envelopes batched per destination, sent at the end of the turn.

Everything the core asks to publish during one loop turn goes out in one ``Bus.send`` at the
end of that turn (or after ``batch_delay``): one payload per destination node, all of them in
one write. Sends are pipelined, never awaited, and a bus keeps them in order, so a node's
envelopes reach each destination in the order the core produced them; that order is what keeps
messages ordered per channel. Outcomes come back through a callback: envelopes a node did not
receive (nobody listening, or Redis unavailable) are handed to ``on_undeliverable``.
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


#: Called with the envelopes that could not be handed to a node.
Undeliverable = Callable[[NodeId, list[Envelope]], None]


class Outbox:
    """Batches envelopes per node and sends them once per loop turn."""

    def __init__(
        self,
        bus: Sender,
        *,
        on_undeliverable: Undeliverable,
        on_published: Callable[[float, int], None] = lambda seconds, count: None,
        batch_delay: float = 0.0,
    ) -> None:
        self._bus = bus
        self._batch_delay = batch_delay
        self._on_undeliverable = on_undeliverable
        self._on_published = on_published
        self._pending: dict[NodeId, list[Envelope]] = {}
        self._size = 0
        self._flush_scheduled = False
        #: Sends whose outcome has not come back yet.
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return self._size

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
            loop = asyncio.get_running_loop()
            if self._batch_delay > 0:
                loop.call_later(self._batch_delay, self.flush)
            else:
                loop.call_soon(self.flush)

    async def wait_idle(self) -> None:
        """Until everything put so far has been sent and answered (or reported undeliverable)."""
        await self._idle.wait()

    def flush(self) -> None:
        """Send what is pending now (normally called by the loop, once per turn)."""
        self._flush_scheduled = False
        if not self._pending:
            self._settle()
            return
        pending, self._pending, self._size = self._pending, {}, 0
        batches: list[tuple[NodeId, list[Envelope]]] = []
        for node_id, envelopes in pending.items():
            for start in range(0, len(envelopes), MAX_BATCH):
                batches.append((node_id, envelopes[start : start + MAX_BATCH]))
        payloads = [(node_id, encode_batch(envelopes)) for node_id, envelopes in batches]
        started = time.perf_counter()

        def on_result(result: list[int] | BackendUnavailable) -> None:
            self._in_flight -= 1
            self._on_published(time.perf_counter() - started, len(payloads))
            if isinstance(result, BackendUnavailable):
                logger.debug("publish failed: %s", result)
                result = [0] * len(batches)
            for (node_id, envelopes), count in zip(batches, result, strict=True):
                if count == 0:
                    self._on_undeliverable(node_id, envelopes)
            self._settle()

        self._in_flight += 1
        self._bus.send(payloads, on_result)

    def _settle(self) -> None:
        if self._in_flight == 0 and not self._pending:
            self._idle.set()

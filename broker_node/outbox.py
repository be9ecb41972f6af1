"""The node's side of the bus: envelopes batched per destination, published in order.

Everything the core asks to publish during one loop turn (and while the previous publish was
in flight) goes out in the next publish: one payload per destination node, all of them in one
pipelined round trip. Publishes never overlap, so a node's envelopes reach each destination in
the order the core produced them; that order is what keeps messages ordered per channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from broker_node.core.envelopes import Envelope, encode_batch
from broker_node.errors import BackendUnavailable
from shared.ids import NodeId

logger = logging.getLogger("broker_node.outbox")

#: Envelopes in one bus payload; a larger backlog goes out as several payloads.
MAX_BATCH: Final = 512


class Publisher(Protocol):
    """What the outbox needs of a bus."""

    async def publish(self, messages: Sequence[tuple[NodeId, bytes]]) -> list[int]: ...


#: Called with the envelopes that could not be handed to a node.
Undeliverable = Callable[[NodeId, list[Envelope]], None]


class Outbox:
    """Batches envelopes per node and publishes them from one task."""

    def __init__(
        self,
        bus: Publisher,
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
        self._wake = asyncio.Event()
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
        if self._size == 1:
            self._idle.clear()
            self._wake.set()

    async def wait_idle(self) -> None:
        """Until everything put so far has been published (or reported undeliverable)."""
        await self._idle.wait()

    async def run(self) -> None:
        """The publishing loop; run it under a supervisor."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            # At least one more loop turn: what the other clients' frames of this turn
            # produce joins the same publish (a batch delay gathers for longer).
            await asyncio.sleep(self._batch_delay)
            while self._pending:
                pending, self._pending, self._size = self._pending, {}, 0
                await self._publish(pending)
            self._idle.set()

    async def _publish(self, pending: dict[NodeId, list[Envelope]]) -> None:
        batches: list[tuple[NodeId, list[Envelope]]] = []
        for node_id, envelopes in pending.items():
            for start in range(0, len(envelopes), MAX_BATCH):
                batches.append((node_id, envelopes[start : start + MAX_BATCH]))
        payloads = [(node_id, encode_batch(envelopes)) for node_id, envelopes in batches]
        started = time.perf_counter()
        try:
            receivers = await self._bus.publish(payloads)
        except BackendUnavailable as exc:
            logger.debug("publish failed: %s", exc)
            receivers = [0] * len(payloads)
        self._on_published(time.perf_counter() - started, len(payloads))
        for (node_id, envelopes), count in zip(batches, receivers, strict=True):
            if count == 0:
                self._on_undeliverable(node_id, envelopes)

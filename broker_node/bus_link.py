"""The node's link to the bus: its inbox subscription, the outbox and its outcomes, and the
close notices sent again after an outage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from broker_node.cluster.base import Bus
from broker_node.core.actions import Action
from broker_node.core.close_notices import CloseNotices
from broker_node.core.envelopes import Envelope, decode_batch
from broker_node.core.stats import NodeStats
from broker_node.errors import BackendUnavailable
from broker_node.logs import LIMIT_LOG_INTERVAL
from broker_node.outbox import Outbox
from shared.ids import NodeId

logger = logging.getLogger("broker_node.bus_link")


class BusLink:
    """Subscribes to this node's inbox and feeds what arrives to the core; owns the outbox.

    ``on_subscribed`` hears each change of the subscription (a node without it is not
    ready); the core's decisions go to ``execute``.
    """

    def __init__(
        self,
        *,
        node_id: NodeId,
        bus: Bus,
        stats: NodeStats,
        backend_name: str,
        on_bus: Callable[[list[Envelope]], list[Action]],
        undeliverable: Callable[[NodeId, list[Envelope]], list[Action]],
        execute: Callable[[list[Action]], None],
        on_subscribed: Callable[[bool], None],
        batch_delay: float,
        retry_window: float,
    ) -> None:
        self._node_id = node_id
        self._bus = bus
        self._stats = stats
        self._backend_name = backend_name
        self._on_bus = on_bus
        self._core_undeliverable = undeliverable
        self._execute = execute
        self._on_subscribed = on_subscribed
        self.outbox = Outbox(
            bus,
            on_undeliverable=self._undeliverable,
            on_unknown=self._unknown,
            on_published=self._published,
            on_retry=self._retried,
            batch_delay=batch_delay,
            retry_window=retry_window,
        )
        self.close_notices = CloseNotices()
        self.subscribed = False
        self._subscribed_event = asyncio.Event()
        self._dropped_logged_at = -LIMIT_LOG_INTERVAL

    async def wait_subscribed(self) -> None:
        """Return once this node's inbox is listened to."""
        await self._subscribed_event.wait()

    def subscriber_down(self) -> None:
        """The subscriber loop failed (its supervisor restarts it): not subscribed meanwhile."""
        self._set_subscribed(False)

    def _set_subscribed(self, subscribed: bool) -> None:
        if subscribed != self.subscribed:
            self.subscribed = subscribed
            self._on_subscribed(subscribed)

    async def subscriber_loop(self) -> None:
        # A lost subscription is made again at once: while it is missing, what other nodes
        # send here reaches nobody (their outboxes retry for a while). Only repeated failures
        # wait, a little longer each time.
        failures = 0
        while True:
            try:
                async with self._bus.subscribe(self._node_id, self._on_payload) as subscription:
                    if not self.subscribed:
                        logger.info("subscribed to this node's bus inbox")
                    self._set_subscribed(True)
                    self._subscribed_event.set()
                    failures = 0
                    await subscription.wait_lost()
            except BackendUnavailable as exc:
                if self.subscribed:
                    logger.warning("bus subscription lost; resubscribing")
                elif not failures:
                    logger.warning(
                        "cannot subscribe to this node's bus inbox at %s (%s); retrying",
                        self._backend_name,
                        exc,
                    )
                self._set_subscribed(False)
                self._subscribed_event.clear()
                if failures:
                    await asyncio.sleep(min(0.05 * 2**failures, 1.0))
                failures += 1

    def _on_payload(self, payload: bytes) -> None:
        envelopes, dropped = decode_batch(payload)
        if dropped:
            # The others of the batch are still handled. Logged at most once per interval:
            # a flood of bad envelopes must not flood the log (the counter has them all).
            self._stats.bus_envelopes_dropped += dropped
            self._log_dropped_envelopes(dropped, len(payload))
        self._stats.bus_batches_in += 1
        self._execute(self._on_bus(envelopes))

    def _log_dropped_envelopes(self, dropped: int, size: int) -> None:
        now = time.monotonic()
        if now - self._dropped_logged_at >= LIMIT_LOG_INTERVAL:
            self._dropped_logged_at = now
            logger.warning(
                "dropped %d undecodable bus envelope(s) of a %d-byte payload (%d so far)",
                dropped,
                size,
                self._stats.bus_envelopes_dropped,
            )

    def _undeliverable(self, node_id: NodeId, envelopes: list[Envelope]) -> None:
        """``node_id`` did not listen on its inbox for a whole retry window."""
        self.close_notices.keep(node_id, envelopes)
        self._execute(self._core_undeliverable(node_id, envelopes))

    def _unknown(self, node_id: NodeId, envelopes: list[Envelope]) -> None:
        """Redis did not answer: these may or may not reach ``node_id``. What waits on them
        is answered when its deadline passes ("not confirmed in time": outcome unknown)."""
        self.close_notices.keep(node_id, envelopes)

    def _retried(self, count: int) -> None:
        self._stats.bus_retries += count

    def _published(self, seconds: float, count: int) -> None:
        self._stats.bus_publishes += count
        self._stats.bus_publish_seconds += seconds

    def resend_close_notices(self) -> None:
        """Send again the close notices that may not have gone out (Redis answers again)."""
        put = self.outbox.put
        for node_id, envelope in self.close_notices.take():
            put(node_id, envelope)

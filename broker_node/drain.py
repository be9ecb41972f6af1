"""A graceful stop's drain: answer what was read, close the clients, hand sessions over.

Order: stop reading every client and wait until every request already read is answered;
tell resumable sessions to resume elsewhere and close the other clients with 1001 (their
channels' peers are notified); publish what is left; give the clients a moment to finish the
closing handshake; hand the sessions still waiting here to live nodes; leave the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sized
from typing import Final, Protocol

from broker_node.cluster.base import Registry
from broker_node.core.actions import Action
from broker_node.core.broker import BrokerCore
from broker_node.core.drain import everything_answered, hand_off_targets
from broker_node.errors import BackendUnavailable
from broker_node.registry_calls import RegistryCaller
from shared.codec import CLOSE_GOING_AWAY
from shared.ids import ConnectionId, NodeId

logger = logging.getLogger("broker_node.drain")


#: How often a drain checks whether every request it read has been answered.
DRAIN_POLL: Final = 0.005


class DrainedClient(Protocol):
    """What the drain does with a client's socket."""

    @property
    def requests_pending(self) -> bool: ...

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class DrainedOutbox(Protocol):
    def __len__(self) -> int: ...

    async def wait_idle(self) -> None: ...


class Drain:
    """Runs a node's drain once, with the node's parts as narrow collaborators."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        standalone: bool,
        drain_timeout: float,
        core: BrokerCore,
        clients: Mapping[ConnectionId, DrainedClient],
        execute: Callable[[list[Action]], None],
        flush_all: Callable[[], None],
        outbox: DrainedOutbox,
        registry: Registry,
        calls: RegistryCaller,
        sockets: Sized,
        no_sockets: asyncio.Event,
        wait_session_work: Callable[[], Awaitable[None]],
    ) -> None:
        self._node_id = node_id
        self._standalone = standalone
        self._drain_timeout = drain_timeout
        self._core = core
        self._clients = clients
        self._execute = execute
        self._flush_all = flush_all
        self._outbox = outbox
        self._registry = registry
        self._calls = calls
        self._sockets = sockets
        self._no_sockets = no_sockets
        self._wait_session_work = wait_session_work

    async def run(self) -> None:
        # The listening socket stays open until the end so that probes see /readyz answer
        # 503 (and the load balancer moves on) rather than a refused connection; new
        # WebSocket upgrades are refused with 503 meanwhile (see ClientConnection).
        await self._answer_what_was_read()
        # Resumable sessions are told to resume elsewhere (4100) and wait here, detached, to
        # be handed over; the other clients are closed as always.
        self._execute(self._core.drain_sessions())
        for client in list(self._clients.values()):
            client.close(CLOSE_GOING_AWAY, "Server shutting down")
            # Reading again lets the closing handshake complete; frames that arrive now are
            # past the close and never handled.
            client.resume_reading("drain")
        self._flush_all()
        await self._outbox.wait_idle()
        # Give clients a moment to answer the closing handshake; then the TCP goes anyway.
        if self._sockets:
            self._no_sockets.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(2.0, self._drain_timeout / 2)):
                    await self._no_sockets.wait()
        await self._hand_off_sessions()
        try:
            await self._registry.leave(self._node_id)
        except BackendUnavailable:
            logger.warning("could not remove this node's registry entries (Redis unavailable)")

    async def _answer_what_was_read(self) -> None:
        """Stop reading every client, then wait until every request read so far is answered:
        no request waits in a backlog, no cross-node message or open awaits another node,
        nothing waits to be published. What a client sends from now on is never read: it
        gets no reply and has no effect. Bounded by half the drain timeout (the rest is for
        closing); cross-node work is bounded by the request timeout anyway."""
        clients = self._clients
        for client in list(clients.values()):
            client.pause_reading("drain")
        try:
            async with asyncio.timeout(self._drain_timeout / 2):
                # Polled: the work finishes in the core, in backlogs and in the outbox, and no
                # one event says all of it is done; the drain runs once per process.
                while not everything_answered(  # noqa: ASYNC110
                    self._core,
                    requests_waiting=any(client.requests_pending for client in clients.values()),
                    envelopes_unpublished=len(self._outbox),
                ):
                    await asyncio.sleep(DRAIN_POLL)
                await self._outbox.wait_idle()
        except TimeoutError:
            logger.warning("drain: requests still unanswered after %.1fs", self._drain_timeout / 2)
        self._flush_all()

    async def _hand_off_sessions(self) -> None:
        """Wait for the drained sessions' clients to resume elsewhere (each resume takes its
        session over), up to half the drain timeout; hand what is left to a live node, or end
        it when there is none."""
        core = self._core
        if core.resume is None:
            return
        deadline = time.monotonic() + self._drain_timeout / 2
        # Polled, as the drain's other waits: several resumes come in from other nodes.
        while core.detached_sessions() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL * 10)
        left = core.detached_sessions()
        if not left:
            await self._wait_session_work()
            return
        live: set[NodeId] = set()
        if not self._standalone:
            with contextlib.suppress(BackendUnavailable):
                live = await self._calls.call("live_nodes", self._registry.live_nodes())
        for session_id, peer in hand_off_targets(left, live, self._node_id):
            if peer is None:
                self._execute(core.session_ended(session_id, True))
                continue
            moved = False
            with contextlib.suppress(BackendUnavailable):
                moved = await self._calls.call(
                    "transfer_session",
                    self._registry.transfer_session(session_id, self._node_id, peer),
                )
            if moved:
                self._execute(core.hand_off(session_id, peer))
            else:
                self._execute(core.session_ended(session_id, True))
        await self._outbox.wait_idle()
        await self._wait_session_work()

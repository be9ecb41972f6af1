"""The registry in the background: removals written in batches, session resume's registry
work done in order, and what a resync must know (the dirty flag, the writes under way).

Removals and session work never hold up a client: the core decides, the writer writes when
it can. A write whose outcome is unknown (Redis did not answer) marks the registry dirty; the
heartbeat resynchronises this node's entries once the backend answers again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterator, Set
from contextlib import AbstractContextManager, contextmanager
from typing import Final, Protocol, TypeVar

from broker_node.cluster.base import Registry
from broker_node.core.actions import (
    Action,
    EndSession,
    ForgetChannel,
    ForgetConnection,
    LoadSession,
    MarkDetached,
    MoveChannels,
)
from broker_node.core.records import ChannelRecord
from broker_node.errors import BackendUnavailable
from broker_node.registry_calls import RegistryCalls
from shared.ids import ChannelId, ConnectionId, NodeId

#: Registry removals written per round trip by the registry writer.
REMOVAL_BATCH: Final = 500
#: How often waiting for session work checks whether the queue is empty.
SESSION_WORK_POLL: Final = 0.005

_Id = TypeVar("_Id")

SessionWork = MarkDetached | EndSession | MoveChannels | LoadSession


class SessionAnswers(Protocol):
    """Where the answers of session work go (the core)."""

    def session_ended(self, connection_id: ConnectionId, ended: bool) -> list[Action]: ...

    def session_retry(self, connection_id: ConnectionId) -> list[Action]: ...

    def install_lost(
        self, session_id: ConnectionId, channels: list[ChannelRecord] | None
    ) -> list[Action]: ...


class RegistryWriter:
    """Writes this node's removals and session work to the registry, in the background.

    ``execute`` runs the core's follow-up actions (the notices a removal holds back until it
    is written, the answers of session work). While ``draining()`` those notices do not wait
    for their removal (nor while the backend is away).
    """

    def __init__(
        self,
        *,
        node_id: NodeId,
        registry: Registry,
        calls: RegistryCalls,
        answers: SessionAnswers,
        execute: Callable[[list[Action]], None],
        draining: Callable[[], bool],
    ) -> None:
        self._node_id = node_id
        self._registry = registry
        self._calls = calls
        self._answers = answers
        self._execute = execute
        self._draining = draining
        self._backlog: deque[ForgetChannel | ForgetConnection] = deque()
        self._wake = asyncio.Event()
        #: Session resume's registry work (issue 14), done in order by the session writer.
        self._session_work: deque[SessionWork] = deque()
        self._session_wake = asyncio.Event()
        #: Connections and channels whose registry write is under way: live for a resync.
        self._writing_connections: set[ConnectionId] = set()
        self._writing_channels: set[ChannelId] = set()
        self._dirty = False

    # --- what the dispatcher and the executor use ---------------------------------------------

    def forget(self, action: ForgetChannel | ForgetConnection) -> None:
        """Queue a registry removal (and the notices it holds back until it is written)."""
        # No bound: the queue holds at most one entry per connection and channel this node
        # had, and the writer takes it in batches.
        if (
            type(action) is ForgetConnection
            and action.then
            and (self._draining() or not self._calls.backend_up)
        ):
            # Leaving (the node's entries go with it) or Redis away (the removal waits for a
            # resync): the notices must not wait for that.
            self._execute(list(action.then))
            action = ForgetConnection(action.record)
        self._backlog.append(action)
        self._wake.set()

    def queue_session_work(self, action: SessionWork) -> None:
        self._session_work.append(action)
        self._session_wake.set()

    def mark_dirty(self) -> None:
        """A write's outcome is unknown: resynchronise this node's entries once Redis answers."""
        self._dirty = True

    def writing_connection(self, connection_id: ConnectionId) -> AbstractContextManager[None]:
        """While the connection's registry entry is being written (live for a resync)."""
        return _member_while(self._writing_connections, connection_id)

    def writing_channel(self, channel_id: ChannelId) -> AbstractContextManager[None]:
        """While the channel's registry entry is being written (live for a resync)."""
        return _member_while(self._writing_channels, channel_id)

    # --- what the heartbeat and the drain use -------------------------------------------------

    @property
    def dirty(self) -> bool:
        return self._dirty

    def clear_dirty(self) -> None:
        self._dirty = False

    @property
    def writing_connections(self) -> Set[ConnectionId]:
        return self._writing_connections

    @property
    def writing_channels(self) -> Set[ChannelId]:
        return self._writing_channels

    def drop_queued_removals(self) -> None:
        """This node was reaped: what the reaper removed must not come back. The removals
        still queued are dropped (their notices go out) and nothing is dirty any more."""
        self._notify_forgotten(list(self._backlog))
        self._backlog.clear()
        self._dirty = False

    async def wait_session_work(self) -> None:
        """Return once no session work is queued."""
        # Polled: the session writer empties its queue one registry call at a time.
        while self._session_work:  # noqa: ASYNC110
            await asyncio.sleep(SESSION_WORK_POLL)

    # --- the loops ----------------------------------------------------------------------------

    def _notify_forgotten(self, batch: list[ForgetChannel | ForgetConnection]) -> None:
        for action in batch:
            if type(action) is ForgetConnection and action.then:
                self._execute(list(action.then))

    async def removal_loop(self) -> None:
        backlog = self._backlog
        registry = self._registry
        call = self._calls.call
        while True:
            await self._wake.wait()
            self._wake.clear()
            while backlog:
                batch = [backlog.popleft() for _ in range(min(REMOVAL_BATCH, len(backlog)))]
                channels = [a.record for a in batch if isinstance(a, ForgetChannel)]
                connections = [a.record for a in batch if isinstance(a, ForgetConnection)]
                try:
                    if channels:
                        await call("remove_channels", registry.remove_channels(channels))
                    if connections:
                        await call("remove_connections", registry.remove_connections(connections))
                except BackendUnavailable:
                    # Whatever is still queued is not live either: the resync, once the
                    # backend is back, removes it with every other entry that is not live.
                    batch += backlog
                    backlog.clear()
                    self._dirty = True
                self._notify_forgotten(batch)

    async def session_loop(self) -> None:
        """Session resume's registry work, in order; each answer goes back to the core."""
        work = self._session_work
        registry = self._registry
        call = self._calls.call
        answers = self._answers
        while True:
            await self._session_wake.wait()
            self._session_wake.clear()
            while work:
                action = work.popleft()
                try:
                    if type(action) is MarkDetached:
                        await call(
                            "mark_detached",
                            registry.mark_detached(
                                action.record.connection_id, self._node_id, action.at_ms
                            ),
                        )
                    elif type(action) is EndSession:
                        ended = await call("end_session", registry.end_session(action.record))
                        self._execute(answers.session_ended(action.record.connection_id, ended))
                    elif type(action) is MoveChannels:
                        await call(
                            "move_channels",
                            registry.move_channels(list(action.records), action.from_node),
                        )
                    elif type(action) is LoadSession:
                        channels = await self._session_channels(
                            action.connection_id, action.previous_node
                        )
                        self._execute(answers.install_lost(action.connection_id, channels))
                except BackendUnavailable:
                    if type(action) is EndSession:
                        # Tried again at the next expiry check.
                        self._execute(answers.session_retry(action.record.connection_id))
                    elif type(action) is LoadSession:
                        self._execute(answers.install_lost(action.connection_id, None))
                    else:
                        self._dirty = True

    async def _session_channels(
        self, session_id: ConnectionId, previous_node: NodeId
    ) -> list[ChannelRecord]:
        """The channels of a session, per the registry: among those indexed under the node
        that held it (and under this node, where a resume may have moved some already)."""
        found: list[ChannelRecord] = []
        ids: set[ChannelId] = set()
        call = self._calls.call
        for node_id in {previous_node, self._node_id}:
            _, channels = await call("node_index", self._registry.node_index(node_id))
            ids |= channels
        for channel_id in sorted(ids):
            record = await call("find_channel", self._registry.find_channel(channel_id))
            if record is not None and record.peer_of(session_id) is not None:
                found.append(record)
        return found


@contextmanager
def _member_while(members: set[_Id], member: _Id) -> Iterator[None]:
    members.add(member)
    try:
        yield
    finally:
        members.discard(member)

"""Doing what the core decided: each action of a list, in order, on sockets, the bus and the
registry's background writers.

Theory of operation: ``Executor.execute`` never re-enters itself. Actions made while it works
(a frame held for a detached session, a session's log overflowing, a confirmation or a
departure triggered by a write or a close) are executed right after the action that made
them, before the rest of the list: the order a nested call gave, without the nesting. A call
made from inside an action (a socket closing calls back into the node) is queued the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Protocol, assert_never

from broker_node.core.actions import (
    Action,
    CloseClient,
    EndSession,
    ForgetChannel,
    ForgetConnection,
    KeepFrames,
    LoadSession,
    MarkDetached,
    MoveChannels,
    PauseReading,
    Publish,
    Rebind,
    Receipt,
    Replay,
    ResumeReading,
    Send,
)
from broker_node.core.envelopes import Envelope
from broker_node.core.sessions import SessionLog
from shared.ids import ChannelId, ConnectionId, NodeId


class ClientSocket(Protocol):
    """What the executor does to one client's socket."""

    session_log: SessionLog | None

    def send(self, frame: bytes, receipt: Receipt | None = None) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    def pause_reading(self, reason: str) -> None: ...
    def resume_reading(self, reason: str) -> None: ...


class HeldFrames(Protocol):
    """The core's answers for frames that found no socket, or no room in a session's log."""

    def hold(
        self, connection_id: ConnectionId, frame: bytes, receipt: Receipt | None
    ) -> list[Action]: ...
    def session_overflow(self, connection_id: ConnectionId) -> list[Action]: ...


class RegistryWrites(Protocol):
    """The registry's background writers: removals, session work, and what a resync must
    know (writes whose outcome is unknown, writes under way)."""

    def forget(self, action: ForgetChannel | ForgetConnection) -> None: ...
    def queue_session_work(
        self, action: MarkDetached | EndSession | MoveChannels | LoadSession
    ) -> None: ...
    def mark_dirty(self) -> None: ...
    def writing_connection(self, connection_id: ConnectionId) -> AbstractContextManager[None]: ...
    def writing_channel(self, channel_id: ChannelId) -> AbstractContextManager[None]: ...


class Executor:
    """Executes the core's actions (see the module docstring for the order)."""

    def __init__(
        self,
        *,
        clients: Mapping[ConnectionId, ClientSocket],
        core: HeldFrames,
        publish: Callable[[NodeId, Envelope], None],
        registry: RegistryWrites,
        rebind: Callable[[Rebind], None],
    ) -> None:
        self._clients = clients
        self._core = core
        self._publish = publish
        self._registry = registry
        self._rebind = rebind
        self._running = False
        #: Actions made while an action runs: executed right after it.
        self._produced: list[Action] = []

    def execute(self, actions: list[Action]) -> None:
        """Execute ``actions`` in order (queued behind the current action when called while
        executing)."""
        if self._running:
            self._produced += actions
            return
        self._running = True
        clients = self._clients
        produced = self._produced
        todo: Iterator[Action] = iter(actions)
        try:
            while True:
                for action in todo:
                    # Hot path (every message): Send and Publish are told by their exact type
                    # before the match, whose class patterns cost several times as much on
                    # Python 3.11. The match below handles them all the same.
                    if type(action) is Send:
                        # As _send, inlined.
                        client = clients.get(action.connection_id)
                        if client is None:
                            # No socket: a detached session keeps it; otherwise it is not
                            # delivered.
                            produced += self._core.hold(
                                action.connection_id, action.frame, action.receipt
                            )
                        else:
                            log = client.session_log
                            if log is None or log.append(action.frame):
                                client.send(action.frame, action.receipt)
                            else:
                                client.send(action.frame, action.receipt)
                                produced += self._core.session_overflow(action.connection_id)
                    elif type(action) is Publish:
                        self._publish(action.node_id, action.envelope)
                    else:
                        self._execute_one(action)
                    if produced:
                        break
                else:
                    return
                # Rare: what the action made goes first, then the rest of the list.
                todo = iter([*produced, *todo])
                produced.clear()
        finally:
            self._running = False
            if produced:
                # An action raised: what it made is dropped with the rest of its list.
                produced.clear()

    def _execute_one(self, action: Action) -> None:
        match action:
            case Send():
                self._send(action)
            case Publish():
                self._publish(action.node_id, action.envelope)
            case CloseClient():
                client = self._clients.get(action.connection_id)
                if client is not None:
                    client.close(action.code, action.reason)
            case ForgetChannel() | ForgetConnection():
                self._registry.forget(action)
            case PauseReading():
                client = self._clients.get(action.connection_id)
                if client is not None:
                    client.pause_reading("flow")
            case ResumeReading():
                client = self._clients.get(action.connection_id)
                if client is not None:
                    client.resume_reading("flow")
            # --- session resume (issue 14)
            case KeepFrames():
                client = self._clients.get(action.connection_id)
                if client is not None:
                    client.session_log = action.log
            case Replay():
                client = self._clients.get(action.connection_id)
                if client is not None:
                    for frame in action.frames:
                        client.send(frame)
            case Rebind():
                self._rebind(action)
            case MarkDetached() | EndSession() | MoveChannels() | LoadSession():
                self._registry.queue_session_work(action)
            case _:
                assert_never(action)

    def _send(self, action: Send) -> None:
        client = self._clients.get(action.connection_id)
        if client is None:
            # No socket: a detached session keeps it; otherwise it is not delivered.
            self._produced += self._core.hold(action.connection_id, action.frame, action.receipt)
            return
        log = client.session_log
        if log is None or log.append(action.frame):
            client.send(action.frame, action.receipt)
        else:
            client.send(action.frame, action.receipt)
            self._produced += self._core.session_overflow(action.connection_id)

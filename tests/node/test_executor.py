"""The executor without sockets: every action kind, and actions made while executing run
right after the action that made them, never in a nested call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from broker_node.core.actions import (
    Action,
    CloseClient,
    EndSession,
    ForgetChannel,
    ForgetConnection,
    KeepFrames,
    LoadSession,
    LocalReceipt,
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
from broker_node.core.envelopes import Closed, Envelope
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.core.sessions import SessionLog
from broker_node.executor import Executor
from shared.ids import ChannelId, ConnectionId, NodeId

A, B = ConnectionId("a"), ConnectionId("b")
NODE = NodeId("n")
RECORD = ConnectionRecord(A, NODE, "r")
CHANNEL = ChannelRecord(ChannelId("c"), A, NODE, B, NODE)


def frame(frame_id: int) -> bytes:
    """A frame as the node encodes it (a session log reads its id)."""
    return b'{"type":"message","id":%d}' % frame_id


class Recorder:
    def __init__(self) -> None:
        self.effects: list[tuple[object, ...]] = []


class Socket:
    def __init__(self, name: str, recorder: Recorder) -> None:
        self.name = name
        self.recorder = recorder
        self.session_log: SessionLog | None = None
        #: Called from inside ``close``, as a real socket calls back into the node.
        self.on_close: Callable[[], None] | None = None

    def send(self, frame: bytes, receipt: Receipt | None = None) -> None:
        self.recorder.effects.append(("send", self.name, frame, receipt))

    def close(self, code: int, reason: str) -> None:
        self.recorder.effects.append(("close", self.name, code, reason))
        if self.on_close is not None:
            self.on_close()

    def pause_reading(self, reason: str) -> None:
        self.recorder.effects.append(("pause", self.name, reason))

    def resume_reading(self, reason: str) -> None:
        self.recorder.effects.append(("resume", self.name, reason))


class Core:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.held: list[Action] = []
        self.overflow: list[Action] = []

    def hold(
        self, connection_id: ConnectionId, frame: bytes, receipt: Receipt | None
    ) -> list[Action]:
        self.recorder.effects.append(("hold", connection_id, frame))
        return list(self.held)

    def session_overflow(self, connection_id: ConnectionId) -> list[Action]:
        self.recorder.effects.append(("overflow", connection_id))
        return list(self.overflow)


class Registry:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def forget(self, action: ForgetChannel | ForgetConnection) -> None:
        self.recorder.effects.append(("forget", action))

    def queue_session_work(
        self, action: MarkDetached | EndSession | MoveChannels | LoadSession
    ) -> None:
        self.recorder.effects.append(("session work", action))

    def mark_dirty(self) -> None:
        raise AssertionError("the executor never marks the registry dirty")

    @contextlib.contextmanager
    def writing_connection(self, connection_id: ConnectionId) -> Iterator[None]:
        raise AssertionError("the executor writes no connection")
        yield

    @contextlib.contextmanager
    def writing_channel(self, channel_id: ChannelId) -> Iterator[None]:
        raise AssertionError("the executor writes no channel")
        yield


class Fixture:
    def __init__(self) -> None:
        self.recorder = Recorder()
        self.clients: dict[ConnectionId, Socket] = {
            A: Socket("a", self.recorder),
            B: Socket("b", self.recorder),
        }
        self.core = Core(self.recorder)
        self.executor = Executor(
            clients=self.clients,
            core=self.core,
            publish=self.publish,
            registry=Registry(self.recorder),
            rebind=self.rebind,
        )

    @property
    def effects(self) -> list[tuple[object, ...]]:
        return self.recorder.effects

    def publish(self, node_id: NodeId, envelope: Envelope) -> None:
        self.recorder.effects.append(("publish", node_id, envelope))

    def rebind(self, action: Rebind) -> None:
        self.recorder.effects.append(("rebind", action.from_id, action.to_id))


@pytest.fixture
def fx() -> Fixture:
    return Fixture()


def test_send_writes_to_the_socket(fx: Fixture) -> None:
    receipt = LocalReceipt(B, 1, ChannelId("c"), 3)
    fx.executor.execute([Send(A, b"one", receipt), Send(B, b"two")])
    assert fx.effects == [("send", "a", b"one", receipt), ("send", "b", b"two", None)]


def test_send_without_a_socket_is_held_and_what_hold_says_runs_next(fx: Fixture) -> None:
    fx.core.held = [Send(B, b"held-reply")]
    fx.executor.execute([Send(ConnectionId("gone"), b"x"), Send(A, b"after")])
    assert fx.effects == [
        ("hold", "gone", b"x"),
        ("send", "b", b"held-reply", None),
        ("send", "a", b"after", None),
    ]


def test_send_keeps_the_frame_in_a_session_log(fx: Fixture) -> None:
    log = SessionLog(max_frames=10, max_bytes=1000)
    fx.clients[A].session_log = log
    fx.executor.execute([Send(A, frame(1))])
    assert fx.effects == [("send", "a", frame(1), None)]
    assert len(log) == 1


def test_a_full_session_log_still_sends_then_overflows(fx: Fixture) -> None:
    fx.clients[A].session_log = SessionLog(max_frames=1, max_bytes=1000)
    fx.core.overflow = [CloseClient(A, 1008, "slow consumer")]
    fx.executor.execute([Send(A, frame(1)), Send(A, frame(2)), Send(B, b"3")])
    assert fx.effects == [
        ("send", "a", frame(1), None),
        ("send", "a", frame(2), None),
        ("overflow", "a"),
        ("close", "a", 1008, "slow consumer"),
        ("send", "b", b"3", None),
    ]


def test_publish_close_pause_resume(fx: Fixture) -> None:
    envelope = Closed(ChannelId("c"), B)
    fx.executor.execute(
        [
            Publish(NODE, envelope),
            CloseClient(A, 1000, "bye"),
            CloseClient(ConnectionId("gone"), 1000, "bye"),
            PauseReading(B),
            PauseReading(ConnectionId("gone")),
            ResumeReading(B),
            ResumeReading(ConnectionId("gone")),
        ]
    )
    assert fx.effects == [
        ("publish", NODE, envelope),
        ("close", "a", 1000, "bye"),
        ("pause", "b", "flow"),
        ("resume", "b", "flow"),
    ]


def test_registry_and_session_work_go_to_the_writers(fx: Fixture) -> None:
    actions: list[Action] = [
        ForgetChannel(CHANNEL),
        ForgetConnection(RECORD),
        MarkDetached(RECORD, 5),
        EndSession(RECORD),
        MoveChannels((CHANNEL,), NODE),
        LoadSession(A, NODE),
    ]
    fx.executor.execute(actions)
    assert fx.effects == [
        ("forget", actions[0]),
        ("forget", actions[1]),
        ("session work", actions[2]),
        ("session work", actions[3]),
        ("session work", actions[4]),
        ("session work", actions[5]),
    ]


def test_keep_frames_replay_and_rebind(fx: Fixture) -> None:
    log = SessionLog(max_frames=10, max_bytes=1000)
    gone = ConnectionId("gone")
    fx.executor.execute(
        [
            KeepFrames(A, log),
            KeepFrames(gone, log),
            Replay(B, (b"r1", b"r2")),
            Replay(gone, (b"r3",)),
            Rebind(A, B, 4100, "resumed elsewhere"),
        ]
    )
    assert fx.clients[A].session_log is log
    assert fx.effects == [
        ("send", "b", b"r1", None),
        ("send", "b", b"r2", None),
        ("rebind", "a", "b"),
    ]


def test_a_call_from_inside_an_action_runs_after_it_in_order(fx: Fixture) -> None:
    calls = 0

    def closing() -> None:
        nonlocal calls
        calls += 1
        # As a socket's close tells the node, which executes the departure's actions.
        fx.executor.execute([Send(B, b"peer told"), Publish(NODE, Closed(ChannelId("c"), B))])
        fx.recorder.effects.append(("close returned",))

    fx.clients[A].on_close = closing
    fx.executor.execute([CloseClient(A, 1000, "bye"), Send(B, b"next")])
    assert calls == 1
    assert fx.effects == [
        ("close", "a", 1000, "bye"),
        ("close returned",),
        ("send", "b", b"peer told", None),
        ("publish", NODE, Closed(ChannelId("c"), B)),
        ("send", "b", b"next", None),
    ]


def test_nested_actions_nest_depth_first(fx: Fixture) -> None:
    # The overflow closes A, whose close makes more actions: all before the list goes on.
    fx.clients[A].session_log = SessionLog(max_frames=0, max_bytes=1000)
    fx.core.overflow = [CloseClient(A, 1008, "slow consumer"), Send(B, b"overflowed")]
    fx.clients[A].on_close = lambda: fx.executor.execute([Send(B, b"closed")])
    fx.executor.execute([Send(A, frame(1)), Send(B, b"last")])
    assert fx.effects == [
        ("send", "a", frame(1), None),
        ("overflow", "a"),
        ("close", "a", 1008, "slow consumer"),
        ("send", "b", b"closed", None),
        ("send", "b", b"overflowed", None),
        ("send", "b", b"last", None),
    ]


def test_an_action_that_raises_leaves_the_executor_usable(fx: Fixture) -> None:
    def failing() -> None:
        fx.executor.execute([Send(B, b"never")])
        raise RuntimeError("boom")

    fx.clients[A].on_close = failing
    with pytest.raises(RuntimeError):
        fx.executor.execute([CloseClient(A, 1000, "bye")])
    fx.executor.execute([Send(B, b"fine")])
    assert fx.effects == [("close", "a", 1000, "bye"), ("send", "b", b"fine", None)]


def test_the_callers_list_is_not_changed(fx: Fixture) -> None:
    fx.core.held = [Send(B, b"held-reply")]
    actions: list[Action] = [Send(ConnectionId("gone"), b"x")]
    fx.executor.execute(actions)
    assert actions == [Send(ConnectionId("gone"), b"x")]


def test_an_unknown_action_is_a_bug(fx: Fixture) -> None:
    with pytest.raises(AssertionError):
        fx.executor.execute([object()])  # type: ignore[list-item]


def test_the_match_handles_the_fast_kinds_too(fx: Fixture) -> None:
    # Send and Publish are told apart before the match (hot path); the match, exhaustive
    # over the Action union, does the same for them.
    fx.clients[A].session_log = SessionLog(max_frames=0, max_bytes=1000)
    fx.core.held = [Send(B, b"held-reply")]
    fx.core.overflow = [Send(B, b"overflowed")]
    envelope = Closed(ChannelId("c"), B)
    for action in (
        Send(B, b"plain"),
        Send(A, frame(1)),
        Send(ConnectionId("gone"), b"x"),
        Publish(NODE, envelope),
    ):
        fx.executor._execute_one(action)
    assert fx.effects == [
        ("send", "b", b"plain", None),
        ("send", "a", frame(1), None),
        ("overflow", "a"),
        ("hold", "gone", b"x"),
        ("publish", NODE, envelope),
    ]
    assert fx.executor._produced == [Send(B, b"overflowed"), Send(B, b"held-reply")]

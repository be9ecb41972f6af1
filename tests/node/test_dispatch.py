"""The dispatcher over a real core and the in-memory registry, without sockets."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.cluster.memory import MemoryHub, MemoryRegistry
from broker_node.core.actions import (
    Action,
    EndSession,
    ForgetChannel,
    ForgetConnection,
    LoadSession,
    MarkDetached,
    MoveChannels,
    Send,
)
from broker_node.core.broker import BrokerCore
from broker_node.dispatch import Dispatcher
from broker_node.errors import BackendUnavailable
from shared.codec import (
    Rejection,
    decode_request,
)
from shared.ids import ChannelId, ConnectionId, NodeId

_T = TypeVar("_T")
HERE = NodeId("here")
A, B = ConnectionId("a"), ConnectionId("b")


class Calls:
    def __init__(self) -> None:
        self.down = False
        #: Operations that fail while the others answer.
        self.failing: set[str] = set()
        self.operations: list[str] = []

    async def call(self, operation: str, call: Awaitable[_T]) -> _T:
        self.operations.append(operation)
        if self.down or operation in self.failing:
            if hasattr(call, "close"):
                call.close()
            raise BackendUnavailable(operation, None)
        return await call


class Writes:
    def __init__(self) -> None:
        self.dirty = False
        self.forgotten: list[ForgetChannel | ForgetConnection] = []
        self.writing: list[str] = []

    def forget(self, action: ForgetChannel | ForgetConnection) -> None:
        self.forgotten.append(action)

    def queue_session_work(
        self, action: MarkDetached | EndSession | MoveChannels | LoadSession
    ) -> None:
        raise AssertionError("no session work here")

    def mark_dirty(self) -> None:
        self.dirty = True

    @contextlib.contextmanager
    def writing_connection(self, connection_id: ConnectionId) -> Iterator[None]:
        self.writing.append(connection_id)
        yield

    @contextlib.contextmanager
    def writing_channel(self, channel_id: ChannelId) -> Iterator[None]:
        self.writing.append("channel")
        yield


class Auth:
    def __init__(self) -> None:
        self.dropped: list[ConnectionId] = []

    def verify(self, token: str | None) -> Identity | TokenRefusal | None:
        return None

    async def take_slot(self, cid: ConnectionId, identity: Identity | None) -> str | None:
        return None

    def drop_slot(self, cid: ConnectionId) -> None:
        self.dropped.append(cid)


class Client:
    def __init__(self) -> None:
        self.cost = 0

    def add_request_cost(self, requests: int) -> None:
        self.cost += requests


class Fixture:
    def __init__(
        self, *, standalone: bool = False, calls: Callable[[BrokerCore], Calls] | None = None
    ) -> None:
        self.core = BrokerCore(
            HERE, max_role_length=8, max_unconfirmed=4, request_timeout=2.0, clock=lambda: 0.0
        )
        self.registry = MemoryRegistry(MemoryHub())
        self.calls = Calls() if calls is None else calls(self.core)
        self.writes = Writes()
        self.auth = Auth()
        self.clients = {A: Client(), B: Client()}
        self.executed: list[Action] = []
        self.bad: list[str] = []
        self.dispatcher = Dispatcher(
            node_id=HERE,
            core=self.core,
            execute=self.executed.extend,
            registry=self.registry,
            calls=self.calls,
            writes=self.writes,
            auth=self.auth,
            clients=self.clients,
            bad_frame=self.bad.append,
            standalone=standalone,
            max_list_page=100,
        )
        for cid in (A, B):
            self.core.connect(cid)

    def replies(self, to: ConnectionId) -> list[dict[str, Any]]:
        return [
            json.loads(a.frame)
            for a in self.executed
            if isinstance(a, Send) and a.connection_id == to
        ]

    def request(self, value: dict[str, Any]) -> Any:
        return decode_request(json.dumps(value).encode(), 32)


async def registered(fx: Fixture) -> None:
    for cid in (A, B):
        await fx.dispatcher.handle(cid, fx.request({"type": "register", "id": 1, "role": "r"}))
    fx.executed.clear()


async def test_register_writes_the_registry_then_answers() -> None:
    fx = Fixture()
    await fx.dispatcher.handle(A, fx.request({"type": "register", "id": 1, "role": "r"}))
    assert fx.calls.operations == ["add_connection"]
    assert fx.writes.writing == [A]
    assert fx.replies(A)[-1]["type"] == "registered"


async def test_register_with_the_registry_down_marks_it_dirty() -> None:
    fx = Fixture()
    fx.calls.down = True
    await fx.dispatcher.handle(A, fx.request({"type": "register", "id": 1, "role": "r"}))
    assert fx.writes.dirty
    assert fx.auth.dropped == [A]
    assert fx.replies(A)[-1]["type"] == "register_failed"


async def test_a_request_of_a_client_gone_meanwhile_is_dropped() -> None:
    fx = Fixture()
    fx.core.client_gone(A)
    await fx.dispatcher.handle(A, fx.request({"type": "register", "id": 1, "role": "r"}))
    assert fx.executed == [] and fx.calls.operations == []


async def test_open_then_message_and_close_take_the_fast_path() -> None:
    fx = Fixture()
    await registered(fx)
    await fx.dispatcher.handle(A, fx.request({"type": "open", "id": 2, "targetId": B}))
    assert fx.calls.operations[-2:] == ["find_connection", "add_channel"]
    opened = fx.replies(A)[-1]
    assert opened["type"] == "channel_opened"
    channel = opened["channelId"]
    message = fx.request({"type": "message", "id": 3, "channelId": channel, "payload": 1})
    assert fx.dispatcher.try_now(A, message)
    assert fx.replies(B)[-1]["type"] == "channel_message"
    close = fx.request({"type": "close", "id": 4, "channelId": channel})
    assert fx.dispatcher.try_now(A, close)
    assert fx.replies(B)[-1]["type"] == "channel_closed_notification"


async def test_open_with_the_registry_down() -> None:
    fx = Fixture()
    await registered(fx)
    fx.calls.down = True
    await fx.dispatcher.handle(A, fx.request({"type": "open", "id": 2, "targetId": B}))
    assert fx.replies(A)[-1]["type"] == "channel_open_failed"


async def test_open_whose_channel_write_fails_marks_the_registry_dirty() -> None:
    fx = Fixture()
    await registered(fx)
    fx.calls.failing = {"add_channel"}
    await fx.dispatcher.handle(A, fx.request({"type": "open", "id": 2, "targetId": B}))
    assert fx.calls.operations[-2:] == ["find_connection", "add_channel"]
    assert fx.writes.dirty and fx.writes.writing[-1] == "channel"
    assert fx.replies(A)[-1]["type"] == "channel_open_failed"
    # A target that is not there: refused before any write.
    await fx.dispatcher.handle(A, fx.request({"type": "open", "id": 3, "targetId": "nobody"}))
    assert fx.calls.operations[-1] == "find_connection"
    assert fx.replies(A)[-1]["type"] == "channel_open_failed"


async def test_message_on_an_unknown_channel_waits_and_asks_the_registry() -> None:
    fx = Fixture()
    await registered(fx)
    message = fx.request({"type": "message", "id": 3, "channelId": "nope", "payload": 1})
    close = fx.request({"type": "close", "id": 4, "channelId": "nope"})
    assert not fx.dispatcher.try_now(A, message)
    assert not fx.dispatcher.try_now(A, close)
    await fx.dispatcher.handle(A, message)
    await fx.dispatcher.handle(A, close)
    assert fx.calls.operations[-2:] == ["find_channel", "find_channel"]
    fx.calls.down = True
    await fx.dispatcher.handle(A, message)
    await fx.dispatcher.handle(A, close)
    failed = [reply["type"] for reply in fx.replies(A)]
    assert failed == [
        "channel_message_failed",
        "channel_close_failed",
        "channel_message_failed",
        "channel_close_failed",
    ]


async def test_standalone_never_asks_the_registry_about_channels() -> None:
    fx = Fixture(standalone=True)
    await registered(fx)
    message = fx.request({"type": "message", "id": 3, "channelId": "nope", "payload": 1})
    assert fx.dispatcher.try_now(A, message)
    close = fx.request({"type": "close", "id": 4, "channelId": "nope"})
    assert fx.dispatcher.try_now(A, close)
    assert fx.calls.operations == ["add_connection", "add_connection"]


async def test_other_requests_never_take_the_fast_path() -> None:
    fx = Fixture(standalone=True)
    assert not fx.dispatcher.try_now(A, fx.request({"type": "register", "id": 1, "role": "r"}))


async def test_list_by_role_counts_a_long_reply_against_the_rate() -> None:
    fx = Fixture()
    await registered(fx)
    for n in range(60):
        cid = ConnectionId(f"c{n}")
        fx.core.connect(cid)
        await fx.dispatcher.handle(cid, fx.request({"type": "register", "id": 1, "role": "r"}))
    await fx.dispatcher.handle(A, fx.request({"type": "list_by_role", "id": 5, "role": "r"}))
    assert fx.replies(A)[-1]["type"] == "connections"
    assert fx.clients[A].cost == 1
    fx.calls.down = True
    await fx.dispatcher.handle(A, fx.request({"type": "list_by_role", "id": 6, "role": "r"}))
    assert fx.replies(A)[-1]["type"] == "list_by_role_failed"
    # Refused before the registry: an unknown role shape.
    await fx.dispatcher.handle(A, fx.request({"type": "list_by_role", "id": 7, "role": "r" * 9}))
    assert fx.replies(A)[-1]["type"] == "list_by_role_failed"


async def test_refresh_ack_resume_and_rejections() -> None:
    fx = Fixture()
    await registered(fx)
    await fx.dispatcher.handle(A, fx.request({"type": "refresh", "id": 8, "token": "t"}))
    assert fx.replies(A)[-1]["type"] == "refresh_failed"
    await fx.dispatcher.handle(
        A,
        fx.request(
            {"type": "resume", "id": 9, "connectionId": "x", "resumeToken": "t", "lastId": 0}
        ),
    )
    assert fx.replies(A)[-1]["type"] == "resume_failed"
    await fx.dispatcher.handle(A, fx.request({"type": "ack", "id": 10, "lastId": 1}))
    bad: Rejection = fx.request({"type": "nonsense", "id": 11})
    await fx.dispatcher.handle(A, bad)
    assert fx.bad == ["unknown_type"]
    fx.dispatcher.binary(A)
    fx.dispatcher.binary(None)
    assert fx.bad == ["unknown_type", "binary", "binary"]


class LeavingCalls(Calls):
    """The client leaves while the registry is asked about a channel."""

    def __init__(self, core: BrokerCore, leaver: ConnectionId) -> None:
        super().__init__()
        self.core = core
        self.leaver = leaver

    async def call(self, operation: str, call: Awaitable[_T]) -> _T:
        result = await super().call(operation, call)
        if operation == "find_channel":
            self.core.client_gone(self.leaver)
        return result


async def test_a_message_or_close_whose_client_left_during_the_lookup_is_dropped() -> None:
    for kind in ("message", "close"):
        fx = Fixture(calls=lambda core: LeavingCalls(core, A))
        await registered(fx)
        request = fx.request({"type": kind, "id": 5, "channelId": "elsewhere", "payload": 1})
        await fx.dispatcher.handle(A, request)
        assert fx.replies(A) == []


async def test_an_ack_takes_the_fast_path_and_answers_as_in_its_turn() -> None:
    now, later = Fixture(), Fixture()
    for fx in (now, later):
        await registered(fx)
    ack = {"type": "ack", "id": 10, "lastId": 1}
    assert now.dispatcher.try_now(A, now.request(ack))
    await later.dispatcher.handle(A, later.request(ack))
    assert now.executed == later.executed
    assert now.calls.operations == later.calls.operations

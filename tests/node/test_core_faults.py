"""The pure core on its fault paths: clients that left mid-request, lost or silent nodes."""

from __future__ import annotations

import pytest

from broker_node.core.actions import Action, ForgetChannel, Publish
from broker_node.core.broker import (
    NODE_LOST,
    NOT_REGISTERED,
    REGISTRY_UNAVAILABLE,
    TARGET_NODE_SILENT,
    TARGET_NOT_FOUND,
    BrokerCore,
)
from broker_node.core.envelopes import (
    Closed,
    CloseRequest,
    CloseResult,
    Confirm,
    Deliver,
    Incoming,
    OpenResult,
)
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.core.stats import NodeStats
from shared.codec import ErrorReply
from shared.ids import ChannelId, ConnectionId
from shared.messages import Close, ListByRole, Message, Open, Register
from tests.node.test_core import HERE, THERE, Clock, frames, raw, registered

A, B, C = ConnectionId("a"), ConnectionId("b"), ConnectionId("c")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> BrokerCore:
    return BrokerCore(HERE, max_role_length=8, max_unconfirmed=8, request_timeout=2.0, clock=clock)


def open_remote(core: BrokerCore, opener: ConnectionId = A) -> tuple[ChannelRecord, int]:
    """``opener`` (here) asks for a channel to B (there); returns it and the open's seq."""
    request = Open(id=20, targetId=B)
    plan = core.plan_open(opener, request, ConnectionRecord(B, THERE, "r"))
    assert isinstance(plan, ChannelRecord)
    [publish] = core.launch_open(opener, request, plan)
    assert isinstance(publish, Publish) and isinstance(publish.envelope, Incoming)
    return plan, publish.envelope.seq


def test_replies_for_a_client_that_left_are_dropped(core: BrokerCore) -> None:
    core.connect(A)
    plan = core.begin_register(A, Register(id=1, role="r"))
    assert isinstance(plan, ConnectionRecord)
    core.disconnect(A)
    assert not core.is_connected(A)
    assert core.finish_register(A, Register(id=1, role="r")) == []
    assert core.finish_list(A, ListByRole(id=2, role="r"), []) == []
    assert core.plan_open(A, Open(id=3, targetId=B), None) == []
    assert core.fail_open(A, Open(id=3, targetId=B), "x") == []
    assert core.reject(A, ErrorReply(1, "Unknown request type: x")) == []


def test_registry_failures_become_failed_replies(core: BrokerCore) -> None:
    core.connect(A)
    core.begin_register(A, Register(id=1, role="r"))
    [failed] = frames(core.finish_register(A, Register(id=1, role="r"), REGISTRY_UNAVAILABLE))
    assert failed == {
        "type": "register_failed",
        "id": 1,
        "replyTo": 1,
        "error": REGISTRY_UNAVAILABLE,
    }
    # The connection may try again.
    assert isinstance(core.begin_register(A, Register(id=2, role="r")), ConnectionRecord)
    core.finish_register(A, Register(id=2, role="r"))
    assert core.begin_list(A, ListByRole(id=3, role="r")) is None
    [listed] = frames(core.finish_list(A, ListByRole(id=3, role="r"), None))
    assert listed["type"] == "list_by_role_failed" and listed["error"] == REGISTRY_UNAVAILABLE
    assert core.begin_open(A, Open(id=4, targetId=B)) is None
    [opened] = frames(core.fail_open(A, Open(id=4, targetId=B), REGISTRY_UNAVAILABLE))
    assert opened["type"] == "channel_open_failed" and opened["targetId"] == B


def test_open_whose_ends_left_while_the_registry_was_written(core: BrokerCore) -> None:
    registered(core, A, B)
    request = Open(id=5, targetId=B)
    plan = core.plan_open(A, request, ConnectionRecord(B, HERE, "r"))
    assert isinstance(plan, ChannelRecord)
    core.disconnect(B)
    actions = core.launch_open(A, request, plan)
    assert ForgetChannel(plan) in actions
    assert frames(actions, A)[0]["error"] == TARGET_NOT_FOUND
    core.disconnect(A)
    assert core.launch_open(A, request, plan) == [ForgetChannel(plan)]


def test_remote_open_refused_or_opener_gone(core: BrokerCore) -> None:
    registered(core, A)
    channel, seq = open_remote(core)
    assert core.pending_counts() == (0, 1)
    actions = core.on_bus([OpenResult(seq, TARGET_NOT_FOUND)])
    assert ForgetChannel(channel) in actions
    assert frames(actions, A)[0]["type"] == "channel_open_failed"
    assert core.on_bus([OpenResult(seq, None)]) == []  # answered once only

    channel, seq = open_remote(core)
    core.disconnect(A)
    actions = core.on_bus([OpenResult(seq, None)])
    # The target was told; its end must be closed too.
    assert Publish(THERE, Closed(channel.channel_id, B)) in actions
    assert ForgetChannel(channel) in actions


def test_silent_target_node_fails_the_open_and_closes_its_side(
    core: BrokerCore, clock: Clock
) -> None:
    registered(core, A)
    channel, _ = open_remote(core)
    clock.now += 1
    assert core.expire() == []
    clock.now += 5
    actions = core.expire()
    assert Publish(THERE, Closed(channel.channel_id, B)) in actions
    assert frames(actions, A)[0]["error"] == TARGET_NODE_SILENT


def test_incoming_for_an_unregistered_target(core: BrokerCore) -> None:
    core.connect(B)
    record = ChannelRecord(ChannelId("ch"), A, THERE, B, HERE)
    assert core.on_bus([Incoming(3, record)]) == [Publish(THERE, OpenResult(3, TARGET_NOT_FOUND))]


def test_undeliverable_envelopes(core: BrokerCore) -> None:
    registered(core, A)
    channel, seq = open_remote(core)
    core.on_bus([OpenResult(seq, None)])
    [publish] = core.message(A, Message(id=7, channelId=channel.channel_id, payload=raw(1)))
    assert isinstance(publish, Publish)
    actions = core.undeliverable(THERE, [publish.envelope, Closed(ChannelId("x"), B)])
    [failed] = frames(actions, A)
    assert failed["replyTo"] == 7 and failed["error"] == NODE_LOST

    _, open_seq = open_remote(core)
    incoming = Incoming(open_seq, ChannelRecord(ChannelId("y"), A, HERE, B, THERE))
    [opened] = frames(core.undeliverable(THERE, [incoming]), A)
    assert opened["type"] == "channel_open_failed" and opened["error"] == TARGET_NOT_FOUND


def test_node_lost_fails_pending_opens_and_forgets_its_sender_seqs(core: BrokerCore) -> None:
    registered(core, A)
    open_remote(core)
    assert core.remote_nodes() == set()  # not open yet: no channel until the target's node answers
    actions = core.node_lost(THERE)
    assert frames(actions, A)[0]["error"] == TARGET_NOT_FOUND
    assert core.pending_counts() == (0, 0)


def test_messages_from_the_target_side_and_confirmations_for_a_sender_that_left(
    core: BrokerCore,
) -> None:
    registered(core, A)
    record = ChannelRecord(ChannelId("ch"), B, THERE, A, HERE)
    core.on_bus([Incoming(1, record)])
    assert core.remote_nodes() == {THERE}
    [publish] = core.message(A, Message(id=9, channelId="ch", payload=raw("up")))
    assert isinstance(publish, Publish) and isinstance(publish.envelope, Deliver)
    assert publish.envelope.recipient == B
    core.disconnect(A)
    assert core.on_bus([Confirm([publish.envelope.seq], [])]) == []


def test_close_of_a_cross_node_channel_tells_the_other_node(core: BrokerCore) -> None:
    registered(core, A)
    record = ChannelRecord(ChannelId("ch"), B, THERE, A, HERE)
    core.on_bus([Incoming(1, record)])
    actions: list[Action] = core.close(A, Close(id=4, channelId="ch"))
    # Confirmed only once the other end's node applied it.
    [request] = actions
    assert isinstance(request, Publish) and isinstance(request.envelope, CloseRequest)
    assert request.envelope.recipient == B and request.node_id == THERE
    [closed] = frames(core.on_bus([CloseResult(request.envelope.seq, True)]), A)
    assert closed["type"] == "channel_closed"
    # A close for a channel this node no longer knows is ignored.
    assert core.on_bus([Closed(ChannelId("ch"), A)]) == []


def test_unregistered_connection_gets_not_registered_on_message(core: BrokerCore) -> None:
    core.connect(C)
    [failed] = frames(core.message(C, Message(id=1, channelId="x", payload=raw(0))))
    assert failed["error"] == NOT_REGISTERED


def test_stats_count_what_the_core_decides(core: BrokerCore) -> None:
    stats = NodeStats()
    counted = BrokerCore(
        HERE, max_role_length=8, max_unconfirmed=8, request_timeout=1, clock=lambda: 0, stats=stats
    )
    registered(counted, A, B)
    request = Open(id=5, targetId=B)
    plan = counted.plan_open(A, request, ConnectionRecord(B, HERE, "r"))
    assert isinstance(plan, ChannelRecord)
    counted.launch_open(A, request, plan)
    counted.message(A, Message(id=6, channelId=plan.channel_id, payload=raw(1)))
    counted.message(A, Message(id=7, channelId="nope", payload=raw(1)))
    assert stats.messages_local == 1
    assert stats.failures[("channel_message_failed", "Channel not found")] == 1
    stats.registry_call("heartbeat", 0.5, failed=False)
    stats.registry_call("heartbeat", 0.25, failed=True)
    assert stats.registry_calls["heartbeat"] == [2, 0.75, 1]

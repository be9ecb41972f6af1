"""The pure core on its fault paths: clients that left mid-request, lost or silent nodes, and
work in flight that is answered late, early, twice or by the wrong node."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from broker_node.core.actions import Action, ForgetChannel, Publish, Send
from broker_node.core.broker import (
    CHANNEL_NOT_FOUND,
    DELIVERY_UNKNOWN,
    NODE_LOST,
    NOT_AUTHORIZED,
    NOT_REGISTERED,
    RECIPIENT_GONE,
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
    Envelope,
    Incoming,
    OpenResult,
)
from broker_node.core.records import ChannelRecord, ConnectionRecord
from broker_node.core.stats import NodeStats
from shared.codec import ErrorReply
from shared.ids import ChannelId, ConnectionId, NodeId
from shared.messages import Close, ListByRole, Message, Open, Register
from tests.node.test_core import HERE, THERE, Clock, frames, local_channel, raw, registered

A, B, C = ConnectionId("a"), ConnectionId("b"), ConnectionId("c")
X, Y = ConnectionId("x"), ConnectionId("y")
ELSEWHERE = NodeId("elsewhere")


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


# --- work in flight ----------------------------------------------------------------------


def remote_channel(core: BrokerCore, opener: ConnectionId = A) -> ChannelId:
    """``opener`` (here) has an open channel to B (there)."""
    channel, seq = open_remote(core, opener)
    core.on_bus([OpenResult(seq, None)])
    return channel.channel_id


def incoming_from(core: BrokerCore, remote: ConnectionId, node: NodeId, seq: int) -> ChannelId:
    """``remote`` on ``node`` opened a channel to B (here)."""
    channel = ChannelRecord(ChannelId(f"from-{remote}"), remote, node, B, HERE)
    core.on_bus([Incoming(seq, channel)])
    return channel.channel_id


def publishes(actions: Sequence[Action]) -> list[Publish]:
    return [a for a in actions if isinstance(a, Publish)]


# --- requests the shell answers without the registry ---------------------------------------


def test_a_message_or_close_failed_for_the_registry(core: BrokerCore) -> None:
    registered(core, A)
    request = Message(id=7, channelId="elsewhere", payload=raw(1))
    [failed] = frames(core.fail_on_channel(A, "message", request, REGISTRY_UNAVAILABLE))
    assert failed["type"] == "channel_message_failed" and failed["replyTo"] == 7
    assert failed["error"] == REGISTRY_UNAVAILABLE and failed["channelId"] == "elsewhere"
    core.disconnect(A)
    assert core.fail_on_channel(A, "close", Close(id=8, channelId="x"), "x") == []


def test_whether_the_core_knows_a_channel_without_the_registry(core: BrokerCore) -> None:
    assert core.knows_channel(A, "any")  # a connection gone: nothing to ask
    core.connect(A)
    assert core.knows_channel(A, "any")  # not registered: it fails before the channel matters
    registered(core, B)
    channel = local_channel(core, B, B)
    assert core.knows_channel(B, channel)
    assert not core.knows_channel(B, "unknown here")


# --- confirmations ------------------------------------------------------------------------


def test_a_sender_gone_before_the_write_hears_nothing(core: BrokerCore) -> None:
    registered(core, A, B)
    channel = local_channel(core, A, B)
    actions = core.message(A, Message(id=7, channelId=channel, payload=raw("hi")))
    receipts = [a.receipt for a in actions if isinstance(a, Send) and a.receipt is not None]
    core.disconnect(A)
    assert core.written(receipts) == []


def test_writes_are_confirmed_to_each_sending_node_in_one_envelope(core: BrokerCore) -> None:
    registered(core, B)
    from_there = incoming_from(core, X, THERE, 1)
    from_elsewhere = incoming_from(core, Y, ELSEWHERE, 1)
    delivered = core.on_bus(
        [
            Deliver(1, THERE, from_there, B, raw(1)),
            Deliver(1, ELSEWHERE, from_elsewhere, B, raw(2)),
            Deliver(2, THERE, from_there, B, raw(3)),
        ]
    )
    receipts = [a.receipt for a in delivered if isinstance(a, Send) and a.receipt is not None]
    assert publishes(core.written(receipts)) == [
        Publish(THERE, Confirm([1, 2], [])),
        Publish(ELSEWHERE, Confirm([1], [])),
    ]


def test_a_remote_delivery_the_recipient_never_took_is_refused_to_its_node(
    core: BrokerCore,
) -> None:
    registered(core, B)
    channel = incoming_from(core, X, THERE, 1)
    delivered = core.on_bus([Deliver(1, THERE, channel, B, raw("lost"))])
    receipts = [a.receipt for a in delivered if isinstance(a, Send) and a.receipt is not None]
    assert core.unwritten(receipts, handed=True) == [
        Publish(THERE, Confirm([], [(1, DELIVERY_UNKNOWN)]))
    ]


def test_refusals_of_one_batch_go_back_in_one_envelope(core: BrokerCore) -> None:
    registered(core, B)
    refused = core.on_bus(
        [
            Deliver(1, THERE, ChannelId("gone"), B, raw(1)),
            Deliver(2, THERE, ChannelId("gone"), B, raw(2)),
        ]
    )
    assert refused == [
        Publish(THERE, Confirm([], [(1, CHANNEL_NOT_FOUND), (2, CHANNEL_NOT_FOUND)]))
    ]


def test_a_delivery_for_the_channel_s_remote_end_is_refused(core: BrokerCore) -> None:
    # A misrouted envelope: the recipient is an end of the channel, but not on this node.
    registered(core, A)
    channel = remote_channel(core)
    assert core.on_bus([Deliver(1, ELSEWHERE, channel, B, raw(1))]) == [
        Publish(ELSEWHERE, Confirm([], [(1, RECIPIENT_GONE)]))
    ]


# --- closes -------------------------------------------------------------------------------


def test_a_channel_to_itself_closes_without_a_notification(core: BrokerCore) -> None:
    registered(core, A)
    channel = local_channel(core, A, A)
    closing = core.close(A, Close(id=9, channelId=channel))
    assert [f["type"] for f in frames(closing)] == ["channel_closed"]
    assert ForgetChannel in {type(a) for a in closing}


def test_a_second_close_during_a_cross_node_close_fails_after_the_first(
    core: BrokerCore,
) -> None:
    registered(core, A)
    channel = remote_channel(core)
    [request] = publishes(core.close(A, Close(id=9, channelId=channel)))
    assert isinstance(request.envelope, CloseRequest)
    # Its reply waits behind the first close's, as one node would have answered them.
    assert core.close(A, Close(id=10, channelId=channel)) == []
    settled = frames(core.on_bus([CloseResult(request.envelope.seq, True)]))
    assert [(f["type"], f["replyTo"]) for f in settled] == [
        ("channel_closed", 9),
        ("channel_close_failed", 10),
    ]
    assert settled[1]["error"] == CHANNEL_NOT_FOUND


@pytest.mark.parametrize("close_answered_first", [True, False], ids=["close-first", "in-order"])
def test_a_message_then_a_close_are_answered_in_that_order(
    core: BrokerCore, close_answered_first: bool
) -> None:
    registered(core, A)
    channel = remote_channel(core)
    [deliver] = publishes(core.message(A, Message(id=8, channelId=channel, payload=raw(1))))
    [request] = publishes(core.close(A, Close(id=9, channelId=channel)))
    assert isinstance(deliver.envelope, Deliver) and isinstance(request.envelope, CloseRequest)
    # The other node may answer the close before the message's write is confirmed.
    answers: list[Envelope] = [
        Confirm([deliver.envelope.seq], []),
        CloseResult(request.envelope.seq, True),
    ]
    if close_answered_first:
        answers.reverse()
    replies = [(f["type"], f["replyTo"]) for a in answers for f in frames(core.on_bus([a]))]
    assert replies == [("channel_message_sent", 8), ("channel_closed", 9)]


def test_the_losing_close_of_a_race_stands_when_the_other_node_is_lost(
    core: BrokerCore,
) -> None:
    registered(core, B)
    channel = incoming_from(core, X, THERE, 1)
    [request] = publishes(core.close(B, Close(id=9, channelId=channel)))
    assert isinstance(request.envelope, CloseRequest)
    # The opener closed at once: its close wins, and B's own answer is still to come...
    won = core.on_bus([CloseRequest(5, THERE, channel, B)])
    assert publishes(won) == [Publish(THERE, CloseResult(5, True))]
    # ...but its node is lost before it answers: B's close stands.
    lost = core.node_lost(THERE)
    assert [(f["type"], f["replyTo"]) for f in frames(lost)] == [("channel_closed", 9)]
    assert core.pending_counts() == (0, 0)


def test_a_close_request_the_bus_could_not_hand_over_stands(core: BrokerCore) -> None:
    registered(core, A)
    channel = remote_channel(core)
    [request] = publishes(core.close(A, Close(id=9, channelId=channel)))
    actions = core.undeliverable(THERE, [request.envelope])
    assert [(f["type"], f["replyTo"]) for f in frames(actions)] == [("channel_closed", 9)]
    assert not core.knows_channel(A, channel)


def test_a_close_by_a_connection_that_is_not_an_end_is_refused(core: BrokerCore) -> None:
    registered(core, A, B, C)
    channel = local_channel(core, A, B)
    [refused] = frames(core.close(C, Close(id=9, channelId=channel)))
    assert refused["type"] == "channel_close_failed" and refused["error"] == NOT_AUTHORIZED


# --- time ---------------------------------------------------------------------------------


def test_work_still_in_time_does_not_expire(core: BrokerCore, clock: Clock) -> None:
    registered(core, A)
    channel = remote_channel(core)
    core.message(A, Message(id=8, channelId=channel, payload=raw(1)))
    core.close(A, Close(id=9, channelId=remote_channel(core)))
    pending, seq = open_remote(core)
    assert core.pending_channel_ids() == {pending.channel_id}
    clock.now += 1.0  # half the request timeout
    assert core.expire() == []
    assert core.pending_counts() == (1, 2)  # a message; an open and a close
    core.on_bus([OpenResult(seq, None)])
    assert core.pending_channel_ids() == set()

"""Two cores wired by a hand-driven bus: cross-node outcomes equal one node's, without I/O.

The test decides when each node's published envelopes reach the other, so that every
interleaving of a race can be stepped through.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from broker_node.core.actions import (
    Action,
    ForgetConnection,
    PauseReading,
    Publish,
    ResumeReading,
    Send,
)
from broker_node.core.broker import BrokerCore
from broker_node.core.envelopes import Envelope
from broker_node.core.records import ChannelRecord, ConnectionRecord
from shared.ids import ChannelId, ConnectionId, NodeId
from shared.messages import Close, Message, Open, Register

ONE, TWO = NodeId("one"), NodeId("two")
A, B = ConnectionId("a"), ConnectionId("b")


class Node:
    def __init__(self, node_id: NodeId, *, max_unconfirmed: int = 100) -> None:
        self.core = BrokerCore(
            node_id,
            max_role_length=8,
            max_unconfirmed=max_unconfirmed,
            request_timeout=2.0,
            clock=lambda: self.now,
        )
        self.now = 0.0
        #: Frames each local client received, in order.
        self.frames: dict[ConnectionId, list[dict[str, Any]]] = {}
        self.paused: set[ConnectionId] = set()
        #: Envelopes published to the other node and not yet handed over.
        self.outbox: list[Envelope] = []

    def run(self, actions: list[Action]) -> None:
        """Execute like the shell would, the kernel taking every frame at once."""
        receipts = []
        for action in actions:
            if isinstance(action, Send):
                self.frames.setdefault(action.connection_id, []).append(json.loads(action.frame))
                if action.receipt is not None:
                    receipts.append(action.receipt)
            elif isinstance(action, Publish):
                self.outbox.append(action.envelope)
            elif isinstance(action, PauseReading):
                self.paused.add(action.connection_id)
            elif isinstance(action, ResumeReading):
                self.paused.discard(action.connection_id)
            elif isinstance(action, ForgetConnection):
                self.run(list(action.then))  # the registry forgot it at once
        if receipts:
            self.run(self.core.written(receipts))

    def take(self, cid: ConnectionId) -> list[tuple[str, int | None]]:
        """(type, replyTo) of the frames ``cid`` received since the last take."""
        got = self.frames.pop(cid, [])
        return [(frame["type"], frame.get("replyTo")) for frame in got]


def deliver(source: Node, target: Node) -> None:
    """Hand everything ``source`` published so far to ``target``, as one bus batch."""
    envelopes, source.outbox = source.outbox, []
    target.run(target.core.on_bus(envelopes))


def settle(one: Node, two: Node) -> None:
    while one.outbox or two.outbox:
        deliver(one, two)
        deliver(two, one)


def make_pair(max_unconfirmed: int = 100) -> tuple[Node, Node, ChannelId]:
    """a on node one opened a channel to b on node two."""
    one, two = Node(ONE, max_unconfirmed=max_unconfirmed), Node(TWO)
    for node, cid in ((one, A), (two, B)):
        node.core.connect(cid)
        record = node.core.begin_register(cid, Register(id=1, role="r"))
        assert isinstance(record, ConnectionRecord)
        node.run(node.core.finish_register(cid, Register(id=1, role="r")))
    request = Open(id=2, targetId=B)
    plan = one.core.plan_open(A, request, ConnectionRecord(B, TWO, "r"))
    assert isinstance(plan, ChannelRecord)
    one.run(one.core.launch_open(A, request, plan))
    settle(one, two)
    assert one.take(A)[-1] == ("channel_opened", 2)
    assert two.take(B)[-1] == ("incoming_channel", None)
    return one, two, plan.channel_id


@pytest.fixture
def pair() -> tuple[Node, Node, ChannelId]:
    return make_pair()


def payload(n: int) -> msgspec.Raw:
    return msgspec.Raw(str(n).encode())


def test_close_after_the_other_end_closed_fails(pair: tuple[Node, Node, ChannelId]) -> None:
    one, two, channel = pair
    two.run(two.core.close(B, Close(id=5, channelId=channel)))
    settle(one, two)
    assert two.take(B) == [("channel_closed", 5)]
    assert one.take(A) == [("channel_closed_notification", None)]
    one.run(one.core.close(A, Close(id=6, channelId=channel)))
    assert one.take(A) == [("channel_close_failed", 6)]
    assert one.outbox == []


@pytest.mark.parametrize("first", ["one", "two", "both"])
def test_both_ends_closing_at_once(pair: tuple[Node, Node, ChannelId], first: str) -> None:
    one, two, channel = pair
    one.run(one.core.close(A, Close(id=5, channelId=channel)))
    two.run(two.core.close(B, Close(id=5, channelId=channel)))
    # Each node may see the other's request before or after its own result.
    if first == "one":
        deliver(one, two)
    elif first == "two":
        deliver(two, one)
    settle(one, two)
    # The opener's close wins on both nodes, whatever the interleaving.
    assert one.take(A) == [("channel_closed", 5)]
    assert two.take(B) == [("channel_closed_notification", None), ("channel_close_failed", 5)]
    assert not one.core.channels and not two.core.channels
    assert one.core.pending_counts() == two.core.pending_counts() == (0, 0)


def test_a_close_waits_for_the_confirmations_before_it(
    pair: tuple[Node, Node, ChannelId],
) -> None:
    one, two, channel = pair
    one.run(one.core.message(A, Message(id=5, channelId=channel, payload=payload(1))))
    one.run(one.core.close(A, Close(id=6, channelId=channel)))
    one.run(one.core.message(A, Message(id=7, channelId=channel, payload=payload(2))))
    settle(one, two)
    # As on one node: the message's confirmation, the close's reply, then the late message.
    assert one.take(A) == [
        ("channel_message_sent", 5),
        ("channel_closed", 6),
        ("channel_message_failed", 7),
    ]
    assert two.take(B) == [("channel_message", None), ("channel_closed_notification", None)]


def test_the_other_ends_messages_before_the_close_still_arrive(
    pair: tuple[Node, Node, ChannelId],
) -> None:
    one, two, channel = pair
    two.run(two.core.message(B, Message(id=5, channelId=channel, payload=payload(1))))
    one.run(one.core.close(A, Close(id=6, channelId=channel)))
    deliver(two, one)  # b's message reaches a while a's close is on its way
    settle(one, two)
    assert one.take(A) == [("channel_message", None), ("channel_closed", 6)]
    assert two.take(B) == [("channel_message_sent", 5), ("channel_closed_notification", None)]


def test_a_message_after_the_close_was_applied_fails(pair: tuple[Node, Node, ChannelId]) -> None:
    one, two, channel = pair
    one.run(one.core.close(A, Close(id=5, channelId=channel)))
    deliver(one, two)  # applied at b's node
    two.run(two.core.message(B, Message(id=6, channelId=channel, payload=payload(1))))
    settle(one, two)
    assert two.take(B) == [("channel_closed_notification", None), ("channel_message_failed", 6)]
    assert one.take(A) == [("channel_closed", 5)]


def test_the_other_end_leaving_while_a_close_is_on_its_way(
    pair: tuple[Node, Node, ChannelId],
) -> None:
    one, two, channel = pair
    one.run(one.core.close(A, Close(id=5, channelId=channel)))
    two.run(two.core.disconnect(B))
    deliver(two, one)  # b's departure reaches a's node first
    settle(one, two)
    assert one.take(A) == [("channel_closed_notification", None), ("channel_close_failed", 5)]


def test_the_closer_leaving_while_its_close_is_on_its_way(
    pair: tuple[Node, Node, ChannelId],
) -> None:
    one, two, channel = pair
    one.run(one.core.close(A, Close(id=5, channelId=channel)))
    one.run(one.core.disconnect(A))
    settle(one, two)
    # b hears of the closure once, from the close.
    assert two.take(B) == [("channel_closed_notification", None)]
    assert one.core.pending_counts() == (0, 0)


def test_a_close_to_a_lost_or_silent_node_stands(pair: tuple[Node, Node, ChannelId]) -> None:
    one, _, channel = pair
    one.run(one.core.close(A, Close(id=5, channelId=channel)))
    one.outbox.clear()  # the request is lost with its node
    one.run(one.core.node_lost(TWO))
    assert one.take(A) == [("channel_closed", 5)]
    assert not one.core.channels

    one2, two2, channel2 = make_pair()
    one2.run(one2.core.close(A, Close(id=5, channelId=channel2)))
    one2.outbox.clear()
    one2.now += 5
    one2.run(one2.core.expire())
    assert one2.take(A) == [("channel_closed", 5)]
    # The other end's node is told again with a plain notice, in case it is there after all.
    deliver(one2, two2)
    assert two2.take(B) == [("channel_closed_notification", None)]
    assert channel2 not in two2.core.channels


def test_flow_control_pauses_and_resumes_a_fast_sender() -> None:
    one, two, channel = make_pair(max_unconfirmed=4)
    for n in range(6):
        one.run(one.core.message(A, Message(id=10 + n, channelId=channel, payload=payload(n))))
    assert A in one.paused
    assert not [f for f in one.take(A) if f[0] == "channel_message_failed"]
    settle(one, two)
    assert A not in one.paused
    assert [f[1] for f in one.take(A)] == list(range(10, 16))
    assert [f["payload"] for f in two.frames[B]] == list(range(6))

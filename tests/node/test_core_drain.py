"""The drain's pure decisions: when everything read is answered, where sessions go."""

from __future__ import annotations

from broker_node.core.broker import BrokerCore
from broker_node.core.drain import everything_answered, hand_off_targets
from broker_node.core.records import ChannelRecord, ConnectionRecord
from shared.ids import ConnectionId, NodeId
from shared.messages import Open, Register

HERE, PEER_B, PEER_A = NodeId("here"), NodeId("b"), NodeId("a")
A, B, C = ConnectionId("a"), ConnectionId("b"), ConnectionId("c")


def make_core() -> BrokerCore:
    return BrokerCore(HERE, max_role_length=8, max_unconfirmed=10, request_timeout=2.0, clock=float)


def test_an_idle_core_has_everything_answered() -> None:
    assert everything_answered(make_core(), requests_waiting=False, envelopes_unpublished=0)


def test_a_request_in_a_backlog_or_an_envelope_unpublished_is_not_answered() -> None:
    core = make_core()
    assert not everything_answered(core, requests_waiting=True, envelopes_unpublished=0)
    assert not everything_answered(core, requests_waiting=False, envelopes_unpublished=1)


def test_a_same_node_message_awaiting_its_recipient_is_not_answered() -> None:
    core = make_core()
    core.connect(A)
    core.connections[A].unconfirmed = 1
    assert not everything_answered(core, requests_waiting=False, envelopes_unpublished=0)


def test_an_open_awaiting_another_node_is_not_answered() -> None:
    core = make_core()
    core.connect(A)
    assert isinstance(core.begin_register(A, Register(id=1, role="r")), ConnectionRecord)
    core.finish_register(A, Register(id=1, role="r"))
    request = Open(id=2, targetId=B)
    plan = core.plan_open(A, request, ConnectionRecord(B, PEER_B, "r"))
    assert isinstance(plan, ChannelRecord)
    core.launch_open(A, request, plan)
    assert core.pending_counts() == (0, 1)
    assert not everything_answered(core, requests_waiting=False, envelopes_unpublished=0)


def test_sessions_go_round_robin_to_the_other_live_nodes_in_a_fixed_order() -> None:
    targets = hand_off_targets([A, B, C], {PEER_B, HERE, PEER_A}, HERE)
    assert targets == [(A, PEER_A), (B, PEER_B), (C, PEER_A)]


def test_sessions_end_here_when_no_other_node_is_live() -> None:
    assert hand_off_targets([A, B], {HERE}, HERE) == [(A, None), (B, None)]
    assert hand_off_targets([], set(), HERE) == []

"""The core's limits: channels per connection and list_by_role pages (issue 15 item 3)."""

from __future__ import annotations

import json
from typing import Any

from broker_node.core.actions import Action, Publish, Send
from broker_node.core.broker import (
    INVALID_LIMIT,
    TARGET_TOO_MANY_CHANNELS,
    TOO_MANY_CHANNELS,
    BrokerCore,
)
from broker_node.core.envelopes import Incoming, OpenResult
from broker_node.core.records import ChannelRecord, ConnectionRecord
from shared.ids import ChannelId, ConnectionId, NodeId
from shared.messages import ListByRole, Open, Register

A, B, C = ConnectionId("a"), ConnectionId("b"), ConnectionId("c")
HERE, THERE = NodeId("here"), NodeId("there")


def make_core(*, max_channels: int = 1000, list_page_size: int = 1000) -> BrokerCore:
    return BrokerCore(
        HERE,
        max_role_length=8,
        max_unconfirmed=8,
        request_timeout=2.0,
        clock=lambda: 0.0,
        max_channels=max_channels,
        list_page_size=list_page_size,
    )


def registered(core: BrokerCore, *ids: ConnectionId) -> None:
    for cid in ids:
        core.connect(cid)
        core.begin_register(cid, Register(id=1, role="r"))
        core.finish_register(cid, Register(id=1, role="r"))


def sent(actions: list[Action] | None) -> list[dict[str, Any]]:
    return [json.loads(a.frame) for a in actions or [] if isinstance(a, Send)]


def open_local(core: BrokerCore, opener: ConnectionId, target: ConnectionId) -> list[Action]:
    request = Open(id=7, targetId=target)
    refusal = core.begin_open(opener, request)
    if refusal is not None:
        return refusal
    plan = core.plan_open(opener, request, ConnectionRecord(target, HERE, "r"))
    if isinstance(plan, list):
        return plan
    return core.launch_open(opener, request, plan)


def test_the_opener_is_refused_at_its_cap_and_may_open_again_after_a_close() -> None:
    core = make_core(max_channels=2)
    registered(core, A, B, C)
    open_local(core, A, B)
    open_local(core, A, C)
    (reply,) = sent(open_local(core, A, B))
    assert reply["type"] == "channel_open_failed" and reply["error"] == TOO_MANY_CHANNELS
    assert core.stats.limit_refusals["channels"] == 1


def test_a_local_target_at_its_cap_is_refused() -> None:
    core = make_core(max_channels=1)
    registered(core, A, B, C)
    open_local(core, A, B)
    (reply,) = sent(open_local(core, C, B))
    assert reply["error"] == TARGET_TOO_MANY_CHANNELS


def test_opens_in_flight_count_toward_the_cap() -> None:
    core = make_core(max_channels=2)
    registered(core, A)
    for n in range(2):
        request = Open(id=n, targetId="remote")
        assert core.begin_open(A, request) is None
        plan = core.plan_open(A, request, ConnectionRecord(ConnectionId("remote"), THERE, "r"))
        assert isinstance(plan, ChannelRecord)
        assert isinstance(core.launch_open(A, request, plan)[0], Publish)
    assert sent(core.begin_open(A, Open(id=9, targetId="remote")))[0]["error"] == (
        TOO_MANY_CHANNELS
    )


def test_a_remote_open_to_a_target_at_its_cap_is_answered_with_the_reason() -> None:
    core = make_core(max_channels=1)
    registered(core, A, B)
    open_local(core, A, B)
    channel = ChannelRecord(ChannelId("x"), ConnectionId("far"), THERE, B, HERE)
    actions = core.on_bus([Incoming(5, channel)])
    assert actions == [Publish(THERE, OpenResult(5, TARGET_TOO_MANY_CHANNELS))]


def test_pages_are_sorted_and_say_when_more_follow() -> None:
    core = make_core(list_page_size=2)
    registered(core, A)
    ids = [ConnectionId(x) for x in ("d", "b", "e", "a", "c")]
    (page,) = sent(core.finish_list(A, ListByRole(id=3, role="r"), ids))
    assert page["ids"] == ["a", "b"] and page["more"] is True
    (page,) = sent(core.finish_list(A, ListByRole(id=4, role="r", after="b"), ids))
    assert page["ids"] == ["c", "d"] and page["more"] is True
    (page,) = sent(core.finish_list(A, ListByRole(id=5, role="r", after="d"), ids))
    assert page["ids"] == ["e"] and "more" not in page
    (page,) = sent(core.finish_list(A, ListByRole(id=6, role="r", limit=1), ids))
    assert page["ids"] == ["a"] and page["more"] is True


def test_a_limit_below_one_is_refused() -> None:
    core = make_core()
    registered(core, A)
    (reply,) = sent(core.begin_list(A, ListByRole(id=3, role="r", limit=0)))
    assert reply["type"] == "list_by_role_failed" and reply["error"] == INVALID_LIMIT

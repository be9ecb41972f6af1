"""The pure core: events in, actions out; no event loop, no sockets."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import msgspec
import pytest

from broker_node.core.actions import (
    Action,
    CloseClient,
    ForgetChannel,
    ForgetConnection,
    PauseReading,
    Publish,
    Receipt,
    RemoteReceipt,
    ResumeReading,
    Send,
)
from broker_node.core.broker import (
    ALREADY_REGISTERED,
    CHANNEL_NOT_FOUND,
    LATE_DELIVERY,
    NOT_AUTHORIZED,
    NOT_CONFIRMED,
    NOT_REGISTERED,
    TARGET_NOT_FOUND,
    BrokerCore,
)
from broker_node.core.envelopes import Closed, Confirm, Deliver, Incoming, OpenResult
from broker_node.core.records import ChannelRecord, ConnectionRecord
from shared.codec import CloseConnection, ErrorReply, FailedReply
from shared.ids import ChannelId, ConnectionId, NodeId
from shared.messages import Close, ListByRole, Message, Open, Register

A, B, C = ConnectionId("a"), ConnectionId("b"), ConnectionId("c")
HERE, THERE = NodeId("here"), NodeId("there")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def core(clock: Clock) -> BrokerCore:
    return BrokerCore(HERE, max_role_length=8, max_unconfirmed=2, request_timeout=2.0, clock=clock)


def frames(actions: list[Action], to: ConnectionId | None = None) -> list[dict[str, Any]]:
    return [
        json.loads(a.frame)
        for a in actions
        if isinstance(a, Send) and (to is None or a.connection_id == to)
    ]


def written(core: BrokerCore, actions: list[Action]) -> list[Action]:
    """``actions``, then what the core does once the kernel took every frame sent."""
    receipts = [a.receipt for a in actions if isinstance(a, Send) and a.receipt is not None]
    return actions + core.written(receipts)


def registered(core: BrokerCore, *ids: ConnectionId, legacy: bool = False) -> None:
    for cid in ids:
        core.connect(cid, legacy_errors=legacy)
        plan = core.begin_register(cid, Register(id=1, role="r"))
        assert isinstance(plan, ConnectionRecord)
        core.finish_register(cid, Register(id=1, role="r"))


def local_channel(core: BrokerCore, opener: ConnectionId, target: ConnectionId) -> ChannelId:
    request = Open(id=50, targetId=target)
    plan = core.plan_open(opener, request, ConnectionRecord(target, HERE, "r"))
    assert isinstance(plan, ChannelRecord)
    core.launch_open(opener, request, plan)
    return plan.channel_id


def raw(value: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.json.encode(value))


def test_register_once_with_role_limits(core: BrokerCore) -> None:
    core.connect(A)
    empty = core.begin_register(A, Register(id=1, role=""))
    assert isinstance(empty, list)
    assert frames(empty)[0]["type"] == "register_failed"
    too_long = core.begin_register(A, Register(id=2, role="x" * 9))
    assert isinstance(too_long, list)
    assert "longer than 8" in frames(too_long)[0]["error"]
    plan = core.begin_register(A, Register(id=3, role="r"))
    assert plan == ConnectionRecord(A, HERE, "r")
    # A second register while the first is in flight fails too.
    again = core.begin_register(A, Register(id=4, role="r"))
    assert isinstance(again, list)
    assert frames(again)[0] == {
        "type": "register_failed",
        "id": 3,
        "replyTo": 4,
        "error": ALREADY_REGISTERED,
    }
    [reply] = frames(core.finish_register(A, Register(id=3, role="r")))
    assert reply == {"type": "registered", "id": 4, "replyTo": 3, "connectionId": "a"}
    last = core.begin_register(A, Register(id=5, role="r"))
    assert isinstance(last, list)
    assert frames(last)[0]["error"] == ALREADY_REGISTERED


def test_requests_before_register_fail_with_their_own_reply(core: BrokerCore) -> None:
    core.connect(A)
    assert (
        frames(core.begin_list(A, ListByRole(id=1, role="r")) or [])[0]["type"]
        == "list_by_role_failed"
    )
    [opened] = frames(core.begin_open(A, Open(id=2, targetId="b")) or [])
    assert opened == {
        "type": "channel_open_failed",
        "id": 2,
        "replyTo": 2,
        "targetId": "b",
        "error": NOT_REGISTERED,
    }
    [sent] = frames(core.message(A, Message(id=3, channelId="x", payload=raw(1))))
    assert sent["type"] == "channel_message_failed" and sent["channelId"] == "x"
    [closed] = frames(core.close(A, Close(id=4, channelId="x")))
    assert closed["type"] == "channel_close_failed" and closed["error"] == NOT_REGISTERED


def test_ids_strictly_increase_per_connection(core: BrokerCore) -> None:
    registered(core, A, B)
    channel = local_channel(core, A, B)
    seen: dict[str, list[int]] = {A: [], B: []}
    for n in range(5):
        actions = core.message(A, Message(id=10 + n, channelId=channel, payload=raw(n)))
        for action in written(core, actions):
            if isinstance(action, Send):
                seen[action.connection_id].append(json.loads(action.frame)["id"])
    for ids in seen.values():
        assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_local_open_tells_target_before_opener(core: BrokerCore) -> None:
    registered(core, A, B)
    request = Open(id=7, targetId=B)
    plan = core.plan_open(A, request, ConnectionRecord(B, HERE, "r"))
    assert isinstance(plan, ChannelRecord)
    actions = core.launch_open(A, request, plan)
    assert [a.connection_id for a in actions if isinstance(a, Send)] == [B, A]
    incoming, opened = frames(actions)
    assert incoming["type"] == "incoming_channel" and incoming["from"] == A
    assert opened == {
        "type": "channel_opened",
        "id": 2,
        "replyTo": 7,
        "channelId": plan.channel_id,
        "targetId": B,
    }


def test_open_unknown_target(core: BrokerCore) -> None:
    registered(core, A)
    [failed] = frames(core.plan_open(A, Open(id=3, targetId="nobody"), None))  # type: ignore[arg-type]
    assert failed == {
        "type": "channel_open_failed",
        "id": 2,
        "replyTo": 3,
        "targetId": "nobody",
        "error": TARGET_NOT_FOUND,
    }


def test_message_local_delivers_payload_raw_and_confirms(core: BrokerCore) -> None:
    registered(core, A, B)
    channel = local_channel(core, A, B)
    payload = msgspec.Raw(b'{"z": [1, 2]}')
    actions = core.message(A, Message(id=9, channelId=channel, payload=payload))
    assert isinstance(actions[0], Send) and actions[0].connection_id == B
    assert b'"payload":{"z": [1, 2]}' in actions[0].frame
    # Confirmed only once the recipient's socket took the frame.
    assert frames(actions, A) == []
    assert actions[0].receipt is not None
    [sent] = frames(core.written([actions[0].receipt]), A)
    assert sent["type"] == "channel_message_sent" and sent["replyTo"] == 9
    assert sent["channelId"] == channel


def test_a_same_node_message_past_the_window_pauses_before_it_is_delivered(
    core: BrokerCore,
) -> None:
    """The shell may confirm a delivery while it still executes the list that made it (the
    recipient's socket took it at once): the pause must already be done by then, or the
    resume its confirmation brings would come first and the pause stay for good."""
    registered(core, A, B)
    channel = local_channel(core, A, B)
    receipts: list[Receipt] = []
    for n in range(3):
        actions = core.message(A, Message(id=60 + n, channelId=channel, payload=raw(n)))
        [receipt] = [a.receipt for a in actions if isinstance(a, Send) and a.receipt]
        receipts.append(receipt)
    # The third passes the window of two.
    assert actions[0] == PauseReading(A) and isinstance(actions[1], Send) and len(actions) == 2
    assert ResumeReading(A) not in core.written(receipts[:1])
    assert ResumeReading(A) in core.written(receipts[1:2])


def test_a_frame_never_written_fails_its_message(core: BrokerCore) -> None:
    registered(core, A, B)
    channel = local_channel(core, A, B)
    [delivery] = core.message(A, Message(id=9, channelId=channel, payload=raw(1)))
    assert isinstance(delivery, Send) and delivery.receipt is not None
    [failed] = frames(core.unwritten([delivery.receipt], handed=False), A)
    assert failed["type"] == "channel_message_failed"
    assert failed["error"] == "Recipient not connected"
    [delivery] = core.message(A, Message(id=10, channelId=channel, payload=raw(1)))
    assert isinstance(delivery, Send) and delivery.receipt is not None
    [unknown] = frames(core.unwritten([delivery.receipt], handed=True), A)
    assert "outcome unknown" in unknown["error"]


def test_frames_about_a_channel_wait_behind_its_confirmations(core: BrokerCore) -> None:
    registered(core, A, B)
    channel = local_channel(core, A, B)
    [delivery] = core.message(A, Message(id=9, channelId=channel, payload=raw(1)))
    assert isinstance(delivery, Send) and delivery.receipt is not None
    # A closes, then sends again, before its first message is confirmed: as on one node, the
    # confirmation comes first, then the close's reply, then the failure.
    closing = core.close(A, Close(id=10, channelId=channel))
    assert frames(closing, A) == []
    assert frames(closing, B)[0]["type"] == "channel_closed_notification"
    assert frames(core.message(A, Message(id=11, channelId=channel, payload=raw(2))), A) == []
    released = frames(core.written([delivery.receipt]), A)
    assert [(f["type"], f["replyTo"]) for f in released] == [
        ("channel_message_sent", 9),
        ("channel_closed", 10),
        ("channel_message_failed", 11),
    ]
    assert [f["id"] for f in released] == sorted(f["id"] for f in released)


def test_third_party_can_neither_send_nor_close(core: BrokerCore) -> None:
    registered(core, A, B, C)
    channel = local_channel(core, A, B)
    [sent] = frames(core.message(C, Message(id=1, channelId=channel, payload=raw(1))))
    assert sent["type"] == "channel_message_failed" and sent["error"] == NOT_AUTHORIZED
    [closed] = frames(core.close(C, Close(id=2, channelId=channel)))
    assert closed["type"] == "channel_close_failed" and closed["error"] == NOT_AUTHORIZED
    assert channel in core.channels


def test_close_notifies_peer_and_then_channel_is_gone(core: BrokerCore) -> None:
    registered(core, A, B)
    channel = local_channel(core, A, B)
    actions = core.close(B, Close(id=3, channelId=channel))
    assert frames(actions, A) == [
        {"type": "channel_closed_notification", "id": 3, "channelId": channel}
    ]
    assert frames(actions, B)[0]["type"] == "channel_closed"
    assert any(isinstance(a, ForgetChannel) for a in actions)
    again = frames(core.message(A, Message(id=4, channelId=channel, payload=raw(1))))
    assert again[0]["error"] == CHANNEL_NOT_FOUND
    assert frames(core.close(A, Close(id=5, channelId=channel)))[0]["error"] == CHANNEL_NOT_FOUND


def test_disconnect_closes_channels_and_leaves_registry(core: BrokerCore) -> None:
    registered(core, A, B, C)
    first = local_channel(core, A, B)
    second = local_channel(core, C, A)
    actions = core.disconnect(A)
    # The peers are told once the registry no longer lists A: the notices ride on its removal.
    assert frames(actions) == []
    [forget] = [a for a in actions if isinstance(a, ForgetConnection)]
    assert forget.record == ConnectionRecord(A, HERE, "r")
    notices = list(forget.then)
    assert frames(notices, B) == [
        {"type": "channel_closed_notification", "id": 3, "channelId": first}
    ]
    assert frames(notices, C)[0]["channelId"] == second
    assert not core.channels
    assert core.disconnect(A) == []


def test_legacy_errors_mode(core: BrokerCore) -> None:
    registered(core, A, legacy=True)
    [failed] = frames(core.message(A, Message(id=5, channelId="x", payload=raw(1))))
    assert failed == {"type": "error", "id": 2, "replyTo": 5, "error": CHANNEL_NOT_FOUND}


def test_rejections(core: BrokerCore) -> None:
    core.connect(A)
    assert core.reject(A, CloseConnection(1003, "Invalid JSON")) == [
        CloseClient(A, 1003, "Invalid JSON")
    ]
    [error] = frames(core.reject(A, ErrorReply(None, "Message must be a JSON object")))
    assert error == {"type": "error", "id": 1, "error": "Message must be a JSON object"}
    [failed] = frames(core.reject(A, FailedReply("close", 4, "Invalid request: x", "c")))
    assert failed == {
        "type": "channel_close_failed",
        "id": 2,
        "replyTo": 4,
        "channelId": "c",
        "error": "Invalid request: x",
    }
    assert core.binary_frame(A)[0].code == 1003  # type: ignore[union-attr]


# --- cross-node -----------------------------------------------------------------------------


def remote_channel(core: BrokerCore) -> ChannelRecord:
    """A (here) opened a channel to B (there)."""
    request = Open(id=20, targetId=B)
    plan = core.plan_open(A, request, ConnectionRecord(B, THERE, "r"))
    assert isinstance(plan, ChannelRecord)
    [publish] = core.launch_open(A, request, plan)
    assert isinstance(publish, Publish) and publish.node_id == THERE
    assert isinstance(publish.envelope, Incoming)
    [opened] = frames(core.on_bus([OpenResult(publish.envelope.seq, None)]))
    assert opened["type"] == "channel_opened"
    return plan


def test_cross_node_message_confirmed_by_recipient_node(core: BrokerCore) -> None:
    registered(core, A)
    channel = remote_channel(core)
    [publish] = core.message(A, Message(id=30, channelId=channel.channel_id, payload=raw("p")))
    assert isinstance(publish, Publish) and isinstance(publish.envelope, Deliver)
    assert publish.node_id == THERE
    seq = publish.envelope.seq
    [sent] = frames(core.on_bus([Confirm([seq], [])]))
    assert sent["type"] == "channel_message_sent" and sent["replyTo"] == 30
    # A confirmation that arrives twice is answered once.
    assert core.on_bus([Confirm([seq], [])]) == []


def test_cross_node_refusal_and_expiry(core: BrokerCore, clock: Clock) -> None:
    registered(core, A)
    channel = remote_channel(core)
    [p1] = core.message(A, Message(id=31, channelId=channel.channel_id, payload=raw(1)))
    [_second] = core.message(A, Message(id=32, channelId=channel.channel_id, payload=raw(2)))
    # Past the window (2 here) nothing fails: reading the sender's socket pauses, before the
    # message goes (whose confirmation may resume it).
    third = core.message(A, Message(id=33, channelId=channel.channel_id, payload=raw(3)))
    assert third[0] == PauseReading(A) and isinstance(third[1], Publish) and len(third) == 2
    assert isinstance(p1, Publish) and isinstance(p1.envelope, Deliver)
    refusal = core.on_bus([Confirm([], [(p1.envelope.seq, "Recipient not connected")])])
    [refused] = frames(refusal)
    assert refused["replyTo"] == 31 and refused["error"] == "Recipient not connected"
    assert ResumeReading(A) not in refusal  # two still in flight: more than half the window
    clock.now += 5
    expired = core.expire()
    assert [(f["replyTo"], f["error"]) for f in frames(expired)] == [
        (32, NOT_CONFIRMED),
        (33, NOT_CONFIRMED),
    ]
    assert ResumeReading(A) in expired


def test_incoming_from_another_node(core: BrokerCore) -> None:
    registered(core, B)
    record = ChannelRecord(ChannelId("ch"), A, THERE, B, HERE)
    actions = core.on_bus([Incoming(5, record)])
    [incoming] = frames(actions)
    assert incoming == {"type": "incoming_channel", "id": 2, "from": "a", "channelId": "ch"}
    assert Publish(THERE, OpenResult(5, None)) in actions
    # Unknown target: the opener's node hears so.
    missing = ChannelRecord(ChannelId("ch2"), A, THERE, C, HERE)
    assert core.on_bus([Incoming(6, missing)]) == [Publish(THERE, OpenResult(6, TARGET_NOT_FOUND))]


def test_deliveries_are_confirmed_in_one_envelope_per_node(core: BrokerCore) -> None:
    registered(core, B)
    record = ChannelRecord(ChannelId("ch"), A, THERE, B, HERE)
    core.on_bus([Incoming(1, record)])
    batch = [Deliver(n, THERE, ChannelId("ch"), B, raw(n)) for n in range(1, 4)]
    batch.append(Deliver(9, THERE, ChannelId("nope"), B, raw(0)))
    actions = core.on_bus(batch)
    assert [m["payload"] for m in frames(actions, B)] == [1, 2, 3]
    # Refusals at once; deliveries once the kernel took them, all in one envelope.
    assert [a for a in actions if isinstance(a, Publish)] == [
        Publish(THERE, Confirm([], [(9, CHANNEL_NOT_FOUND)]))
    ]
    receipts = [a.receipt for a in actions if isinstance(a, Send)]
    assert receipts == [RemoteReceipt(THERE, n) for n in (1, 2, 3)]
    assert core.written([r for r in receipts if r is not None]) == [
        Publish(THERE, Confirm([1, 2, 3], []))
    ]


def test_closed_from_another_node_and_node_lost(core: BrokerCore) -> None:
    registered(core, A, B)
    first = remote_channel(core)
    [closed] = frames(core.on_bus([Closed(first.channel_id, A)]))
    assert closed == {"type": "channel_closed_notification", "id": 3, "channelId": first.channel_id}
    second = remote_channel(core)
    [_pending] = core.message(A, Message(id=40, channelId=second.channel_id, payload=raw(1)))
    actions = core.node_lost(THERE)
    notes = frames(actions, A)
    # The message's failure first, then the closure it was sent before.
    assert [(f["type"], f.get("replyTo")) for f in notes] == [
        ("channel_message_failed", 40),
        ("channel_closed_notification", None),
    ]
    assert notes[1]["channelId"] == second.channel_id
    assert not core.channels and core.remote_nodes() == set()
    # The lost node hears of it too, in case it was only thought lost.
    assert Publish(THERE, Closed(second.channel_id, B)) in actions
    assert ForgetChannel(second) in actions


def test_records_snapshot(core: BrokerCore) -> None:
    registered(core, A, B)
    core.connect(C)
    channel = local_channel(core, A, B)
    connections, channels = core.records()
    assert {c.connection_id for c in connections} == {A, B}
    assert [c.channel_id for c in channels] == [channel]


def test_core_and_shared_import_no_io() -> None:
    """Every module of broker_node.core (the rules: the broker, liveness, close notices,
    drain...) and the shared protocol types import nothing that does I/O."""
    code = (
        "import sys, importlib, pkgutil, broker_node.core, shared.codec, shared.messages;"
        "[importlib.import_module(m.name) for m in"
        " pkgutil.iter_modules(broker_node.core.__path__, 'broker_node.core.')];"
        "bad = [m for m in ('asyncio', 'websockets', 'redis') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_late_delivery_behind_a_newer_one_is_refused(core: BrokerCore) -> None:
    registered(core, B)
    record = ChannelRecord(ChannelId("ch"), A, THERE, B, HERE)
    core.on_bus([Incoming(1, record)])
    core.on_bus([Deliver(10, THERE, ChannelId("ch"), B, raw("new"))])
    actions = core.on_bus([Deliver(7, THERE, ChannelId("ch"), B, raw("stale"))])
    assert frames(actions, B) == []
    assert actions == [Publish(THERE, Confirm([], [(7, LATE_DELIVERY)]))]
    # Once the sending node is lost and comes back (same id), its new seqs are accepted.
    core.node_lost(THERE)
    core.on_bus([Incoming(2, record)])
    assert frames(core.on_bus([Deliver(3, THERE, ChannelId("ch"), B, raw("again"))]), B)

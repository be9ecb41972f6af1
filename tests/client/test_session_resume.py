"""The pure session's resume layers: frame acks, per-channel seq, detach, resume, reconcile.

Every rule of ``client/session.py`` for resumable sessions, with frames in and values out,
no event loop and no socket (``docs/resume-design.md`` is the wire design).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from client.errors import ChannelClosed, ConnectionLost
from client.session import (
    ACK_DELAY,
    ACK_EVERY,
    OPEN_OUTCOME_UNKNOWN,
    RESEND_AFTER,
    WINDOW_EXPIRED,
    ChannelEnded,
    ChannelIncoming,
    ChannelPayload,
    Detached,
    Ending,
    Event,
    Listed,
    Opened,
    RegisteredAs,
    RequestLost,
    RequestRejected,
    RequestSucceeded,
    ScheduleAck,
    SendWindowOpened,
    Sent,
    Session,
    SessionLost,
    SessionResumed,
    SessionState,
    TokenRefreshed,
    Violation,
)
from shared.ids import ChannelId, ConnectionId

ME = ConnectionId("11111111-1111-4111-8111-111111111111")
PEER = ConnectionId("22222222-2222-4222-8222-222222222222")
OTHER = ConnectionId("55555555-5555-4555-8555-555555555555")
CH = ChannelId("33333333-3333-4333-8333-333333333333")
CH2 = ChannelId("44444444-4444-4444-8444-444444444444")
CH3 = ChannelId("66666666-6666-4666-8666-666666666666")

RETRYABLE = "Recipient's node was lost"


def frame(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class Broker:
    """The broker side of one session: frames with strictly increasing ids, and what the
    session wrote (decoded)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.last_id = 0

    def send(self, **fields: Any) -> list[Event]:
        self.last_id += 1
        return self.session.receive(frame(id=self.last_id, **fields))

    def fail(self, request_id: int, error: str = RETRYABLE) -> list[Event]:
        """``channel_message_failed`` of message ``request_id`` on ``CH``."""
        return self.send(
            type="channel_message_failed", replyTo=request_id, channelId=CH, error=error
        )

    def written(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.session.frames_to_send()]

    def sent_messages(self) -> list[tuple[int, Any]]:
        """``(seq, payload)`` of every ``message`` written since the last look."""
        return [(f["seq"], f["payload"]) for f in self.written() if f["type"] == "message"]


def start(*, max_unacked: int = 1000, window: int = 120) -> tuple[Session, Broker]:
    session = Session(request_resume=True, max_unacked=max_unacked)
    request = session.register("me")
    assert json.loads(request.frame) == {"type": "register", "id": 1, "role": "me", "resume": True}
    broker = Broker(session)
    events = broker.send(
        type="registered", replyTo=1, connectionId=ME, resumeToken="token-1", resumeWindow=window
    )
    assert events == [RequestSucceeded(1, RegisteredAs(ME)), ScheduleAck(ACK_DELAY)]
    assert session.resumable
    assert broker.written() == [json.loads(request.frame)]
    return session, broker


def open_to_peer(session: Session, broker: Broker, channel: ChannelId = CH) -> None:
    request = session.open_channel(PEER)
    events = broker.send(
        type="channel_opened", replyTo=request.request_id, channelId=channel, targetId=PEER
    )
    assert events[0] == RequestSucceeded(request.request_id, Opened(channel, PEER))
    broker.written()


def detach_and_resume(session: Session, broker: Broker, token: str | None = None) -> dict[str, Any]:
    assert session.connection_closed(1006) == Detached()
    request = session.resume(token)
    written = broker.written()
    assert written == [json.loads(request.frame)]
    return written[0]


# --- registering ----------------------------------------------------------------------------


def test_a_broker_without_resume_gives_todays_session() -> None:
    session = Session(request_resume=True)
    session.register("me")
    events = session.receive(frame(type="registered", id=1, replyTo=1, connectionId=ME))
    assert events == [RequestSucceeded(1, RegisteredAs(ME))]
    assert not session.resumable
    session.receive(frame(type="incoming_channel", id=2, **{"from": PEER}, channelId=CH))
    request = session.send(CH, "x")
    assert "seq" not in json.loads(request.frame)
    assert not session.send_blocked(CH)
    # A frame id seen again is not checked either: today's behaviour, exactly.
    assert session.receive(frame(type="channel_message", id=2, channelId=CH, payload=1)) == [
        ChannelPayload(CH, msgspec.Raw(b"1"))
    ]
    ending = session.connection_closed(1006)
    assert ending == Ending(failed_requests=[request.request_id], closed_channels=[CH])


def test_a_token_the_client_did_not_ask_for_is_ignored() -> None:
    session = Session()
    session.register("me")
    session.receive(
        frame(type="registered", id=1, replyTo=1, connectionId=ME, resumeToken="t", resumeWindow=9)
    )
    assert not session.resumable
    assert session.resume_token is None


# --- acknowledging broker frames -----------------------------------------------------------


def test_the_first_unacked_frame_schedules_an_ack_and_ack_reports_the_last_id() -> None:
    session, broker = start()
    assert session.ack() is not None  # the registered frame
    assert broker.written() == [{"type": "ack", "id": 2, "lastId": 1}]
    assert session.ack() is None  # nothing new
    listing = session.list_by_role("r")
    assert broker.send(type="connections", replyTo=listing.request_id, ids=[]) == [
        RequestSucceeded(listing.request_id, Listed([])),
        ScheduleAck(ACK_DELAY),
    ]
    assert broker.send(type="error", error="noise") == [Violation("broker error: noise")]
    broker.written()
    session.ack()
    assert broker.written() == [{"type": "ack", "id": 4, "lastId": 3}]


def test_every_32_frames_an_ack_goes_out_at_once() -> None:
    session, broker = start()
    session.ack()
    broker.written()
    open_to_peer(session, broker)  # frame 2
    for n in range(ACK_EVERY - 1):
        broker.send(type="channel_message", channelId=CH, payload=n, seq=n + 1)
    written = broker.written()
    assert written == [{"type": "ack", "id": 4, "lastId": 33, "channels": {CH: ACK_EVERY - 1}}]
    # Only the channels whose count moved since.
    broker.send(type="channel_message", channelId=CH, payload="no seq")
    session.ack()
    assert broker.written() == [{"type": "ack", "id": 5, "lastId": 34}]


def test_a_frame_id_not_above_the_last_one_is_a_replay_overlap() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    broker.send(type="channel_message", channelId=CH, payload="once", seq=1)
    overlap = session.receive(
        frame(type="channel_message", id=broker.last_id, channelId=CH, payload="once", seq=1)
    )
    assert len(overlap) == 1
    assert isinstance(overlap[0], Violation)
    assert not overlap[0].serious


# --- our messages: seq, retention, flow control ---------------------------------------------


def test_messages_carry_seq_per_channel_and_channel_acked_releases_them() -> None:
    session, broker = start()
    open_to_peer(session, broker, CH)
    open_to_peer(session, broker, CH2)
    first = session.send(CH, "a")
    second = session.send(CH, "b")
    other = session.send(CH2, "c")
    assert broker.sent_messages() == [(1, "a"), (2, "b"), (1, "c")]
    # The peer's SDK processed "a" before our confirmation of it came back.
    assert broker.send(type="channel_acked", channelId=CH, seq=1) == [
        RequestSucceeded(first.request_id, Sent(CH))
    ]
    assert (
        broker.send(type="channel_message_sent", replyTo=first.request_id, channelId=CH) == []
    )  # answered already
    assert broker.send(type="channel_message_sent", replyTo=second.request_id, channelId=CH) == [
        RequestSucceeded(second.request_id, Sent(CH))
    ]
    assert broker.send(type="channel_acked", channelId=CH, seq=2) == []
    assert broker.send(type="channel_acked", channelId=CH2, seq=1) == [
        RequestSucceeded(other.request_id, Sent(CH2))
    ]
    # Nothing is kept any more: the safety net has nothing to send.
    session.resend_stalled(0.0)
    session.resend_stalled(RESEND_AFTER * 2)
    assert broker.sent_messages() == []


def test_a_full_channel_blocks_sends_until_the_peer_acks() -> None:
    session, broker = start(max_unacked=2)
    open_to_peer(session, broker)
    session.send(CH, 1)
    assert not session.send_blocked(CH)
    session.send(CH, 2)
    assert session.send_blocked(CH)
    assert not session.send_blocked(CH2)  # no such channel: the send itself says so
    events = broker.send(type="channel_acked", channelId=CH, seq=1)
    assert events[-1] == SendWindowOpened(CH)
    assert not session.send_blocked(CH)
    assert SendWindowOpened(CH) not in broker.send(type="channel_acked", channelId=CH, seq=2)


def test_channel_resync_resends_every_message_after_last_seq_in_order() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    requests = [session.send(CH, n) for n in range(1, 5)]
    broker.written()
    events = broker.send(type="channel_resync", channelId=CH, lastSeq=2)
    assert events == [
        RequestSucceeded(requests[0].request_id, Sent(CH)),
        RequestSucceeded(requests[1].request_id, Sent(CH)),
    ]
    again = broker.written()
    assert [(f["seq"], f["payload"]) for f in again] == [(3, 3), (4, 4)]
    assert all(f["id"] > requests[-1].request_id for f in again)  # new request ids
    # The new transmission's confirmation answers the caller's send.
    assert broker.send(type="channel_message_sent", replyTo=again[0]["id"], channelId=CH) == [
        RequestSucceeded(requests[2].request_id, Sent(CH))
    ]


def test_channel_acked_or_resync_for_a_channel_not_open() -> None:
    _session, broker = start()
    for notice in (
        {"type": "channel_acked", "channelId": CH, "seq": 1},
        {"type": "channel_resync", "channelId": CH, "lastSeq": 0},
    ):
        events = broker.send(**notice)
        assert isinstance(events[0], Violation)
        assert not events[0].serious


# --- failures of our messages ---------------------------------------------------------------


def test_a_retryable_failure_goes_back_to_that_message_and_the_send_carries_on() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    requests = [session.send(CH, n) for n in range(1, 4)]
    broker.written()
    assert broker.fail(requests[1].request_id) == []
    again = broker.written()
    assert [f["seq"] for f in again] == [2, 3]
    # The first transmission of 3 was overtaken: its failure changes nothing.
    assert broker.fail(requests[2].request_id) == []
    assert broker.written() == []
    # 2 fails again: no tight loop; the next tick of the safety net resends.
    assert broker.fail(again[0]["id"]) == []
    assert broker.written() == []
    session.resend_stalled(0.0)
    assert broker.sent_messages() == [(1, 1), (2, 2), (3, 3)]
    session.resend_stalled(1.0)  # watching from now on
    assert broker.sent_messages() == []


def test_calls_sent_again_are_reported_so_that_their_wait_starts_over() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    waited = session.send(CH, "a")
    abandoned = session.send(CH, "b")
    session.abandon(abandoned.request_id)
    assert session.take_resent() == []
    broker.fail(waited.request_id)
    assert session.take_resent() == [waited.request_id]  # not the abandoned one
    assert session.take_resent() == []


def test_a_window_failing_message_after_message_is_resent_once_then_at_a_slowing_pace() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    requests = [session.send(CH, n) for n in range(5)]
    broker.written()

    def fail_all(ids: list[int]) -> None:
        for request_id in ids:
            broker.fail(request_id)

    fail_all([r.request_id for r in requests])
    again = broker.written()
    assert [f["seq"] for f in again] == [1, 2, 3, 4, 5]  # one go-back-N, not one per failure
    fail_all([f["id"] for f in again])
    assert broker.written() == []  # later failures wait for the ticks
    session.resend_stalled(10.0)
    again = broker.written()
    assert len(again) == 5
    fail_all([f["id"] for f in again])
    session.resend_stalled(10.9)
    assert broker.written() == []  # a second apart at first
    session.resend_stalled(11.0)
    again = broker.written()
    assert len(again) == 5
    fail_all([f["id"] for f in again])
    session.resend_stalled(12.9)
    assert broker.written() == []  # then two
    session.resend_stalled(13.0)
    again = broker.written()
    assert len(again) == 5
    # Progress: the next failure resends at once again.
    broker.send(type="channel_acked", channelId=CH, seq=1)
    broker.fail(again[1]["id"])
    assert [f["seq"] for f in broker.written()] == [2, 3, 4, 5]


def test_the_safety_net_waits_longer_each_time_the_peer_makes_no_progress() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    session.send(CH, "x")
    broker.written()
    resent_at = []
    for now in range(60):
        session.resend_stalled(float(now))
        if broker.written():
            resent_at.append(now)
    assert resent_at == [5, 10, 15, 20, 28, 44]


def test_a_message_refused_for_good_gives_its_seq_to_the_next_ones() -> None:
    session, broker = start(max_unacked=3)
    open_to_peer(session, broker)
    requests = [session.send(CH, n) for n in ("a", "bad", "c", "d")]
    broker.written()
    events = broker.fail(
        requests[1].request_id, "Invalid request: JSON nested deeper than 64 levels"
    )
    assert events == [
        SendWindowOpened(CH),
        RequestRejected(
            requests[1].request_id,
            "message",
            "channel_message_failed",
            "Invalid request: JSON nested deeper than 64 levels",
        ),
    ]
    # Sent again with the seq the peer expects next, or it would drop them all.
    assert broker.sent_messages() == [(2, "c"), (3, "d")]
    session.send(CH, "e")
    assert broker.sent_messages() == [(4, "e")]


def test_a_refusal_after_a_confirmed_transmission_is_ignored() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    request = session.send(CH, "x")
    broker.send(type="channel_message_sent", replyTo=request.request_id, channelId=CH)
    broker.written()
    broker.send(type="channel_resync", channelId=CH, lastSeq=0)
    again = broker.written()[0]
    assert broker.fail(again["id"], "Refused") == []
    assert not session.send_blocked(CH)
    broker.send(type="channel_resync", channelId=CH, lastSeq=0)
    assert broker.sent_messages() == [(1, "x")]  # still kept


def test_a_channel_gone_fails_every_message_kept_for_it() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    requests = [session.send(CH, n) for n in range(2)]
    events = broker.fail(requests[0].request_id, "Channel not found")
    assert events == [
        RequestRejected(r.request_id, "message", "channel_message_failed", "Channel not found")
        for r in requests
    ]
    # The second's own answer comes too, and changes nothing.
    assert broker.fail(requests[1].request_id, "Channel not found") == []


def test_a_failure_after_the_channel_closed_is_reported_as_today() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    request = session.send(CH, 1)
    session.close_channel(CH)
    events = broker.fail(request.request_id)
    assert events == [
        RequestRejected(request.request_id, "message", "channel_message_failed", RETRYABLE)
    ]


# --- the safety net --------------------------------------------------------------------------


def test_no_ack_progress_for_five_seconds_resends_the_unacked_tail() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    session.send(CH, "a")
    session.send(CH, "b")
    broker.written()
    session.resend_stalled(100.0)  # starts watching
    session.resend_stalled(100.0 + RESEND_AFTER - 0.1)
    assert broker.written() == []
    broker.send(type="channel_acked", channelId=CH, seq=1)  # progress: starts over
    session.resend_stalled(100.0 + RESEND_AFTER)
    session.resend_stalled(100.0 + 2 * RESEND_AFTER - 0.1)
    assert broker.sent_messages() == []
    session.resend_stalled(100.0 + 2 * RESEND_AFTER)
    assert broker.sent_messages() == [(2, "b")]


def test_no_resend_while_the_peer_is_detached_and_its_messages_are_held() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    request = session.send(CH, "a")
    assert broker.send(
        type="channel_message_sent", replyTo=request.request_id, channelId=CH, held=True
    ) == [RequestSucceeded(request.request_id, Sent(CH, held=True))]
    broker.written()
    for now in (0.0, RESEND_AFTER, 10 * RESEND_AFTER):
        session.resend_stalled(now)
    assert broker.written() == []
    # The peer resumed and acked: held no more.
    session.send(CH, "b")
    broker.send(type="channel_acked", channelId=CH, seq=1)
    broker.written()
    session.resend_stalled(20 * RESEND_AFTER)
    session.resend_stalled(21 * RESEND_AFTER)
    assert broker.sent_messages() == [(2, "b")]


# --- incoming messages -------------------------------------------------------------------


def test_incoming_seq_drops_duplicates_and_messages_after_a_gap() -> None:
    session, broker = start()
    broker.send(type="incoming_channel", **{"from": PEER}, channelId=CH)

    def deliver(seq: int | None, payload: Any) -> list[Event]:
        fields = {} if seq is None else {"seq": seq}
        return broker.send(type="channel_message", channelId=CH, payload=payload, **fields)

    assert deliver(1, "one") == [ChannelPayload(CH, msgspec.Raw(b'"one"'))]
    duplicate = deliver(1, "one")
    gap = deliver(3, "three")
    assert [type(e) for e in duplicate + gap] == [Violation, Violation]
    assert deliver(2, "two") == [ChannelPayload(CH, msgspec.Raw(b'"two"'))]
    assert deliver(None, "a non-SDK sender") == [
        ChannelPayload(CH, msgspec.Raw(b'"a non-SDK sender"'))
    ]
    broker.written()
    session.ack()
    assert broker.written()[0]["channels"] == {CH: 2}


def test_messages_held_before_channel_opened_are_sequenced_when_released() -> None:
    session, broker = start()
    request = session.open_channel(PEER)
    broker.send(type="channel_message", channelId=CH, payload="first", seq=1)
    broker.send(type="channel_message", channelId=CH, payload="first", seq=1)
    events = broker.send(
        type="channel_opened", replyTo=request.request_id, channelId=CH, targetId=PEER
    )
    assert events[:2] == [
        RequestSucceeded(request.request_id, Opened(CH, PEER)),
        ChannelPayload(CH, msgspec.Raw(b'"first"')),
    ]
    assert isinstance(events[2], Violation)


# --- detaching ---------------------------------------------------------------------------------


def test_a_drop_detaches_and_requests_wait_for_the_resume() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    unwritten = session.list_by_role("r")
    assert session.connection_closed(None) == Detached(immediately=False)
    assert session.state is SessionState.DETACHED
    assert session.detached
    assert broker.written() == []  # never written: sent after the resume
    queued = session.send(CH, "while away")
    closing = session.list_by_role("later")
    assert broker.written() == []
    assert session.channels == {CH: PEER}
    assert session.ack() is None
    session.resend_stalled(1000.0)
    assert broker.written() == []
    assert unwritten.request_id < queued.request_id < closing.request_id


def test_a_draining_node_asks_for_an_immediate_resume() -> None:
    session, _ = start()
    assert session.connection_closed(4100) == Detached(immediately=True)


@pytest.mark.parametrize("code", [1002, 1003, 1007, 1008, 1009, 4003])
def test_close_codes_after_which_resuming_cannot_help(code: int) -> None:
    session, broker = start()
    open_to_peer(session, broker)
    request = session.list_by_role("r")
    lost = session.connection_closed(code)
    assert lost == SessionLost(
        f"The broker closed the connection with code {code}",
        Ending(failed_requests=[request.request_id], closed_channels=[CH]),
    )
    assert session.state is SessionState.ENDED
    assert not session.resumable
    with pytest.raises(ConnectionLost):
        session.list_by_role("r")


def test_closing_on_purpose_ends_a_resumable_session() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    request = session.send(CH, 1)
    assert session.connection_lost() == Ending([request.request_id], [CH])


def test_the_resume_request() -> None:
    session, broker = start()
    open_to_peer(session, broker, CH)
    open_to_peer(session, broker, CH2)
    broker.send(type="channel_message", channelId=CH, payload=0, seq=1)
    resume = detach_and_resume(session, broker, token="jwt")
    assert resume == {
        "type": "resume",
        "id": resume["id"],
        "connectionId": ME,
        "resumeToken": "token-1",
        "lastId": broker.last_id,
        "token": "jwt",
        "channels": {CH: 1, CH2: 0},
    }
    assert session.state is SessionState.RESUMING
    with pytest.raises(RuntimeError):
        session.resume()
    # lastId acknowledged every frame: the next ack reports only what comes after it.
    assert session.ack() is None


def test_a_resume_without_channels_or_token_omits_them() -> None:
    session, broker = start()
    resume = detach_and_resume(session, broker)
    assert set(resume) == {"type", "id", "connectionId", "resumeToken", "lastId"}


def test_the_window_surely_passed() -> None:
    session, broker = start(window=120)
    open_to_peer(session, broker)
    request = session.list_by_role("r")
    assert session.expire(1.0) is None  # attached: nothing to expire
    session.connection_closed(1006)
    assert session.expire(119.9) is None
    assert session.expire(120.0) == SessionLost(WINDOW_EXPIRED, Ending([request.request_id], [CH]))


def test_a_connection_that_drops_while_resuming_detaches_again() -> None:
    session, broker = start()
    detach_and_resume(session, broker)
    assert session.connection_closed(1006) == Detached()
    assert session.state is SessionState.DETACHED
    # A late answer to that resume answers nothing.
    events = broker.send(
        type="resumed",
        replyTo=99,
        connectionId=ME,
        resumeToken="t",
        resumeWindow=120,
        complete=True,
    )
    assert isinstance(events[0], Violation)


# --- resuming: complete --------------------------------------------------------------------


def resumed(broker: Broker, resume: dict[str, Any], **fields: Any) -> list[Event]:
    return broker.send(
        type="resumed",
        replyTo=resume["id"],
        connectionId=ME,
        resumeToken="token-2",
        resumeWindow=60,
        **fields,
    )


def test_resumed_sends_again_what_the_broker_never_read_then_the_queued_calls() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    read = session.list_by_role("read")
    message_read = session.send(CH, "read")
    unread = session.send(CH, "unread")
    unread_open = session.open_channel(OTHER)
    broker.written()
    resume = detach_and_resume(session, broker)
    queued = session.send(CH, "queued")
    queued_close = session.close_channel(CH)
    assert queued_close is not None
    # The replayed frames: the reply to a request read before the drop.
    assert broker.send(type="connections", replyTo=read.request_id, ids=[PEER]) == [
        RequestSucceeded(read.request_id, Listed([PEER])),
        ScheduleAck(ACK_DELAY),
    ]
    events = resumed(broker, resume, complete=True, lastRequestId=message_read.request_id)
    assert events == [SessionResumed(complete=True), ScheduleAck(ACK_DELAY)]
    assert session.state is SessionState.READY
    assert session.resume_token == "token-2"
    assert session.resume_window == 60
    again = broker.written()
    assert [(f["type"], f.get("seq"), f.get("payload")) for f in again] == [
        ("message", 2, "unread"),
        ("open", None, None),
        ("message", 3, "queued"),
        ("close", None, None),
    ]
    ids = [f["id"] for f in again]
    assert ids == sorted(ids) and ids[0] > resume["id"]  # new ids, increasing on the wire
    # The read message's reply still comes, under its own id.
    assert broker.send(
        type="channel_message_sent", replyTo=message_read.request_id, channelId=CH
    ) == [RequestSucceeded(message_read.request_id, Sent(CH))]
    # The re-sent open is answered under its new id, and reported under the old.
    events = broker.send(
        type="channel_opened", replyTo=again[1]["id"], channelId=CH2, targetId=OTHER
    )
    assert events[0] == RequestSucceeded(unread_open.request_id, Opened(CH2, OTHER))
    assert unread.request_id < queued.request_id


def test_replayed_frames_while_resuming_are_processed_and_acked_once_resumed() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    requests = [session.send(CH, n) for n in range(2)]
    broker.written()
    resume = detach_and_resume(session, broker)
    # A retryable failure replayed: the message goes out again once resumed.
    broker.fail(requests[0].request_id)
    broker.send(type="channel_resync", channelId=CH, lastSeq=0)
    for n in range(ACK_EVERY):
        broker.send(type="channel_message", channelId=CH, payload=n, seq=n + 1)
    assert broker.written() == []  # no ack, no resend before resumed
    events = resumed(
        broker, resume, complete=True, lastRequestId=requests[-1].request_id, expiresIn=300
    )
    assert events == [SessionResumed(complete=True, expires_in=300), ScheduleAck(ACK_DELAY)]
    written = broker.written()
    assert [(f["seq"], f["payload"]) for f in written if f["type"] == "message"] == [
        (1, 0),
        (2, 1),
    ]
    # Over ACK_EVERY frames unacked: acked at once, as soon as the session is attached.
    assert [f for f in written if f["type"] == "ack"] == [
        {"type": "ack", "id": written[-1]["id"], "lastId": broker.last_id, "channels": {CH: 32}}
    ]


def test_resumed_without_a_last_request_id_settles_what_may_have_been_read() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    listing = session.list_by_role("r")
    opening = session.open_channel(OTHER)
    broker.written()
    resume = detach_and_resume(session, broker)
    events = resumed(broker, resume, complete=True)
    assert events == [
        SessionResumed(complete=True),
        RequestLost(opening.request_id, OPEN_OUTCOME_UNKNOWN),
        ScheduleAck(ACK_DELAY),
    ]
    again = broker.written()
    assert [(f["type"], f["role"]) for f in again] == [("list_by_role", "r")]
    assert broker.send(type="connections", replyTo=again[0]["id"], ids=[])[0] == (
        RequestSucceeded(listing.request_id, Listed([]))
    )


def test_resumed_and_resume_failed_for_another_request_are_violations() -> None:
    session, broker = start()
    resume = detach_and_resume(session, broker)
    events = broker.send(type="resume_failed", replyTo=resume["id"] + 7, error="x")
    assert isinstance(events[0], Violation)
    assert session.state is SessionState.RESUMING


# --- resuming: the node that held the session was lost ----------------------------------------


def test_complete_false_reconciles_channels_and_resends_every_unacked_message() -> None:
    session, broker = start()
    open_to_peer(session, broker, CH)
    open_to_peer(session, broker, CH2)
    confirmed = session.send(CH, "confirmed")
    broker.send(type="channel_message_sent", replyTo=confirmed.request_id, channelId=CH)
    acked = session.send(CH, "acked")
    broker.send(type="channel_acked", channelId=CH, seq=2)
    broker.send(type="channel_resync", channelId=CH, lastSeq=0)  # nothing after 2 is kept
    pending = session.send(CH, "pending")
    lost_channel_message = session.send(CH2, "into a closed channel")
    listing = session.list_by_role("r")
    opening = session.open_channel(OTHER)
    closing = session.close_channel(CH2)
    assert closing is not None
    broker.written()
    resume = detach_and_resume(session, broker)
    events = resumed(
        broker,
        resume,
        complete=False,
        channels=[
            {"channelId": CH, "peerId": PEER},
            {"channelId": CH2, "peerId": PEER},  # being closed by us: not incoming
            {"channelId": CH3, "peerId": OTHER},  # opened to us on the lost node
        ],
    )
    assert events == [
        SessionResumed(complete=False),
        RequestLost(opening.request_id, OPEN_OUTCOME_UNKNOWN),
        ChannelIncoming(CH3, OTHER),
        ScheduleAck(ACK_DELAY),
    ]
    again = broker.written()
    assert [(f["type"], f.get("seq"), f.get("payload")) for f in again] == [
        ("message", 3, "pending"),
        ("message", 1, "into a closed channel"),
        ("list_by_role", None, None),
        ("close", None, None),
    ]
    assert session.channels == {CH: PEER, CH3: OTHER}
    assert confirmed.request_id < acked.request_id < pending.request_id
    assert lost_channel_message.request_id < listing.request_id


def test_a_node_that_took_over_may_number_its_frames_afresh() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    for seq in range(1, 6):
        broker.send(type="channel_message", channelId=CH, payload=seq, seq=seq)
    resume = detach_and_resume(session, broker)
    broker.last_id = 1  # the lost node's counter is gone
    events = resumed(broker, resume, complete=False, channels=[{"channelId": CH, "peerId": PEER}])
    assert events[0] == SessionResumed(complete=False)
    assert broker.send(type="channel_message", channelId=CH, payload=6, seq=6) == [
        ChannelPayload(CH, msgspec.Raw(b"6"))
    ]
    session.ack()
    assert broker.written()[-1]["lastId"] == 3


def test_complete_false_ends_channels_the_registry_no_longer_has() -> None:
    session, broker = start()
    open_to_peer(session, broker, CH)
    open_to_peer(session, broker, CH2)
    kept = session.send(CH, "kept")
    doomed = session.send(CH2, "doomed")
    broker.written()
    resume = detach_and_resume(session, broker)
    events = resumed(
        broker,
        resume,
        complete=False,
        lastRequestId=kept.request_id - 1,
        channels=[{"channelId": CH, "peerId": PEER}],
    )
    assert events == [
        SessionResumed(complete=False),
        ChannelEnded(CH2),
        RequestRejected(
            doomed.request_id, "message", "channel_message_failed", "Channel not found"
        ),
        ScheduleAck(ACK_DELAY),
    ]
    assert broker.sent_messages() == [(1, "kept")]
    assert session.channels == {CH: PEER}


def test_complete_false_with_no_channels_listed_ends_them_all() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    resume = detach_and_resume(session, broker)
    events = resumed(broker, resume, complete=False)
    assert ChannelEnded(CH) in events
    assert session.channels == {}


def test_an_abandoned_open_that_was_lost_says_nothing() -> None:
    session, broker = start()
    opening = session.open_channel(OTHER)
    session.abandon(opening.request_id)
    broker.written()
    resume = detach_and_resume(session, broker)
    events = resumed(broker, resume, complete=False)
    assert events == [SessionResumed(complete=False), ScheduleAck(ACK_DELAY)]


def test_a_channel_known_from_reconciling_keeps_its_stream_when_its_open_reply_comes() -> None:
    session, broker = start()
    opening = session.open_channel(PEER)
    broker.written()
    resume = detach_and_resume(session, broker)
    resumed(
        broker,
        resume,
        complete=False,
        lastRequestId=opening.request_id - 1,  # the open was not read: sent again
        channels=[{"channelId": CH, "peerId": PEER}],
    )
    session.send(CH, "first")
    again_open = next(f for f in broker.written() if f["type"] == "open")
    broker.send(type="channel_opened", replyTo=again_open["id"], channelId=CH, targetId=PEER)
    assert session.send(CH, "second") is not None
    assert broker.sent_messages() == [(2, "second")]


# --- resume failures ---------------------------------------------------------------------


def test_resume_failed_ends_the_session() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    request = session.send(CH, "x")
    resume = detach_and_resume(session, broker)
    queued = session.list_by_role("r")
    events = broker.send(type="resume_failed", replyTo=resume["id"], error="Resume token not valid")
    assert events == [
        SessionLost(
            "Resume token not valid",
            Ending([request.request_id, queued.request_id], [CH]),
        )
    ]
    assert session.state is SessionState.ENDED
    assert broker.written() == []


@pytest.mark.parametrize("kind", ["resume_failed", "error"])
def test_a_refusal_numbered_by_the_new_socket_is_heard(kind: str) -> None:
    # The refusal is the new socket's first frame (id 1), below the session's last id.
    session, broker = start()
    open_to_peer(session, broker)
    resume = detach_and_resume(session, broker)
    refusal = frame(id=1, type=kind, replyTo=resume["id"], error="Resume token not valid")
    events = session.receive(refusal)
    assert [type(event) for event in events] == [SessionLost]
    assert session.state is SessionState.ENDED


def test_an_error_reply_to_resume_ends_the_session() -> None:
    # A node without resume: "Unknown request type: resume".
    session, broker = start()
    resume = detach_and_resume(session, broker)
    events = broker.send(type="error", replyTo=resume["id"], error="Unknown request type: resume")
    assert events == [SessionLost("Unknown request type: resume", Ending([], []))]


# --- abandoning, closing ------------------------------------------------------------------------


def test_abandon_finds_a_call_sent_again_or_queued() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    listing = session.list_by_role("r")
    resume = detach_and_resume(session, broker)
    queued = session.list_by_role("q")
    session.abandon(queued.request_id)
    resumed(broker, resume, complete=True, lastRequestId=listing.request_id - 1)
    again = broker.written()
    session.abandon(listing.request_id)  # now under a new id
    assert broker.send(type="connections", replyTo=again[0]["id"], ids=[]) == []
    assert broker.send(type="connections", replyTo=again[1]["id"], ids=[]) == []


def test_an_abandoned_message_is_still_resent_until_acked() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    request = session.send(CH, "gave up")
    session.abandon(request.request_id)
    broker.written()
    events = broker.send(type="channel_resync", channelId=CH, lastSeq=0)
    assert events == []
    assert broker.sent_messages() == [(1, "gave up")]
    assert broker.send(type="channel_acked", channelId=CH, seq=1) == []


def test_a_send_on_a_channel_not_open_while_detached() -> None:
    session, _broker = start()
    session.connection_closed(1006)
    with pytest.raises(ChannelClosed):
        session.send(CH, 1)
    assert session.close_channel(CH) is None


# --- token refresh ------------------------------------------------------------------------------


def test_refresh_typed_and_untyped_and_queued_while_detached() -> None:
    session, broker = start()
    refresh = session.refresh("jwt-2")
    assert json.loads(refresh.frame) == {
        "type": "refresh",
        "id": refresh.request_id,
        "token": "jwt-2",
    }
    assert broker.send(type="refreshed", replyTo=refresh.request_id, expiresIn=60)[0] == (
        RequestSucceeded(refresh.request_id, TokenRefreshed(60))
    )
    untyped = session.refresh("jwt-3")
    assert session.receive(frame(id=broker.last_id + 1, replyTo=untyped.request_id)) == [
        RequestSucceeded(untyped.request_id, TokenRefreshed(None))
    ]
    broker.last_id += 1
    broker.written()
    session.connection_closed(1006)
    queued = session.refresh("jwt-4")
    assert broker.written() == []
    assert session.pending == 0
    assert queued.kind == "refresh"


def test_an_ack_below_what_was_acked_changes_nothing() -> None:
    session, broker = start()
    open_to_peer(session, broker)
    for n in range(3):
        session.send(CH, n)
    broker.send(type="channel_acked", channelId=CH, seq=2)
    broker.written()
    assert broker.send(type="channel_acked", channelId=CH, seq=1) == []
    broker.send(type="channel_resync", channelId=CH, lastSeq=1)  # a resync always resends
    assert broker.sent_messages() == [(3, 2)]


# --- purity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["session.py", "events.py"])
def test_the_pure_modules_import_no_io(name: str) -> None:
    source = Path(__file__).resolve().parents[2] / "client" / name
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "collections", "dataclasses", "enum", "typing"} | {
        "msgspec",
        "client",
        "shared",
    }

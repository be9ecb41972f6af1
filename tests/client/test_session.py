"""The pure session layer: frames in, values out, no event loop and no socket."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from client.errors import ChannelClosed, ConnectionLost, InvalidPayload, NotConnected
from client.session import (
    AbandonedChannel,
    ChannelEnded,
    ChannelIncoming,
    ChannelPayload,
    Closed,
    Listed,
    Opened,
    RegisteredAs,
    RequestRejected,
    RequestSucceeded,
    Sent,
    Session,
    SessionState,
    TokenRefreshed,
    Violation,
    encode_payload,
)
from shared.ids import ChannelId, ConnectionId

ME = "11111111-1111-4111-8111-111111111111"
PEER = "22222222-2222-4222-8222-222222222222"
CH = ChannelId("33333333-3333-4333-8333-333333333333")
CH2 = ChannelId("44444444-4444-4444-8444-444444444444")


def frame(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


class Ids:
    """Broker-side ids: strictly increasing from 1, like a node's."""

    def __init__(self) -> None:
        self.value = 0

    def __call__(self) -> int:
        self.value += 1
        return self.value


@pytest.fixture
def ready() -> Session:
    session = Session()
    request = session.register("me")
    events = session.receive(
        frame(type="registered", id=1, replyTo=request.request_id, connectionId=ME)
    )
    assert events == [RequestSucceeded(1, RegisteredAs(ConnectionId(ME)))]
    return session


def open_channel(session: Session, channel: ChannelId = CH) -> None:
    request = session.open_channel(PEER)
    events = session.receive(
        frame(
            type="channel_opened",
            id=100,
            replyTo=request.request_id,
            channelId=channel,
            targetId=PEER,
        )
    )
    assert events == [RequestSucceeded(request.request_id, Opened(channel, ConnectionId(PEER)))]


# --- requests -----------------------------------------------------------------------------


def test_register_frame_is_the_readme_example_and_ids_count_from_one() -> None:
    session = Session()
    request = session.register("my-role")
    assert request.request_id == 1
    assert request.kind == "register"
    assert request.frame == b'{"type":"register","id":1,"role":"my-role"}'
    assert session.state is SessionState.REGISTERING
    assert session.pending == 1


def test_registered_makes_the_session_ready(ready: Session) -> None:
    assert ready.state is SessionState.READY
    assert ready.connection_id == ME
    assert ready.pending == 0


def test_register_twice_is_a_bug() -> None:
    session = Session()
    session.register("a")
    with pytest.raises(RuntimeError):
        session.register("a")


def test_register_failed_rejects_and_fails_the_session() -> None:
    session = Session()
    session.register("x")
    events = session.receive(frame(type="register_failed", id=1, replyTo=1, error="Role too long"))
    assert events == [RequestRejected(1, "register", "register_failed", "Role too long")]
    assert session.state is SessionState.FAILED
    with pytest.raises(NotConnected):
        session.list_by_role("x")


def test_requests_before_registration_raise_not_connected() -> None:
    session = Session()
    with pytest.raises(NotConnected):
        session.list_by_role("a")
    with pytest.raises(NotConnected):
        session.open_channel(PEER)
    session.register("a")
    with pytest.raises(NotConnected):
        session.send(CH, {})


def test_request_frames_and_numbering(ready: Session) -> None:
    listing = ready.list_by_role("other-role")
    assert listing.frame == b'{"type":"list_by_role","id":2,"role":"other-role"}'
    opening = ready.open_channel(PEER)
    assert opening.frame == b'{"type":"open","id":3,"targetId":"' + PEER.encode() + b'"}'
    assert ready.pending == 2


def test_list_by_role_reply(ready: Session) -> None:
    request = ready.list_by_role("r")
    events = ready.receive(
        frame(type="connections", id=2, replyTo=request.request_id, ids=[ME, PEER])
    )
    assert events == [RequestSucceeded(2, Listed([ConnectionId(ME), ConnectionId(PEER)]))]


def test_list_by_role_failed(ready: Session) -> None:
    request = ready.list_by_role("r")
    events = ready.receive(
        frame(type="list_by_role_failed", id=2, replyTo=request.request_id, error="backend")
    )
    assert events == [RequestRejected(2, "list_by_role", "list_by_role_failed", "backend")]


# --- channels -----------------------------------------------------------------------------


def test_open_routes_messages_and_the_peer_close(ready: Session) -> None:
    open_channel(ready)
    assert ready.channels == {CH: PEER}
    events = ready.receive(
        b'{"type":"channel_message","id":7,"channelId":"' + CH.encode() + b'","payload":[1,"x"]}'
    )
    assert events == [ChannelPayload(CH, msgspec.Raw(b'[1,"x"]'))]
    assert ready.receive(frame(type="channel_closed_notification", id=8, channelId=CH)) == [
        ChannelEnded(CH)
    ]
    assert ready.channels == {}


def test_open_failed(ready: Session) -> None:
    request = ready.open_channel(PEER)
    events = ready.receive(
        frame(
            type="channel_open_failed",
            id=9,
            replyTo=request.request_id,
            targetId=PEER,
            error="Target connection not found",
        )
    )
    assert events == [
        RequestRejected(
            request.request_id, "open", "channel_open_failed", "Target connection not found"
        )
    ]


def test_incoming_channel_is_routed(ready: Session) -> None:
    events = ready.receive(frame(type="incoming_channel", id=5, **{"from": PEER}, channelId=CH))
    assert events == [ChannelIncoming(CH, ConnectionId(PEER))]
    assert ready.channels == {CH: PEER}
    again = ready.receive(frame(type="incoming_channel", id=6, **{"from": PEER}, channelId=CH))
    assert isinstance(again[0], Violation)


def test_messages_before_channel_opened_are_held_then_released_in_order(
    ready: Session,
) -> None:
    # The broker tells the target first; the target may answer before our reply arrives.
    request = ready.open_channel(PEER)
    for n in range(3):
        assert ready.receive(frame(type="channel_message", id=n + 2, channelId=CH, payload=n)) == []
    events = ready.receive(
        frame(type="channel_opened", id=9, replyTo=request.request_id, channelId=CH, targetId=PEER)
    )
    assert events == [
        RequestSucceeded(request.request_id, Opened(CH, ConnectionId(PEER))),
        ChannelPayload(CH, msgspec.Raw(b"0")),
        ChannelPayload(CH, msgspec.Raw(b"1")),
        ChannelPayload(CH, msgspec.Raw(b"2")),
    ]


def test_an_early_close_ends_the_channel_right_after_it_opens(ready: Session) -> None:
    request = ready.open_channel(PEER)
    ready.receive(frame(type="channel_message", id=2, channelId=CH, payload="bye"))
    ready.receive(frame(type="channel_closed_notification", id=3, channelId=CH))
    events = ready.receive(
        frame(type="channel_opened", id=4, replyTo=request.request_id, channelId=CH, targetId=PEER)
    )
    assert events[1:] == [ChannelPayload(CH, msgspec.Raw(b'"bye"')), ChannelEnded(CH)]
    assert ready.channels == {}


def test_early_notifications_are_bounded_and_dropped_when_no_open_is_pending() -> None:
    session = Session(max_early=2)
    session.register("me")
    session.receive(frame(type="registered", id=1, replyTo=1, connectionId=ME))
    first = session.open_channel(PEER)
    second = session.open_channel(PEER)
    assert session.receive(frame(type="channel_message", id=2, channelId=CH2, payload=1)) == []
    assert session.receive(frame(type="channel_message", id=3, channelId=CH2, payload=2)) == []
    over = session.receive(frame(type="channel_message", id=4, channelId=CH2, payload=3))
    assert len(over) == 1
    assert isinstance(over[0], Violation)
    assert over[0].serious
    session.receive(
        frame(type="channel_opened", id=5, replyTo=first.request_id, channelId=CH, targetId=PEER)
    )
    # The last pending open failed: what was held for CH2 can belong to nobody.
    session.receive(
        frame(
            type="channel_open_failed",
            id=6,
            replyTo=second.request_id,
            targetId=PEER,
            error="gone",
        )
    )
    late = session.receive(frame(type="channel_message", id=7, channelId=CH2, payload=4))
    assert len(late) == 1
    assert isinstance(late[0], Violation)
    assert not late[0].serious


def test_send_builds_a_message_with_the_payload_verbatim(ready: Session) -> None:
    open_channel(ready)
    request = ready.send(CH, {"any": "data", "n": [1, 2.5, None, True]})
    assert request.kind == "message"
    decoded = json.loads(request.frame)
    assert decoded == {
        "type": "message",
        "id": request.request_id,
        "channelId": CH,
        "payload": {"any": "data", "n": [1, 2.5, None, True]},
    }
    raw = ready.send(CH, msgspec.Raw(b'{"pre":"encoded"}'))
    assert b'"payload":{"pre":"encoded"}' in raw.frame
    events = ready.receive(
        frame(type="channel_message_sent", id=20, replyTo=request.request_id, channelId=CH)
    )
    assert events == [RequestSucceeded(request.request_id, Sent(CH))]


@pytest.mark.parametrize("payload", ["text", 42, 1.5, True, None, [], {}, [{"a": [None]}]])
def test_any_json_value_is_a_payload(payload: object) -> None:
    assert msgspec.json.decode(encode_payload(payload)) == payload


def test_a_payload_that_is_not_json_raises_before_an_id_is_taken(ready: Session) -> None:
    open_channel(ready)
    before = ready.pending
    with pytest.raises(InvalidPayload) as caught:
        ready.send(CH, {"x": object()})
    assert isinstance(caught.value, TypeError)
    with pytest.raises(InvalidPayload):
        ready.send(CH, {(1, 2): "tuple keys"})
    assert ready.pending == before
    assert ready.send(CH, 1).request_id == 3  # ids 1 (register) and 2 (open) were taken


def test_channel_message_failed(ready: Session) -> None:
    open_channel(ready)
    request = ready.send(CH, 1)
    events = ready.receive(
        frame(
            type="channel_message_failed",
            id=3,
            replyTo=request.request_id,
            channelId=CH,
            error="Channel not found",
        )
    )
    assert events == [
        RequestRejected(
            request.request_id, "message", "channel_message_failed", "Channel not found"
        )
    ]


def test_send_on_a_channel_that_is_not_open(ready: Session) -> None:
    with pytest.raises(ChannelClosed):
        ready.send(CH, 1)


def test_close_stops_routing_at_once_and_is_idempotent(ready: Session) -> None:
    open_channel(ready)
    request = ready.close_channel(CH)
    assert request is not None
    assert request.frame == b'{"type":"close","id":3,"channelId":"' + CH.encode() + b'"}'
    assert ready.close_channel(CH) is None
    late = ready.receive(frame(type="channel_message", id=4, channelId=CH, payload=1))
    assert len(late) == 1
    assert isinstance(late[0], Violation)
    assert not late[0].serious
    events = ready.receive(
        frame(type="channel_closed", id=5, replyTo=request.request_id, channelId=CH)
    )
    assert events == [RequestSucceeded(request.request_id, Closed(CH))]


def test_close_failed_still_forgets_the_channel(ready: Session) -> None:
    open_channel(ready)
    request = ready.close_channel(CH)
    assert request is not None
    events = ready.receive(
        frame(
            type="channel_close_failed",
            id=5,
            replyTo=request.request_id,
            channelId=CH,
            error="Channel not found",
        )
    )
    assert events == [
        RequestRejected(request.request_id, "close", "channel_close_failed", "Channel not found")
    ]
    assert ready.channels == {}


def test_forget_channel(ready: Session) -> None:
    open_channel(ready)
    ready.forget_channel(CH)
    assert ready.channels == {}


# --- errors and oddities ------------------------------------------------------------------


def test_error_with_reply_to_fails_that_request(ready: Session) -> None:
    request = ready.list_by_role("r")
    events = ready.receive(
        frame(type="error", id=3, replyTo=request.request_id, error="Unknown request type: x")
    )
    assert events == [
        RequestRejected(request.request_id, "list_by_role", "error", "Unknown request type: x")
    ]


def test_error_without_reply_to_is_a_violation(ready: Session) -> None:
    events = ready.receive(frame(type="error", id=3, error="Message must be a JSON object"))
    assert events == [Violation("broker error: Message must be a JSON object")]


def test_reply_to_an_unknown_request_is_a_violation(ready: Session) -> None:
    assert isinstance(
        ready.receive(frame(type="connections", id=3, replyTo=99, ids=[]))[0], Violation
    )
    assert isinstance(
        ready.receive(frame(type="list_by_role_failed", id=4, replyTo=98, error="x"))[0], Violation
    )


def test_a_reply_of_the_wrong_type_rejects_the_request(ready: Session) -> None:
    request = ready.list_by_role("r")
    events = ready.receive(
        frame(type="channel_closed", id=3, replyTo=request.request_id, channelId=CH)
    )
    assert isinstance(events[0], Violation)
    assert events[1:] == [
        RequestRejected(
            request.request_id,
            "list_by_role",
            "unexpected_reply",
            "channel_closed does not answer list_by_role",
        )
    ]


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"type": "nonsense", "id": 1}', b'{"id": 1}', b'{"replyTo": "1"}'],
)
def test_unintelligible_frames_are_violations(ready: Session, data: bytes) -> None:
    events = ready.receive(data)
    assert len(events) == 1
    assert isinstance(events[0], Violation)
    assert events[0].serious


def test_abandoned_requests_drop_their_late_replies(ready: Session) -> None:
    listing = ready.list_by_role("r")
    ready.abandon(listing.request_id)
    ready.abandon(12345)  # unknown: nothing happens
    assert ready.receive(frame(type="connections", id=3, replyTo=listing.request_id, ids=[])) == []
    failing = ready.list_by_role("r")
    ready.abandon(failing.request_id)
    assert (
        ready.receive(
            frame(type="list_by_role_failed", id=4, replyTo=failing.request_id, error="x")
        )
        == []
    )
    assert ready.pending == 0


def test_a_late_channel_opened_for_an_abandoned_open_asks_to_close_it(ready: Session) -> None:
    request = ready.open_channel(PEER)
    ready.abandon(request.request_id)
    ready.receive(frame(type="channel_message", id=2, channelId=CH, payload="early"))
    events = ready.receive(
        frame(type="channel_opened", id=3, replyTo=request.request_id, channelId=CH, targetId=PEER)
    )
    assert events == [AbandonedChannel(CH)]
    close = ready.close_channel(CH)
    assert close is not None
    assert close.kind == "close"


def test_connection_lost_fails_everything_pending_and_closes_every_channel(
    ready: Session,
) -> None:
    open_channel(ready)
    ready.receive(frame(type="incoming_channel", id=5, **{"from": PEER}, channelId=CH2))
    first = ready.list_by_role("r")
    second = ready.send(CH, 1)
    abandoned = ready.list_by_role("r")
    ready.abandon(abandoned.request_id)
    ending = ready.connection_lost()
    assert ending.failed_requests == [first.request_id, second.request_id]
    assert ending.closed_channels == [CH, CH2]
    assert ready.state is SessionState.ENDED
    assert ready.pending == 0
    with pytest.raises(ConnectionLost):
        ready.list_by_role("r")
    assert ready.close_channel(CH) is None


# --- the original npm broker's untyped replies --------------------------------------------


def test_untyped_success_replies_are_read_by_request_kind() -> None:
    session = Session()
    session.register("me")
    assert session.receive(frame(connectionId=ME, replyTo=1, id=1)) == [
        RequestSucceeded(1, RegisteredAs(ConnectionId(ME)))
    ]
    listing = session.list_by_role("r")
    assert session.receive(frame(ids=[PEER], replyTo=listing.request_id, id=2)) == [
        RequestSucceeded(listing.request_id, Listed([ConnectionId(PEER)]))
    ]
    opening = session.open_channel(PEER)
    assert session.receive(frame(channelId=CH, replyTo=opening.request_id, id=3)) == [
        RequestSucceeded(opening.request_id, Opened(CH, ConnectionId(PEER)))
    ]
    sending = session.send(CH, {"a": 1})
    assert session.receive(frame(replyTo=sending.request_id, id=4)) == [
        RequestSucceeded(sending.request_id, Sent(CH))
    ]
    closing = session.close_channel(CH)
    assert closing is not None
    assert session.receive(frame(replyTo=closing.request_id, id=5)) == [
        RequestSucceeded(closing.request_id, Closed(CH))
    ]
    # Its failures: {"type": "error", "error": ..., "replyTo": N}
    failing = session.open_channel(PEER)
    assert session.receive(
        frame(type="error", error="Target connection not found", replyTo=failing.request_id, id=6)
    ) == [RequestRejected(failing.request_id, "open", "error", "Target connection not found")]
    assert isinstance(session.receive(frame(replyTo=999, id=7))[0], Violation)


def test_an_untyped_reply_to_a_refresh_succeeds(ready: Session) -> None:
    refreshing = ready.refresh("new-token")
    assert ready.receive(frame(replyTo=refreshing.request_id, id=2)) == [
        RequestSucceeded(refreshing.request_id, TokenRefreshed(None))
    ]


def test_an_untyped_reply_without_the_expected_field_rejects() -> None:
    session = Session()
    session.register("me")
    events = session.receive(frame(replyTo=1, id=1, nothing="here"))
    assert len(events) == 2
    assert isinstance(events[0], Violation)
    assert isinstance(events[1], RequestRejected)
    assert events[1].reply_type == "unexpected_reply"
    assert session.state is SessionState.FAILED


# --- purity -------------------------------------------------------------------------------

PURE_MODULES = ["session.py", "errors.py", "backoff.py"]
ALLOWED_IMPORTS = {
    "__future__",
    "dataclasses",
    "enum",
    "random",
    "typing",
    "collections",
    "msgspec",
    "client",
    "shared",
}


@pytest.mark.parametrize("name", PURE_MODULES)
def test_pure_modules_import_no_io(name: str) -> None:
    source = Path(__file__).resolve().parents[2] / "client" / name
    tree = ast.parse(source.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, imported - ALLOWED_IMPORTS

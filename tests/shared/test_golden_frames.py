"""Every JSON example of the original README, decoded and encoded back byte for byte."""

from __future__ import annotations

import json

import msgspec
import pytest

from shared import messages as m
from shared.codec import decode_broker_message, decode_request, encode

# (README example as printed there, the class it must decode to)
REQUESTS = [
    ('{"type": "register", "id": 1, "role": "my-role"}', m.Register),
    ('{"type": "list_by_role", "id": 3, "role": "other-role"}', m.ListByRole),
    ('{"type": "open", "id": 5, "targetId": "connection-uuid"}', m.Open),
    (
        '{"type": "message", "id": 8, "channelId": "channel-uuid", "payload": { "any": "data" }}',
        m.Message,
    ),
    ('{"type": "close", "id": 11, "channelId": "channel-uuid"}', m.Close),
]

REPLIES = [
    (
        '{"type": "registered", "id": 2, "replyTo": 1, "connectionId": "connection-uuid"}',
        m.Registered,
    ),
    (
        '{"type": "register_failed", "id": 2, "replyTo": 1, "error": "Error message"}',
        m.RegisterFailed,
    ),
    (
        '{"type": "connections", "id": 4, "replyTo": 3, "ids": ["uuid-1", "uuid-2", "uuid-3"]}',
        m.Connections,
    ),
    (
        '{"type": "list_by_role_failed", "id": 4, "replyTo": 3, "error": "Error message"}',
        m.ListByRoleFailed,
    ),
    (
        '{"type": "channel_opened", "id": 6, "replyTo": 5, "channelId": "channel-uuid",'
        ' "targetId": "connection-uuid"}',
        m.ChannelOpened,
    ),
    (
        '{"type": "incoming_channel", "id": 7, "from": "connection-uuid",'
        ' "channelId": "channel-uuid"}',
        m.IncomingChannel,
    ),
    (
        '{"type": "channel_open_failed", "id": 6, "replyTo": 5, "targetId": "connection-uuid",'
        ' "error": "Target connection not found"}',
        m.ChannelOpenFailed,
    ),
    (
        '{"type": "channel_message", "id": 9, "channelId": "channel-uuid",'
        ' "payload": { "any": "data" }}',
        m.ChannelMessage,
    ),
    (
        '{"type": "channel_message_sent", "id": 10, "replyTo": 8, "channelId": "channel-uuid"}',
        m.ChannelMessageSent,
    ),
    (
        '{"type": "channel_message_failed", "id": 10, "replyTo": 8, "channelId": "channel-uuid",'
        ' "error": "Channel not found"}',
        m.ChannelMessageFailed,
    ),
    (
        '{"type": "channel_closed", "id": 12, "replyTo": 11, "channelId": "channel-uuid"}',
        m.ChannelClosed,
    ),
    (
        '{"type": "channel_closed_notification", "id": 13, "channelId": "channel-uuid"}',
        m.ChannelClosedNotification,
    ),
    (
        '{"type": "channel_close_failed", "id": 12, "replyTo": 11, "channelId": "channel-uuid",'
        ' "error": "Channel not found"}',
        m.ChannelCloseFailed,
    ),
]


def compact(example: str) -> bytes:
    return json.dumps(json.loads(example), separators=(",", ":")).encode()


@pytest.mark.parametrize(("example", "cls"), REQUESTS, ids=[c.__name__ for _, c in REQUESTS])
def test_request_examples_round_trip(example: str, cls: type) -> None:
    # As printed in the README (spaces and all) it decodes; compact, it round-trips exactly.
    assert type(decode_request(example.encode())) is cls
    decoded = decode_request(compact(example))
    assert type(decoded) is cls
    assert encode(decoded) == compact(example)  # type: ignore[arg-type]


@pytest.mark.parametrize(("example", "cls"), REPLIES, ids=[c.__name__ for _, c in REPLIES])
def test_reply_examples_round_trip(example: str, cls: type) -> None:
    assert type(decode_broker_message(example.encode())) is cls
    decoded = decode_broker_message(compact(example))
    assert type(decoded) is cls
    assert encode(decoded) == compact(example)


def test_payload_is_carried_raw_not_reparsed() -> None:
    # Whitespace and key order inside the payload survive: the node never re-encodes it.
    frame = b'{"type":"message","id":1,"channelId":"c","payload":{ "b" : 1, "a" :[true,null]}}'
    decoded = decode_request(frame)
    assert isinstance(decoded, m.Message)
    assert isinstance(decoded.payload, msgspec.Raw)
    assert bytes(decoded.payload) == b'{ "b" : 1, "a" :[true,null]}'
    out = encode(m.ChannelMessage(id=2, channelId="c", payload=decoded.payload))
    expected = b'{"type":"channel_message","id":2,"channelId":"c",'
    expected += b'"payload":{ "b" : 1, "a" :[true,null]}}'
    assert out == expected


@pytest.mark.parametrize("payload", ['"text"', "42", "-1.5e3", "true", "false", "null", "[1,[2]]"])
def test_payload_may_be_any_json_value(payload: str) -> None:
    frame = f'{{"type":"message","id":1,"channelId":"c","payload":{payload}}}'.encode()
    decoded = decode_request(frame)
    assert isinstance(decoded, m.Message)
    assert bytes(decoded.payload) == payload.encode()


def test_error_reply_shape() -> None:
    assert encode(m.Error(id=3, error="Unknown request type: x", replyTo=7)) == (
        b'{"type":"error","id":3,"replyTo":7,"error":"Unknown request type: x"}'
    )
    assert encode(m.Error(id=3, error="bad")) == b'{"type":"error","id":3,"error":"bad"}'

"""The bad-input table of cluster-semantics.md, as values (no sockets)."""

from __future__ import annotations

from typing import get_args

import pytest

from shared.codec import (
    CloseConnection,
    ErrorReply,
    FailedReply,
    decode_request,
    encode,
    failure_type,
    rejection_kind,
)
from shared.messages import REQUESTS, Register, RequestKind


@pytest.mark.parametrize("frame", [b"nope", b"{", b'{"type":"register"', "\u00e9t\u00e9", b""])
def test_text_that_is_not_json_closes_with_1003(frame: bytes | str) -> None:
    assert decode_request(frame) == CloseConnection(1003, "Invalid JSON")


@pytest.mark.parametrize("frame", [b"[1,2]", b'"register"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_gets_an_error(frame: bytes) -> None:
    assert decode_request(frame) == ErrorReply(None, "Message must be a JSON object")


@pytest.mark.parametrize(
    "frame",
    [
        b'{"type":"register","role":"r"}',
        b'{"type":"register","id":"1","role":"r"}',
        b'{"type":"register","id":1.5,"role":"r"}',
        b'{"type":"register","id":true,"role":"r"}',
        b'{"type":"register","id":null,"role":"r"}',
    ],
)
def test_object_without_usable_integer_id_gets_an_error(frame: bytes) -> None:
    result = decode_request(frame)
    assert isinstance(result, ErrorReply)
    assert result.reply_to is None
    assert "id" in result.error


def test_unknown_type_with_id_is_answered_with_reply_to() -> None:
    assert decode_request(b'{"type":"subscribe","id":4}') == ErrorReply(
        4, "Unknown request type: subscribe"
    )
    assert decode_request(b'{"type":7,"id":4}') == ErrorReply(4, "Unknown request type: 7")
    assert decode_request(b'{"id":4}') == ErrorReply(4, "Missing field: type")


@pytest.mark.parametrize(
    ("frame", "request_type", "field", "subject"),
    [
        (b'{"type":"register","id":1}', "register", "role", ""),
        (b'{"type":"register","id":1,"role":5}', "register", "role", ""),
        (b'{"type":"list_by_role","id":1}', "list_by_role", "role", ""),
        (b'{"type":"open","id":1}', "open", "targetId", ""),
        (b'{"type":"open","id":1,"targetId":["x"]}', "open", "targetId", ""),
        (b'{"type":"message","id":1,"channelId":"c"}', "message", "payload", "c"),
        (b'{"type":"message","id":1,"payload":1}', "message", "channelId", ""),
        (b'{"type":"close","id":1,"channelId":9}', "close", "channelId", ""),
    ],
)
def test_known_type_with_bad_fields_names_the_field(
    frame: bytes, request_type: str, field: str, subject: str
) -> None:
    result = decode_request(frame)
    assert isinstance(result, FailedReply)
    assert result.request_type == request_type
    assert result.reply_to == 1
    assert field in result.error
    assert result.subject == subject


def test_unknown_fields_are_ignored() -> None:
    assert decode_request(b'{"type":"register","id":1,"role":"r","extra":"x"}') == Register(
        id=1, role="r"
    )


def test_one_table_names_every_request_and_its_replies() -> None:
    # The README's request/reply table, row by row.
    rows = {
        kind: (spec.request.__struct_config__.tag, spec.success_type, spec.failure_type)
        for kind, spec in REQUESTS.items()
    }
    assert rows == {
        "register": ("register", "registered", "register_failed"),
        "list_by_role": ("list_by_role", "connections", "list_by_role_failed"),
        "open": ("open", "channel_opened", "channel_open_failed"),
        "message": ("message", "channel_message_sent", "channel_message_failed"),
        "close": ("close", "channel_closed", "channel_close_failed"),
        "refresh": ("refresh", "refreshed", "refresh_failed"),
        "resume": ("resume", "resumed", "resume_failed"),
        "ack": ("ack", None, "error"),
    }
    assert set(REQUESTS) == set(get_args(RequestKind))
    assert failure_type("open") == "channel_open_failed"


@pytest.mark.parametrize(
    ("kind", "frame"),
    [
        ("register", b'{"type":"register_failed","id":7,"replyTo":3,"error":"e"}'),
        ("list_by_role", b'{"type":"list_by_role_failed","id":7,"replyTo":3,"error":"e"}'),
        ("open", b'{"type":"channel_open_failed","id":7,"replyTo":3,"targetId":"s","error":"e"}'),
        (
            "message",
            b'{"type":"channel_message_failed","id":7,"replyTo":3,"channelId":"s","error":"e"}',
        ),
        (
            "close",
            b'{"type":"channel_close_failed","id":7,"replyTo":3,"channelId":"s","error":"e"}',
        ),
        ("refresh", b'{"type":"refresh_failed","id":7,"replyTo":3,"error":"e"}'),
    ],
)
def test_a_failure_names_its_subject_in_the_field_of_its_kind(kind: str, frame: bytes) -> None:
    assert encode(REQUESTS[kind].failed(7, 3, "s", "e")) == frame


@pytest.mark.parametrize(
    "frame",
    [
        b"\xff",
        b'{"type":"register","id":1,"role":"\xff"}',
        b'{"type":"register","id":1,"role":"\xed\xa0\x80"}',
        b'{"type":"register","id":1,"role":"\xc0\xaf"}',
        # msgspec alone passes a Raw payload through without checking it.
        b'{"type":"message","id":1,"channelId":"c","payload":"\xe9t\xe9"}',
        bytearray(b'{"type":"message","id":1,"channelId":"c","payload":"\xe9"}'),
        memoryview(b'{"type":"message","id":1,"channelId":"c","payload":"\xe9"}'),
    ],
)
def test_text_that_is_not_utf8_closes_with_1007(frame: bytes | bytearray | memoryview) -> None:
    assert decode_request(frame) == CloseConnection(1007, "Invalid UTF-8")


@pytest.mark.parametrize(
    "frame",
    [
        '{"type":"register","id":1,"role":"été 🚀"}'.encode(),
        bytearray('{"type":"register","id":1,"role":"été 🚀"}'.encode()),
        memoryview('{"type":"register","id":1,"role":"été 🚀"}'.encode()),
        '{"type":"register","id":1,"role":"été 🚀"}',
    ],
)
def test_non_ascii_utf8_decodes(frame: bytes | bytearray | memoryview | str) -> None:
    assert decode_request(frame) == Register(id=1, role="été 🚀")


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b"nope", "invalid_json"),
        (b"\xff", "invalid_utf8"),
        (b"[1]", "bad_shape"),
        (b'{"id":1,"type":"nope"}', "unknown_type"),
        (b'{"id":1,"type":"register"}', "bad_fields"),
        (b'{"id":1,"type":"register","role":"\\ud800"}', "uncarriable"),
    ],
)
def test_each_rejection_has_its_bad_frame_kind(frame: bytes, kind: str) -> None:
    rejection = decode_request(frame)
    assert isinstance(rejection, CloseConnection | ErrorReply | FailedReply)
    assert rejection_kind(rejection) == kind

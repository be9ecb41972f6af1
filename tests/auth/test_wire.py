"""The authentication extensions of the wire protocol, byte for byte as docs/protocol.md shows."""

from __future__ import annotations

import pytest

from shared.codec import decode_broker_message, decode_request, encode
from shared.messages import Refresh, Refreshed, RefreshFailed, Register, Registered


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            b'{"type":"registered","id":1,"replyTo":1,"connectionId":"c","expiresIn":3600}',
            Registered(id=1, replyTo=1, connectionId="c", expiresIn=3600),
        ),
        (
            b'{"type":"refreshed","id":9,"replyTo":7,"expiresIn":3600}',
            Refreshed(id=9, replyTo=7, expiresIn=3600),
        ),
        (
            b'{"type":"refresh_failed","id":9,"replyTo":7,"error":"Token is for another subject"}',
            RefreshFailed(id=9, replyTo=7, error="Token is for another subject"),
        ),
    ],
)
def test_replies_round_trip(frame: bytes, message: object) -> None:
    assert decode_broker_message(frame) == message
    assert encode(message) == frame


def test_requests_decode() -> None:
    assert decode_request(b'{"type":"refresh","id":7,"token":"t"}') == Refresh(id=7, token="t")
    assert decode_request(b'{"type":"register","id":1,"role":"r","token":"t"}') == Register(
        id=1, role="r", token="t"
    )


def test_without_auth_the_original_frames_are_unchanged() -> None:
    assert encode(Registered(id=1, replyTo=1, connectionId="c")) == (
        b'{"type":"registered","id":1,"replyTo":1,"connectionId":"c"}'
    )
    assert encode(Register(id=1, role="r")) == b'{"type":"register","id":1,"role":"r"}'


def test_refresh_without_token_names_the_field() -> None:
    rejection = decode_request(b'{"type":"refresh","id":3}')
    assert getattr(rejection, "request_type", None) == "refresh"
    assert "token" in getattr(rejection, "error", "")

"""Tokens in the handshake: where they are read from, and that the logs never show them."""

from __future__ import annotations

import logging

import pytest
from websockets.datastructures import Headers
from websockets.server import ServerProtocol

import broker_node.connection  # noqa: F401 - installs the redacting filter on websockets' logger
from broker_node.auth.handshake import (
    RedactTokens,
    handshake_token,
    redact,
    select_subprotocol,
)

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2lnbmF0dXJl"


def test_bearer_subprotocol_is_read_first() -> None:
    headers = Headers({"Sec-WebSocket-Protocol": f"broker.v1, broker.bearer.{TOKEN}"})
    assert handshake_token("/?token=other", headers, query_allowed=True) == TOKEN


def test_query_token_only_when_allowed() -> None:
    assert handshake_token(f"/?token={TOKEN}", Headers(), query_allowed=True) == TOKEN
    assert handshake_token(f"/?token={TOKEN}", Headers(), query_allowed=False) is None
    assert handshake_token("/", Headers(), query_allowed=True) is None


def test_a_malformed_protocol_header_carries_no_token() -> None:
    headers = Headers({"Sec-WebSocket-Protocol": "not a, valid ;header"})
    assert handshake_token("/", headers, query_allowed=False) is None


def test_the_app_subprotocol_is_echoed_never_the_bearer() -> None:
    protocol = ServerProtocol()
    assert select_subprotocol(protocol, ["broker.bearer.x", "broker.v1"]) == "broker.v1"  # type: ignore[list-item]
    assert select_subprotocol(protocol, ["broker.bearer.x"]) is None  # type: ignore[list-item]


def test_redact() -> None:
    assert redact(f"GET /?errors=legacy&token={TOKEN}&x=1") == (
        "GET /?errors=legacy&token=[redacted]&x=1"
    )
    assert redact(f"broker.v1, broker.bearer.{TOKEN}") == "broker.v1, broker.bearer.[redacted]"


def test_websockets_debug_log_of_a_handshake_shows_no_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="websockets.server")
    protocol = ServerProtocol(logger=logging.getLogger("websockets.server"))
    protocol.receive_data(
        (
            f"GET /?token={TOKEN} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: broker.bearer.{TOKEN}\r\n\r\n"
        ).encode()
    )
    protocol.events_received()
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "token=[redacted]" in text and "broker.bearer.[redacted]" in text
    assert TOKEN not in text


def test_the_log_filter_redacts_messages_and_their_arguments() -> None:
    record = logging.LogRecord(
        "websockets.server", logging.DEBUG, __file__, 1, f"GET /?token={TOKEN}", None, None
    )
    assert RedactTokens().filter(record)
    assert record.getMessage() == "GET /?token=[redacted]"
    record = logging.LogRecord(
        "websockets.server",
        logging.DEBUG,
        __file__,
        1,
        "< %s %d",
        (f"broker.bearer.{TOKEN}", 7),
        None,
    )
    assert RedactTokens().filter(record)
    assert record.getMessage() == "< broker.bearer.[redacted] 7"

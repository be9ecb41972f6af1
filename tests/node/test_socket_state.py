"""A connection's state: the transition table, and a real socket's way through it."""

from __future__ import annotations

import asyncio

import pytest

from broker_node.connection import (
    SOCKET_TRANSITIONS,
    ClientConnection,
    SocketState,
    next_socket_state,
)
from broker_node.node import BrokerNode
from tests.support.polling import wait_until
from tests.support.raw_ws import RawClient, client_frame

HANDSHAKE, HTTP, OPEN, CLOSING, CLOSED = (
    SocketState.HANDSHAKE,
    SocketState.HTTP,
    SocketState.OPEN,
    SocketState.CLOSING,
    SocketState.CLOSED,
)

ALLOWED = {
    (HANDSHAKE, HTTP),
    (HANDSHAKE, OPEN),
    (HANDSHAKE, CLOSED),
    (HTTP, CLOSED),
    (OPEN, CLOSING),
    (OPEN, CLOSED),
    (CLOSING, CLOSED),
}


def test_the_table_has_every_state() -> None:
    assert set(SOCKET_TRANSITIONS) == set(SocketState)


@pytest.mark.parametrize("current", list(SocketState), ids=lambda s: s.name)
@pytest.mark.parametrize("new", list(SocketState), ids=lambda s: s.name)
def test_transitions(current: SocketState, new: SocketState) -> None:
    if (current, new) in ALLOWED:
        assert next_socket_state(current, new) is new
    else:
        with pytest.raises(RuntimeError, match=f"{current.name} -> {new.name}"):
            next_socket_state(current, new)


def test_every_state_can_end_and_closed_is_final() -> None:
    for state in SocketState:
        assert state is CLOSED or CLOSED in SOCKET_TRANSITIONS[state]
    assert not SOCKET_TRANSITIONS[CLOSED]


async def only_socket(node: BrokerNode) -> ClientConnection:
    await wait_until(lambda: len(node.sockets) == 1, timeout=5, message="the node's socket")
    (sock,) = node.sockets
    return sock


async def test_a_websocket_goes_open_closing_closed(node: BrokerNode) -> None:
    raw = await RawClient.connect(node.port)
    sock = await only_socket(node)
    assert sock.state is OPEN
    # The client starts the closing handshake: the node forgets it, then the TCP goes.
    await raw.write(client_frame((1000).to_bytes(2, "big"), opcode=0x8))
    assert await raw.close_code() == 1000
    await wait_until(lambda: sock.state is not OPEN, timeout=5, message="closing")
    await raw.aclose()
    await wait_until(lambda: sock.state is CLOSED, timeout=5, message="closed")
    assert sock.connection_id not in node.clients


async def test_a_plain_http_request_is_answered_once(node: BrokerNode) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    sock = await only_socket(node)
    assert sock.state is HANDSHAKE
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    assert answer.startswith(b"HTTP/1.1 200")
    await wait_until(lambda: sock.state is CLOSED, timeout=5, message="closed")
    writer.close()

"""The client table without sockets: admission limits, address counts, one way out."""

from __future__ import annotations

import logging

import pytest
from websockets.datastructures import Headers
from websockets.frames import Close
from websockets.http11 import Request as HttpRequest
from websockets.server import ServerProtocol

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.client_table import ClientTable
from broker_node.config import Settings
from broker_node.core.actions import Action, Rebind
from broker_node.core.broker import BrokerCore
from broker_node.core.sessions import SessionLog
from broker_node.core.stats import NodeStats
from shared.ids import ConnectionId, NodeId

A, B = ConnectionId("a"), ConnectionId("b")


class Sock:
    def __init__(self, peer: str = "10.0.0.1") -> None:
        self.ws = ServerProtocol()
        self.connection_id: ConnectionId | None = None
        self.session_log: SessionLog | None = None
        self.peer = self.client_ip = peer
        self.ip_counted = False
        self.keepalive_slice = 0
        self.aborted = False
        self.closed: tuple[int, str] | None = None

    def abort(self) -> None:
        self.aborted = True

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


class Auth:
    def __init__(self) -> None:
        self.dropped: list[ConnectionId] = []

    def verify(self, token: str | None) -> Identity | TokenRefusal | None:
        return None if token is None else TokenRefusal("no keys here")

    def drop_slot(self, cid: ConnectionId) -> None:
        self.dropped.append(cid)


class Fixture:
    def __init__(self, **settings: object) -> None:
        self.stats = NodeStats()
        self.core = BrokerCore(
            NodeId("n"),
            max_role_length=8,
            max_unconfirmed=4,
            request_timeout=2.0,
            clock=lambda: 0.0,
        )
        self.executed: list[list[Action]] = []
        self.auth = Auth()
        self.table: ClientTable[Sock] = ClientTable(
            Settings(node_id=NodeId("n"), **settings),  # type: ignore[arg-type]
            core=self.core,
            execute=self.executed.append,
            auth=self.auth,
            stats=self.stats,
            keepalive_slices=4,
        )

    def accept(self, cid: ConnectionId, peer: str = "10.0.0.1") -> Sock:
        sock = Sock(peer)
        self.table.connection_opened(sock)
        self.table.handshake_over(sock)
        sock.connection_id = cid
        self.table.client_accepted(sock, legacy_errors=False)
        return sock


def upgrade(origin: str | None = None) -> HttpRequest:
    headers = Headers()
    if origin is not None:
        headers["Origin"] = origin
    return HttpRequest("/", headers)


def test_sockets_handshakes_and_the_last_socket_gone() -> None:
    fx = Fixture()
    sock = Sock()
    fx.table.connection_opened(sock)
    assert fx.table.handshaking_count == 1 and not fx.table.no_sockets.is_set()
    fx.table.handshake_over(sock)
    assert fx.table.handshaking_count == 0
    fx.table.connection_lost(sock)
    assert not fx.table.sockets and fx.table.no_sockets.is_set()


def test_a_client_leaves_once_whatever_calls_it_gone() -> None:
    fx = Fixture()
    sock = fx.accept(A)
    assert fx.table.clients == {A: sock} and fx.core.is_connected(A)
    assert sock.keepalive_slice == 1 and sock.ip_counted
    fx.table.client_gone(sock)
    assert A not in fx.table.clients and not fx.core.is_connected(A)
    assert fx.auth.dropped == [A]
    # The socket closing later, then lost: nothing more happens to the client.
    fx.table.client_gone(sock)
    fx.table.connection_lost(sock)
    assert fx.auth.dropped == [A]
    assert len(fx.executed) == 1
    assert not sock.ip_counted


def test_rebind_moves_the_socket_and_closes_the_old_one_quietly() -> None:
    fx = Fixture()
    old, new = fx.accept(A), fx.accept(B)
    new.session_log = SessionLog(max_frames=1, max_bytes=10)
    fx.table.rebind(Rebind(B, A, 4100, "resumed"))
    assert fx.table.clients == {A: new}
    assert new.connection_id == A and new.session_log is None
    assert old.connection_id is None and old.closed == (4100, "resumed")
    # The old socket's departure is not the session's: the client stays.
    fx.table.client_gone(old)
    assert fx.table.clients == {A: new}
    fx.table.rebind(Rebind(ConnectionId("nobody"), A, 4100, "resumed"))
    assert fx.table.clients == {A: new}
    fx.table.rebind(Rebind(A, ConnectionId("c"), 4100, "resumed"))
    assert fx.table.clients == {ConnectionId("c"): new}


def test_admission_limits() -> None:
    fx = Fixture(allowed_origins=("https://ok.example",), max_connections=2)
    sock = Sock()
    refused = fx.table.admit(sock, upgrade("https://evil.example"))
    assert refused is not None and refused.status_code == 403
    assert fx.table.admit(sock, upgrade("https://ok.example")) is None
    fx.accept(A)
    fx.accept(B)
    refused = fx.table.admit(sock, upgrade())
    assert refused is not None and refused.status_code == 503
    assert fx.stats.limit_refusals == {"origin": 1, "connections": 1}


def test_connections_per_address() -> None:
    fx = Fixture(max_connections_per_ip=1)
    fx.accept(A, peer="10.0.0.1")
    refused = fx.table.admit(Sock("10.0.0.1"), upgrade())
    assert refused is not None and refused.status_code == 429
    assert fx.table.admit(Sock("10.0.0.2"), upgrade()) is None


def test_a_token_at_the_upgrade_is_checked() -> None:
    fx = Fixture()
    sock = Sock()
    sock.connection_id = A
    fx.table.client_accepted(sock, legacy_errors=False, token="t")
    assert len(fx.executed) == 1


def test_short_of_descriptors_the_oldest_handshake_goes() -> None:
    fx = Fixture()
    fx.table._socket_budget = 1
    first, second = Sock(), Sock()
    fx.table.connection_opened(first)
    fx.table.connection_opened(second)
    assert first.aborted and not second.aborted
    assert fx.stats.limit_refusals["file_descriptors"] == 1


def test_a_frame_over_the_size_limit_counts(caplog: pytest.LogCaptureFixture) -> None:
    fx = Fixture()
    sock = fx.accept(A)
    sock.ws.close_sent = Close(1009, "too big")
    sock.ws.close_rcvd = Close(1000, "")
    fx.table.connection_lost(sock)
    assert fx.stats.bad_frames["too_big"] == 1


def test_limits_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    fx = Fixture()
    with caplog.at_level(logging.WARNING, logger="broker_node.node"):
        fx.table.limit_reached("rate", Sock("10.9.9.9"))
        fx.table.limit_reached("rate")
    assert fx.stats.limit_refusals["rate"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        "limit rate reached (1 times so far, e.g. by 10.9.9.9)"
    ]

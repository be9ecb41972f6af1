"""The core's authentication decisions: register, list, open, refresh, expiry, revocation."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.auth.policy import parse_policy
from broker_node.core.actions import Action, CloseClient, Send
from broker_node.core.broker import (
    AUTH_DISABLED,
    AUTH_REQUIRED,
    OTHER_SUBJECT,
    ROLE_NOT_ALLOWED,
    TARGET_NOT_FOUND,
    AuthRules,
    BrokerCore,
)
from broker_node.core.records import ChannelRecord, ConnectionRecord
from shared.ids import ConnectionId, NodeId
from shared.messages import (
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TOKEN_INVALID,
    ListByRole,
    Open,
    Refresh,
    Register,
)

A, B, C = ConnectionId("a"), ConnectionId("b"), ConnectionId("c")
HERE = NodeId("here")
POLICY = parse_policy(
    """
    [roles.server]
    list = ["tab"]
    open = ["tab", "service"]
    [roles.tab]
    accept = ["server"]
    [roles.service]
    list = ["*"]
    open = ["*"]
    """
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mono() -> Clock:
    return Clock(100.0)


@pytest.fixture
def wall() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
def core(mono: Clock, wall: Clock) -> BrokerCore:
    return BrokerCore(
        HERE,
        max_role_length=16,
        max_unconfirmed=8,
        request_timeout=2.0,
        clock=mono,
        wall_clock=wall,
        auth=AuthRules(POLICY, timeout=10.0, grace=25.0),
    )


def who(sub: str = "alice", roles: tuple[str, ...] = ("server",), **kw: Any) -> Identity:
    kw.setdefault("expires_at", 1_000_600.0)
    return Identity(subject=sub, roles=frozenset(roles), **kw)


def frames(actions: list[Action], to: ConnectionId | None = None) -> list[dict[str, Any]]:
    return [
        json.loads(a.frame)
        for a in actions
        if isinstance(a, Send) and (to is None or a.connection_id == to)
    ]


def register(core: BrokerCore, cid: ConnectionId, role: str, token: Identity) -> dict[str, Any]:
    core.connect(cid)
    request = Register(id=1, role=role, token="t")
    plan = core.begin_register(cid, request, token)
    assert isinstance(plan, ConnectionRecord), frames(plan)
    [reply] = frames(core.finish_register(cid, request))
    return reply


def refused_register(core: BrokerCore, token: Identity | TokenRefusal | None) -> str:
    core.connect(A)
    plan = core.begin_register(A, Register(id=1, role="server"), token)
    assert isinstance(plan, list)
    [reply] = frames(plan)
    assert reply["type"] == "register_failed"
    return str(reply["error"])


def test_registered_tells_when_the_token_expires(core: BrokerCore) -> None:
    reply = register(core, A, "server", who())
    assert reply == {
        "type": "registered",
        "id": 1,
        "replyTo": 1,
        "connectionId": "a",
        "expiresIn": 600,
    }


def test_register_without_a_token_is_refused(core: BrokerCore) -> None:
    assert refused_register(core, None) == AUTH_REQUIRED


def test_register_with_a_refused_token_names_the_reason(core: BrokerCore) -> None:
    assert refused_register(core, TokenRefusal("expired")) == "Invalid token: expired"


def test_register_as_a_role_the_token_lacks_is_refused(core: BrokerCore) -> None:
    assert refused_register(core, who(roles=("tab",))) == ROLE_NOT_ALLOWED


def test_handshake_token_authenticates_register_without_token(core: BrokerCore) -> None:
    core.connect(A)
    assert core.authenticated(A, who()) == []
    plan = core.begin_register(A, Register(id=1, role="server"))
    assert isinstance(plan, ConnectionRecord)


@pytest.mark.parametrize(
    ("refusal", "code"), [("expired", CLOSE_TOKEN_EXPIRED), ("malformed", CLOSE_TOKEN_INVALID)]
)
def test_refused_handshake_token_closes(core: BrokerCore, refusal: str, code: int) -> None:
    core.connect(A)
    assert core.authenticated(A, TokenRefusal(refusal)) == [
        CloseClient(A, code, f"Invalid token: {refusal}")
    ]


def test_list_is_filtered_by_the_policy(core: BrokerCore) -> None:
    register(core, A, "server", who())
    register(core, B, "tab", who("bob", ("tab",)))
    allowed = core.finish_list(A, ListByRole(id=2, role="tab"), [B])
    assert frames(allowed)[0]["ids"] == ["b"]
    hidden = core.finish_list(A, ListByRole(id=3, role="server"), [A])
    assert frames(hidden)[0] == {"type": "connections", "id": 3, "replyTo": 3, "ids": []}
    # A tab may list nothing: its role has no list rule.
    assert frames(core.finish_list(B, ListByRole(id=2, role="tab"), [B]))[0]["ids"] == []


def test_open_to_a_forbidden_target_fails_exactly_like_a_missing_one(core: BrokerCore) -> None:
    register(core, A, "tab", who("tabby", ("tab",)))
    request = Open(id=2, targetId="b")
    forbidden = core.plan_open(A, request, ConnectionRecord(B, HERE, "server"))
    assert isinstance(forbidden, list)
    # Frame ids advance per frame; compare everything else.
    missing = core.plan_open(A, Open(id=2, targetId="b"), None)
    assert isinstance(missing, list)
    [f], [m] = frames(forbidden), frames(missing)
    del f["id"], m["id"]
    assert (
        f
        == m
        == {
            "type": "channel_open_failed",
            "replyTo": 2,
            "targetId": "b",
            "error": TARGET_NOT_FOUND,
        }
    )


def test_open_follows_the_accept_rule(core: BrokerCore) -> None:
    register(core, A, "server", who())
    register(core, C, "service", who("svc", ("service",)))
    tab = ConnectionRecord(B, HERE, "tab")
    assert isinstance(core.plan_open(A, Open(id=2, targetId="b"), tab), ChannelRecord)
    # service may open to every role, but tabs accept only servers.
    assert isinstance(core.plan_open(C, Open(id=2, targetId="b"), tab), list)
    assert isinstance(
        core.plan_open(C, Open(id=3, targetId="a"), ConnectionRecord(A, HERE, "server")),
        ChannelRecord,
    )


def test_refresh_before_expiry_extends_the_connection(core: BrokerCore, wall: Clock) -> None:
    register(core, A, "server", who())
    wall.now = 1_000_590.0
    fresh = who(expires_at=1_001_200.0)
    [reply] = frames(core.refresh(A, Refresh(id=5, token="t"), fresh))
    assert reply == {"type": "refreshed", "id": 2, "replyTo": 5, "expiresIn": 610}
    wall.now = 1_000_600.0 + 25.0
    assert core.check_tokens() == []


def test_expired_token_closes_after_the_grace_period(core: BrokerCore, wall: Clock) -> None:
    register(core, A, "server", who())
    wall.now = 1_000_600.0 + 24.0
    assert core.check_tokens() == []
    wall.now = 1_000_600.0 + 25.0
    assert core.check_tokens() == [CloseClient(A, CLOSE_TOKEN_EXPIRED, "Token expired")]


def test_refresh_after_expiry_within_the_grace_is_taken(core: BrokerCore, wall: Clock) -> None:
    register(core, A, "server", who())
    wall.now = 1_000_610.0
    [reply] = frames(core.refresh(A, Refresh(id=5, token="t"), who(expires_at=1_000_900.0)))
    assert reply["type"] == "refreshed"
    wall.now = 1_000_640.0
    assert core.check_tokens() == []


def test_refresh_refusals(core: BrokerCore) -> None:
    register(core, A, "server", who())

    def error(token: Identity | TokenRefusal) -> str:
        [reply] = frames(core.refresh(A, Refresh(id=9, token="t"), token))
        assert reply["type"] == "refresh_failed"
        return str(reply["error"])

    assert error(TokenRefusal("expired")) == "Invalid token: expired"
    assert error(who(sub="mallory")) == OTHER_SUBJECT
    assert error(who(roles=("tab",))) == ROLE_NOT_ALLOWED
    # The connection keeps its first token after a refused refresh.
    assert core.connections[A].identity == who()


def test_refresh_on_a_node_without_auth(mono: Clock) -> None:
    core = BrokerCore(HERE, max_role_length=8, max_unconfirmed=2, request_timeout=1, clock=mono)
    core.connect(A)
    [reply] = frames(core.refresh(A, Refresh(id=1, token="t"), TokenRefusal("off")))
    assert reply == {"type": "refresh_failed", "id": 1, "replyTo": 1, "error": AUTH_DISABLED}


def test_unauthenticated_connection_is_closed_after_the_timeout(
    core: BrokerCore, mono: Clock
) -> None:
    core.connect(A)
    core.connect(B)
    core.authenticated(B, who())
    mono.now += 9.9
    assert core.check_tokens() == []
    mono.now += 0.1
    assert core.check_tokens() == [CloseClient(A, CLOSE_TOKEN_EXPIRED, "Not authenticated in time")]


def test_revoke_closes_by_subject_or_token_id(core: BrokerCore) -> None:
    register(core, A, "server", who("alice", token_id="t-1"))
    register(core, B, "server", who("alice", token_id="t-2"))
    register(core, C, "server", who("carol", token_id="t-3"))
    revoked = (CLOSE_TOKEN_INVALID, "Token revoked")
    by_alice = core.revoke(lambda identity: identity.subject == "alice")
    assert by_alice == [CloseClient(A, *revoked), CloseClient(B, *revoked)]
    assert core.revoke(lambda identity: identity.token_id == "t-3") == [CloseClient(C, *revoked)]
    assert core.revoke(lambda identity: False) == []


def test_without_auth_tokens_are_ignored(mono: Clock) -> None:
    core = BrokerCore(HERE, max_role_length=8, max_unconfirmed=2, request_timeout=1, clock=mono)
    core.connect(A)
    plan = core.begin_register(A, Register(id=1, role="r", token="whatever"), None)
    assert isinstance(plan, ConnectionRecord)
    core.finish_register(A, Register(id=1, role="r"))
    assert frames(core.finish_list(A, ListByRole(id=2, role="r"), [A]))[0]["ids"] == ["a"]
    mono.now += 1000
    assert core.check_tokens() == []


def test_refusals_and_closes_are_counted(core: BrokerCore, mono: Clock, wall: Clock) -> None:
    refused_register(core, TokenRefusal("expired"))
    core.connect(B)
    core.authenticated(B, TokenRefusal("malformed"))
    register(core, C, "server", who(token_id="t"))
    core.revoke(lambda identity: identity.token_id == "t")
    mono.now += 60
    core.check_tokens()
    assert core.stats.token_refusals == {"expired": 1, "malformed": 1}
    # Nobody executes the closes here: A and B, both without a token, also time out.
    assert core.stats.auth_closes == {"invalid_token": 1, "revoked": 1, "timeout": 2}


def test_expiry_heap_stays_bounded_by_the_live_connections(core: BrokerCore, wall: Clock) -> None:
    register(core, A, "server", who())
    for n in range(3000):  # many refreshes (or connections come and gone)
        core.refresh(A, Refresh(id=n + 2, token="t"), who(expires_at=1_000_600.0 + n))
    assert len(core._expiry_due) <= 2 * len(core.connections) + 1025
    wall.now = 1_000_600.0 + 2999 + 25
    assert core.check_tokens() == [CloseClient(A, CLOSE_TOKEN_EXPIRED, "Token expired")]


def test_a_handshake_token_for_a_client_gone_or_a_node_without_auth_does_nothing(
    core: BrokerCore, mono: Clock
) -> None:
    assert core.authenticated(A, who()) == []  # never connected, or gone already
    plain = BrokerCore(HERE, max_role_length=8, max_unconfirmed=2, request_timeout=1, clock=mono)
    plain.connect(A)
    assert plain.authenticated(A, TokenRefusal("expired")) == []


def test_refresh_before_register_is_refused(core: BrokerCore) -> None:
    core.connect(A)
    core.authenticated(A, who())
    [reply] = frames(core.refresh(A, Refresh(id=3, token="t"), who()))
    assert reply["type"] == "refresh_failed" and reply["error"] == "Connection not registered"


def test_a_token_without_expiry_never_expires(core: BrokerCore, wall: Clock) -> None:
    reply = register(core, A, "server", who(expires_at=None))
    assert "expiresIn" not in reply
    wall.now += 10**9
    assert core.check_tokens() == []


def test_the_expiry_of_a_client_gone_is_dropped(core: BrokerCore, wall: Clock) -> None:
    register(core, A, "server", who())
    core.disconnect(A)
    wall.now = 1_000_600.0 + 25.0
    assert core.check_tokens() == []
    assert core.identity_of(A) is None

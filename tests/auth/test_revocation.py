"""The revocation list a node keeps: users by issue time, tokens by jti, both until they lapse."""

from __future__ import annotations

import pytest

from broker_node.auth.identity import Identity
from broker_node.auth.revocation import (
    Revocation,
    RevocationKeys,
    RevocationList,
    decode_revocation,
    encode_revocation,
)


def who(sub: str = "alice", iat: float | None = 100.0, jti: str | None = None) -> Identity:
    return Identity(subject=sub, roles=frozenset(), token_id=jti, issued_at=iat)


def test_a_user_revocation_covers_tokens_issued_until_then() -> None:
    revocations = RevocationList()
    revocations.add(Revocation(kind="sub", value="alice", at=200.0, until=1000.0))
    assert revocations.is_revoked(who(iat=150.0), now=300.0)
    assert revocations.is_revoked(who(iat=200.0), now=300.0)
    assert revocations.is_revoked(who(iat=None), now=300.0)
    assert not revocations.is_revoked(who(iat=201.0), now=300.0)
    assert not revocations.is_revoked(who(sub="bob"), now=300.0)


def test_a_token_revocation_covers_its_jti_only() -> None:
    revocations = RevocationList()
    revocations.add(Revocation(kind="jti", value="t-1", at=200.0, until=1000.0))
    assert revocations.is_revoked(who(jti="t-1", iat=900.0), now=300.0)
    assert not revocations.is_revoked(who(jti="t-2"), now=300.0)
    assert not revocations.is_revoked(who(jti=None), now=300.0)


def test_revocations_lapse_and_are_pruned() -> None:
    revocations = RevocationList()
    revocations.add(Revocation(kind="sub", value="alice", at=200.0, until=1000.0))
    revocations.add(Revocation(kind="jti", value="t-1", at=200.0, until=500.0))
    assert not revocations.is_revoked(who(sub="bob", jti="t-1"), now=500.0)
    revocations.prune(now=600.0)
    assert len(revocations) == 1
    assert not revocations.is_revoked(who(), now=1000.0)


def test_the_latest_user_revocation_wins() -> None:
    revocations = RevocationList()
    revocations.add(Revocation(kind="sub", value="alice", at=300.0, until=1000.0))
    revocations.add(Revocation(kind="sub", value="alice", at=200.0, until=1000.0))  # late, older
    assert revocations.is_revoked(who(iat=250.0), now=400.0)


def test_wire_form_round_trips_and_rejects_garbage() -> None:
    revocation = Revocation(kind="jti", value="t-1", at=1.5, until=2.5)
    assert decode_revocation(encode_revocation(revocation)) == revocation
    with pytest.raises(ValueError):
        decode_revocation(b'{"kind": "everyone"}')


def test_keys_follow_the_prefix() -> None:
    keys = RevocationKeys("p")
    assert keys.key("sub", "a:b") == "p:revoked-sub:a:b"
    assert keys.channel == "p:revocations"
    assert keys.pattern == "p:revoked-*"

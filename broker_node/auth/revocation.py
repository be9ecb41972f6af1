"""Revocation across the cluster: kick a user (``sub``) or a token (``jti``) on every node.

An operator's revocation (``broker-admin``) is written twice to Redis: as a key that expires
when the revoked tokens would have (so a node that starts later, or whose subscription was
down, still knows it), and as a message on one pub/sub channel every node listens to (so
connections already open are closed at once). A node keeps the revocations in memory
(``RevocationList``, pure), so that checking a token costs no Redis round trip.

A user revocation covers the tokens issued (``iat``) up to the moment of the revocation, and
tokens without ``iat``: the user's next token, issued later, is accepted again. A token
revocation covers that ``jti`` for as long as it is remembered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import msgspec
from redis.asyncio import Redis

from broker_node.auth.identity import Identity

logger = logging.getLogger("broker_node.auth.revocation")

RevocationKind = Literal["sub", "jti"]


class Revocation(msgspec.Struct, frozen=True):
    kind: RevocationKind
    value: str
    #: Unix time of the revocation: a user's tokens issued up to then are revoked.
    at: float
    #: Unix time until which it is remembered (the revoked tokens' latest ``exp``).
    until: float


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Revocation)


def encode_revocation(revocation: Revocation) -> bytes:
    return _encoder.encode(revocation)


def decode_revocation(data: bytes | str) -> Revocation:
    """Raises ``msgspec.DecodeError`` (a ``ValueError``) on anything else."""
    return _decoder.decode(data)


class RevocationList:
    """The revocations a node knows; entries past their ``until`` no longer count."""

    def __init__(self) -> None:
        self._subjects: dict[str, Revocation] = {}
        self._tokens: dict[str, Revocation] = {}

    def __len__(self) -> int:
        return len(self._subjects) + len(self._tokens)

    def add(self, revocation: Revocation) -> None:
        table = self._subjects if revocation.kind == "sub" else self._tokens
        known = table.get(revocation.value)
        # The latest revocation of a user covers every earlier one.
        if known is None or revocation.at >= known.at:
            table[revocation.value] = revocation

    def is_revoked(self, identity: Identity, now: float) -> bool:
        by_subject = self._subjects.get(identity.subject)
        if by_subject is not None and now < by_subject.until:
            issued = identity.issued_at
            if issued is None or issued <= by_subject.at:
                return True
        if identity.token_id is not None:
            by_token = self._tokens.get(identity.token_id)
            if by_token is not None and now < by_token.until:
                return True
        return False

    def prune(self, now: float) -> None:
        for table in (self._subjects, self._tokens):
            for value in [v for v, r in table.items() if r.until <= now]:
                del table[value]


@dataclass(frozen=True, slots=True)
class RevocationKeys:
    """Names of the revocation keys and channel (the families of ``cluster/keys.py``)."""

    prefix: str = "broker"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:revocations"

    @property
    def pattern(self) -> str:
        return f"{self.prefix}:revoked-*"

    def key(self, kind: RevocationKind, value: str) -> str:
        return f"{self.prefix}:revoked-{kind}:{value}"


async def announce(redis: Redis, keys: RevocationKeys, revocation: Revocation) -> int:
    """Remember the revocation until it lapses and tell every node; returns how many nodes
    were listening."""
    ttl_ms = max(1, int((revocation.until - revocation.at) * 1000))
    data = encode_revocation(revocation)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.key(revocation.kind, revocation.value), data, px=ttl_ms)
        pipe.publish(keys.channel, data)
        _, receivers = await pipe.execute()
    return int(receivers)


async def listen(
    redis: Redis,
    keys: RevocationKeys,
    on_revocation: Callable[[Revocation], None],
    on_subscribed: Callable[[], None] | None = None,
) -> None:
    """Subscribe, load what Redis remembers, then pass on every new revocation; returns or
    raises when the connection is lost (the caller's supervisor starts it again)."""
    async with redis.pubsub() as pubsub:
        await pubsub.subscribe(keys.channel)
        # Loaded after subscribing: a revocation made in between arrives either way.
        async for key in redis.scan_iter(match=keys.pattern, count=1000):
            data = await redis.get(key)
            if data is not None:
                _deliver(data, on_revocation)
        if on_subscribed is not None:
            on_subscribed()
        async for message in pubsub.listen():
            if message.get("type") == "message":
                _deliver(message["data"], on_revocation)


def _deliver(data: bytes | str, on_revocation: Callable[[Revocation], None]) -> None:
    try:
        revocation = decode_revocation(data)
    except msgspec.DecodeError:
        logger.warning("ignored an unreadable revocation (%d bytes)", len(data))
        return
    on_revocation(revocation)

"""Signing keys and tokens for the authentication tests (issue 13)."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

SECRET: Final = "test-secret-of-at-least-thirty-two-bytes!"
OTHER_SECRET: Final = "another-secret-of-at-least-thirty-two-bytes"


@dataclass(frozen=True)
class KeyPair:
    algorithm: str
    private: Any
    public_pem: str


def rsa_pair() -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return KeyPair("RS256", key, _public_pem(key))


def ec_pair() -> KeyPair:
    key = ec.generate_private_key(ec.SECP256R1())
    return KeyPair("ES256", key, _public_pem(key))


def ed25519_pair() -> KeyPair:
    key = ed25519.Ed25519PrivateKey.generate()
    return KeyPair("EdDSA", key, _public_pem(key))


def _public_pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(
    sub: str = "alice", roles: list[str] | None = None, ttl: float = 300, **extra: Any
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": sub,
        "roles": roles if roles is not None else ["a", "b"],
        "iat": now,
        "exp": now + ttl,
        **extra,
    }


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def signed(pair: KeyPair, payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(payload, pair.private, algorithm=pair.algorithm, headers=headers or None)


def unsigned(payload: dict[str, Any]) -> str:
    """A token with ``alg: none`` and no signature."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def jwks(*pairs: tuple[str, KeyPair]) -> str:
    """A JWKS document of the public keys, each under its ``kid``."""
    keys = []
    for kid, pair in pairs:
        algorithm = jwt.get_algorithm_by_name(pair.algorithm)
        entry = json.loads(algorithm.to_jwk(pair.private.public_key()))
        entry.update(kid=kid, alg=pair.algorithm, use="sig")
        keys.append(entry)
    return json.dumps({"keys": keys})

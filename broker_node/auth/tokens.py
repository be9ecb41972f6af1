"""JWT verification: a token in, an ``Identity`` or a ``TokenRefusal`` out.

Verification is PyJWT's: the signature with the configured key (an HS256 secret, a PEM public
key for RS256/ES256/EdDSA, or the key of a JWKS whose ``kid`` the token names), the algorithm
against an allow-list that can never hold ``none``, ``exp`` (required) and ``nbf`` with a small
leeway, and ``aud``/``iss`` when configured. Nothing here does I/O: JWKS keys are fetched by
``broker_node.auth.jwks`` and handed in through a ``KeySource``.

The claims this broker reads besides the registered ones: ``roles`` (the roles the token may
register as), and optionally ``list`` and ``open`` (the roles it may discover and open channels
to; they narrow the policy file, see ``broker_node.auth.policy``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, Protocol

import jwt

from broker_node.auth.identity import (
    ALGORITHM_NOT_ALLOWED,
    BAD_SIGNATURE,
    EXPIRED,
    MALFORMED,
    NOT_YET_VALID,
    REVOKED,
    UNKNOWN_KEY,
    WRONG_AUDIENCE,
    WRONG_ISSUER,
    Identity,
    TokenRefusal,
)

#: Algorithms a shared secret may sign with, and those of public keys.
SECRET_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
#: The algorithms allowed when none are configured, per kind of key.
DEFAULT_SECRET_ALGORITHMS: Final[tuple[str, ...]] = ("HS256",)
DEFAULT_PUBLIC_KEY_ALGORITHMS: Final[tuple[str, ...]] = ("RS256", "ES256", "EdDSA")


class KeySource(Protocol):
    """Where the verification key of a token comes from."""

    def key_for(self, kid: str | None, algorithm: str) -> Any:
        """The key for a token whose header names ``kid`` and ``algorithm``, or None."""


@dataclass(frozen=True, slots=True)
class StaticKey:
    """One secret or public key for every token."""

    key: Any

    def key_for(self, kid: str | None, algorithm: str) -> Any:
        return self.key


class TokenVerifier:
    """Verifies tokens against one key source and one set of rules."""

    def __init__(
        self,
        keys: KeySource,
        *,
        algorithms: Collection[str],
        leeway: float = 5.0,
        audience: str | None = None,
        issuer: str | None = None,
        is_revoked: Callable[[Identity], bool] | None = None,
    ) -> None:
        allowed = frozenset(algorithms)
        unknown = allowed - SECRET_ALGORITHMS - PUBLIC_KEY_ALGORITHMS
        if not allowed or unknown:
            # "none" lands here: it is never an accepted algorithm.
            raise ValueError(f"unsupported token algorithms: {sorted(unknown) or 'none given'}")
        self.keys = keys
        self.algorithms = allowed
        self.leeway = leeway
        self.audience = audience
        self.issuer = issuer
        self.is_revoked = is_revoked

    def verify(self, token: str) -> Identity | TokenRefusal:
        """Check the token (against the current time) and read its claims."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return TokenRefusal(MALFORMED)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            return TokenRefusal(ALGORITHM_NOT_ALLOWED)
        kid = header.get("kid")
        key = self.keys.key_for(kid if isinstance(kid, str) else None, algorithm)
        if key is None:
            return TokenRefusal(UNKNOWN_KEY)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            return TokenRefusal(EXPIRED)
        except jwt.ImmatureSignatureError:
            return TokenRefusal(NOT_YET_VALID)
        except jwt.InvalidAudienceError:
            return TokenRefusal(WRONG_AUDIENCE)
        except jwt.InvalidIssuerError:
            return TokenRefusal(WRONG_ISSUER)
        except jwt.InvalidSignatureError:
            return TokenRefusal(BAD_SIGNATURE)
        except jwt.InvalidAlgorithmError:
            return TokenRefusal(ALGORITHM_NOT_ALLOWED)
        except jwt.MissingRequiredClaimError as exc:
            return TokenRefusal(f"missing claim {exc.claim}")
        except (jwt.PyJWTError, ValueError, TypeError):
            # A key of the wrong kind for the algorithm, a claim of the wrong type, ...
            return TokenRefusal(MALFORMED)
        identity = identity_from_claims(claims)
        if isinstance(identity, TokenRefusal):
            return identity
        if self.is_revoked is not None and self.is_revoked(identity):
            return TokenRefusal(REVOKED)
        return identity


def identity_from_claims(claims: dict[str, Any]) -> Identity | TokenRefusal:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        return TokenRefusal("claim sub must be a non-empty string")
    roles = _role_set(claims.get("roles", []))
    may_list = _role_set(claims["list"]) if "list" in claims else None
    may_open = _role_set(claims["open"]) if "open" in claims else None
    if roles is None:
        return TokenRefusal("claim roles must be a list of strings")
    if "list" in claims and may_list is None:
        return TokenRefusal("claim list must be a list of strings")
    if "open" in claims and may_open is None:
        return TokenRefusal("claim open must be a list of strings")
    jti = claims.get("jti")
    iat = claims.get("iat")
    exp = claims.get("exp")
    return Identity(
        subject=subject,
        roles=roles,
        may_list=may_list,
        may_open=may_open,
        token_id=jti if isinstance(jti, str) else None,
        issued_at=float(iat) if isinstance(iat, int | float) else None,
        expires_at=float(exp) if isinstance(exp, int | float) else None,
    )


def _role_set(value: object) -> frozenset[str] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    return None

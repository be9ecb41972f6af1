"""Settings to an authenticator: the verifier, its key source, the policy (fails early)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broker_node.auth.identity import Identity
from broker_node.auth.jwks import JwksKeys, read_source
from broker_node.auth.policy import Policy, PolicyError, parse_policy
from broker_node.auth.tokens import (
    DEFAULT_PUBLIC_KEY_ALGORITHMS,
    DEFAULT_SECRET_ALGORITHMS,
    PUBLIC_KEY_ALGORITHMS,
    SECRET_ALGORITHMS,
    KeySource,
    StaticKey,
    TokenVerifier,
)
from broker_node.config import Settings
from broker_node.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class AuthSetup:
    verifier: TokenVerifier
    policy: Policy | None
    #: Set when keys come from a JWKS that the node must refresh.
    jwks: JwksKeys | None


def build_auth(
    settings: Settings, is_revoked: Callable[[Identity], bool] | None = None
) -> AuthSetup | None:
    """The node's authentication, or None when it is off; ``ConfigurationError`` if wrong.

    Reads the policy file and the first JWKS document (blocking, at start only)."""
    if not settings.auth_enabled:
        return None
    sources = [s for s in (settings.auth_secret, settings.auth_public_key, settings.auth_jwks) if s]
    if len(sources) > 1:
        raise ConfigurationError("give one of --auth-secret, --auth-public-key, --auth-jwks")
    keys: KeySource
    jwks: JwksKeys | None = None
    if settings.auth_secret:
        keys = StaticKey(settings.auth_secret)
        allowed, defaults = SECRET_ALGORITHMS, DEFAULT_SECRET_ALGORITHMS
    else:
        allowed, defaults = PUBLIC_KEY_ALGORITHMS, DEFAULT_PUBLIC_KEY_ALGORITHMS
        if settings.auth_public_key:
            # Parsed once here rather than by PyJWT on every token.
            try:
                public_key = load_pem_public_key(settings.auth_public_key.encode())
            except ValueError as exc:
                raise ConfigurationError(f"cannot read the public key: {exc}") from exc
            keys = StaticKey(public_key)
        else:
            assert settings.auth_jwks is not None
            jwks = JwksKeys()
            try:
                jwks.update(read_source(settings.auth_jwks))
            except (OSError, ValueError) as exc:
                raise ConfigurationError(f"cannot read the JWKS: {exc}") from exc
            keys = jwks
    algorithms = settings.auth_algorithms or defaults
    wrong = set(algorithms) - allowed
    if wrong:
        kind = "a shared secret" if settings.auth_secret else "public keys"
        raise ConfigurationError(f"algorithms {sorted(wrong)} cannot be used with {kind}")
    policy = None
    if settings.auth_policy:
        try:
            policy = parse_policy(Path(settings.auth_policy).read_text())
        except (OSError, PolicyError) as exc:
            raise ConfigurationError(f"policy file {settings.auth_policy}: {exc}") from exc
    verifier = TokenVerifier(
        keys,
        algorithms=algorithms,
        leeway=settings.auth_leeway,
        audience=settings.auth_audience,
        issuer=settings.auth_issuer,
        is_revoked=is_revoked,
    )
    return AuthSetup(verifier, policy, jwks)

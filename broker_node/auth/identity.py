"""What a verified token says (``Identity``) or why it was refused (``TokenRefusal``).

Plain values, importable by the pure core without PyJWT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: The refusal reasons (the text after "Invalid token: " on the wire).
EXPIRED: Final = "expired"
NOT_YET_VALID: Final = "not yet valid"
BAD_SIGNATURE: Final = "signature verification failed"
ALGORITHM_NOT_ALLOWED: Final = "algorithm not allowed"
WRONG_AUDIENCE: Final = "audience not accepted"
WRONG_ISSUER: Final = "issuer not accepted"
MALFORMED: Final = "malformed"
UNKNOWN_KEY: Final = "signing key not known"
REVOKED: Final = "revoked"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the client is, and what it may do."""

    subject: str
    #: Roles the token may register as.
    roles: frozenset[str]
    #: Roles it may list / open channels to, from its claims; None: the claim is absent.
    may_list: frozenset[str] | None = None
    may_open: frozenset[str] | None = None
    token_id: str | None = None
    #: ``iat`` and ``exp`` as Unix times.
    issued_at: float | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class TokenRefusal:
    """Why a token was refused; ``expired`` tokens may be replaced, the others may not."""

    reason: str

    @property
    def expired(self) -> bool:
        return self.reason == EXPIRED

    @property
    def error(self) -> str:
        return f"Invalid token: {self.reason}"

"""Exceptions of the broker node.

BrokerNodeError
├── BackendUnavailable      the registry or bus could not be reached in time (not our bug)
└── ConfigurationError      a setting is invalid (the operator's to fix)
"""

from __future__ import annotations


class BrokerNodeError(Exception):
    """Base class of the node's own exceptions."""


class BackendUnavailable(BrokerNodeError):
    """The cluster backend (Redis) failed or timed out; the request may be retried later."""

    def __init__(self, operation: str, cause: BaseException | None = None) -> None:
        self.operation = operation
        self.cause = cause
        # The cause's type and text: redis-py's exceptions have a repr that omits the text
        # (the address and errno an operator needs).
        detail = ""
        if cause is not None:
            text = str(cause)
            detail = f": {type(cause).__name__}: {text}" if text else f": {type(cause).__name__}"
        super().__init__(f"cluster backend unavailable during {operation}{detail}")


class ConfigurationError(BrokerNodeError):
    """A setting is invalid."""

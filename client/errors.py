"""Exceptions of the client SDK.

    BrokerError
    ├── NotConnected            there is no registered connection to the broker for this call
    │   ├── ConnectionLost      the connection dropped while the call was in flight
    │   └── ConnectFailed       connect() could not open the WebSocket (refused, DNS, handshake)
    ├── RequestFailed           the broker answered with a failure (``*_failed`` or ``error``)
    ├── RequestTimeout          no answer in time (also a ``TimeoutError``)
    ├── ChannelClosed           the channel is closed: locally, by the peer, or with the connection
    ├── InvalidPayload          a payload is not JSON-serialisable (also a ``TypeError``); nothing
    │                           was sent
    └── ProtocolViolation       the broker answered with a reply that does not fit the request

``NotConnected`` and its subclasses are the broker's or the network's condition; retrying after
the client has reconnected is reasonable. ``RequestFailed`` is the broker's considered answer
(an unknown target, a channel that is gone). ``InvalidPayload`` is the caller's bug.
"""

from __future__ import annotations

import enum

__all__ = [
    "BrokerError",
    "ChannelClosed",
    "CloseReason",
    "ConnectFailed",
    "ConnectionLost",
    "InvalidPayload",
    "NotConnected",
    "ProtocolViolation",
    "RequestFailed",
    "RequestTimeout",
]


class BrokerError(Exception):
    """Base class of every exception the SDK raises on purpose."""


class NotConnected(BrokerError):
    """No registered connection: before ``connect()``, after ``close()``, or between reconnects."""

    def __init__(self, message: str = "Not connected to the broker") -> None:
        super().__init__(message)


class ConnectionLost(NotConnected):
    """The connection to the broker dropped while this call was waiting for its answer.

    Every pending request fails with this as soon as the drop is noticed; none waits for its
    timeout. Whether the broker acted on the request is unknown.
    """

    def __init__(self, message: str = "Connection to the broker was lost") -> None:
        super().__init__(message)


class ConnectFailed(NotConnected):
    """``connect()`` could not open the WebSocket to ``url``; the cause is chained."""

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"Could not connect to {url}: {detail}")


class RequestFailed(BrokerError):
    """The broker answered a request with a failure reply.

    ``reply_type`` is the reply's ``type`` (``"channel_open_failed"``, ``"register_failed"``,
    ``"error"``, ...); ``error`` is its text, e.g. ``"Target connection not found"``.
    """

    def __init__(self, reply_type: str, error: str, *, request_type: str | None = None) -> None:
        self.reply_type = reply_type
        self.error = error
        self.request_type = request_type
        super().__init__(f"{reply_type}: {error}")


class RequestTimeout(BrokerError, TimeoutError):
    """No answer within ``timeout`` seconds (a broker reply, or a peer's response)."""

    def __init__(self, operation: str, timeout: float) -> None:
        self.operation = operation
        self.timeout = timeout
        super().__init__(f"{operation} timed out after {timeout:g} s")


class CloseReason(enum.Enum):
    """Why a channel is closed."""

    #: ``channel.close()`` was called.
    LOCAL = "local"
    #: The peer closed it, or the peer's connection ended (``channel_closed_notification``).
    PEER = "peer"
    #: The connection to the broker ended (dropped, or ``client.close()``).
    CONNECTION = "connection"
    #: Nobody consumed the channel's messages and its bounded buffer filled up; the SDK closed
    #: the channel rather than drop messages silently or grow without bound.
    OVERFLOW = "overflow"


class ChannelClosed(BrokerError):
    """The channel is closed; ``reason`` says why."""

    def __init__(self, channel_id: str, reason: CloseReason) -> None:
        self.channel_id = channel_id
        self.reason = reason
        super().__init__(f"Channel {channel_id} is closed ({reason.value})")


class InvalidPayload(BrokerError, TypeError):
    """The payload cannot be encoded as JSON; nothing was sent."""


class ProtocolViolation(BrokerError):
    """The broker answered a request with a reply the SDK cannot interpret (the broker's bug).

    Frames that answer no request (garbage, an ``error`` without ``replyTo``) are logged
    instead, since nobody is waiting for them.
    """

"""Python client SDK of the connection broker.

    async with BrokerClient("ws://broker:3004", "my-role") as client:
        ids = await client.list_by_role("other-role")
        channel = await client.open_channel(ids[0])
        await channel.send({"hello": "world"})

See ``client.client`` for the semantics (reconnects, buffers, callbacks) and
``client.errors`` for the exception tree.
"""

from client.client import BrokerClient, Channel
from client.errors import (
    BrokerError,
    ChannelClosed,
    CloseReason,
    ConnectFailed,
    ConnectionLost,
    InvalidPayload,
    NotConnected,
    ProtocolViolation,
    RequestFailed,
    RequestTimeout,
)

__all__ = [
    "BrokerClient",
    "BrokerError",
    "Channel",
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

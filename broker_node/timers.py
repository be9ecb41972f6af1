"""The node's clock-driven loops: cross-node work checked against the request timeout, and
keepalive pings to the clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from broker_node.core.actions import Action
from shared.ids import ConnectionId

#: How often cross-node work is checked against the request timeout.
EXPIRY_INTERVAL: Final = 0.25
#: Keepalive pings go out in this many slices per ping interval.
KEEPALIVE_SLICES: Final = 20


async def expiry_loop(
    expire: Callable[[], list[Action]], execute: Callable[[list[Action]], None]
) -> None:
    while True:
        await asyncio.sleep(EXPIRY_INTERVAL)
        execute(expire())


class Pingable(Protocol):
    @property
    def keepalive_slice(self) -> int: ...

    def keepalive(self, now: float, timeout: float) -> None: ...


async def keepalive_loop(
    clients: Mapping[ConnectionId, Pingable], *, interval: float, timeout: float
) -> None:
    # Clients are pinged a slice at a time, each slice once per interval: tens of thousands
    # of pings in one loop turn would stall every message behind them.
    loop = asyncio.get_running_loop()
    current = 0
    while True:
        await asyncio.sleep(interval / KEEPALIVE_SLICES)
        now = loop.time()
        for client in list(clients.values()):
            if client.keepalive_slice == current:
                client.keepalive(now, timeout)
        current = (current + 1) % KEEPALIVE_SLICES

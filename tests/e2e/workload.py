"""SDK clients that keep exchanging request/response messages through the load balancer.

:class:`Responder` (role ``echo``) answers every message of every incoming channel with the
same payload. :class:`Requester` loops: ``list_by_role("echo")``, open a channel to one
responder (the next one in turn, so that every responder is asked), a few
``channel.request()`` round trips, close. Both reconnect on their own
(``maintain_connection=True``). The errors a node going away causes (:data:`TOLERATED`) are
counted and the requester starts over with a fresh channel; anything else, or an answer that
is not the question, is recorded in ``unexpected`` for the test to fail on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, Final

from client import (
    BrokerClient,
    BrokerError,
    Channel,
    ChannelClosed,
    NotConnected,
    RequestFailed,
    RequestTimeout,
)

#: What a rolling restart may do to a client in flight. ``NotConnected`` covers
#: ``ConnectionLost`` and a call made between reconnects.
TOLERATED: Final = (NotConnected, ChannelClosed, RequestFailed, RequestTimeout)
ECHO_ROLE: Final = "echo"
#: Round trips on one channel before a requester moves to the next responder.
ROUNDS_PER_CHANNEL: Final = 3
#: Generous for a loaded 2-core machine; the node's own request timeout is 2.5 s.
REQUEST_TIMEOUT: Final = 5.0


def sdk_client(url: str, role: str, **kwargs: Any) -> BrokerClient:
    """A reconnecting client with quick, still jittered, reconnects."""
    return BrokerClient(
        url,
        role,
        request_timeout=REQUEST_TIMEOUT,
        connect_timeout=REQUEST_TIMEOUT,
        maintain_connection=True,
        backoff_base=0.1,
        backoff_cap=1.0,
        **kwargs,
    )


class Responder:
    """Role ``echo``: answers every message on every incoming channel with the same payload."""

    def __init__(self, url: str) -> None:
        self.client = sdk_client(url, ECHO_ROLE, on_incoming_channel=self._serve)
        #: Monotonic times of the answers sent (and confirmed by the broker).
        self.answers: list[float] = []
        self.tolerated: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []

    def answered_since(self, since: float) -> int:
        return sum(1 for at in self.answers if at >= since)

    async def _serve(self, channel: Channel) -> None:
        # Run by the client as a tracked task per channel; it ends with the channel.
        try:
            async for payload in channel:
                await channel.send(payload)
                self.answers.append(time.monotonic())
        except TOLERATED as exc:
            self.tolerated[type(exc).__name__] += 1
        except BrokerError as exc:
            self.unexpected.append(f"responder {self.client.connection_id}: {exc!r}")


class Requester:
    """Asks the responders, in turn, over fresh channels, until ``stop`` is set."""

    def __init__(self, url: str, index: int) -> None:
        self.index = index
        self.client = sdk_client(url, "requester")
        #: Monotonic times of the completed round trips (answer == question).
        self.round_trips: list[float] = []
        self.tolerated: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []
        self._sequence = 0

    def round_trips_since(self, since: float) -> int:
        return sum(1 for at in self.round_trips if at >= since)

    async def run(self, stop: asyncio.Event) -> None:
        turn = self.index
        while not stop.is_set():
            channel: Channel | None = None
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT * 4):
                    await self.client.wait_connected()
                echoes = sorted(await self.client.list_by_role(ECHO_ROLE))
                if not echoes:
                    await asyncio.sleep(0.1)  # a client's pause before it asks again
                    continue
                target = echoes[turn % len(echoes)]
                turn += 1
                channel = await self.client.open_channel(target)
                for _ in range(ROUNDS_PER_CHANNEL):
                    if stop.is_set():
                        break
                    self._sequence += 1
                    question = {"from": self.index, "seq": self._sequence, "to": target}
                    answer = await channel.request(question, timeout=REQUEST_TIMEOUT)
                    if answer != question:
                        self.unexpected.append(f"asked {question!r}, got {answer!r}")
                        break
                    self.round_trips.append(time.monotonic())
            except TOLERATED as exc:
                self.tolerated[_describe(exc)] += 1
                await asyncio.sleep(0.05)  # a client's pause before it tries again
            except (BrokerError, TimeoutError) as exc:
                self.unexpected.append(f"requester {self.index}: {exc!r}")
                await asyncio.sleep(0.05)  # a client's pause before it tries again
            finally:
                if channel is not None:
                    with contextlib.suppress(BrokerError):
                        await channel.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RequestFailed):
        return f"RequestFailed({exc.reply_type}: {exc.error})"
    return type(exc).__name__

"""Keepalive pings: live clients stay, clients that stopped answering are closed and forgotten."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest

from broker_node.config import Settings
from broker_node.connection import ClientConnection
from broker_node.node import BrokerNode
from shared.ids import NodeId
from tests.support.polling import wait_until
from tests.support.wire import WireClient, pair


@pytest.fixture
async def pinging_node() -> AsyncIterator[BrokerNode]:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        node_id=NodeId("keepalive"),
        ping_interval=0.1,
        ping_timeout=0.3,
    )
    async with BrokerNode(settings) as running:
        yield running


async def test_clients_that_answer_pings_stay_connected(
    pinging_node: BrokerNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Counted at the node: a ping it sent whose pong came back before its next look.
    answered: Counter[int] = Counter()
    awaiting: set[int] = set()
    keepalive = ClientConnection.keepalive

    def counting_keepalive(sock: ClientConnection, now: float, timeout: float) -> None:
        if id(sock) in awaiting and sock.ping_sent_at is None:
            awaiting.discard(id(sock))
            answered[id(sock)] += 1
        keepalive(sock, now, timeout)
        if sock.ping_sent_at is not None:
            awaiting.add(id(sock))

    monkeypatch.setattr(ClientConnection, "keepalive", counting_keepalive)
    url = f"ws://127.0.0.1:{pinging_node.port}"
    a, b, channel = await pair(url)
    # Three pings each, answered by the client library (a node with pings off never gets here).
    await wait_until(
        lambda: len(answered) >= 2 and min(answered.values()) >= 3,
        timeout=15,
        message="three pings answered by each client",
    )
    assert len(pinging_node.clients) == 2
    sent = await a.request("message", channelId=channel, payload="still here")
    assert sent["type"] == "channel_message_sent"
    assert (await b.notification("channel_message"))["payload"] == "still here"
    await a.close()
    await b.close()


async def test_a_client_that_stops_answering_is_closed_and_forgotten(
    pinging_node: BrokerNode,
) -> None:
    url = f"ws://127.0.0.1:{pinging_node.port}"
    silent, peer, channel = await pair(url)
    assert silent.ws is not None
    # Its host "vanishes": nothing it receives is read any more, so no ping is answered.
    silent.ws.transport.pause_reading()
    note = await peer.notification("channel_closed_notification", timeout=5)
    assert note["channelId"] == channel
    listed = await peer.request("list_by_role", role="a")
    assert listed["ids"] == []
    silent.ws.transport.abort()
    await peer.close()


async def test_pings_are_spread_over_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many thousand clients pinged in one loop turn would stall every message behind them.
    interval = 0.4
    settings = Settings(host="127.0.0.1", port=0, node_id=NodeId("spread"), ping_interval=interval)
    pinged_at: dict[int, list[float]] = {}
    keepalive = ClientConnection.keepalive

    def recording_keepalive(sock: ClientConnection, now: float, timeout: float) -> None:
        was_waiting = sock.ping_sent_at is not None
        keepalive(sock, now, timeout)
        if not was_waiting and sock.ping_sent_at is not None:
            pinged_at.setdefault(id(sock), []).append(now)

    monkeypatch.setattr(ClientConnection, "keepalive", recording_keepalive)
    async with BrokerNode(settings) as node:
        clients = [await WireClient(f"ws://127.0.0.1:{node.port}").__aenter__() for _ in range(40)]
        try:
            # Until every client was pinged twice: two intervals at least.
            await wait_until(
                lambda: len(pinged_at) >= 40 and min(map(len, pinged_at.values())) >= 2,
                timeout=30,
                message="every client pinged twice",
            )
        finally:
            for client in clients:
                await client.close()
    assert len(pinged_at) == 40
    firsts = [times[0] for times in pinged_at.values()]
    # A twentieth of the clients per slice: pings went out in many loop turns, not one...
    assert len(set(firsts)) >= 10
    # ...and each client is pinged once per interval, no more.
    assert all(1 <= len(times) <= 3 for times in pinged_at.values())

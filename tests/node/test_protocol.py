"""The whole wire protocol over real sockets against a standalone node."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import InvalidStatus

from broker_node.node import BrokerNode
from tests.support.nodes import http_get
from tests.support.wire import WireClient, pair


async def test_full_flow_with_readme_replies(url: str) -> None:
    async with WireClient(url) as a, WireClient(url) as b:
        a_id = await a.register("tab")
        b_id = await b.register("server")
        assert a_id != b_id
        listed = await b.request("list_by_role", role="tab")
        assert listed["type"] == "connections" and listed["ids"] == [a_id]
        opened = await b.request("open", targetId=a_id)
        assert opened["type"] == "channel_opened" and opened["targetId"] == a_id
        channel = opened["channelId"]
        incoming = await a.notification("incoming_channel")
        assert incoming == {
            "type": "incoming_channel",
            "id": incoming["id"],
            "from": b_id,
            "channelId": channel,
        }
        sent = await b.request("message", channelId=channel, payload={"cmd": "click", "at": [1, 2]})
        assert sent["type"] == "channel_message_sent" and sent["channelId"] == channel
        delivered = await a.notification("channel_message")
        assert delivered["payload"] == {"cmd": "click", "at": [1, 2]}
        answer = await a.request("message", channelId=channel, payload="done")
        assert answer["type"] == "channel_message_sent"
        assert (await b.notification("channel_message"))["payload"] == "done"
        closed = await a.request("close", channelId=channel)
        assert closed == {
            "type": "channel_closed",
            "id": closed["id"],
            "replyTo": closed["replyTo"],
            "channelId": channel,
        }
        note = await b.notification("channel_closed_notification")
        assert note["channelId"] == channel
        after = await b.request("message", channelId=channel, payload=1)
        assert after["type"] == "channel_message_failed" and after["error"] == "Channel not found"
        # Every frame the broker sent each client had a strictly increasing id from 1.
        for client in (a, b):
            assert client.received == []


async def test_ids_strictly_increase_from_one(url: str) -> None:
    async with WireClient(url) as a, WireClient(url) as b:
        ids = []
        for n in range(3):
            await a.send({"type": "list_by_role", "id": n + 1, "role": "x"})
        await a.send({"type": "register", "id": 9, "role": "x"})
        for _ in range(4):
            ids.append((await a.recv())["id"])
        assert ids == [1, 2, 3, 4]
        await b.register("y")


async def test_list_by_role_includes_caller(url: str) -> None:
    async with WireClient(url) as a, WireClient(url) as b, WireClient(url) as c:
        a_id = await a.register("same")
        b_id = await b.register("same")
        await c.register("other")
        listed = await a.request("list_by_role", role="same")
        assert sorted(listed["ids"]) == sorted([a_id, b_id])
        assert (await a.request("list_by_role", role="none"))["ids"] == []


async def test_second_register_and_requests_before_register(url: str) -> None:
    async with WireClient(url) as a:
        assert (await a.request("list_by_role", role="x"))["type"] == "list_by_role_failed"
        failed = await a.request("open", targetId="abc")
        assert (
            failed["type"] == "channel_open_failed"
            and failed["error"] == "Connection not registered"
        )
        assert failed["targetId"] == "abc"
        assert (await a.request("message", channelId="c", payload=1))[
            "type"
        ] == "channel_message_failed"
        assert (await a.request("close", channelId="c"))["type"] == "channel_close_failed"
        await a.register("r")
        again = await a.request("register", role="r")
        assert again["type"] == "register_failed" and "already" in again["error"]


async def test_open_unknown_target(url: str) -> None:
    async with WireClient(url) as a:
        await a.register("r")
        failed = await a.request("open", targetId="00000000-0000-0000-0000-000000000000")
        assert failed["type"] == "channel_open_failed"
        assert failed["error"] == "Target connection not found"
        assert failed["targetId"] == "00000000-0000-0000-0000-000000000000"


async def test_third_party_can_neither_send_nor_close(url: str) -> None:
    a, b, channel = await pair(url)
    async with WireClient(url) as intruder:
        await intruder.register("x")
        sent = await intruder.request("message", channelId=channel, payload="hi")
        assert (
            sent["type"] == "channel_message_failed"
            and sent["error"] == "Not authorized for this channel"
        )
        closed = await intruder.request("close", channelId=channel)
        assert (
            closed["type"] == "channel_close_failed"
            and closed["error"] == "Not authorized for this channel"
        )
    # The channel still works for its two ends.
    assert (await a.request("message", channelId=channel, payload="still"))[
        "type"
    ] == "channel_message_sent"
    assert (await b.notification("channel_message"))["payload"] == "still"
    await a.close()
    await b.close()


async def test_disconnect_closes_channels_and_notifies_peers(url: str) -> None:
    a, b, first = await pair(url)
    async with WireClient(url) as c:
        await c.register("c")
        second = await c.open(a.connection_id or "")
        await a.notification("incoming_channel")
        await a.close()
        assert (await b.notification("channel_closed_notification"))["channelId"] == first
        assert (await c.notification("channel_closed_notification"))["channelId"] == second
        listed = await c.request("list_by_role", role="a")
        assert listed["ids"] == []
        failed = await c.request("message", channelId=second, payload=1)
        assert failed["error"] == "Channel not found"
    await b.close()


async def test_ten_thousand_pipelined_messages_in_order(url: str) -> None:
    a, b, channel = await pair(url)
    count = 10_000
    assert a.ws is not None and b.ws is not None
    frames = [
        json.dumps({"type": "message", "id": 1000 + n, "channelId": channel, "payload": {"seq": n}})
        for n in range(count)
    ]

    async def send_all() -> None:
        assert a.ws is not None
        for frame in frames:
            await a.ws.send(frame)

    async def confirmations() -> list[int]:
        assert a.ws is not None
        got: list[int] = []
        while len(got) < count:
            reply = json.loads(await a.ws.recv())
            assert reply["type"] == "channel_message_sent", reply
            got.append(reply["replyTo"])
        return got

    async def deliveries() -> list[int]:
        assert b.ws is not None
        got: list[int] = []
        while len(got) < count:
            message = json.loads(await b.ws.recv())
            assert message["type"] == "channel_message", message
            got.append(message["payload"]["seq"])
        return got

    async with asyncio.timeout(60):
        _, confirmed, delivered = await asyncio.gather(send_all(), confirmations(), deliveries())
    assert delivered == list(range(count))
    assert confirmed == [1000 + n for n in range(count)]
    await a.close()
    await b.close()


async def test_fragmented_message_is_assembled(url: str) -> None:
    a, b, channel = await pair(url)
    assert a.ws is not None
    text = json.dumps({"type": "message", "id": 77, "channelId": channel, "payload": "x" * 5000})
    await a.ws.send([text[:10], text[10:2000], text[2000:]])
    assert (await a.reply_to(77))["type"] == "channel_message_sent"
    assert (await b.notification("channel_message"))["payload"] == "x" * 5000
    await a.close()
    await b.close()


async def test_legacy_error_mode_for_the_original_js_client(url: str) -> None:
    async with WireClient(url + "/?errors=legacy") as legacy, WireClient(url) as modern:
        await legacy.register("r")
        failed = await legacy.request("open", targetId="nobody")
        assert failed == {
            "type": "error",
            "id": failed["id"],
            "replyTo": failed["replyTo"],
            "error": "Target connection not found",
        }
        # Success replies keep their README types.
        assert (await legacy.request("list_by_role", role="r"))["type"] == "connections"
        await modern.register("r")
        assert (await modern.request("open", targetId="nobody"))["type"] == "channel_open_failed"


async def test_http_endpoints(node: BrokerNode) -> None:
    base = f"http://127.0.0.1:{node.port}"
    results = await asyncio.gather(
        *(
            asyncio.to_thread(http_get, base + path)
            for path in ("/healthz", "/readyz", "/metrics", "/nope")
        )
    )
    (h, h_body), (r, r_body), (m, m_body), (n, _) = results
    assert (h, h_body) == (200, "ok\n")
    assert (r, r_body) == (200, "ready\n")
    assert m == 200 and "broker_connections" in m_body and "broker_messages_routed_total" in m_body
    assert n == 404


async def test_graceful_stop_closes_clients_with_1001_and_refuses_new_ones(
    node: BrokerNode, url: str
) -> None:
    a, b, _ = await pair(url)
    stopping = asyncio.create_task(node.stop())
    code, _ = await a.closed_with()
    assert code == 1001
    code, _ = await b.closed_with()
    assert code == 1001
    await stopping
    assert not node.ready
    status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.port}/readyz")
    assert status == 0  # the listening socket is closed


async def test_during_drain_readyz_is_503_and_new_clients_are_refused(
    node: BrokerNode, url: str
) -> None:
    a, b, _ = await pair(url)
    # The state the node is in between SIGTERM and the end of its drain.
    node.status_board.update(draining=True)
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{node.port}/readyz")
    assert status == 503 and "draining" in body
    with pytest.raises(InvalidStatus) as refused:
        async with WireClient(url):
            pass
    assert refused.value.response.status_code == 503
    node.status_board.update(draining=False)
    await a.close()
    await b.close()

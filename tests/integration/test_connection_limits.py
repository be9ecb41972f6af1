"""Connection-level limits against real node processes (issue 15 items 1, 3, 4, 5)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.nodes import NodeProcess, http_get, metric
from tests.support.polling import wait_until
from tests.support.wire import WireClient, pair

UPGRADE = (
    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def refused_status(url: str, **kwargs: object) -> int | None:
    """The HTTP status an upgrade is refused with; None when it is accepted."""
    try:
        async with connect(url, **kwargs):  # type: ignore[arg-type]
            return None
    except InvalidStatus as exc:
        return exc.response.status_code


def assert_no_traceback(node: NodeProcess) -> None:
    log = node.output()
    assert "Traceback" not in log and "Fatal error" not in log, log[-4000:]


# --- item 1: half-open connections, header bound, connection caps, fd shortage -----------


async def test_half_open_connections_are_dropped_after_the_handshake_timeout() -> None:
    with NodeProcess(extra_args=["--handshake-timeout", "0.5"]) as node:
        silent = await asyncio.open_connection("127.0.0.1", node.port)
        half = await asyncio.open_connection("127.0.0.1", node.port)
        half[1].write(UPGRADE.encode())  # no blank line: the request never ends
        drip = await asyncio.open_connection("127.0.0.1", node.port)

        async def dripping() -> None:
            for byte in UPGRADE.encode():
                drip[1].write(bytes([byte]))
                await asyncio.sleep(0.05)  # a byte at a time, slowly: the behaviour under test

        dripper = asyncio.create_task(dripping())
        for reader, _ in (silent, half, drip):
            # EOF from the node: it closed the connection (bounded wait, no fixed sleep).
            assert await asyncio.wait_for(reader.read(), 10) == b""
        dripper.cancel()
        for _, writer in (silent, half, drip):
            writer.close()
        assert await metric(node, "broker_limit_refusals_total", limit="handshake_timeout") == 3
        # A client that completes its handshake in time is not affected.
        a, b, _ = await pair(node.url)
        await a.close()
        await b.close()


async def test_headers_past_the_bound_get_431() -> None:
    with NodeProcess(extra_args=["--max-header-bytes", "2048"]) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(UPGRADE.encode() + b"X-Pad: " + b"a" * 4000 + b"\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 431 ")
        writer.close()
        # Headers within the bound, and frames sent right behind them, are fine.
        async with WireClient(node.url, additional_headers={"X-Pad": "b" * 1500}) as client:
            await client.register("ok")
        assert await metric(node, "broker_limit_refusals_total", limit="header_bytes") == 1
        assert_no_traceback(node)


async def test_connections_per_node_are_capped_with_503_and_healthz_still_answers() -> None:
    with NodeProcess(extra_args=["--max-connections", "2"]) as node:
        first = await WireClient(node.url).__aenter__()
        second = await WireClient(node.url).__aenter__()
        await first.register("r")
        assert await refused_status(node.url) == 503
        assert (await asyncio.to_thread(http_get, node.http + "/healthz"))[0] == 200
        await first.close()

        async def admitted() -> bool:
            return await refused_status(node.url) is None

        await wait_until(admitted, timeout=10, message="a new connection admitted")
        await second.close()
        assert await metric(node, "broker_limit_refusals_total", limit="connections") >= 1


async def test_connections_per_ip_use_forwarded_addresses_from_trusted_proxies_only() -> None:
    args = ["--max-connections-per-ip", "2", "--trusted-proxies", "127.0.0.0/8"]
    with NodeProcess(extra_args=args) as node:
        alice = {"additional_headers": {"X-Forwarded-For": "198.51.100.1"}}
        bob = {"additional_headers": {"X-Real-IP": "198.51.100.2"}}
        held = [await WireClient(node.url, **alice).__aenter__() for _ in range(2)]
        assert await refused_status(node.url, **alice) == 429
        assert await refused_status(node.url, **bob) is None
        for client in held:
            await client.close()
        assert await metric(node, "broker_limit_refusals_total", limit="connections_per_ip") == 1

    # Without --trusted-proxies the headers are ignored: every client is 127.0.0.1.
    with NodeProcess(extra_args=["--max-connections-per-ip", "2"]) as node:
        held = [
            await WireClient(
                node.url, additional_headers={"X-Forwarded-For": f"203.0.113.{n}"}
            ).__aenter__()
            for n in range(2)
        ]
        assert await refused_status(node.url, additional_headers={"X-Real-IP": "1.2.3.4"}) == 429
        for client in held:
            await client.close()


async def test_short_of_file_descriptors_the_node_sheds_half_open_sockets() -> None:
    # 128 descriptors: 150 silent sockets would lock everyone out without the socket budget.
    with NodeProcess(
        wrapper=["prlimit", "--nofile=128:128"], extra_args=["--handshake-timeout", "60"]
    ) as node:
        silent = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(150)]
        assert (await asyncio.to_thread(http_get, node.http + "/healthz", 5.0))[0] == 200
        a, b, channel = await pair(node.url)
        await a.send({"type": "message", "id": 50, "channelId": channel, "payload": 1})
        assert (await a.reply_to(50))["type"] == "channel_message_sent"
        await a.close()
        await b.close()
        for _, writer in silent:
            writer.close()
        assert await metric(node, "broker_limit_refusals_total", limit="file_descriptors") > 0
        # Logged, but at most once per interval however often it happened.
        assert 1 <= node.output().count("limit file_descriptors reached") <= 2
        assert_no_traceback(node)


# --- item 3: request and byte rates --------------------------------------------------------


async def test_over_the_request_rate_reading_pauses_and_every_request_succeeds() -> None:
    with NodeProcess(extra_args=["--max-requests-per-second", "200"]) as node:
        a, b, channel = await pair(node.url)
        started = time.monotonic()
        replies = []
        # Groups of 50: the node handles every frame of a read it has made, then pauses
        # reading for as long as the client is over its rate.
        for group in range(16):
            ids = range(100 + 50 * group, 150 + 50 * group)
            for n in ids:
                await a.send({"type": "message", "id": n, "channelId": channel, "payload": n})
            replies += [await a.reply_to(n, timeout=30) for n in ids]
        elapsed = time.monotonic() - started
        assert {reply["type"] for reply in replies} == {"channel_message_sent"}
        # A burst of 400, then 200 per second: 800 requests take about 2 s (a lower bound
        # only: a slower machine makes it longer, never shorter).
        assert elapsed >= 1.0
        assert await metric(node, "broker_limit_refusals_total", limit="requests_rate") > 0
        # Every message arrived, in order (read before closing: a client with unread frames
        # is slow to finish its closing handshake).
        received = [(await b.notification("channel_message"))["payload"] for _ in range(800)]
        assert received == list(range(100, 900))
        await a.close()
        await b.close()


async def test_over_the_byte_rate_reading_pauses() -> None:
    args = ["--max-bytes-per-second", "200000", "--max-message-size", "65536"]
    with NodeProcess(extra_args=args) as node:
        a, b, channel = await pair(node.url)
        started = time.monotonic()
        body = "x" * 50_000
        for n in range(16):
            await a.send({"type": "message", "id": 100 + n, "channelId": channel, "payload": body})
            assert (await a.reply_to(100 + n, timeout=30))["type"] == "channel_message_sent"
        # A burst of 400 kB, then 200 kB/s: 800 kB take about 2 s.
        assert time.monotonic() - started >= 1.0
        assert await metric(node, "broker_limit_refusals_total", limit="bytes_rate") > 0
        for _ in range(16):
            assert (await b.notification("channel_message"))["payload"] == body
        await a.close()
        await b.close()


# --- item 4: odd HTTP, the metrics listener -------------------------------------------------


@pytest.mark.parametrize(
    "requests",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + UPGRADE.encode() + b"\r\n",
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /healthz HTTP/1.0\r\n\r\n",
        b"BREW /pot HTCPCP/1.0\r\n\r\n",
    ],
)
async def test_pipelined_or_odd_requests_get_one_answer_and_a_clean_close(
    requests: bytes,
) -> None:
    with NodeProcess() as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(requests)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 ") and answer.count(b"HTTP/1.1 ") == 1
        if requests.startswith(b"GET /healthz"):
            assert answer.endswith(b"\r\n\r\nok\n")
        assert_no_traceback(node)


async def test_metrics_on_their_own_listener() -> None:
    from tests.support.ports import free_port

    metrics_port = free_port()
    args = ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    with NodeProcess(extra_args=args) as node:
        async with WireClient(node.url) as client:
            await client.register("r")
            status, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{metrics_port}/metrics"
            )
            assert status == 200 and "broker_connections 1.0" in body
            assert "broker_asyncio_tasks" in body and "process_open_fds" in body
        assert (await asyncio.to_thread(http_get, node.http + "/metrics"))[0] == 404
        assert (await asyncio.to_thread(http_get, node.http + "/healthz"))[0] == 200
        status, _ = await asyncio.to_thread(http_get, f"http://127.0.0.1:{metrics_port}/readyz")
        assert status == 200


# --- item 5: Origin allow-list ----------------------------------------------------------------


async def test_origins_outside_the_allow_list_get_403() -> None:
    args = ["--allowed-origins", "https://App.example.com/, https://other.example"]
    with NodeProcess(extra_args=args) as node:
        assert await refused_status(node.url, origin="https://evil.example") == 403
        assert await refused_status(node.url, origin="https://app.example.com") is None
        # Not a browser: no Origin header, no check.
        assert await refused_status(node.url) is None
        assert await metric(node, "broker_limit_refusals_total", limit="origin") == 1

    with NodeProcess() as node:
        # Off by default.
        assert await refused_status(node.url, origin="https://evil.example") is None


async def test_defaults_refuse_nothing_ordinary() -> None:
    with NodeProcess() as node:
        a, b, channel = await pair(node.url)
        await a.send(json.dumps({"type": "message", "id": 9, "channelId": channel, "payload": 1}))
        assert (await a.reply_to(9))["type"] == "channel_message_sent"
        await a.close()
        await b.close()
        _, body = await asyncio.to_thread(http_get, node.http + "/metrics")
        assert "broker_limit_refusals_total{" not in body

"""``channel_message_sent`` means the recipient's kernel took the frame (issue 11, item 4).

Before, a message was confirmed as soon as its frame entered the node's own write buffer: a
reader keeping up as fast as it could was closed as a slow consumer while its peer had a
few large messages in flight, and a slow reader lost messages whose senders had been told
they were sent. Now a sender's window is real flow control, and a reader that stops reading
is closed with 1008, the close frame reaching it, and only what never reached its socket
failed to the sender.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from tests.support.cluster import Cluster, fast_args
from tests.support.nodes import NodeProcess, metric
from tests.support.polling import wait_until
from tests.support.raw_ws import OP_CLOSE, OP_PING, OP_TEXT, RawClient, text
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow

NOT_DELIVERED = "Recipient not connected"


async def windowed_sender(
    sender: WireClient, channel: str, sizes: list[int], *, window: int
) -> dict[int, dict[str, Any]]:
    """Send messages of ``sizes`` bytes with at most ``window`` unanswered; every reply, by n."""
    assert sender.ws is not None
    credit = asyncio.Semaphore(window)
    first = sender.next_id
    sender.next_id += len(sizes)
    replies: dict[int, dict[str, Any]] = {}

    async def send_all() -> None:
        for n, size in enumerate(sizes):
            await credit.acquire()
            body = {"n": n, "pad": "x" * size}
            await sender.send(
                {"type": "message", "id": first + n, "channelId": channel, "payload": body}
            )

    async def collect() -> None:
        while len(replies) < len(sizes):
            frame = await sender.recv(timeout=60)
            if "replyTo" in frame:
                replies[frame["replyTo"] - first] = frame
                credit.release()

    async with asyncio.timeout(120):
        await asyncio.gather(send_all(), collect())
    return replies


async def channel_between(
    sender_url: str, reader: RawClient | WireClient
) -> tuple[WireClient, str]:
    sender = await WireClient(sender_url).__aenter__()
    await sender.register("sender")
    if isinstance(reader, RawClient):
        registered = await reader.request({"type": "register", "id": 1, "role": "reader"})
        target = registered["connectionId"]
    else:
        target = await reader.register("reader")
    channel = await sender.open(target)
    return sender, channel


async def has_metric(node: NodeProcess, name: str, value: float) -> bool:
    return await metric(node, name) >= value


async def raw_reader(port: int, *, receive_buffer: int) -> RawClient:
    sock = socket.socket()
    # Set before connecting, so that the window it advertises is small from the start.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await RawClient.connect(port, sock=sock)


@pytest.mark.parametrize(
    ("where", "size", "count", "window"),
    [
        ("same node", 1_000_000, 60, 3),
        ("across nodes", 1_000_000, 60, 3),
        ("same node", 100 * 1024, 400, 64),
        ("across nodes", 100 * 1024, 400, 64),
    ],
)
async def test_a_reader_keeping_up_is_never_a_slow_consumer(
    cluster: Cluster, where: str, size: int, count: int, window: int
) -> None:
    # Confirmations of megabyte frames may take more than the fast 1 s on a loaded machine.
    nodes = await cluster.start(
        1 if where == "same node" else 2, args=fast_args(request_timeout=5.0)
    )
    reader = await cluster.client(nodes[-1])
    sender, channel = await channel_between(nodes[0].url, reader)
    await reader.notification("incoming_channel")
    sizes = [size] * count

    async def read_all() -> list[int]:
        return [
            (await reader.notification("channel_message", timeout=30))["payload"]["n"]
            for _ in sizes
        ]

    reading = asyncio.create_task(read_all())
    replies = await windowed_sender(sender, channel, sizes, window=window)
    assert {r["type"] for r in replies.values()} == {"channel_message_sent"}
    assert await reading == list(range(len(sizes)))
    await sender.close()


async def test_a_slow_reader_gets_every_confirmed_message(cluster: Cluster) -> None:
    [node] = await cluster.start(1)
    reader = await raw_reader(node.port, receive_buffer=64 * 1024)
    sender, channel = await channel_between(node.url, reader)
    assert (await reader.json())["type"] == "incoming_channel"
    # Far more than the kernel's buffers and the node's outbound bound hold together.
    sizes = [100 * 1024] * 150
    received: list[int] = []
    close_code: int | None = None

    async def read_slowly() -> None:
        # About 2 MB/s, slower than the sender: a frame of 100 KB every 50 ms.
        nonlocal close_code
        while len(received) < len(sizes):
            opcode, payload = await reader.frame(timeout=30)
            if opcode == OP_CLOSE:
                close_code = int.from_bytes(payload[:2], "big")
                return
            if opcode == OP_PING:
                continue
            assert opcode == OP_TEXT
            received.append(json.loads(payload)["payload"]["n"])
            await asyncio.sleep(0.05)  # reading slowly is the behaviour under test

    reading = asyncio.create_task(read_slowly())
    replies = await windowed_sender(sender, channel, sizes, window=64)
    await reading
    sent = sorted(n for n, r in replies.items() if r["type"] == "channel_message_sent")
    assert set(sent) <= set(received)
    # With its window as flow control, the sender cannot make a reading client a slow
    # consumer: everything arrives.
    assert close_code is None
    assert received == list(range(len(sizes)))
    await reader.aclose()
    await sender.close()


async def test_a_reader_that_stops_is_closed_and_told_so(cluster: Cluster) -> None:
    args = [*fast_args(), "--slow-consumer-timeout", "1"]
    [node] = await cluster.start(1, args=args)
    reader = await raw_reader(node.port, receive_buffer=32 * 1024)
    sender, channel = await channel_between(node.url, reader)
    assert (await reader.json())["type"] == "incoming_channel"
    # Much more than the socket buffers hold; the reader reads nothing meanwhile.
    sizes = [100 * 1024] * 60
    sending = asyncio.create_task(windowed_sender(sender, channel, sizes, window=64))
    await wait_until(
        lambda: has_metric(node, "broker_slow_consumer_closes_total", 1.0),
        timeout=15,
        message="the reader closed as a slow consumer",
    )
    # It reads again, within the closing handshake's time: the frames the kernel took, then
    # the 1008 close frame.
    received: list[int] = []
    while True:
        opcode, payload = await reader.frame(timeout=10)
        if opcode == OP_CLOSE:
            assert int.from_bytes(payload[:2], "big") == 1008
            break
        if opcode == OP_PING:
            continue
        received.append(json.loads(payload)["payload"]["n"])
    replies = await sending
    outcomes = {r.get("error", r["type"]) for r in replies.values()}
    assert NOT_DELIVERED in outcomes, outcomes
    sent = {n for n, r in replies.items() if r["type"] == "channel_message_sent"}
    failed = {n for n, r in replies.items() if r.get("error") == NOT_DELIVERED}
    assert sent <= set(received)
    assert not failed & set(received)
    assert received == sorted(received)
    await reader.aclose()
    await sender.close()


async def test_a_standalone_node_confirms_what_reached_the_socket() -> None:
    # Standalone: the same rule holds without Redis.
    with NodeProcess() as node:
        reader = await raw_reader(node.port, receive_buffer=64 * 1024)
        sender, channel = await channel_between(node.url, reader)
        assert (await reader.json())["type"] == "incoming_channel"
        await reader.write(text({"type": "list_by_role", "id": 2, "role": "reader"}))
        assert (await reader.json())["replyTo"] == 2
        replies = await windowed_sender(sender, channel, [1000] * 50, window=8)
        assert {r["type"] for r in replies.values()} == {"channel_message_sent"}
        received = [json.loads((await reader.frame())[1])["payload"]["n"] for _ in range(50)]
        assert received == list(range(50))
        await reader.aclose()
        await sender.close()


async def test_a_message_over_the_byte_window_on_its_own_leaves_its_sender_read() -> None:
    """One message larger than ``--max-unconfirmed-bytes`` stops the node reading its sender
    until it is confirmed; on one node that may be before the pause itself was carried out,
    and reading must still resume: the next message is answered too."""
    with NodeProcess(extra_args=["--max-unconfirmed-bytes", "64"]) as node:
        async with WireClient(node.url) as reader:
            sender, channel = await channel_between(node.url, reader)
            await reader.notification("incoming_channel")
            for n in range(3):
                request_id = 100 + n
                payload = {"n": n, "pad": "x" * 200}
                await sender.send(
                    {"type": "message", "id": request_id, "channelId": channel, "payload": payload}
                )
                reply = await sender.reply_to(request_id)
                assert reply["type"] == "channel_message_sent"
                assert (await reader.notification("channel_message"))["payload"] == payload
            await sender.close()

"""SIGTERM under load (issue 11, item 7): every request the draining node received gets its one
reply before the node closes the connection with 1001.

A client on the leaving node sends about 2,000 messages a second to a peer on the other node.
Requests still on the wire when the node stops reading are never read: they get no reply and
have no effect. So, after the close: no request has two replies, every message that reached the
peer was confirmed to its sender, every request up to the last one answered was answered (the
node answered all it read), and the unanswered tail never reached the peer.
"""

from __future__ import annotations

import asyncio
import json
import signal

import pytest
from websockets.exceptions import ConnectionClosed

from tests.integration.helpers import frames_for
from tests.support.cluster import DRAIN_TIMEOUT, Cluster
from tests.support.wire import WireClient

pytestmark = pytest.mark.slow

RATE = 2_000  # messages a second
TICK = 0.01


async def _send_steadily(
    client: WireClient, channel: str, stop: asyncio.Event, busy: asyncio.Event
) -> list[int]:
    """Messages at RATE until the connection closes; the ids sent. ``busy`` is set right after
    a burst once a second's worth went out: the node is then in the middle of its work."""
    assert client.ws is not None
    sent: list[int] = []
    per_tick = int(RATE * TICK)
    loop = asyncio.get_running_loop()
    next_tick = loop.time()
    try:
        while not stop.is_set():
            for _ in range(per_tick):
                request_id = client.next_id
                client.next_id += 1
                frame = {"type": "message", "id": request_id, "channelId": channel}
                await client.ws.send(json.dumps({**frame, "payload": {"n": request_id}}))
                sent.append(request_id)
            if len(sent) >= RATE:
                busy.set()
            next_tick += TICK
            await asyncio.sleep(max(0.0, next_tick - loop.time()))  # paced load: the behaviour
    except ConnectionClosed:
        pass
    return sent


async def _read_until_closed(client: WireClient) -> tuple[list[dict[str, object]], int | None]:
    assert client.ws is not None
    frames = []
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT * 3):
            while True:
                frames.append(json.loads(await client.ws.recv()))
    except ConnectionClosed as exc:
        return frames, exc.rcvd.code if exc.rcvd is not None else None


async def test_sigterm_under_load_answers_every_request_it_read(cluster: Cluster) -> None:
    leaving, staying = await cluster.start(2)
    sender = await cluster.client(leaving, "sender")
    receiver = await cluster.client(staying, "receiver")
    assert receiver.connection_id is not None
    channel = await sender.open(receiver.connection_id)
    await receiver.notification("incoming_channel")

    stop, busy = asyncio.Event(), asyncio.Event()
    sending = asyncio.create_task(_send_steadily(sender, channel, stop, busy))
    reading = asyncio.create_task(_read_until_closed(sender))
    await busy.wait()
    assert leaving.process is not None
    leaving.process.send_signal(signal.SIGTERM)
    frames, code = await reading
    stop.set()
    sent = await sending
    assert code == 1001

    # Everything the peer receives from now on (its node sent it before the channel closed).
    await frames_for(receiver, 3.0)  # kept in receiver.received with the earlier ones
    delivered = [
        int(f["payload"]["n"])
        for f in receiver.received
        if f.get("type") == "channel_message" and f.get("channelId") == channel
    ]
    replies: dict[int, list[str]] = {}
    for frame in frames:
        if "replyTo" in frame:
            replies.setdefault(int(str(frame["replyTo"])), []).append(str(frame["type"]))

    twice = {rid: kinds for rid, kinds in replies.items() if len(kinds) > 1}
    assert twice == {}
    unconfirmed = [n for n in delivered if replies.get(n) != ["channel_message_sent"]]
    assert unconfirmed == [], f"{len(unconfirmed)} delivered without a confirmation"
    last_answered = max(replies)
    gaps = [rid for rid in sent if rid <= last_answered and rid not in replies]
    assert gaps == [], f"{len(gaps)} requests read by the node went unanswered: {gaps[:10]}"
    tail = {rid for rid in sent if rid > last_answered}
    assert not tail & set(delivered), "an unanswered request had an effect"
    assert len(replies) >= RATE // 2
    process = leaving.process
    assert await asyncio.to_thread(process.wait, DRAIN_TIMEOUT) == 0
    assert "still unanswered" not in leaving.output()
    assert "drain timed out" not in leaving.output()

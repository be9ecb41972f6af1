"""Hostile frames against real node processes: deep nesting, odd valid JSON, poisoned envelopes.

Issue 15 item 2 and issue 11 item 3: the sending node refuses what no node can carry, and an
envelope that cannot be decoded fails alone on the receiving node.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import msgspec
import pytest
from redis.asyncio import Redis

from broker_node.core.envelopes import Deliver, encode_batch
from shared.ids import ChannelId, ConnectionId, NodeId
from tests.integration.helpers import KEYS
from tests.support.cluster import Cluster
from tests.support.nodes import NodeProcess, http_get, metric
from tests.support.polling import wait_until
from tests.support.wire import WireClient, pair


@pytest.fixture
def node() -> Iterator[NodeProcess]:
    with NodeProcess() as running:
        yield running


def message_frame(channel: str, payload: str, request_id: int = 7) -> str:
    # The payload is spliced in as raw text: json.dumps would refuse or rewrite these values.
    return f'{{"type":"message","id":{request_id},"channelId":"{channel}","payload":{payload}}}'


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def assert_no_traceback(node: NodeProcess) -> None:
    log = node.output()
    assert "Traceback" not in log and "Fatal error" not in log, log[-4000:]


@pytest.mark.parametrize("depth", [65, 200, 985, 1000, 100_000])
async def test_a_deeply_nested_payload_is_refused_and_the_connection_serves_on(
    node: NodeProcess, depth: int
) -> None:
    a, b, channel = await pair(node.url)
    await a.send(message_frame(channel, nested(depth)))
    if depth <= 200:
        reply = await a.reply_to(7)
        assert reply["type"] == "channel_message_failed"
        assert "nested deeper than 64" in reply["error"]
        # Nothing reached the recipient, and the sender's connection still works.
        await a.send(message_frame(channel, nested(5), request_id=8))
        assert (await a.reply_to(8))["type"] == "channel_message_sent"
        assert (await b.notification("channel_message"))["payload"] == json.loads(nested(5))
    else:
        # Too deep to read even the request's id safely: a close with the reason.
        code, reason = await a.closed_with()
        assert code == 1003 and reason is not None and "nested deeper than 64" in reason
    await a.close()
    await b.close()
    _, body = await asyncio.to_thread(http_get, node.http + "/metrics")
    assert 'broker_bad_frames_total{kind="too_deep"} 1.0' in body
    assert_no_traceback(node)


async def test_the_nesting_limit_is_configurable() -> None:
    with NodeProcess(extra_args=["--max-json-depth", "4"]) as small:
        a, b, channel = await pair(small.url)
        await a.send(message_frame(channel, nested(3)))
        assert (await a.reply_to(7))["type"] == "channel_message_sent"
        await a.send(message_frame(channel, nested(4), request_id=8))
        assert "nested deeper than 4" in (await a.reply_to(8))["error"]
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "payload",
    [
        "1e400",
        "-1e400",
        "1" * 4301,
        "-" + "9" * 5000,
        "1e-400",
        '{"big": 123456789012345678901234567890}',
    ],
)
async def test_valid_json_numbers_are_carried_byte_for_byte(
    node: NodeProcess, payload: str
) -> None:
    a, b, channel = await pair(node.url)
    await a.send(message_frame(channel, payload))
    assert (await a.reply_to(7))["type"] == "channel_message_sent"
    # The recipient's frame holds the payload's bytes as sent (read before any JSON parsing).
    assert b.ws is not None
    raw = await asyncio.wait_for(b.ws.recv(), 5)
    assert f'"payload":{payload}' in str(raw)
    await a.close()
    await b.close()
    assert_no_traceback(node)


@pytest.mark.parametrize("payload", ['"\\ud800"', '["a\\udfff"]', '"\\ud800\\u0041"'])
async def test_an_unpaired_surrogate_is_refused_with_a_reason_not_closed(
    node: NodeProcess, payload: str
) -> None:
    a, b, channel = await pair(node.url)
    await a.send(message_frame(channel, payload))
    reply = await a.reply_to(7)
    assert reply["type"] == "channel_message_failed", reply
    assert "surrogate" in reply["error"]
    await a.send(message_frame(channel, '"fine"', request_id=8))
    assert (await a.reply_to(8))["type"] == "channel_message_sent"
    await a.close()
    await b.close()
    assert_no_traceback(node)


@pytest.mark.parametrize("frame", ["1e400", "1" * 4301, '"\\ud800"'])
async def test_valid_json_that_is_not_an_object_gets_the_error_reply(
    node: NodeProcess, frame: str
) -> None:
    async with WireClient(node.url) as client:
        await client.send(frame)
        reply = await client.recv()
        assert reply["type"] == "error" and "JSON object" in reply["error"]
    assert_no_traceback(node)


async def test_a_huge_number_as_the_id_is_an_unusable_id(node: NodeProcess) -> None:
    async with WireClient(node.url) as client:
        await client.send('{"type":"register","id":1e400,"role":"r"}')
        reply = await client.recv()
        assert reply["type"] == "error" and "id" in reply["error"]
    assert_no_traceback(node)


# --- issue 11 item 3: a poisoned envelope fails alone -------------------------------------


async def test_a_poisoned_envelope_fails_alone_among_healthy_traffic(cluster: Cluster) -> None:
    node0, node1 = await cluster.start(2)
    sender = await cluster.client(node0, "sender")
    recipient = await cluster.client(node1, "recipient")
    recipient_id = recipient.connection_id
    assert recipient_id is not None
    channel = await sender.open(recipient_id)
    await recipient.notification("incoming_channel")

    # A client of node0 cannot get a 985-deep payload onto the bus at all.
    await sender.send(message_frame(channel, nested(985), request_id=100))
    code, _ = await sender.closed_with()
    assert code == 1003
    sender = await cluster.client(node0, "sender")
    channel = await sender.open(recipient_id)
    await recipient.notification("incoming_channel")

    # A batch from a (buggy or older) node with one undecodable envelope between two healthy
    # deliveries, published straight into node1's inbox while clients keep talking.
    fake_node = NodeId("fake-node")
    redis = Redis.from_url(cluster.redis.url)

    def deliver(seq: int, payload: bytes) -> Deliver:
        return Deliver(
            seq=seq,
            sender_node=fake_node,
            channel_id=ChannelId(channel),
            recipient=ConnectionId(recipient_id),
            payload=msgspec.Raw(payload),
        )

    def poisoned(round_: int) -> bytes:
        # Seqs increase per sending node, as a real node's do.
        seq = 10 * (round_ + 1)
        return encode_batch(
            [
                deliver(seq, b'"before"'),
                deliver(seq + 1, nested(5000).encode()),
                deliver(seq + 2, b'"after"'),
            ]
        )

    sent = 0
    for round_ in range(3):
        for n in range(20):
            await sender.send(
                message_frame(channel, json.dumps([round_, n]), request_id=1000 + sent)
            )
            sent += 1
        await redis.publish(KEYS.inbox(NodeId(node1.effective_id())), poisoned(round_))
    for n in range(sent):
        assert (await sender.reply_to(1000 + n, timeout=10))["type"] == "channel_message_sent"

    payloads: list[object] = []
    while len(payloads) < sent + 6:
        payloads.append((await recipient.notification("channel_message", timeout=10))["payload"])
    healthy = [p for p in payloads if isinstance(p, list)]
    assert healthy == [[r, n] for r in range(3) for n in range(20)]
    assert payloads.count("before") == 3 and payloads.count("after") == 3

    async def dropped_counted() -> bool:
        return await metric(node1, "broker_bus_envelopes_dropped_total") == 3

    await wait_until(dropped_counted, timeout=10, message="three dropped envelopes counted")
    assert_no_traceback(node1)
    await redis.aclose()

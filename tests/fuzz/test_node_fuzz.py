"""A node against generated frames: every frame is answered or the connection closed with a
code from the bad-input table, nothing is ever logged as an error, and the node serves on.

Driven in this process (many examples, fast) and against a real ``broker-node`` process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker_node.config import Settings
from broker_node.node import BrokerNode
from shared.ids import NodeId
from tests.fuzz.strategies import frames, request_frames
from tests.support.nodes import NodeProcess
from tests.support.raw_ws import OP_BINARY, OP_CLOSE, OP_TEXT, RawClient, client_frame, text

#: Close codes of the bad-input table (and 1002 for frames websockets refuses).
BAD_INPUT_CLOSES = {1002, 1003, 1007, 1009}


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Target:
    port: int
    peer: RawClient
    peer_id: str


async def setup_peer(port: int) -> Target:
    peer = await RawClient.connect(port)
    reply = await peer.request({"type": "register", "id": 1, "role": "peer"})
    return Target(port, peer, reply["connectionId"])


async def exercise(target: Target, data: st.DataObject) -> None:
    client = await RawClient.connect(target.port)
    try:
        await client.request({"type": "register", "id": 1, "role": "fuzz"})
        opened = await client.request({"type": "open", "id": 2, "targetId": target.peer_id})
        channel = opened["channelId"]
        batch = data.draw(
            st.lists(
                st.one_of(frames, request_frames(channel_id=channel, target_id=target.peer_id)),
                min_size=1,
                max_size=4,
            )
        )
        for frame in batch:
            if isinstance(frame, bytes):
                wire = client_frame(frame, opcode=OP_BINARY)
            else:
                wire = text(frame.encode("utf-8", "surrogatepass"))
            await client.write(wire)
        # A last request: answered (the connection survived every frame) or a clean close.
        await client.write(text({"type": "close", "id": 999_999, "channelId": channel}))
        while True:
            try:
                opcode, payload = await client.frame(timeout=10)
            except asyncio.IncompleteReadError:
                pytest.fail("TCP closed without a close frame")
            if opcode == OP_CLOSE:
                assert int.from_bytes(payload[:2], "big") in BAD_INPUT_CLOSES, payload
                break
            assert opcode == OP_TEXT
            if b'"replyTo":999999' in payload:
                break
    finally:
        await client.aclose()
    # The node still routes for everyone else.
    await target.peer.write(text({"type": "list_by_role", "id": 3, "role": "peer"}))
    while True:
        opcode, payload = await target.peer.frame(timeout=10)
        if opcode == OP_TEXT and b'"replyTo":3,' in payload:
            assert target.peer_id.encode() in payload
            break


@pytest.fixture(scope="module")
def in_process() -> Iterator[tuple[asyncio.Runner, Target, ErrorRecords]]:
    errors = ErrorRecords()
    logging.getLogger().addHandler(errors)
    with asyncio.Runner() as runner:
        node = BrokerNode(
            Settings(host="127.0.0.1", port=0, node_id=NodeId("fuzz"), ping_interval=0)
        )
        runner.run(node.start())
        target = runner.run(setup_peer(node.port))
        try:
            yield runner, target, errors
        finally:
            runner.run(target.peer.aclose())
            runner.run(node.stop())
            logging.getLogger().removeHandler(errors)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_in_process_node(
    in_process: tuple[asyncio.Runner, Target, ErrorRecords], data: st.DataObject
) -> None:
    runner, target, errors = in_process
    runner.run(exercise(target, data))
    assert not errors.records, [record.getMessage() for record in errors.records]


@pytest.fixture(scope="module")
def node_process() -> Iterator[tuple[asyncio.Runner, Target, NodeProcess]]:
    with NodeProcess(extra_args=["--ping-interval", "0"]) as node, asyncio.Runner() as runner:
        target = runner.run(setup_peer(node.port))
        yield runner, target, node
        runner.run(target.peer.aclose())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_node_process(
    node_process: tuple[asyncio.Runner, Target, NodeProcess], data: st.DataObject
) -> None:
    runner, target, node = node_process
    runner.run(exercise(target, data))
    log = node.output()
    assert "Traceback" not in log and "Fatal error" not in log and " ERROR " not in log, log[-3000:]

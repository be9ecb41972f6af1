"""The SDK's resume against a scripted broker: drops mid-stream, replays, failures, resyncs.

A real WebSocket server grants resumable sessions; the test writes every other frame and
decides every drop, so each rule of the shell is exercised on cue (the node's own resume
is tested with it, in the node's suites).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

import client.client
import client.session
from client import BrokerClient, Channel, ChannelClosed, CloseReason, ConnectionLost
from tests.client.helpers import client_tasks
from tests.client.test_scripted import ME, PEER, ScriptedBroker
from tests.support.polling import wait_until

OTHER = "55555555-5555-4555-8555-555555555555"
CHANNEL = "33333333-3333-4333-8333-333333333333"
NEW_CHANNEL = "44444444-4444-4444-8444-444444444444"


class ResumableBroker(ScriptedBroker):
    """Grants resumable sessions to ``register``; records acks; queues every other frame.

    Frame ids increase across connections, as a session's do.
    """

    def __init__(self, *, window: int = 120) -> None:
        super().__init__()
        self.window = window
        self.registers: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        #: Drop every connection that asks to resume (a node that dies under each attempt).
        self.drop_resumes = False

    @property
    def last_id(self) -> int:
        """The id of the last frame sent."""
        return self.next_id

    async def handler(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.connections += 1
        async for raw in ws:
            message = json.loads(raw)
            if message["type"] == "register":
                self.registers.append(message)
                await self.send(
                    type="registered",
                    replyTo=message["id"],
                    connectionId=ME,
                    resumeToken=f"token-{len(self.registers)}",
                    resumeWindow=self.window,
                )
            elif message["type"] == "ack":
                self.acks.append(message)
            elif message["type"] == "resume" and self.drop_resumes:
                ws.transport.abort()
            else:
                await self.frames.put(message)

    def drop(self) -> None:
        """The connection breaks without a close frame (a network cut, a killed node)."""
        assert self.ws is not None
        self.ws.transport.abort()

    async def resumed(self, resume: dict[str, Any], **fields: Any) -> None:
        await self.send(
            type="resumed",
            replyTo=resume["id"],
            connectionId=ME,
            resumeToken=f"token-{resume['id']}",
            resumeWindow=self.window,
            **fields,
        )

    async def open_channel_to_client(self, client: BrokerClient, channel_id: str) -> Channel:
        await self.send(type="incoming_channel", **{"from": PEER}, channelId=channel_id)
        async with asyncio.timeout(5):
            return await anext(aiter(client.incoming_channels()))


@pytest.fixture
async def broker() -> AsyncIterator[ResumableBroker]:
    scripted = ResumableBroker()
    async with serve(scripted.handler, "127.0.0.1", 0) as server:
        scripted.server = server
        yield scripted


def quick(url: str, **options: Any) -> BrokerClient:
    """A client that retries at once (the backoff is tested in test_backoff)."""
    return BrokerClient(url, "me", backoff_base=0.01, backoff_cap=0.05, **options)


# --- asking for resume --------------------------------------------------------------------


async def test_resume_is_asked_for_by_default_and_not_with_resume_false(
    broker: ResumableBroker,
) -> None:
    async with quick(broker.url) as client:
        assert client.resumable
    async with quick(broker.url, resume=False) as client:
        assert not client.resumable
    assert [r.get("resume") for r in broker.registers] == [True, None]
    assert client_tasks() == set()


async def test_acks_report_the_last_frame_and_the_seq_processed_per_channel(
    broker: ResumableBroker,
) -> None:
    async with quick(broker.url) as client:
        await wait_until(
            lambda: bool(broker.acks), timeout=5.0, message="bool(broker.acks)"
        )  # the registered frame, within 100 ms
        assert broker.acks[0]["lastId"] == 1
        channel = await broker.open_channel_to_client(client, CHANNEL)
        for seq in range(1, 41):
            await broker.send(type="channel_message", channelId=CHANNEL, payload=seq, seq=seq)
        await wait_until(
            lambda: broker.acks[-1]["lastId"] == broker.last_id,
            timeout=5.0,
            message='broker.acks[-1]["lastId"] == broker.last_id',
        )
        assert broker.acks[-1]["channels"] == {CHANNEL: 40}
        assert [await anext(aiter(channel)) for _ in range(40)] == list(range(1, 41))


# --- a drop, then a resume that replays ---------------------------------------------------


async def test_a_dropped_connection_resumes_and_everything_carries_on(
    broker: ResumableBroker,
) -> None:
    resumed: list[bool] = []
    disconnected: list[bool] = []
    async with quick(
        broker.url,
        token=lambda: "jwt",
        on_resumed=resumed.append,
        on_disconnected=lambda: disconnected.append(True),
    ) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        payloads = aiter(channel)
        await broker.send(type="channel_message", channelId=CHANNEL, payload="before", seq=1)
        assert await anext(payloads) == "before"
        listing = asyncio.create_task(client.list_by_role("peer"))
        read = await broker.expect("list_by_role")
        sending = asyncio.create_task(channel.send("across"))
        unread = await broker.expect("message")
        assert unread["seq"] == 1

        broker.drop()
        resume = await broker.expect("resume")
        assert resume == {
            "type": "resume",
            "id": resume["id"],
            "connectionId": ME,
            "resumeToken": "token-1",
            "lastId": broker.last_id,
            "token": "jwt",
            "channels": {CHANNEL: 1},
        }
        assert not client.connected
        assert client.connection_id == ME  # the session keeps its id while it resumes
        # The replay: the reply to what the broker read, then the peer's message sent again.
        await broker.send(type="connections", replyTo=read["id"], ids=[PEER])
        await broker.send(type="channel_message", channelId=CHANNEL, payload="before", seq=1)
        await broker.resumed(resume, complete=True, lastRequestId=read["id"])
        again = await broker.expect("message")  # never read: sent again, same seq
        assert (again["seq"], again["payload"]) == (1, "across")
        assert again["id"] > resume["id"]
        await broker.send(type="channel_message_sent", replyTo=again["id"], channelId=CHANNEL)
        async with asyncio.timeout(5):
            await sending
            assert await listing == [PEER]
        await broker.send(type="channel_message", channelId=CHANNEL, payload="after", seq=2)
        async with asyncio.timeout(5):
            assert await anext(payloads) == "after"  # the duplicate was dropped
        assert resumed == [True]
        assert client.connected
        assert not channel.closed
    assert disconnected == [True]  # close() only
    assert client_tasks() == set()


async def test_a_draining_node_sends_the_client_to_resume_at_once(
    broker: ResumableBroker,
) -> None:
    resumed = asyncio.Event()
    # A backoff that would wait many minutes: only an immediate resume passes.
    async with BrokerClient(
        broker.url, "me", backoff_base=600, backoff_cap=600, on_resumed=lambda _: resumed.set()
    ):
        assert broker.ws is not None
        await broker.ws.close(4100, "Resume elsewhere")
        resume = await broker.expect("resume")
        await broker.resumed(resume, complete=True, lastRequestId=1)
        async with asyncio.timeout(5):
            await resumed.wait()


async def test_request_timeouts_stop_while_detached(broker: ResumableBroker) -> None:
    async with quick(broker.url, request_timeout=0.3) as client:
        listing = asyncio.create_task(client.list_by_role("peer"))
        sent = await broker.expect("list_by_role")
        broker.drop()
        resume = await broker.expect("resume")
        # The scenario itself, not a synchronisation: detached for longer than the timeout.
        await asyncio.sleep(0.6)
        await broker.resumed(resume, complete=True, lastRequestId=sent["id"] - 1)
        again = await broker.expect("list_by_role")
        await broker.send(type="connections", replyTo=again["id"], ids=[PEER])
        async with asyncio.timeout(5):
            assert await listing == [PEER]


async def test_a_resume_nobody_answers_is_tried_again_on_a_new_connection(
    broker: ResumableBroker,
) -> None:
    async with quick(broker.url, connect_timeout=0.3):
        broker.drop()
        unanswered = await broker.expect("resume")
        second = await broker.expect("resume")
        assert second["resumeToken"] == unanswered["resumeToken"] == "token-1"
        assert broker.connections == 3
        await broker.resumed(second, complete=True, lastRequestId=1)


# --- the node that held the session was lost -----------------------------------------------


async def test_complete_false_reconciles_channels_and_resends_unacked_messages(
    broker: ResumableBroker,
) -> None:
    resumed: list[bool] = []
    async with quick(broker.url, on_resumed=resumed.append) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        first = asyncio.create_task(channel.send("confirmed, not acked"))
        sent = await broker.expect("message")
        await broker.send(type="channel_message_sent", replyTo=sent["id"], channelId=CHANNEL)
        await first
        second = asyncio.create_task(channel.send("unconfirmed"))
        await broker.expect("message")
        opening = asyncio.create_task(client.open_channel(OTHER))
        await broker.expect("open")

        broker.drop()
        resume = await broker.expect("resume")
        await broker.resumed(
            resume,
            complete=False,
            channels=[
                {"channelId": CHANNEL, "peerId": PEER},
                {"channelId": NEW_CHANNEL, "peerId": OTHER},
            ],
        )
        with pytest.raises(ConnectionLost, match="unknown"):
            await opening
        again = [await broker.expect("message"), await broker.expect("message")]
        assert [(m["seq"], m["payload"]) for m in again] == [
            (1, "confirmed, not acked"),
            (2, "unconfirmed"),
        ]
        await broker.send(type="channel_message_sent", replyTo=again[1]["id"], channelId=CHANNEL)
        async with asyncio.timeout(5):
            await second
            incoming = await anext(aiter(client.incoming_channels()))
        assert (incoming.channel_id, incoming.peer_id) == (NEW_CHANNEL, OTHER)
        assert resumed == [False]


async def test_resync_and_retryable_failures_resend_and_send_does_not_fail(
    broker: ResumableBroker,
) -> None:
    async with quick(broker.url) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        sending = asyncio.create_task(channel.send("a"))
        first = await broker.expect("message")
        await broker.send(
            type="channel_message_failed",
            replyTo=first["id"],
            channelId=CHANNEL,
            error="Recipient's node was lost",
        )
        again = await broker.expect("message")
        assert (again["seq"], again["payload"]) == (1, "a")
        await broker.send(type="channel_message_sent", replyTo=again["id"], channelId=CHANNEL)
        async with asyncio.timeout(5):
            await sending
        await broker.send(type="channel_resync", channelId=CHANNEL, lastSeq=0)
        resync = await broker.expect("message")
        assert (resync["seq"], resync["payload"]) == (1, "a")


async def test_a_message_sent_again_waits_a_full_timeout_for_its_new_answer(
    broker: ResumableBroker,
) -> None:
    async with quick(broker.url, request_timeout=0.5) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        sending = asyncio.create_task(channel.send("slow"))
        first = await broker.expect("message")
        # The scenario itself: each answer comes late, but within a timeout of its sending.
        await asyncio.sleep(0.35)
        await broker.send(
            type="channel_message_failed",
            replyTo=first["id"],
            channelId=CHANNEL,
            error="Delivery not confirmed in time",
        )
        again = await broker.expect("message")
        await asyncio.sleep(0.35)
        await broker.send(type="channel_message_sent", replyTo=again["id"], channelId=CHANNEL)
        async with asyncio.timeout(5):
            await sending  # no RequestTimeout: 0.7 s in all, 0.35 s per transmission


async def test_the_safety_net_resends_what_the_peer_never_acknowledged(
    broker: ResumableBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real period is 5 s, checked every second; the rule is the same, faster.
    monkeypatch.setattr(client.client, "TICK", 0.02)
    monkeypatch.setattr(client.session, "RESEND_AFTER", 0.1)
    async with quick(broker.url) as sdk:
        channel = await broker.open_channel_to_client(sdk, CHANNEL)
        sending = asyncio.create_task(channel.send("lost on the way"))
        first = await broker.expect("message")
        await broker.send(type="channel_message_sent", replyTo=first["id"], channelId=CHANNEL)
        await sending
        again = await broker.expect("message")  # no channel_acked came
        assert (again["seq"], again["payload"]) == (1, "lost on the way")
        await broker.send(type="channel_acked", channelId=CHANNEL, seq=1)


async def test_a_full_channel_makes_send_wait_for_channel_acked(broker: ResumableBroker) -> None:
    async with quick(broker.url, max_unacked_messages=2) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        for n in range(2):
            sending = asyncio.create_task(channel.send(n))
            request = await broker.expect("message")
            await broker.send(type="channel_message_sent", replyTo=request["id"], channelId=CHANNEL)
            await sending
        blocked = asyncio.create_task(channel.send(2))
        listing = asyncio.create_task(client.list_by_role("r"))
        # The blocked send wrote nothing: the next frame is the listing made after it.
        await broker.expect("list_by_role")
        assert not blocked.done()
        await broker.send(type="channel_acked", channelId=CHANNEL, seq=1)
        third = await broker.expect("message")
        assert third["seq"] == 3
        listing.cancel()
        blocked.cancel()


async def test_a_send_blocked_by_flow_control_ends_when_the_channel_closes(
    broker: ResumableBroker,
) -> None:
    async with quick(broker.url, max_unacked_messages=1) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        sending = asyncio.create_task(channel.send(0))
        await broker.expect("message")
        blocked = asyncio.create_task(channel.send(1))
        await broker.send(type="channel_closed_notification", channelId=CHANNEL)
        with pytest.raises(ChannelClosed):
            await blocked
        sending.cancel()


# --- when the session is lost ----------------------------------------------------------------


async def test_resume_failed_loses_the_session_and_a_maintained_client_registers_anew(
    broker: ResumableBroker,
) -> None:
    said: list[str] = []
    async with quick(
        broker.url,
        maintain_connection=True,
        on_session_lost=lambda reason: said.append(f"lost: {reason}"),
        on_disconnected=lambda: said.append("disconnected"),
        on_connected=lambda: said.append("connected"),
    ) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        sending = asyncio.create_task(channel.send("x"))
        await broker.expect("message")
        broker.drop()
        resume = await broker.expect("resume")
        await broker.send(type="resume_failed", replyTo=resume["id"], error="Resume window expired")
        with pytest.raises(ConnectionLost):
            await sending
        assert channel.close_reason is CloseReason.CONNECTION
        await wait_until(
            lambda: said[-1] == "connected", timeout=5.0, message='said[-1] == "connected"'
        )
        assert said == [
            "connected",
            "lost: Resume window expired",
            "disconnected",
            "connected",
        ]
        assert len(broker.registers) == 2
    assert client_tasks() == set()


async def test_a_slow_consumer_close_ends_the_session_without_a_resume(
    broker: ResumableBroker,
) -> None:
    lost: list[str] = []
    connected = asyncio.Event()
    async with quick(
        broker.url,
        maintain_connection=True,
        on_session_lost=lost.append,
        on_connected=connected.set,
    ):
        connected.clear()
        assert broker.ws is not None
        await broker.ws.close(1008, "slow consumer")
        async with asyncio.timeout(5):
            await connected.wait()
        assert lost == ["The broker closed the connection with code 1008"]
        assert broker.frames.empty()  # no resume was tried
        assert len(broker.registers) == 2


async def test_the_window_passes_while_no_node_answers(broker: ResumableBroker) -> None:
    broker.window = 1
    lost = asyncio.Event()
    async with quick(broker.url, on_session_lost=lambda _: lost.set()) as client:
        channel = await broker.open_channel_to_client(client, CHANNEL)
        assert broker.server is not None
        broker.server.close()  # closes our connection too (1001) and accepts no other
        async with asyncio.timeout(10):
            await lost.wait()
        assert channel.close_reason is CloseReason.CONNECTION
        assert not client.connected
        assert client.connection_id is None
        async with asyncio.timeout(5):
            assert [c async for c in client.incoming_channels()] == []
    assert client_tasks() == set()


async def test_the_window_counts_from_the_drop_not_from_each_attempt(
    broker: ResumableBroker,
) -> None:
    broker.window = 1
    broker.drop_resumes = True
    lost: list[str] = []
    async with quick(broker.url, on_session_lost=lost.append):
        broker.drop()
        await wait_until(lambda: bool(lost), timeout=5.0, message="bool(lost)")
        assert lost == ["Resume window expired"]
        assert broker.connections > 2  # it kept trying until then


async def test_close_while_resuming_ends_the_session_at_once(broker: ResumableBroker) -> None:
    lost: list[str] = []
    client = quick(broker.url, on_session_lost=lost.append)
    await client.connect()
    channel = await broker.open_channel_to_client(client, CHANNEL)
    sending = asyncio.create_task(channel.send("x"))
    await broker.expect("message")
    broker.drop()
    await broker.expect("resume")  # left unanswered
    await client.close()
    with pytest.raises(ConnectionLost):
        await sending
    assert channel.close_reason is CloseReason.CONNECTION
    assert lost == []  # closed on purpose
    assert client_tasks() == set()


async def test_close_while_no_node_answers(broker: ResumableBroker) -> None:
    client = quick(broker.url)
    await client.connect()
    assert broker.server is not None
    broker.server.close()
    await wait_until(lambda: not client.connected, timeout=5.0, message="not client.connected")
    await client.close()
    assert client.connection_id is None
    assert client_tasks() == set()

"""Session resume against real processes (issue 14): redis-server and broker-node processes,
clients speaking the wire protocol. A session detaches three ways (its connection drops, its
node drains, its node is killed) and resumes on another node; its peers notice nothing."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from tests.integration.helpers import frames_for
from tests.support.cluster import REQUEST_TIMEOUT, SLACK, TTL, Cluster, fast_args
from tests.support.nodes import NodeProcess, metric
from tests.support.polling import wait_for_value
from tests.support.wire import Frame, WireClient

pytestmark = pytest.mark.slow

WINDOW = 30


def resume_args(window: int = WINDOW) -> list[str]:
    return [*fast_args(), "--resume-window", str(window)]


class Session:
    """A resumable client on the wire: it remembers the last frame it processed."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.wire: WireClient | None = None
        self.connection_id = ""
        self.token = ""
        self.last_id = 0
        self.processed: list[Frame] = []

    async def register(self, node: NodeProcess, role: str = "r") -> Session:
        self.wire = await self.cluster.client(node)
        reply = await self.wire.request("register", role=role, resume=True)
        assert reply["type"] == "registered", reply
        self.connection_id, self.token = reply["connectionId"], reply["resumeToken"]
        self.last_id = reply["id"]
        return self

    async def take(self, count: int, timeout: float = 5.0) -> list[Frame]:
        """Process the next ``count`` frames."""
        assert self.wire is not None
        frames = []
        for _ in range(count):
            frame = await self.wire.recv(timeout)
            assert frame["id"] > self.last_id, (frame, self.last_id)
            self.last_id = frame["id"]
            frames.append(frame)
        self.processed += frames
        return frames

    def drop(self) -> None:
        """The connection dies: no close frame (a cable pulled, a proxy gone)."""
        assert self.wire is not None and self.wire.ws is not None
        self.wire.ws.transport.abort()

    async def drop_seen_by(self, node: NodeProcess) -> None:
        """Drop the connection, and wait until ``node`` (the session's) has noticed: from
        then on what is sent to the session is held."""
        before = await metric(node, "broker_sessions_detached")
        self.drop()
        await wait_for_value(
            lambda: metric(node, "broker_sessions_detached"),
            lambda detached: detached > before,
            timeout=5,
            message="the session's node noticed the dropped connection",
        )

    async def resume(self, node: NodeProcess, **extra: Any) -> list[Frame]:
        """Connect to ``node`` and resume: the frames replayed, then the reply."""
        self.wire = await self.cluster.client(node)
        await self.wire.send(
            {
                "type": "resume",
                "id": 1000 + self.last_id,
                "connectionId": self.connection_id,
                "resumeToken": extra.pop("token", self.token),
                "lastId": self.last_id,
                **extra,
            }
        )
        frames = []
        while True:
            frame = await self.wire.recv()
            frames.append(frame)
            if frame["type"] in ("resumed", "resume_failed", "error"):
                break
        if frames[-1]["type"] == "resumed":
            self.token = frames[-1]["resumeToken"]
            for frame in frames:
                self.last_id = max(self.last_id, frame["id"])
            self.processed += frames
        return frames


async def peer_of(cluster: Cluster, node: NodeProcess, session: Session) -> tuple[WireClient, str]:
    """A plain client on ``node`` with a channel open to ``session``."""
    peer = await cluster.client(node, "peer")
    channel = await peer.open(session.connection_id)
    incoming = await session.take(1)
    assert incoming[0]["type"] == "incoming_channel"
    return peer, channel


async def send(peer: WireClient, channel: str, payload: Any) -> Frame:
    reply = await peer.request("message", channelId=channel, payload=payload)
    assert reply["type"] == "channel_message_sent", reply
    return reply


def messages(frames: list[Frame]) -> list[Any]:
    return [f["payload"] for f in frames if f["type"] == "channel_message"]


def kinds(frames: list[Frame]) -> list[str]:
    return [f["type"] for f in frames]


async def test_a_dropped_connection_resumes_on_another_node(cluster: Cluster) -> None:
    one, two, three = await cluster.start(3, args=resume_args())
    session = await Session(cluster).register(one)
    peer, channel = await peer_of(cluster, two, session)
    await send(peer, channel, 1)
    assert messages(await session.take(1)) == [1]
    await session.drop_seen_by(one)
    held = [await send(peer, channel, n) for n in (2, 3)]
    assert [reply.get("held") for reply in held] == [True, True]

    frames = await session.resume(three)

    assert kinds(frames) == ["channel_message", "channel_message", "resumed"]
    assert messages(frames) == [2, 3]
    assert frames[-1]["complete"] is True
    assert frames[-1]["connectionId"] == session.connection_id
    # Live again, through its new node; the peer never heard of the gap.
    reply = await send(peer, channel, 4)
    assert "held" not in reply
    assert messages(await session.take(1)) == [4]
    assert "channel_closed_notification" not in kinds(await frames_for(peer, 0.3))
    listed = await peer.request("list_by_role", role="r")
    assert listed["ids"] == [session.connection_id]
    assert await metric(three, "broker_session_events_total", event="resumed") == 1
    assert await metric(one, "broker_session_events_total", event="handed_over") == 1


async def test_a_token_is_single_use_and_two_resumes_at_once_have_one_winner(
    cluster: Cluster,
) -> None:
    one, two, three = await cluster.start(3, args=resume_args())
    session = await Session(cluster).register(one)
    used = session.token
    await session.drop_seen_by(one)
    racer = Session(cluster)
    racer.connection_id, racer.token, racer.last_id = session.connection_id, used, 0
    results = await asyncio.gather(session.resume(two), racer.resume(three))
    outcomes = sorted(frames[-1]["type"] for frames in results)
    assert outcomes == ["resume_failed", "resumed"]
    loser = next(frames[-1] for frames in results if frames[-1]["type"] == "resume_failed")
    assert loser["error"] == "Resume token not valid"
    # A replayed token (the one used first) is refused later too.
    thief = Session(cluster)
    thief.connection_id, thief.token = session.connection_id, used
    refused = await thief.resume(one)
    assert refused[-1] == {
        **refused[-1],
        "type": "resume_failed",
        "error": "Resume token not valid",
    }


async def test_a_client_that_never_returns_ends_once_after_the_window(cluster: Cluster) -> None:
    window = 2
    one, two = await cluster.start(2, args=resume_args(window))
    session = await Session(cluster).register(one)
    peer, channel = await peer_of(cluster, two, session)
    await session.drop_seen_by(one)
    # Nothing for the window: the peer's messages are held.
    assert (await send(peer, channel, "held"))["held"] is True
    early = await frames_for(peer, window - 1)
    assert "channel_closed_notification" not in kinds(early)
    notice = await peer.notification("channel_closed_notification", timeout=2 + SLACK)
    assert notice["channelId"] == channel
    assert kinds(await frames_for(peer, 1.0)) == []
    listed = await peer.request("list_by_role", role="r")
    assert listed["ids"] == []
    refused = await session.resume(two)
    assert refused[-1]["error"] == "Resume token not valid"


async def test_a_draining_node_sends_its_sessions_elsewhere(cluster: Cluster) -> None:
    one, two, three = await cluster.start(3, args=resume_args())
    session = await Session(cluster).register(one)
    peer, channel = await peer_of(cluster, two, session)
    await send(peer, channel, 1)
    assert one.process is not None
    process = one.process
    process.send_signal(signal.SIGTERM)
    assert session.wire is not None
    code, reason = await session.wire.closed_with(timeout=10)
    assert code == 4100, (code, reason)
    held = await send(peer, channel, 2)
    frames = await session.resume(three)
    assert frames[-1]["type"] == "resumed", frames
    assert frames[-1]["complete"] is True
    assert messages(frames) == [1, 2]
    assert held.get("held") is True
    assert await asyncio.to_thread(process.wait, 20) == 0
    await send(peer, channel, 3)
    assert messages(await session.take(1)) == [3]
    assert "channel_closed_notification" not in kinds(await frames_for(peer, 0.3))


async def test_a_drained_session_that_does_not_return_at_once_is_handed_over(
    cluster: Cluster,
) -> None:
    one, two = await cluster.start(2, args=resume_args())
    session = await Session(cluster).register(one)
    peer, channel = await peer_of(cluster, two, session)
    await session.drop_seen_by(one)
    await asyncio.to_thread(one.terminate)
    # The session went to the only live node: it holds the peer's messages.
    assert (await send(peer, channel, 5))["held"] is True
    frames = await session.resume(two)
    assert frames[-1]["complete"] is True
    assert messages(frames) == [5]
    assert "channel_closed_notification" not in kinds(await frames_for(peer, 0.3))


@pytest.mark.parametrize("wait_for_reaper", [False, True])
async def test_a_killed_nodes_session_resumes_incomplete_and_its_peers_resend(
    cluster: Cluster, wait_for_reaper: bool
) -> None:
    one, two, three = await cluster.start(3, args=resume_args())
    session = await Session(cluster).register(one)
    peer, channel = await peer_of(cluster, two, session)
    await send(peer, channel, 1)
    assert messages(await session.take(1)) == [1]
    one.kill()
    if wait_for_reaper:

        async def adopted() -> float:
            return sum(
                [
                    await metric(node, "broker_session_events_total", event="adopted")
                    for node in (two, three)
                ]
            )

        await wait_for_value(
            adopted,
            lambda count: count >= 1,
            timeout=TTL + 4 * SLACK,
            message="a survivor to reap the killed node and adopt its session",
        )
    frames = await session.resume(three, channels={channel: 1})
    assert frames[-1]["type"] == "resumed", frames
    assert frames[-1]["complete"] is False
    assert frames[-1]["channels"] == [{"channelId": channel, "peerId": peer.connection_id}]
    resync = await peer.notification("channel_resync", timeout=2 + REQUEST_TIMEOUT)
    assert (resync["channelId"], resync["lastSeq"]) == (channel, 1)
    # The channel lives on through the new node, and never closed for the peer.
    await send(peer, channel, 2)
    assert messages(await session.take(1)) == [2]
    await asyncio.sleep(TTL + SLACK)
    assert "channel_closed_notification" not in kinds(await frames_for(peer, 0.3))


async def test_a_session_resumes_after_redis_restarted_empty(cluster: Cluster) -> None:
    one, two = await cluster.start(2, args=resume_args())
    session = await Session(cluster).register(one)
    peer, channel = await peer_of(cluster, two, session)
    await session.drop_seen_by(one)
    await asyncio.to_thread(cluster.redis.restart)
    # The nodes restore what they hold (the detached session included) once Redis is back.
    frames: list[Frame] = []
    async with asyncio.timeout(10 + SLACK):
        while not frames or frames[-1]["type"] != "resumed":
            frames = await session.resume(two)
            if frames[-1]["type"] != "resumed":
                # Only "not restored yet" may be said meanwhile: never a silent loss.
                assert frames[-1]["error"] in (
                    "Resume token not valid",
                    "Cluster registry unavailable, try again",
                ), frames
                await asyncio.sleep(0.2)
    assert frames[-1]["complete"] is True
    await send(peer, channel, "after")
    assert messages(await session.take(1)) == ["after"]
    assert "channel_closed_notification" not in kinds(await frames_for(peer, 0.3))

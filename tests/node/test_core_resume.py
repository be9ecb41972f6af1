"""Session resume in the core (issue 14), without I/O: three cores on a hand-driven bus, a
shell that keeps each session's frames as the real one does, and clients that remember the
last frame they processed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.core.actions import (
    Action,
    CloseClient,
    EndSession,
    ForgetConnection,
    KeepFrames,
    LoadSession,
    LocalReceipt,
    MarkDetached,
    MoveChannels,
    PauseReading,
    Publish,
    Rebind,
    Replay,
    Send,
)
from broker_node.core.broker import AuthRules, BrokerCore, ResumePlan, ResumeRules
from broker_node.core.envelopes import Acked, Confirm, Envelope, Handover, Incoming, Moved, Take
from broker_node.core.records import (
    AdoptedSession,
    ChannelRecord,
    ClaimRefusal,
    ConnectionRecord,
    Reaped,
    SessionClaim,
    SessionKey,
)
from broker_node.core.sessions import SessionLog, token_hash
from shared.ids import ChannelId, ConnectionId, NodeId
from shared.messages import Ack, Message, Open, Register, Resume

ONE, TWO, THREE = NodeId("one"), NodeId("two"), NodeId("three")
WINDOW = 120


class Socket:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.log: SessionLog | None = None
        self.closed: tuple[int, str] | None = None


class Cluster:
    def __init__(
        self,
        *node_ids: NodeId,
        max_frames: int = 100,
        resume: bool = True,
        auth: AuthRules | None = None,
    ) -> None:
        self.now = 0.0
        self.nodes = {n: Node(self, n, max_frames, resume=resume, auth=auth) for n in node_ids}
        self.bus: list[tuple[NodeId, Envelope]] = []
        #: What the registry knows of each session: (holder, token hash); ended ones removed.
        self.registry: dict[ConnectionId, tuple[NodeId, str]] = {}
        self.registry_channels: dict[ChannelId, ChannelRecord] = {}
        self.dead: set[NodeId] = set()

    def settle(self) -> None:
        for _ in range(100):
            if not self.bus:
                return
            batch, self.bus = self.bus, []
            by_node: dict[NodeId, list[Envelope]] = {}
            for node_id, envelope in batch:
                by_node.setdefault(node_id, []).append(envelope)
            for node_id, envelopes in by_node.items():
                node = self.nodes[node_id]
                if node_id in self.dead:
                    for sender in self.nodes.values():
                        if sender.node_id not in self.dead:
                            sender.run(sender.core.undeliverable(node_id, envelopes))
                    continue
                node.run(node.core.on_bus(envelopes))
        raise AssertionError("the bus never settled")

    def claim(self, session: ConnectionId, token: str, node: NodeId) -> SessionClaim | ClaimRefusal:
        held = self.registry.get(session)
        if held is None or held[1] != token_hash(token):
            return ClaimRefusal.UNKNOWN
        return SessionClaim(held[0], "r", WINDOW, 1)


class Node:
    def __init__(
        self,
        cluster: Cluster,
        node_id: NodeId,
        max_frames: int,
        *,
        resume: bool = True,
        auth: AuthRules | None = None,
    ) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.core = BrokerCore(
            node_id,
            max_role_length=8,
            max_unconfirmed=100,
            request_timeout=2.0,
            clock=lambda: cluster.now,
            wall_clock=lambda: 1_000_000 + cluster.now,
            resume=ResumeRules(WINDOW, max_frames, 1 << 20, orphan_timeout=30.0)
            if resume
            else None,
            auth=auth,
        )
        self.sockets: dict[ConnectionId, Socket] = {}
        self.detach_marks: list[ConnectionId] = []

    def run(self, actions: list[Action]) -> None:
        core = self.core
        for action in actions:
            match action:
                case Send(connection_id=cid, frame=frame, receipt=receipt):
                    sock = self.sockets.get(cid)
                    if sock is None:
                        self.run(core.hold(cid, frame, receipt))
                        continue
                    sock.frames.append(json.loads(frame))
                    if sock.log is not None and not sock.log.append(frame):
                        self.run(core.session_overflow(cid))
                    if receipt is not None:
                        self.run(core.written([receipt]))
                case KeepFrames(connection_id=cid, log=log):
                    self.sockets[cid].log = log
                case Replay(connection_id=cid, frames=frames):
                    self.sockets[cid].frames += [json.loads(f) for f in frames]
                case Rebind(from_id=from_id, to_id=to_id, code=code, reason=reason):
                    old = self.sockets.pop(to_id, None)
                    if old is not None:
                        old.closed = (code, reason)
                    self.sockets[to_id] = self.sockets.pop(from_id)
                case CloseClient(connection_id=cid, code=code, reason=reason):
                    sock = self.sockets.pop(cid, None)
                    if sock is not None:
                        sock.closed = (code, reason)
                        self.run(core.client_gone(cid))
                case Publish(node_id=node_id, envelope=envelope):
                    self.cluster.bus.append((node_id, envelope))
                case ForgetConnection(record=record, then=then):
                    self.cluster.registry.pop(record.connection_id, None)
                    self.run(list(then))
                case MarkDetached(record=record):
                    self.detach_marks.append(record.connection_id)
                case EndSession(record=record):
                    held = self.cluster.registry.get(record.connection_id)
                    ended = held is not None and held[0] == self.node_id
                    if ended:
                        del self.cluster.registry[record.connection_id]
                    self.run(core.session_ended(record.connection_id, ended))
                case MoveChannels(records=records):
                    for channel in records:
                        self.cluster.registry_channels[channel.channel_id] = channel
                case LoadSession(connection_id=cid):
                    channels = [
                        c for c in self.cluster.registry_channels.values() if c.peer_of(cid)
                    ]
                    self.run(core.install_lost(cid, channels))
                case _:
                    pass

    def connect(self, cid: ConnectionId) -> Socket:
        self.core.connect(cid)
        sock = self.sockets[cid] = Socket()
        return sock

    def drop(self, cid: ConnectionId) -> None:
        """The client's socket is gone (network)."""
        self.sockets.pop(cid)
        self.run(self.core.client_gone(cid))


class Client:
    """A client that processes every frame of its socket and remembers the last id."""

    def __init__(self, node: Node, cid: str, *, resume: bool = True) -> None:
        self.cid = ConnectionId(cid)
        self.node = node
        self.sock = node.connect(self.cid)
        self.last_id = 0
        self.seen: list[dict[str, Any]] = []
        self.token = ""
        self.next_request = 1
        request = Register(id=self.request_id(), role="r", resume=resume)
        record = node.core.begin_register(self.cid, request)
        assert isinstance(record, ConnectionRecord)
        if record.session is not None:
            node.cluster.registry[self.cid] = (node.node_id, record.session.token_hash)
        node.run(node.core.finish_register(self.cid, request))
        registered = self.process()[-1]
        assert registered["type"] == "registered"
        self.token = registered.get("resumeToken", "")

    def request_id(self) -> int:
        """The next request's id (read by the node at once: the shell records it)."""
        self.next_request += 1
        if self.sock.log is not None:
            self.sock.log.last_request_id = self.next_request - 1
        return self.next_request - 1

    def process(self) -> list[dict[str, Any]]:
        frames, self.sock.frames = self.sock.frames, []
        if frames and frames[-1]["type"] == "resume_failed":
            return frames  # a new socket of its own, not the session's
        for frame in frames:
            assert frame["id"] > self.last_id, (frame, self.last_id)
            self.last_id = frame["id"]
        self.seen += frames
        return frames

    def send(self, channel: ChannelId, n: int, seq: int | None = None) -> None:
        request = Message(
            id=self.request_id(), channelId=channel, payload=msgspec.Raw(str(n).encode()), seq=seq
        )
        self.node.run(self.node.core.message(self.cid, request))

    def ack(self, channels: dict[str, int] | None = None) -> None:
        request = Ack(id=self.request_id(), lastId=self.last_id, channels=channels)
        self.node.run(self.node.core.ack(self.cid, request))

    def resume_on(
        self, node: Node, *, token: str | None = None, channels: dict[str, int] | None = None
    ) -> list[dict[str, Any]]:
        """Reconnect to ``node`` and resume; the frames before and with the reply."""
        temp = ConnectionId(f"{self.cid}-again-{self.next_request}")
        self.node = node
        self.sock = node.connect(temp)
        request = Resume(
            id=self.request_id(),
            connectionId=self.cid,
            resumeToken=token if token is not None else self.token,
            lastId=self.last_id,
            channels=channels,
        )
        plan = node.core.begin_resume(temp, request)
        assert isinstance(plan, ResumePlan)
        claim = node.cluster.claim(self.cid, request.resumeToken, node.node_id)
        if isinstance(claim, SessionClaim):
            node.cluster.registry[self.cid] = (node.node_id, plan.new_token_hash)
        node.run(node.core.claimed(temp, request, plan, claim))
        node.cluster.settle()
        if isinstance(claim, SessionClaim):
            self.sock = node.sockets[self.cid]
        frames = self.process()
        reply = frames[-1]
        if reply["type"] == "resumed":
            self.token = reply["resumeToken"]
        return frames


def open_channel(opener: Client, target: Client) -> ChannelId:
    node = opener.node
    request = Open(id=opener.request_id(), targetId=target.cid)
    record = ConnectionRecord(target.cid, target.node.node_id, "r", SessionKey("x", WINDOW))
    plan = node.core.plan_open(opener.cid, request, record)
    assert isinstance(plan, ChannelRecord)
    node.cluster.registry_channels[plan.channel_id] = plan
    node.run(node.core.launch_open(opener.cid, request, plan))
    node.cluster.settle()
    assert opener.process()[-1]["type"] == "channel_opened"
    assert target.process()[-1]["type"] == "incoming_channel"
    return plan.channel_id


@dataclass
class ClaimedResume:
    """A resume on another node that has claimed a dropped client's session in the registry;
    that node's core has not been told yet (``claimed``)."""

    temp: ConnectionId
    sock: Socket
    request: Resume
    plan: ResumePlan
    claim: SessionClaim | ClaimRefusal


def claimed_elsewhere(cluster: Cluster, client: Client, node: Node) -> ClaimedResume:
    """Drop ``client``'s socket and resume its session on ``node`` up to the registry's claim."""
    client.node.drop(client.cid)
    temp = ConnectionId("temp")
    sock = node.connect(temp)
    request = Resume(id=9, connectionId=client.cid, resumeToken=client.token, lastId=client.last_id)
    plan = node.core.begin_resume(temp, request)
    assert isinstance(plan, ResumePlan)
    claim = cluster.claim(client.cid, client.token, node.node_id)
    return ClaimedResume(temp, sock, request, plan, claim)


def kinds(frames: list[dict[str, Any]]) -> list[str]:
    return [frame["type"] for frame in frames]


def payloads(frames: list[dict[str, Any]]) -> list[Any]:
    return [frame["payload"] for frame in frames if frame["type"] == "channel_message"]


# --- register ----------------------------------------------------------------------------------


def test_a_resumable_register_gets_a_token_and_the_window() -> None:
    cluster = Cluster(ONE)
    client = Client(cluster.nodes[ONE], "a")
    registered = client.seen[-1]
    assert len(registered["resumeToken"]) >= 22
    assert registered["resumeWindow"] == WINDOW
    # Only the hash is in the registry.
    assert cluster.registry[client.cid][1] == token_hash(client.token)


def test_a_plain_register_is_the_readme_reply() -> None:
    cluster = Cluster(ONE)
    client = Client(cluster.nodes[ONE], "a", resume=False)
    assert set(client.seen[-1]) == {"type", "id", "replyTo", "connectionId"}
    client.node.drop(client.cid)
    assert client.cid not in client.node.core.connections


# --- a dropped connection, resumed on the same node ----------------------------------------------


def test_resume_on_the_same_node_replays_what_was_not_processed() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a, b = Client(node, "a"), Client(node, "b")
    channel = open_channel(a, b)
    b.send(channel, 1)
    a.sock.frames.clear()  # written to the socket, never processed: the connection dropped
    node.drop(a.cid)
    b.send(channel, 2)
    b.send(channel, 3)
    # Held for the detached session: confirmed as held, not delivered, not failed.
    assert [(f["type"], f.get("held")) for f in b.process()] == [
        ("channel_message_sent", None),
        ("channel_message_sent", True),
        ("channel_message_sent", True),
    ]
    assert node.detach_marks == [a.cid]

    frames = a.resume_on(node)

    assert kinds(frames) == ["channel_message"] * 3 + ["resumed"]
    assert payloads(frames) == [1, 2, 3]
    resumed = frames[-1]
    assert resumed["complete"] is True
    assert resumed["connectionId"] == a.cid
    assert resumed["lastRequestId"] == 2  # register 1, open 2
    assert "channel_closed_notification" not in kinds(b.process())
    # Live again: a message goes straight to the new socket.
    b.send(channel, 4)
    assert payloads(a.process()) == [4]


def test_a_token_works_once() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a = Client(node, "a")
    used = a.token
    node.drop(a.cid)
    assert a.resume_on(node)[-1]["type"] == "resumed"
    node.drop(a.cid)
    thief = Client(node, "thief")
    thief.cid = a.cid
    refused = thief.resume_on(node, token=used)
    assert refused[-1]["type"] == "resume_failed"
    assert refused[-1]["error"] == "Resume token not valid"
    assert a.resume_on(node)[-1]["type"] == "resumed"


def test_a_resume_while_the_old_socket_is_still_open_closes_it() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a = Client(node, "a")
    old = a.sock
    frames = a.resume_on(node)
    assert frames[-1]["type"] == "resumed"
    assert old.closed == (4100, "Session resumed on another connection")
    assert a.cid in node.core.connections


# --- acknowledgements ----------------------------------------------------------------------------


def test_acks_trim_the_log_and_tell_the_sender_up_to_which_seq() -> None:
    cluster = Cluster(ONE, TWO)
    a, b = Client(cluster.nodes[ONE], "a"), Client(cluster.nodes[TWO], "b")
    channel = open_channel(a, b)
    for seq in (1, 2, 3):
        b.send(channel, seq, seq=seq)
    cluster.settle()
    assert payloads(a.process()) == [1, 2, 3]
    b.process()
    log = a.sock.log
    assert log is not None
    kept = len(log)
    a.ack({channel: 3})
    cluster.settle()
    assert len(log) == 0 < kept
    assert [(f["type"], f.get("seq")) for f in b.process()] == [("channel_acked", 3)]


# --- resume on another node ----------------------------------------------------------------------


def test_resume_on_another_node_takes_the_session_over() -> None:
    cluster = Cluster(ONE, TWO, THREE)
    a, b = Client(cluster.nodes[ONE], "a"), Client(cluster.nodes[TWO], "b")
    channel = open_channel(a, b)
    b.send(channel, 1, seq=1)
    cluster.settle()
    a.process()
    cluster.nodes[ONE].drop(a.cid)
    b.send(channel, 2, seq=2)
    cluster.settle()
    assert b.process()[-1]["held"] is True

    frames = a.resume_on(cluster.nodes[THREE], channels={channel: 1})

    assert kinds(frames) == ["channel_message", "resumed"]
    assert payloads(frames) == [2]
    assert frames[-1]["complete"] is True
    assert a.cid not in cluster.nodes[ONE].core.connections
    assert cluster.registry_channels[channel].opener_node == THREE
    # The peer's node was told where the session went: its next message goes there directly.
    b.send(channel, 3, seq=3)
    cluster.settle()
    assert payloads(a.process()) == [3]
    # (acked: the resume said message 1 was processed)
    assert [f["type"] for f in b.process()] == ["channel_acked", "channel_message_sent"]
    assert cluster.nodes[TWO].core.channels[channel].opener_node == THREE


def test_what_reaches_the_old_node_after_a_handover_is_forwarded() -> None:
    cluster = Cluster(ONE, TWO, THREE)
    a, b = Client(cluster.nodes[ONE], "a"), Client(cluster.nodes[TWO], "b")
    channel = open_channel(a, b)
    cluster.nodes[ONE].drop(a.cid)
    b.send(channel, 1)  # on the bus to ONE while the session moves to THREE
    in_flight = list(cluster.bus)
    cluster.bus.clear()
    frames = a.resume_on(cluster.nodes[THREE])
    assert frames[-1]["type"] == "resumed"
    cluster.bus += in_flight
    cluster.settle()
    assert payloads(a.process()) == [1]
    assert kinds(b.process()) == ["channel_message_sent"]


def test_a_session_a_lost_node_held_resumes_incomplete_and_peers_resend() -> None:
    cluster = Cluster(ONE, TWO, THREE)
    a, b = Client(cluster.nodes[ONE], "a"), Client(cluster.nodes[TWO], "b")
    channel = open_channel(a, b)
    for seq in (1, 2):
        b.send(channel, seq, seq=seq)
    cluster.settle()
    a.process()
    b.process()
    # ONE dies; TWO notices; THREE reaps it and adopts the session.
    cluster.dead.add(ONE)
    two = cluster.nodes[TWO]
    two.run(two.core.node_lost(ONE))
    assert channel in two.core.channels  # waits for the session's new node
    moved = cluster.registry_channels[channel].moved(a.cid, THREE)
    cluster.registry_channels[channel] = moved
    cluster.registry[a.cid] = (THREE, cluster.registry[a.cid][1])
    reaped = Reaped(
        removed=[],
        adopted=[
            AdoptedSession(
                ConnectionRecord(a.cid, THREE, "r", SessionKey(cluster.registry[a.cid][1], WINDOW)),
                detached_at_ms=1_000_000_000,
                epoch=0,
            )
        ],
        moved=[moved],
    )
    three = cluster.nodes[THREE]
    three.run(three.core.adopt(reaped, ONE))
    cluster.settle()
    assert two.core.channels[channel].opener_node == THREE
    b.send(channel, 3, seq=3)
    cluster.settle()
    assert b.process()[-1]["held"] is True

    frames = a.resume_on(three, channels={channel: 1})

    assert kinds(frames) == ["channel_message", "resumed"]
    resumed = frames[-1]
    assert resumed["complete"] is False
    assert resumed["channels"] == [{"channelId": channel, "peerId": b.cid}]
    assert [frame["id"] for frame in frames] == [a.last_id - 1, a.last_id]
    assert [(f["type"], f["lastSeq"]) for f in b.process()] == [("channel_resync", 1)]
    assert not any(kinds([f]) == ["channel_closed_notification"] for f in b.seen)


def test_an_orphan_channel_closes_if_no_node_claims_its_end() -> None:
    cluster = Cluster(ONE, TWO)
    a, b = Client(cluster.nodes[ONE], "a"), Client(cluster.nodes[TWO], "b")
    open_channel(a, b)
    two = cluster.nodes[TWO]
    two.run(two.core.node_lost(ONE))
    assert kinds(b.process()) == []
    cluster.now += 31
    two.run(two.core.expire())
    assert kinds(b.process()) == ["channel_closed_notification"]


# --- the window, and bounds ----------------------------------------------------------------------


def test_a_session_whose_window_passes_ends_once_with_the_usual_notices() -> None:
    cluster = Cluster(ONE, TWO)
    a, b = Client(cluster.nodes[ONE], "a"), Client(cluster.nodes[TWO], "b")
    open_channel(a, b)
    one = cluster.nodes[ONE]
    one.drop(a.cid)
    cluster.now += WINDOW - 1
    one.run(one.core.expire())
    cluster.settle()
    assert kinds(b.process()) == []
    cluster.now += 1
    one.run(one.core.expire())
    cluster.settle()
    assert kinds(b.process()) == ["channel_closed_notification"]
    one.run(one.core.expire())
    cluster.settle()
    assert kinds(b.process()) == []
    assert a.cid not in cluster.registry
    refused = a.resume_on(cluster.nodes[TWO])
    assert refused[-1]["error"] == "Resume token not valid"


def test_a_detached_session_over_its_bound_ends() -> None:
    cluster = Cluster(ONE, max_frames=3)
    node = cluster.nodes[ONE]
    a, b = Client(node, "a"), Client(node, "b", resume=False)
    channel = open_channel(a, b)
    a.ack()
    node.drop(a.cid)
    for n in range(4):
        b.send(channel, n)
    assert kinds(b.process())[-1] == "channel_closed_notification"
    assert a.cid not in node.core.connections


# --- drain ---------------------------------------------------------------------------------------


def test_a_drain_closes_sessions_with_4100_and_hands_off_the_rest() -> None:
    cluster = Cluster(ONE, TWO)
    one = cluster.nodes[ONE]
    a, b = Client(one, "a"), Client(cluster.nodes[TWO], "b")
    channel = open_channel(a, b)
    sock = a.sock
    one.run(one.core.drain_sessions())
    assert sock.closed == (4100, "Node draining: resume on another node")
    assert one.core.detached_sessions() == [a.cid]
    cluster.registry[a.cid] = (TWO, cluster.registry[a.cid][1])
    one.run(one.core.hand_off(a.cid, TWO))
    cluster.settle()
    assert one.core.detached_sessions() == []
    assert cluster.nodes[TWO].core.detached_sessions() == [a.cid]
    b.send(channel, 7)
    cluster.settle()
    assert b.process()[-1]["held"] is True
    frames = a.resume_on(cluster.nodes[TWO])
    assert kinds(frames) == ["channel_message", "resumed"]
    assert frames[-1]["complete"] is True


@pytest.mark.parametrize("resume", [True, False])
def test_resume_is_refused_when_off_or_after_register(resume: bool) -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a = Client(node, "a", resume=resume)
    request = Resume(id=9, connectionId="x", resumeToken="t", lastId=0)
    result = node.core.begin_resume(a.cid, request)
    assert isinstance(result, list)
    node.run(result)
    assert a.process()[-1]["error"] == "Connection already registered"


@pytest.mark.parametrize("nodes", [(ONE, ONE), (ONE, TWO)])
def test_a_recipient_that_cannot_resume_acks_on_delivery(nodes: tuple[NodeId, NodeId]) -> None:
    cluster = Cluster(ONE, TWO)
    a = Client(cluster.nodes[nodes[0]], "a")
    plain = Client(cluster.nodes[nodes[1]], "plain", resume=False)
    channel = open_channel(a, plain)
    # (open_channel's record says the target resumes: make it say what it is)
    for node in cluster.nodes.values():
        record = node.core.channels.get(channel)
        if record is not None:
            node.core.channels[channel] = msgspec.structs.replace(record, target_resumes=False)
    a.send(channel, 1, seq=1)
    a.send(channel, 2)
    cluster.settle()
    assert payloads(plain.process()) == [1, 2]
    assert [(f["type"], f.get("seq")) for f in a.process()] == [
        ("channel_message_sent", None),
        ("channel_acked", 1),
        ("channel_message_sent", None),
    ]


def test_a_client_that_closes_with_1000_ends_its_session_at_once() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a, b = Client(node, "a"), Client(node, "b")
    open_channel(a, b)
    node.sockets.pop(a.cid)
    node.run(node.core.client_gone(a.cid, said_bye=True))
    assert kinds(b.process()) == ["channel_closed_notification"]
    assert a.cid not in node.core.connections


# --- the rarer paths -----------------------------------------------------------------------------


def test_a_resume_whose_holder_died_unreaped_takes_what_the_registry_knows() -> None:
    cluster = Cluster(ONE, TWO, THREE)
    a, b = Client(cluster.nodes[ONE], "a"), Client(cluster.nodes[TWO], "b")
    channel = open_channel(a, b)
    cluster.dead.add(ONE)  # its inbox takes nothing: the Take comes back undeliverable
    frames = a.resume_on(cluster.nodes[THREE], channels={channel: 0})
    assert frames[-1]["type"] == "resumed"
    assert frames[-1]["complete"] is False
    assert [(f["type"], f["lastSeq"]) for f in b.process()] == [("channel_resync", 0)]
    b.send(channel, 1)
    cluster.settle()
    assert payloads(a.process()) == [1]


def test_a_resume_whose_registry_says_here_but_the_session_is_not_takes_the_registry() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a = Client(node, "a")
    node.core.connections.pop(a.cid)  # as after a restart of the node under the same id
    frames = a.resume_on(node)
    assert frames[-1]["complete"] is False


def test_a_handover_the_holder_does_not_have_loads_the_session_from_the_registry() -> None:
    cluster = Cluster(ONE, TWO)
    one, two = cluster.nodes[ONE], cluster.nodes[TWO]
    a = Client(one, "a")
    one.core.connections.pop(a.cid)  # the holder forgot it (its window ended meanwhile)
    frames = a.resume_on(two)
    assert frames[-1]["complete"] is False


def test_a_resume_on_a_node_without_resume_is_refused() -> None:
    cluster = Cluster(ONE, resume=False)
    node = cluster.nodes[ONE]
    node.core.connect(ConnectionId("x"))
    request = Resume(id=1, connectionId="a", resumeToken="t", lastId=0)
    refused = node.core.begin_resume(ConnectionId("x"), request)
    assert isinstance(refused, list)
    assert b"Resume is not enabled on this node" in refused[0].frame  # type: ignore[union-attr]
    assert node.core.adopt(Reaped(removed=[]), TWO) == []


def test_a_resume_under_authentication_needs_a_valid_token() -> None:
    cluster = Cluster(ONE, auth=AuthRules(None, timeout=10.0, grace=25.0))
    core = cluster.nodes[ONE].core
    request = Resume(id=1, connectionId="a", resumeToken="t", lastId=0)
    for cid, token, error in (
        ("x", None, b"Authentication required"),
        ("y", TokenRefusal("expired"), b"Invalid token: expired"),
    ):
        core.connect(ConnectionId(cid))
        refused = core.begin_resume(ConnectionId(cid), request, token)
        assert isinstance(refused, list)
        assert error in refused[0].frame  # type: ignore[union-attr]
    core.connect(ConnectionId("z"))
    who = Identity("alice", frozenset({"r"}), expires_at=2_000_000.0)
    assert isinstance(core.begin_resume(ConnectionId("z"), request, who), ResumePlan)
    assert core.identity_of(ConnectionId("z")) == who


def test_a_resumed_socket_brings_its_identity_to_the_session() -> None:
    cluster = Cluster(ONE, auth=AuthRules(None, timeout=10.0, grace=25.0))
    node = cluster.nodes[ONE]
    core = node.core
    alice = Identity("alice", frozenset({"r"}), expires_at=2_000_000.0)
    node.connect(ConnectionId("a"))
    core.authenticated(ConnectionId("a"), alice)
    request = Register(id=1, role="r", resume=True)
    record = core.begin_register(ConnectionId("a"), request)
    assert isinstance(record, ConnectionRecord) and record.session is not None
    cluster.registry[ConnectionId("a")] = (ONE, record.session.token_hash)
    node.run(core.finish_register(ConnectionId("a"), request))
    token = node.sockets[ConnectionId("a")].frames[-1]["resumeToken"]
    node.drop(ConnectionId("a"))
    node.connect(ConnectionId("again"))
    fresh = Identity("alice", frozenset({"r"}), expires_at=3_000_000.0)
    resume = Resume(id=2, connectionId="a", resumeToken=token, lastId=1)
    plan = core.begin_resume(ConnectionId("again"), resume, fresh)
    assert isinstance(plan, ResumePlan)
    node.run(
        core.claimed(
            ConnectionId("again"), resume, plan, cluster.claim(plan.session_id, token, ONE)
        )
    )
    assert node.sockets[ConnectionId("a")].frames[-1]["type"] == "resumed"
    assert core.identity_of(ConnectionId("a")) == fresh


def test_a_refused_claim_for_a_socket_already_gone_says_nothing() -> None:
    cluster = Cluster(ONE)
    core = cluster.nodes[ONE].core
    request = Resume(id=1, connectionId="a", resumeToken="t", lastId=0)
    plan = ResumePlan(ConnectionId("a"), "h", "t2", "h2")
    assert core.claimed(ConnectionId("gone"), request, plan, ClaimRefusal.UNKNOWN) == []
    core.connect(ConnectionId("x"))
    assert (
        b"Resume window expired"
        in core.claimed(  # type: ignore[union-attr]
            ConnectionId("x"), request, plan, ClaimRefusal.EXPIRED
        )[0].frame
    )
    core.connect(ConnectionId("y"))
    assert (
        b"Cluster registry unavailable"
        in core.claimed(  # type: ignore[union-attr]
            ConnectionId("y"), request, plan, None
        )[0].frame
    )


def test_a_resume_whose_socket_left_before_the_handover_stays_detached() -> None:
    cluster = Cluster(ONE, TWO)
    one, two = cluster.nodes[ONE], cluster.nodes[TWO]
    a = Client(one, "a")
    resume = claimed_elsewhere(cluster, a, two)
    cluster.registry[a.cid] = (TWO, resume.plan.new_token_hash)
    two.run(two.core.claimed(resume.temp, resume.request, resume.plan, resume.claim))
    two.sockets.pop(resume.temp)
    two.core.connections.pop(resume.temp)  # the new socket left while ONE was asked
    cluster.settle()
    assert two.core.detached_sessions() == [a.cid]


def test_a_flow_paused_session_is_paused_again_on_its_new_socket() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a = Client(node, "a")
    node.core.connections[a.cid].flow_paused = True
    node.drop(a.cid)
    actions: list[Action] = []
    original = node.run

    def record(batch: list[Action]) -> None:
        actions.extend(batch)
        original(batch)

    node.run = record  # type: ignore[method-assign, assignment]
    a.resume_on(node)
    assert PauseReading(a.cid) in actions


def test_acks_about_unknown_channels_or_from_plain_clients_say_nothing() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a, b = Client(node, "a"), Client(node, "b", resume=False)
    channel = open_channel(b, a)
    assert node.core.ack(b.cid, Ack(id=9, lastId=1)) == []
    a.ack({"no-such-channel": 3, channel: 1})
    assert [(f["type"], f["seq"]) for f in b.process()] == [("channel_acked", 1)]


def test_gone_twice_and_other_no_ops() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    core = node.core
    a, plain = Client(node, "a"), Client(node, "p", resume=False)
    node.drop(a.cid)
    assert core.client_gone(a.cid) == []  # already detached
    receipt = LocalReceipt(plain.cid, 5, ChannelId("c"), 1)
    assert core.hold(ConnectionId("nobody"), b"{}", None) == []
    assert core.session_overflow(plain.cid) == []
    assert core.session_ended(ConnectionId("nobody"), True) == []
    assert core.session_retry(a.cid) == []
    assert core.hand_off(plain.cid, TWO) == []
    core._on_moved(Moved(ChannelId("nope"), a.cid, TWO))  # a channel not held here
    assert core.on_bus([Acked(ChannelId("c"), ConnectionId("nobody"), 1)]) == []
    assert core.unwritten_to(a.cid, [], handed=True) == []  # kept in its log: held
    assert core.hold(plain.cid, b"{}", None) == []  # not a session: nothing kept
    assert receipt.sender == plain.cid


def test_an_attached_session_over_its_bound_is_closed_as_a_slow_consumer() -> None:
    cluster = Cluster(ONE, max_frames=3)
    node = cluster.nodes[ONE]
    a, b = Client(node, "a"), Client(node, "b", resume=False)
    channel = open_channel(b, a)
    sock = a.sock
    for n in range(3):
        b.send(channel, n)
    assert sock.closed == (1008, "slow consumer")
    assert a.cid not in node.core.connections
    assert "channel_closed_notification" in kinds(b.process())


def test_a_take_for_a_session_not_held_here_says_so_and_a_busy_one_waits() -> None:
    cluster = Cluster(ONE, TWO)
    one, two = cluster.nodes[ONE], cluster.nodes[TWO]
    one.run(one.core.on_bus([Take(ConnectionId("nobody"), 1, TWO, 0)]))
    assert cluster.bus == [(TWO, Handover(ConnectionId("nobody"), 1, False))]
    cluster.bus.clear()
    a, b = Client(one, "a"), Client(two, "b")
    local = Client(one, "local", resume=False)
    across, here = open_channel(a, b), open_channel(a, local)
    a.send(across, 1)  # unconfirmed until TWO answers: the handover waits for it
    taken = list(cluster.bus)
    cluster.bus.clear()
    one.run(one.core.on_bus([Take(a.cid, 1, TWO, a.last_id)]))
    assert cluster.bus == [] and a.sock.closed == (4100, "Session resumed on another connection")
    cluster.bus += taken
    cluster.settle()  # the confirmation settles it; the next expiry check hands it over
    one.run(one.core.expire())
    assert any(type(envelope) is Handover for _, envelope in cluster.bus)
    # The channel whose other end stays here now points at TWO.
    assert one.core.channels[here].opener_node == TWO
    assert across not in one.core.channels


def test_what_comes_for_a_handed_over_target_is_forwarded_and_the_rest_is_not() -> None:
    cluster = Cluster(ONE, TWO, THREE)
    a = Client(cluster.nodes[ONE], "a")
    cluster.nodes[ONE].drop(a.cid)
    assert a.resume_on(cluster.nodes[TWO])[-1]["type"] == "resumed"
    one = cluster.nodes[ONE]
    record = ChannelRecord(ChannelId("c"), ConnectionId("o"), THREE, a.cid, ONE)
    other = ChannelRecord(ChannelId("d"), ConnectionId("o"), THREE, ConnectionId("x"), ONE)
    one.run(one.core.on_bus([Incoming(1, record), Incoming(2, other)]))
    assert (TWO, Incoming(1, record)) in cluster.bus
    cluster.bus.clear()
    cluster.now += WINDOW + 1
    one.run(one.core.expire())
    one.run(one.core.on_bus([Incoming(3, record)]))  # forwarding ended with the window
    assert (TWO, Incoming(3, record)) not in cluster.bus


def test_a_session_whose_end_was_claimed_elsewhere_is_kept_until_its_take() -> None:
    cluster = Cluster(ONE)
    node = cluster.nodes[ONE]
    a = Client(node, "a")
    node.drop(a.cid)
    assert node.core.session_ended(a.cid, False) == []
    assert a.cid in node.core.connections
    cluster.registry.pop(a.cid)  # and its new holder died: no Take comes
    cluster.now += WINDOW + 2 * 2.0 + 1
    node.run(node.core.expire())
    assert a.cid not in node.core.connections


def test_an_unanswered_take_is_asked_of_the_registry_again() -> None:
    cluster = Cluster(ONE, TWO)
    one, two = cluster.nodes[ONE], cluster.nodes[TWO]
    a = Client(one, "a")
    resume = claimed_elsewhere(cluster, a, two)
    two.run(two.core.claimed(resume.temp, resume.request, resume.plan, resume.claim))
    cluster.bus.clear()  # the Take is lost
    cluster.now += 2 * 2.0
    two.run(two.core.expire())
    assert resume.sock.frames[-1]["type"] == "resumed"
    assert resume.sock.frames[-1]["complete"] is False


def test_adopting_skips_what_is_held_already_and_installs_only_its_channels() -> None:
    cluster = Cluster(ONE, TWO)
    two = cluster.nodes[TWO]
    b = Client(two, "b")
    key = SessionKey("h", WINDOW)
    foreign = ChannelRecord(ChannelId("f"), ConnectionId("p"), TWO, ConnectionId("q"), TWO)
    reaped = Reaped(
        removed=[],
        adopted=[
            AdoptedSession(ConnectionRecord(b.cid, TWO, "r", key), 0, 0),
            AdoptedSession(ConnectionRecord(ConnectionId("s"), TWO, "r", key), 0, 0),
        ],
        moved=[foreign],
    )
    two.run(two.core.adopt(reaped, ONE))
    assert ConnectionId("s") in two.core.detached_sessions()
    assert ChannelId("f") not in two.core.channels
    lost = Handover(ConnectionId("t"), 0, True, role="r", channels=[foreign], lost=True)
    two.run(two.core.on_bus([lost]))  # nobody asked for it and it is not a hand-off
    assert ConnectionId("t") not in two.core.connections


def test_a_channel_record_moves_either_end() -> None:
    record = ChannelRecord(ChannelId("c"), ConnectionId("o"), ONE, ConnectionId("t"), TWO)
    assert record.moved(ConnectionId("t"), THREE).target_node == THREE
    assert record.moved(ConnectionId("o"), THREE).opener_node == THREE


def test_a_lost_session_with_a_local_peer_is_resynced_and_kept_channels_stay() -> None:
    cluster = Cluster(ONE, TWO)
    one, two = cluster.nodes[ONE], cluster.nodes[TWO]
    a, b = Client(two, "a"), Client(two, "b", resume=False)
    channel = open_channel(b, a)
    assert two.core.client_gone(ConnectionId("nobody")) == []
    two.core.connections.pop(a.cid)  # TWO lost it (as if it restarted under the same id)
    frames = a.resume_on(two, channels={channel: 4})
    assert frames[-1]["complete"] is False
    assert [(f["type"], f["lastSeq"]) for f in b.process()] == [("channel_resync", 4)]
    assert one.core.install_lost(ConnectionId("nobody"), []) == []


def test_a_lost_session_the_registry_cannot_describe_fails_and_is_forgotten() -> None:
    cluster = Cluster(ONE, TWO)
    one, two = cluster.nodes[ONE], cluster.nodes[TWO]
    a = Client(one, "a")
    resume = claimed_elsewhere(cluster, a, two)
    cluster.dead.add(ONE)
    two.run(two.core.claimed(resume.temp, resume.request, resume.plan, resume.claim))
    actions = two.core.install_lost(a.cid, None)  # the registry could not be asked
    assert any(type(action) is ForgetConnection for action in actions)
    two.run([action for action in actions if type(action) is not ForgetConnection])
    assert resume.sock.frames[-1]["error"] == "Cluster registry unavailable, try again"


def test_other_envelopes_are_not_forwarded_and_foreign_channels_not_installed() -> None:
    cluster = Cluster(ONE, TWO)
    one, two = cluster.nodes[ONE], cluster.nodes[TWO]
    a = Client(one, "a")
    one.drop(a.cid)
    assert a.resume_on(two)[-1]["type"] == "resumed"
    one.run(one.core.on_bus([Confirm([], [], [])]))
    assert cluster.bus == []
    foreign = ChannelRecord(ChannelId("f"), ConnectionId("p"), ONE, ConnectionId("q"), ONE)
    handoff = Handover(
        ConnectionId("s"), 0, True, role="r", channels=[foreign], detached_at_ms=1, window=5
    )
    two.run(two.core.on_bus([handoff]))
    assert two.core.detached_sessions() == [ConnectionId("s")]
    assert ChannelId("f") not in two.core.channels


def test_a_disowned_session_is_dropped_without_a_word_to_its_peers() -> None:
    cluster = Cluster(ONE, TWO)
    node = cluster.nodes[ONE]
    a, b = Client(node, "a"), Client(node, "b", resume=False)
    channel = open_channel(b, a)
    remote = open_channel(Client(cluster.nodes[TWO], "c", resume=False), a)
    node.drop(a.cid)
    node.core.session_ended(a.cid, False)
    node.core.session_ended(a.cid, False)
    assert a.cid not in node.core.connections
    assert channel in node.core.channels  # its other end is here: Moved will say where
    assert remote not in node.core.channels
    assert kinds(b.process()) == []


def test_expiry_forgets_entries_of_sessions_that_left() -> None:
    cluster = Cluster(ONE, TWO)
    one = cluster.nodes[ONE]
    a, b = Client(one, "a"), Client(one, "b")
    one.drop(a.cid)
    one.run(one.core.on_bus([Take(b.cid, 1, TWO, 0)]))  # handed over at once (idle)
    one.core.connections.pop(a.cid)
    one.core._handing[a.cid] = (Take(a.cid, 1, TWO, 0), 0.0)
    cluster.now += WINDOW
    one.run(one.core.expire())
    assert one.core.detached_sessions() == []
    assert a.cid not in one.core._handing

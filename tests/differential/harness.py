"""Drive the same workload on real broker-node processes and observe every client.

A :class:`System` is one broker (a standalone node, or a cluster of nodes on one redis-server)
with a fixed number of workload clients, client ``i`` connected to node ``i % len(nodes)``.
Each client reads every frame its connection receives (:class:`TracedClient`), checks that
the broker's frame ids increase from 1, and the system turns frames into the model's symbolic
form: connection and channel ids become the names the model gave them, ``replyTo`` the
request's tag. :meth:`System.step` sends the requests of one step (a client's requests are
written back to back, without awaiting replies) and waits until what every client observed
is one of the legal outcomes, or fails with what was seen and what was allowed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.differential.model import (
    Action,
    Close,
    Disconnect,
    Expected,
    ListByRole,
    Message,
    Observation,
    Open,
    Outcome,
    Register,
    Request,
    matches,
    may_become,
)

#: Longest a step may take on a busy two-core machine (a cross-node request takes
#: milliseconds; a failure waits at most the nodes' 1 s request timeout).
STEP_TIMEOUT = 8.0
#: The role of the observer connection of each system, never used by the workload.
OBSERVER_ROLE = "observer"


class Divergence(AssertionError):
    """A system's clients observed something that no single node could have produced."""


class TracedClient:
    """One WebSocket connection that records every frame it receives."""

    def __init__(self, url: str, changed: asyncio.Event | None = None) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self.frames: list[dict[str, Any]] = []
        self.next_request_id = 1
        #: Set on every frame and on close (shared by the clients of one system).
        self.changed = changed if changed is not None else asyncio.Event()
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self.errors: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def connect(self) -> TracedClient:
        # No keepalive of our own: the loop only runs during steps (the node's pings are
        # answered whenever it runs, and its ping timeout is far longer than a pause).
        self.ws = await connect(
            self.url, max_size=None, open_timeout=STEP_TIMEOUT, ping_interval=None
        )
        self._reader = asyncio.create_task(self._read(self.ws))
        return self

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                received: dict[str, Any] = json.loads(raw)
                if received.get("id") != len(self.frames) + 1:
                    self.errors.append(f"frame id {received.get('id')} after {len(self.frames)}")
                self.frames.append(received)
                self.changed.set()
        except ConnectionClosed:
            pass
        finally:
            rcvd = ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else None
            self.closed.set()
            self.changed.set()

    def request_id(self) -> int:
        request_id = self.next_request_id
        self.next_request_id += 1
        return request_id

    async def send(self, frames: Sequence[dict[str, Any]]) -> None:
        assert self.ws is not None
        for one in frames:
            await self.ws.send(json.dumps(one))

    async def close(self) -> None:
        if self.ws is not None:
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await self.ws.close()
            except TimeoutError:
                self.ws.transport.abort()
        if self._reader is not None:
            await self._reader


@dataclass
class System:
    """One broker under test and the workload's clients on it."""

    name: str
    urls: list[str]
    clients: list[TracedClient] = field(default_factory=list)
    observer: TracedClient | None = None
    #: Symbolic name -> raw id, and back, for connections and channels.
    raw: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    #: (client, request id) -> the request's tag, per connection generation.
    tags: dict[tuple[int, int, int], str] = field(default_factory=dict)
    generation: list[int] = field(default_factory=list)
    #: Where each client's frames of the current step start.
    marks: list[int] = field(default_factory=list)
    #: The node (index into urls) each client is connected to.
    homes: list[int] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    unresolved: bool = False
    observer_id: str = ""

    def url_of(self, client: int) -> str:
        return self.urls[self.homes[client]]

    async def connect_all(self, count: int) -> None:
        if self.observer is None:
            self.observer = await TracedClient(self.urls[0]).connect()
            reply = await self.call(self.observer, {"type": "register", "role": OBSERVER_ROLE})
            self.observer_id = reply["connectionId"]
        self.homes = [i % len(self.urls) for i in range(count)]
        self.clients = list(
            await asyncio.gather(
                *(TracedClient(self.url_of(i), self.changed).connect() for i in range(count))
            )
        )
        self.generation = [0] * count
        self.marks = [0] * count
        self.raw.clear()
        self.names.clear()
        self.tags.clear()

    async def disconnect_all(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients))
        self.clients = []

    async def call(self, client: TracedClient, request: dict[str, Any]) -> dict[str, Any]:
        """A request outside the workload (the observer's), and its reply."""
        request_id = client.request_id()
        start = len(client.frames)
        await client.send([{**request, "id": request_id}])
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for received in client.frames[start:]:
                    if received.get("replyTo") == request_id:
                        return received
                if client.closed.is_set():
                    raise ConnectionError(f"{self.name}: connection closed awaiting a reply")
                client.changed.clear()
                await client.changed.wait()

    async def listed(self, role: str) -> set[str]:
        assert self.observer is not None
        reply = await self.call(self.observer, {"type": "list_by_role", "role": role})
        assert reply["type"] == "connections", reply
        return set(reply["ids"])

    # --- translating between the model's names and this system's ids ---------------------

    def raw_id(self, name: str) -> str:
        """The id this system knows ``name`` by (a fresh UUID for a name never assigned)."""
        if name not in self.raw:
            made = str(uuid.uuid4())
            self.raw[name] = made
            self.names[made] = name
        return self.raw[name]

    def wire(self, client: int, request: Request) -> dict[str, Any]:
        request_id = self.clients[client].request_id()
        self.tags[(client, self.generation[client], request_id)] = request.tag
        match request:
            case Register(role=role):
                return {"type": "register", "id": request_id, "role": role}
            case ListByRole(role=role):
                return {"type": "list_by_role", "id": request_id, "role": role}
            case Open(target=target):
                return {"type": "open", "id": request_id, "targetId": self.raw_id(target)}
            case Message(channel=channel, payload=payload):
                return {
                    "type": "message",
                    "id": request_id,
                    "channelId": self.raw_id(channel),
                    "payload": payload,
                }
            case Close(channel=channel):
                return {"type": "close", "id": request_id, "channelId": self.raw_id(channel)}

    def _learn(self, client: int, received: dict[str, Any]) -> None:
        """A success reply names the connection or channel that the request created."""
        tag = self.tags.get((client, self.generation[client], received.get("replyTo", -1)))
        if tag is None:
            return
        made: str | None = None
        if received.get("type") == "registered":
            made = received.get("connectionId")
            name = f"conn-{tag}"
        elif received.get("type") == "channel_opened":
            made = received.get("channelId")
            name = f"chan-{tag}"
        if isinstance(made, str) and made not in self.names:
            self.raw[name] = made
            self.names[made] = name

    def _name(self, raw: Any) -> Any:
        if isinstance(raw, str):
            if raw in self.names:
                return self.names[raw]
            self.unresolved = True
            return f"?{raw}"
        return raw

    def normalise(self, client: int, received: dict[str, Any]) -> Expected:
        fields: dict[str, Any] = {}
        for key, value in received.items():
            if key == "id":
                continue
            if key == "replyTo":
                tag = self.tags.get((client, self.generation[client], value))
                fields[key] = tag if tag is not None else f"?{value}"
            elif key in ("connectionId", "targetId", "from", "channelId"):
                fields[key] = self._name(value)
            elif key == "ids" and isinstance(value, list):
                fields[key] = tuple(sorted(self._name(v) for v in value))
            else:
                fields[key] = value
        return tuple(sorted(fields.items()))

    def observed(self) -> dict[int, list[Expected]]:
        """This step's frames, normalised (``unresolved`` if an id is not known yet: the
        target may hear of a channel before its opener's reply names it)."""
        self.unresolved = False
        step_frames = {c: self.clients[c].frames[self.marks[c] :] for c in range(len(self.clients))}
        for client, frames in step_frames.items():
            for received in frames:
                self._learn(client, received)
        return {
            client: [self.normalise(client, received) for received in frames]
            for client, frames in step_frames.items()
        }

    # --- one step ------------------------------------------------------------------------

    async def _run_program(self, client: int, program: Sequence[Action]) -> None:
        requests: list[dict[str, Any]] = []
        for action in program:
            if isinstance(action, Disconnect):
                assert not requests, "a disconnect ends a client's program"
                await self.reconnect(client)
            else:
                requests.append(self.wire(client, action))
        if requests:
            await self.clients[client].send(requests)

    async def reconnect(self, client: int, home: int | None = None) -> None:
        """Close the client's connection and open a new one (to ``home`` if given)."""
        await self.clients[client].close()
        if home is not None:
            self.homes[client] = home
        self.clients[client] = await TracedClient(self.url_of(client), self.changed).connect()
        self.generation[client] += 1
        self.marks[client] = 0

    async def step(
        self, programs: dict[int, Sequence[Action]], legal: Sequence[Outcome]
    ) -> Outcome:
        """Run the clients' programs at once; the legal outcome that every client observed."""
        self.marks = [len(c.frames) for c in self.clients]
        await asyncio.gather(*(self._run_program(c, p) for c, p in programs.items()))
        return await self.settle(legal, f"step {programs}")

    async def settle(
        self, legal: Sequence[Outcome], what: str, timeout: float = STEP_TIMEOUT
    ) -> Outcome:
        """Wait until every client observed one of ``legal``; Divergence if none comes."""
        seen: dict[int, list[Expected]] = {}
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self.changed.clear()
                    seen = self.observed()
                    for outcome in legal:
                        if all(matches(seen[c], outcome.seen[c]) for c in seen):
                            self._check_ids()
                            return outcome
                    if not self.unresolved and not any(
                        all(may_become(seen[c], o.seen[c]) for c in seen) for o in legal
                    ):
                        break
                    await self.changed.wait()
        except TimeoutError:
            pass
        raise Divergence(describe(self.name, what, seen, [o.seen for o in legal]))

    def _check_ids(self) -> None:
        for index, client in enumerate(self.clients):
            if client.errors:
                raise Divergence(f"{self.name}: client {index}: {client.errors}")


def describe(
    system: str,
    what: str,
    seen: dict[int, list[Expected]],
    legal: Sequence[dict[int, Observation]],
) -> str:
    lines = [f"{system}: no single-node outcome matches after {what}", "observed:"]
    lines += [f"  client {c}: {[dict(f) for f in frames]}" for c, frames in seen.items()]
    for number, outcome in enumerate(legal, 1):
        lines.append(f"legal outcome {number}:")
        lines += [f"  client {c}: {_show(obs)}" for c, obs in outcome.items()]
    return "\n".join(lines)


def _show(observation: Observation) -> list[object]:
    return [
        dict(item) if isinstance(item, tuple) else [dict(f) for f in item.frames]
        for item in observation
    ]

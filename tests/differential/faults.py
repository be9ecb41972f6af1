"""The workload with faults injected between steps, on a cluster (issue 10 item 3).

What a fault must lead to is fixed by ``../shared/docs/cluster-semantics.md``:

- a node stopped (SIGTERM) or killed (SIGKILL): its clients lose their connections; every
  channel with an end there is reported closed (``channel_closed_notification``) to its other
  end; the clients reconnect to another node; the node is then started again (a killed one
  under a new node id, since the cluster fenced the old one);
- Redis restarted empty, or the nodes' pub/sub connections killed: nothing a client can see.

After each fault the checks are the same: every channel the model holds open carries a
message in each direction (never silently dead, never half-open; every confirmed message is
seen by its recipient in the same step), and Redis holds an entry for exactly the live
connections and channels (keys counted).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule
from redis.asyncio import Redis

from tests.differential.harness import OBSERVER_ROLE, System
from tests.differential.model import (
    Action,
    Disconnect,
    Message,
    Outcome,
    Unordered,
    outcomes,
)
from tests.differential.workload import ROLES, Workload
from tests.integration.helpers import KEYS
from tests.support.cluster import Cluster
from tests.support.polling import wait_for_value

#: Nodes that faults may hit; node 0 holds the observer connection that waits for cleanups.
FAULTY_NODES = (1, 2)
#: Cleanup after SIGKILL waits for the node's heartbeat to lapse (TTL 1 s) and a reaper.
FAULT_TIMEOUT = 20.0


#: What Redis holds: connection ids, channel ids, and the members of each role.
Stored = tuple[set[str], set[str], dict[str, set[str]]]


class Faults(Workload):
    """The single-client rules of :class:`Workload`, plus faults (see the module docstring)."""

    faults: ClassVar[frozenset[str]] = frozenset()
    nodes: ClassVar[Cluster]
    generation: ClassVar[int] = 0

    @property
    def cluster(self) -> System:
        return self.systems[0]

    # Concurrent races are the differential test's business; here the steps are sequential.
    both_ends_close_at_once = None  # type: ignore[assignment]
    messages_race_close = None  # type: ignore[assignment]
    close_races_disconnect = None  # type: ignore[assignment]

    # --- node faults -------------------------------------------------------------------------

    @precondition(lambda self: "stop" in self.faults)
    @rule(node=st.sampled_from(FAULTY_NODES))
    def stop_node(self, node: int) -> None:
        self._lose_node(node, kill=False)

    @precondition(lambda self: "kill" in self.faults)
    @rule(node=st.sampled_from(FAULTY_NODES))
    def kill_node(self, node: int) -> None:
        self._lose_node(node, kill=True)

    def _lose_node(self, node: int, *, kill: bool) -> None:
        cluster = self.cluster
        affected = [c for c in range(len(cluster.clients)) if cluster.homes[c] == node]
        legal = self._all_leave(affected)
        old = self.nodes.nodes[node]
        if kill:
            old.kill()
        else:
            old.terminate()
        refuge = next(
            n for n in range(len(self.nodes.nodes)) if n != node and n not in FAULTY_NODES
        )
        outcome = self.loop.run(self._after_loss(affected, refuge, legal), timeout=60)
        self.model = outcome.after
        self.loop.run(self._registry_matches(), timeout=60)
        Faults.generation += 1
        # A killed node was reaped and fenced: it comes back under a new id, as a replaced pod.
        self.nodes.replace(old, node_id=f"node-{node}-{Faults.generation}" if kill else None)
        self.probe_every_channel()

    def _all_leave(self, affected: Sequence[int]) -> list[Outcome]:
        """The clients' connections all close at once: one node's outcome (the peers'
        notifications in any order)."""
        legal = outcomes(
            self.model, {c: [Disconnect()] for c in affected}, len(self.cluster.clients)
        )
        first = legal[0]
        for client, seen in first.seen.items():
            frames = [
                f
                for item in seen
                for f in (item.frames if isinstance(item, Unordered) else (item,))
            ]
            first.seen[client] = [Unordered(tuple(frames))] if frames else []
        return [first]

    async def _after_loss(self, affected: list[int], refuge: int, legal: list[Outcome]) -> Outcome:
        cluster = self.cluster
        cluster.marks = [len(c.frames) for c in cluster.clients]
        for client in affected:
            # A client of a lost node notices its socket closed and connects elsewhere.
            async with asyncio.timeout(FAULT_TIMEOUT):
                await cluster.clients[client].closed.wait()
            await cluster.reconnect(client, home=refuge)
        return await cluster.settle(legal, "a lost node", timeout=FAULT_TIMEOUT)

    # --- Redis faults ------------------------------------------------------------------------

    @precondition(lambda self: "redis" in self.faults)
    @rule()
    def restart_redis_empty(self) -> None:
        self.nodes.redis.restart()
        self.probe_every_channel()
        self.loop.run(self._registry_matches(), timeout=60)

    @precondition(lambda self: "pubsub" in self.faults)
    @rule()
    def kill_pubsub_connections(self) -> None:
        self.loop.run(self._kill_pubsub())
        self.probe_every_channel()
        self.loop.run(self._registry_matches(), timeout=60)

    async def _kill_pubsub(self) -> None:
        redis: Redis = Redis.from_url(self.nodes.redis.url)
        try:
            await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # type: ignore[no-untyped-call]
        finally:
            await redis.aclose()

    # --- the checks after a fault ------------------------------------------------------------

    def probe_every_channel(self) -> None:
        """Each client sends one message on each of its channels: all must be delivered."""
        for client in range(len(self.cluster.clients)):
            me = self.model.connection_of[client]
            if me is None:
                continue
            program: list[Action] = [
                Message(self.tag(), name, f"probe {name} from {me}")
                for name in self.model.channels_of(me)
            ]
            if program:
                self.step({client: program})

    async def _registry_matches(self) -> None:
        """Redis holds exactly the live connections (and the observer) and channels."""
        cluster = self.cluster
        connections = {cluster.raw_id(name) for name in self.model.roles}
        channels = {cluster.raw_id(name) for name in self.model.channels}
        assert cluster.observer is not None
        expected_roles = {
            role: {cluster.raw_id(n) for n, r in self.model.roles.items() if r == role}
            for role in ROLES
        }

        def live(stored: Stored) -> bool:
            conns, chans, roles = stored
            return (
                conns - {cluster.observer_id} == connections
                and chans == channels
                and all(roles.get(r, set()) == expected_roles[r] for r in ROLES)
            )

        redis: Redis = Redis.from_url(self.nodes.redis.url, decode_responses=True)
        try:
            await wait_for_value(
                lambda: _stored(redis),
                live,
                timeout=FAULT_TIMEOUT,
                message=f"Redis to hold the live connections {connections} and channels {channels}",
            )
        finally:
            await redis.aclose()


async def _stored(redis: Redis) -> Stored:
    conns: set[str] = set()
    chans: set[str] = set()
    roles: dict[str, set[str]] = {}
    async for key in redis.scan_iter(match=KEYS.pattern, count=1000):
        if key.startswith(KEYS.connection_prefix):
            conns.add(key.removeprefix(KEYS.connection_prefix))
        elif key.startswith(KEYS.channel_prefix):
            chans.add(key.removeprefix(KEYS.channel_prefix))
        elif key.startswith(KEYS.role_prefix) and key != KEYS.role(OBSERVER_ROLE):
            members: set[str] = await redis.smembers(key)  # type: ignore[assignment]
            roles[key.removeprefix(KEYS.role_prefix)] = members
    return conns, chans, roles

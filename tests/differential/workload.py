"""The random workload: a Hypothesis state machine over the model and some systems.

Every rule is one step: it builds each acting client's program (one request, a pipelined
burst, a disconnect, or two clients at once in a true race), asks the model for the legal
outcomes, runs the step on every system at once and demands that each system's clients
observed one of them. Steps follow each other only once the previous one is complete, so
the causal order between steps is well defined; inside a step, only the races that the rule
names are concurrent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.differential.conftest import Loop
from tests.differential.harness import STEP_TIMEOUT, Divergence, System
from tests.differential.model import (
    Action,
    Close,
    Disconnect,
    ListByRole,
    Message,
    Model,
    Open,
    Outcome,
    Register,
    outcomes,
)
from tests.support.polling import wait_until

CLIENTS = 4
ROLES = ("r0", "r1")

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
clients = st.integers(min_value=0, max_value=CLIENTS - 1)
roles = st.sampled_from(ROLES)


class Workload(RuleBasedStateMachine):
    """Clients acting on every system in lockstep; see the module docstring."""

    loop: Loop
    systems: Sequence[System]

    def __init__(self) -> None:
        super().__init__()
        self.model = Model.fresh(CLIENTS)
        self.counter = 0
        self.loop.run(self._connect_all())

    async def _connect_all(self) -> None:
        await asyncio.gather(*(s.connect_all(CLIENTS) for s in self.systems))

    # --- running a step -------------------------------------------------------------------

    def tag(self) -> str:
        self.counter += 1
        return str(self.counter)

    def step(self, programs: dict[int, Sequence[Action]]) -> None:
        legal = outcomes(self.model, programs, CLIENTS)
        gone = [
            (name, self.model.roles[name])
            for client, program in programs.items()
            if any(isinstance(a, Disconnect) for a in program)
            and (name := self.model.connection_of[client]) is not None
        ]
        chosen = self.loop.run(self._step_everywhere(programs, legal))
        after = chosen[0].after
        assert all(o.after == after for o in chosen), "legal outcomes must agree on the state"
        self.model = after
        if gone:
            self.loop.run(self._until_unlisted(gone))

    async def _step_everywhere(
        self, programs: dict[int, Sequence[Action]], legal: list[Outcome]
    ) -> list[Outcome]:
        results = await asyncio.gather(
            *(s.step(programs, legal) for s in self.systems), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return [r for r in results if isinstance(r, Outcome)]

    async def _until_unlisted(self, gone: list[tuple[str, str]]) -> None:
        """A disconnect has no reply: wait until every system stopped listing the connection."""

        async def one(system: System) -> None:
            for name, role in gone:
                raw = system.raw_id(name)

                async def unlisted() -> bool:
                    return raw not in await system.listed(role)  # noqa: B023 - awaited at once

                await wait_until(
                    unlisted, timeout=STEP_TIMEOUT, message=f"{system.name}: {name} unlisted"
                )
            raise_if_late = [c for c in system.clients if c.errors]
            if raise_if_late:
                raise Divergence(f"{system.name}: {[c.errors for c in raise_if_late]}")

        await asyncio.gather(*(one(s) for s in self.systems))

    def teardown(self) -> None:
        self.loop.run(self._reset())

    async def _reset(self) -> None:
        await asyncio.gather(*(s.disconnect_all() for s in self.systems))

        async def empty(system: System) -> None:
            for role in ROLES:

                async def nobody() -> bool:
                    return not await system.listed(role)  # noqa: B023 - awaited at once

                await wait_until(
                    nobody, timeout=STEP_TIMEOUT, message=f"{system.name}: nobody in {role}"
                )

        await asyncio.gather(*(empty(s) for s in self.systems))

    # --- choices ---------------------------------------------------------------------------

    def channel_for(self, data: st.DataObject, client: int) -> str:
        me = self.model.connection_of[client]
        own = self.model.channels_of(me) if me is not None else []
        choices = own + self.model.known_channels + ["chan-never-opened"]
        return data.draw(st.sampled_from(choices), label="channel")

    def target_for(self, data: st.DataObject, client: int) -> str:
        me = self.model.connection_of[client]
        live = sorted(self.model.roles)
        # Not the client itself: on a channel to oneself the node confirms a message once the
        # kernel took the delivery, so the confirmation may follow later deliveries on the
        # same socket (reported; no single-client order to demand there yet).
        choices = [n for n in live + self.model.known_connections if n != me]
        choices.append("conn-never-registered")
        return data.draw(st.sampled_from(choices), label="target")

    def request_for(self, data: st.DataObject, client: int) -> Action:
        kind = data.draw(st.sampled_from(["message", "message", "close", "list", "open"]))
        if kind == "message":
            payload = data.draw(json_values, label="payload")
            return Message(self.tag(), self.channel_for(data, client), payload)
        if kind == "close":
            return Close(self.tag(), self.channel_for(data, client))
        if kind == "list":
            return ListByRole(self.tag(), data.draw(roles))
        return Open(self.tag(), self.target_for(data, client))

    def two_ended_channels(self) -> list[str]:
        return [n for n, ch in self.model.channels.items() if ch.opener != ch.target]

    # --- rules: one client at a time ---------------------------------------------------------

    @initialize(chosen=st.lists(roles, min_size=CLIENTS, max_size=CLIENTS))
    def register_everyone(self, chosen: list[str]) -> None:
        for client, role in enumerate(chosen):
            self.step({client: [Register(self.tag(), role)]})

    @rule(client=clients, role=roles)
    def register(self, client: int, role: str) -> None:
        self.step({client: [Register(self.tag(), role)]})

    @rule(client=clients, role=roles)
    def list_by_role(self, client: int, role: str) -> None:
        self.step({client: [ListByRole(self.tag(), role)]})

    @rule(client=clients, data=st.data())
    def open(self, client: int, data: st.DataObject) -> None:
        self.step({client: [Open(self.tag(), self.target_for(data, client))]})

    @rule(client=clients, data=st.data(), payload=json_values)
    def message(self, client: int, data: st.DataObject, payload: Any) -> None:
        self.step({client: [Message(self.tag(), self.channel_for(data, client), payload)]})

    @rule(client=clients, data=st.data())
    def close(self, client: int, data: st.DataObject) -> None:
        self.step({client: [Close(self.tag(), self.channel_for(data, client))]})

    @rule(client=clients, data=st.data(), size=st.integers(min_value=2, max_value=8))
    def pipelined_burst(self, client: int, data: st.DataObject, size: int) -> None:
        self.step({client: [self.request_for(data, client) for _ in range(size)]})

    @rule(client=clients, data=st.data(), size=st.integers(min_value=2, max_value=30))
    def message_burst(self, client: int, data: st.DataObject, size: int) -> None:
        channel = self.channel_for(data, client)
        self.step({client: [Message(self.tag(), channel, n) for n in range(size)]})

    @rule(client=clients)
    def disconnect(self, client: int) -> None:
        self.step({client: [Disconnect()]})

    # --- rules: true races -------------------------------------------------------------------

    @precondition(lambda self: self.two_ended_channels())
    @rule(data=st.data())
    def both_ends_close_at_once(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.two_ended_channels()))
        channel = self.model.channels[name]
        programs: dict[int, Sequence[Action]] = {}
        for end in channel.ends():
            client = self.model.client_of(end)
            assert client is not None
            programs[client] = [Close(self.tag(), name)]
        self.step(programs)

    @precondition(lambda self: self.two_ended_channels())
    @rule(data=st.data(), size=st.integers(min_value=1, max_value=4), opener_sends=st.booleans())
    def messages_race_close(self, data: st.DataObject, size: int, opener_sends: bool) -> None:
        name = data.draw(st.sampled_from(self.two_ended_channels()))
        channel = self.model.channels[name]
        sender, closer = (
            (channel.opener, channel.target) if opener_sends else (channel.target, channel.opener)
        )
        sending, closing = self.model.client_of(sender), self.model.client_of(closer)
        assert sending is not None and closing is not None
        self.step(
            {
                sending: [Message(self.tag(), name, n) for n in range(size)],
                closing: [Close(self.tag(), name)],
            }
        )

    @precondition(lambda self: self.two_ended_channels())
    @rule(data=st.data(), opener_closes=st.booleans())
    def close_races_disconnect(self, data: st.DataObject, opener_closes: bool) -> None:
        name = data.draw(st.sampled_from(self.two_ended_channels()))
        channel = self.model.channels[name]
        closer, leaver = (
            (channel.opener, channel.target) if opener_closes else (channel.target, channel.opener)
        )
        closing, leaving = self.model.client_of(closer), self.model.client_of(leaver)
        assert closing is not None and leaving is not None
        self.step({closing: [Close(self.tag(), name)], leaving: [Disconnect()]})

    @invariant()
    def frame_ids_increase(self) -> None:
        for system in self.systems:
            for index, client in enumerate(system.clients):
                if client.errors:
                    raise Divergence(f"{system.name}: client {index}: {client.errors}")

"""The one request dispatcher: each request a client sent goes to the core, with the registry
round trips some of them need.

Theory of operation: a connection reads a request and offers it to ``try_now``, which takes
what never waits for the registry (message and close on a channel this node holds, ack) and
executes the core's decision at once. Anything else, and anything behind a request still
waiting, goes to the connection's backlog, whose worker awaits ``handle`` for each in arrival
order. A request that waited is handled only if its client is still connected (the one guard
here: ``try_now`` runs while the connection reads, and the connection reads only while open).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from broker_node.auth.identity import Identity, TokenRefusal
from broker_node.cluster.base import Registry
from broker_node.core.actions import Action, ForgetConnection
from broker_node.core.broker import REGISTRY_UNAVAILABLE, BrokerCore
from broker_node.errors import BackendUnavailable
from broker_node.executor import RegistryWrites
from broker_node.registry_calls import RegistryCaller
from shared.codec import Rejection, rejection_kind
from shared.ids import ChannelId, ConnectionId, NodeId
from shared.messages import (
    Ack,
    Close,
    ListByRole,
    Message,
    Open,
    Refresh,
    Register,
    Request,
    Resume,
)

#: How many ids of a list_by_role reply weigh as much as one request against the rate limit.
LIST_IDS_PER_REQUEST: Final = 50
#: What a refresh is checked against on a node without authentication (the core refuses it).
_NO_AUTH: Final = TokenRefusal("authentication is off")


class Authenticator(Protocol):
    """Tokens and the per-user connection limit (issue 13)."""

    def verify(self, token: str | None) -> Identity | TokenRefusal | None: ...
    async def take_slot(self, cid: ConnectionId, identity: Identity | None) -> str | None: ...
    def drop_slot(self, cid: ConnectionId) -> None: ...


class CostedClient(Protocol):
    def add_request_cost(self, requests: int) -> None: ...


class Dispatcher:
    """Requests to the core (see the module docstring)."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        core: BrokerCore,
        execute: Callable[[list[Action]], None],
        registry: Registry,
        calls: RegistryCaller,
        writes: RegistryWrites,
        auth: Authenticator,
        clients: Mapping[ConnectionId, CostedClient],
        bad_frame: Callable[[str], None],
        standalone: bool,
        max_list_page: int,
    ) -> None:
        self._node_id = node_id
        self._core = core
        self._execute = execute
        self._registry = registry
        self._calls = calls
        self._writes = writes
        self._auth = auth
        self._clients = clients
        self._bad_frame = bad_frame
        self._standalone = standalone
        self._max_list_page = max_list_page
        # Bound once: try_now runs for every message.
        self._knows_channel = core.knows_channel
        self._message = core.message
        self._close = core.close

    def try_now(self, cid: ConnectionId, request: Request | Rejection) -> bool:
        """Handle ``request`` right away if it needs no registry round trip; False: it waits
        its turn in the connection's backlog (``handle``)."""
        # message and close on a channel this node holds never wait for the registry.
        kind = type(request)
        if kind is Message:
            channel_id: str = request.channelId  # type: ignore[union-attr]
            if self._standalone or self._knows_channel(cid, channel_id):
                self._execute(self._message(cid, request))  # type: ignore[arg-type]
                return True
        elif kind is Close:
            channel_id = request.channelId  # type: ignore[union-attr]
            if self._standalone or self._knows_channel(cid, channel_id):
                self._execute(self._close(cid, request))  # type: ignore[arg-type]
                return True
        elif kind is Ack:
            # A resumable client acknowledges as it reads: its session is this node's, so the
            # registry has nothing to say, and no backlog task is made for it.
            self._execute(self._core.ack(cid, request))  # type: ignore[arg-type]
            return True
        return False

    def binary(self, cid: ConnectionId | None) -> None:
        """A binary message: refused (the protocol is text only)."""
        self._bad_frame("binary")
        if cid is not None:
            self._execute(self._core.binary_frame(cid))

    async def handle(self, cid: ConnectionId, request: Request | Rejection) -> None:
        """One request, in arrival order, possibly waiting for the registry."""
        core = self._core
        execute = self._execute
        if not core.is_connected(cid):
            return
        if isinstance(request, Message):
            elsewhere = await self._open_elsewhere(cid, request.channelId)
            if not core.is_connected(cid):
                # Gone during the lookup: the core forgot the client and its channels.
                return
            if elsewhere is not None:
                execute(core.message(cid, request, elsewhere=elsewhere))
            else:
                execute(core.fail_on_channel(cid, "message", request, REGISTRY_UNAVAILABLE))
        elif isinstance(request, Close):
            elsewhere = await self._open_elsewhere(cid, request.channelId)
            if not core.is_connected(cid):
                return
            if elsewhere is not None:
                execute(core.close(cid, request, elsewhere=elsewhere))
            else:
                execute(core.fail_on_channel(cid, "close", request, REGISTRY_UNAVAILABLE))
        elif isinstance(request, Register):
            await self._register(cid, request)
        elif isinstance(request, ListByRole):
            await self._list_by_role(cid, request)
        elif isinstance(request, Open):
            await self._open(cid, request)
        elif isinstance(request, Refresh):
            verified = self._auth.verify(request.token)
            execute(core.refresh(cid, request, verified if verified is not None else _NO_AUTH))
        elif isinstance(request, Resume):
            await self._resume(cid, request)
        elif isinstance(request, Ack):
            execute(core.ack(cid, request))
        else:
            self._bad_frame(rejection_kind(request))
            execute(core.reject(cid, request))

    async def _open_elsewhere(self, cid: ConnectionId, channel_id: str) -> bool | None:
        """For a channel this node does not hold: is it open on other nodes, with ``cid`` not
        one of its ends? (That connection is then "not authorized", as on one node, rather
        than told the channel does not exist; an end of a channel this node no longer holds
        was closed already.) None when the registry cannot say."""
        if self._standalone or self._core.knows_channel(cid, channel_id):
            return False
        try:
            record = await self._calls.call(
                "find_channel", self._registry.find_channel(ChannelId(channel_id))
            )
        except BackendUnavailable:
            return None
        return record is not None and record.peer_of(cid) is None

    async def _register(self, cid: ConnectionId, request: Register) -> None:
        core = self._core
        plan = core.begin_register(cid, request, self._auth.verify(request.token))
        if isinstance(plan, list):
            self._execute(plan)
            return
        limit_error = await self._auth.take_slot(cid, core.identity_of(cid))
        if limit_error is not None:
            self._execute(core.finish_register(cid, request, limit_error))
            return
        error = None
        with self._writes.writing_connection(cid):
            try:
                await self._calls.call("add_connection", self._registry.add_connection(plan))
            except BackendUnavailable:
                error = REGISTRY_UNAVAILABLE
                # Outcome unknown: a stalled Redis runs the write when it resumes, which would
                # list a connection that was refused. Resynchronise once it answers.
                self._writes.mark_dirty()
        if error is None and not core.is_connected(cid):
            self._writes.forget(ForgetConnection(plan))
        if error is not None or not core.is_connected(cid):
            self._auth.drop_slot(cid)
        self._execute(core.finish_register(cid, request, error))

    async def _resume(self, cid: ConnectionId, request: Resume) -> None:
        core = self._core
        plan = core.begin_resume(cid, request, self._auth.verify(request.token))
        if isinstance(plan, list):
            self._execute(plan)
            return
        claim = None
        with contextlib.suppress(BackendUnavailable):
            claim = await self._calls.call(
                "claim_session",
                self._registry.claim_session(
                    plan.session_id,
                    plan.token_hash,
                    plan.new_token_hash,
                    self._node_id,
                    int(time.time() * 1000),
                ),
            )
        self._execute(core.claimed(cid, request, plan, claim))

    async def _list_by_role(self, cid: ConnectionId, request: ListByRole) -> None:
        core = self._core
        refusal = core.begin_list(cid, request)
        if refusal is not None:
            self._execute(refusal)
            return
        ids = None
        with contextlib.suppress(BackendUnavailable):
            ids = await self._calls.call("list_by_role", self._registry.list_by_role(request.role))
        self._execute(core.finish_list(cid, request, ids))
        client = self._clients.get(cid)
        if ids and client is not None:
            # A reply of many ids costs the node and Redis far more than one request: it
            # counts as one request per LIST_IDS_PER_REQUEST ids against the client's rate.
            page = min(len(ids), self._max_list_page, request.limit or len(ids))
            client.add_request_cost(page // LIST_IDS_PER_REQUEST)

    async def _open(self, cid: ConnectionId, request: Open) -> None:
        # One flow, a core decision at each step: may it open, who is the target (registry),
        # which channel, the channel written (registry), then the two ends told.
        core = self._core
        refusal = core.begin_open(cid, request)
        if refusal is not None:
            self._execute(refusal)
            return
        try:
            target = await self._calls.call(
                "find_connection", self._registry.find_connection(ConnectionId(request.targetId))
            )
        except BackendUnavailable:
            self._execute(core.fail_open(cid, request, REGISTRY_UNAVAILABLE))
            return
        plan = core.plan_open(cid, request, target)
        if isinstance(plan, list):
            self._execute(plan)
            return
        try:
            with self._writes.writing_channel(plan.channel_id):
                await self._calls.call("add_channel", self._registry.add_channel(plan))
        except BackendUnavailable:
            # As for register: the channel may still be written; resynchronise when back.
            self._writes.mark_dirty()
            self._execute(core.fail_open(cid, request, REGISTRY_UNAVAILABLE))
            return
        self._execute(core.launch_open(cid, request, plan))

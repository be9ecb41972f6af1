"""The SDK against a node with authentication: a token callback, refresh, reconnects."""

from __future__ import annotations

import asyncio

import pytest

from client import BrokerClient
from client.errors import RequestFailed
from tests.client.helpers import client_tasks
from tests.support.nodes import NodeProcess
from tests.support.polling import wait_until
from tests.support.ports import free_port
from tests.support.tokens import SECRET, claims, hs256

AUTH_ENV = {"BROKER_AUTH_SECRET": SECRET}
GRACE_ARGS = ["--auth-grace", "0.5", "--auth-leeway", "0"]


class Tokens:
    """An async token callback that counts its calls; each token has its own jti."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.issued: list[str] = []

    async def __call__(self) -> str:
        jti = f"t-{len(self.issued)}"
        self.issued.append(jti)
        return hs256(claims(sub="alice", roles=["worker"], ttl=self.ttl, jti=jti))


async def test_callback_refreshes_before_expiry_on_the_same_connection() -> None:
    tokens = Tokens(ttl=4)
    with NodeProcess(extra_args=GRACE_ARGS, env=AUTH_ENV) as node:
        async with BrokerClient(node.url, "worker", token=tokens) as client:
            first_id = client.connection_id
            # Refreshed at 80 % of each 3-4 s lifetime: two refreshes outlive the first
            # token's exp + grace on the same connection.
            await wait_until(
                lambda: len(tokens.issued) >= 3, timeout=15, message="two token refreshes"
            )
            assert client.connected and client.connection_id == first_id
            assert await client.list_by_role("nobody") == []
    assert client_tasks() == set()


async def test_callback_gives_a_fresh_token_on_every_reconnect() -> None:
    tokens = Tokens(ttl=300)
    port = free_port()
    connected = asyncio.Event()
    node = NodeProcess(port=port, extra_args=GRACE_ARGS, env=AUTH_ENV).start()
    try:
        client = BrokerClient(
            node.url,
            "worker",
            token=tokens,
            maintain_connection=True,
            backoff_base=0.05,
            backoff_cap=0.2,
            on_connected=connected.set,
        )
        async with client:
            assert tokens.issued == ["t-0"]
            connected.clear()
            await asyncio.to_thread(node.terminate)  # graceful: clients get 1001
            node.log.unlink(missing_ok=True)
            node = NodeProcess(port=port, extra_args=GRACE_ARGS, env=AUTH_ENV)
            await asyncio.to_thread(node.start)
            async with asyncio.timeout(20):
                await connected.wait()
            # Every connection attempt asked for a token; the last one registered.
            assert len(tokens.issued) >= 2 and client.connected
    finally:
        await asyncio.to_thread(node.__exit__, None, None, None)


async def test_a_static_token_that_is_refused_fails_connect() -> None:
    with NodeProcess(env=AUTH_ENV) as node:
        client = BrokerClient(node.url, "worker", token=hs256(claims(roles=["other"])))
        with pytest.raises(RequestFailed, match="Role not allowed for this token"):
            await client.connect()
        await client.close()

"""Authentication and the role policy against real broker-node processes (issue 13).

Every refused token gets its documented answer; tokens travel in ``register``, in the
``Sec-WebSocket-Protocol`` header and (only when enabled) in ``?token=``; a connection without a
token is closed after ``--auth-timeout``; refresh before and after expiry; the policy filters
``list_by_role`` and makes a forbidden ``open`` look like an ``open`` to a missing connection,
across nodes.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from shared.messages import CLOSE_TOKEN_EXPIRED, CLOSE_TOKEN_INVALID
from tests.integration.helpers import frames_for, list_role
from tests.support.cluster import Cluster, fast_args
from tests.support.nodes import BROKER_NODE, NodeProcess, http_get
from tests.support.polling import wait_until
from tests.support.tokens import (
    OTHER_SECRET,
    SECRET,
    claims,
    ec_pair,
    ed25519_pair,
    hs256,
    jwks,
    rsa_pair,
    signed,
    unsigned,
)
from tests.support.wire import WireClient

AUTH_ENV = {"BROKER_AUTH_SECRET": SECRET}
POLICY = """
[roles.server]
list = ["tab"]
open = ["tab", "service"]

[roles.tab]
accept = ["server"]

[roles.service]
list = ["*"]
open = ["*"]
"""


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    # A short auth timeout and grace, with room for a slow machine between connect and register.
    args = ["--auth-audience", "brokers", "--auth-timeout", "3", "--auth-grace", "1"]
    with NodeProcess(extra_args=args, env=AUTH_ENV) as process:
        yield process


@pytest.fixture
async def client(node: NodeProcess) -> AsyncIterator[WireClient]:
    async with WireClient(node.url) as made:
        yield made


def token(**kw: Any) -> str:
    kw.setdefault("aud", "brokers")
    return hs256(claims(**kw))


async def register(client: WireClient, role: str, tok: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"role": role}
    if tok is not None:
        fields["token"] = tok
    return await client.request("register", **fields)


async def test_a_valid_token_registers_and_says_when_it_expires(client: WireClient) -> None:
    reply = await register(client, "a", token(roles=["a"], ttl=300))
    assert reply["type"] == "registered", reply
    assert 290 <= reply["expiresIn"] <= 300


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (
            lambda: hs256(claims(aud="brokers"), secret=OTHER_SECRET),
            "signature verification failed",
        ),
        (lambda: token(ttl=-60), "expired"),
        (lambda: token(nbf=int(time.time()) + 120), "not yet valid"),
        (lambda: signed(rsa_pair(), claims(aud="brokers")), "algorithm not allowed"),
        (lambda: unsigned(claims(aud="brokers")), "algorithm not allowed"),
        (lambda: token(aud="elsewhere"), "audience not accepted"),
        (lambda: "garbage", "malformed"),
    ],
    ids=["forged", "expired", "not-yet-valid", "wrong-alg", "alg-none", "wrong-aud", "garbage"],
)
async def test_refused_tokens_get_their_answer(client: WireClient, make: Any, error: str) -> None:
    reply = await register(client, "a", make())
    assert reply["type"] == "register_failed"
    assert reply["error"] == f"Invalid token: {error}"


async def test_refusals_are_in_the_metrics(node: NodeProcess, client: WireClient) -> None:
    await register(client, "a", token(ttl=-60))
    _, body = await asyncio.to_thread(http_get, node.http + "/metrics", 1.0)
    assert 'broker_token_refusals_total{reason="expired"}' in body


async def test_wrong_role_and_no_token_are_refused(client: WireClient) -> None:
    reply = await register(client, "admin", token(roles=["a"]))
    assert reply == {
        "type": "register_failed",
        "id": 1,
        "replyTo": 1,
        "error": "Role not allowed for this token",
    }
    reply = await register(client, "a", None)
    assert reply["error"] == "Authentication required"


async def test_a_refused_register_may_be_retried_with_a_good_token(client: WireClient) -> None:
    assert (await register(client, "a", token(ttl=-60)))["type"] == "register_failed"
    assert (await register(client, "a", token(roles=["a"])))["type"] == "registered"


async def test_bearer_subprotocol_authenticates_and_the_app_protocol_is_echoed(
    node: NodeProcess,
) -> None:
    offered = ["broker.v1", f"broker.bearer.{token(roles=['a'])}"]
    async with WireClient(node.url, subprotocols=offered) as client:
        assert client.ws is not None and client.ws.subprotocol == "broker.v1"
        assert (await register(client, "a", None))["type"] == "registered"


@pytest.mark.parametrize(
    ("claimed", "code"),
    [({"ttl": -60}, CLOSE_TOKEN_EXPIRED), ({"aud": "elsewhere"}, CLOSE_TOKEN_INVALID)],
    ids=["expired", "invalid"],
)
async def test_a_refused_header_token_closes_with_its_code(
    node: NodeProcess, claimed: dict[str, Any], code: int
) -> None:
    # Made now, not at collection: a token made then may have expired by the time a long
    # run gets here, and an expired token is refused as expired whatever else is wrong.
    tok = token(**claimed)
    async with WireClient(node.url, subprotocols=["broker.v1", f"broker.bearer.{tok}"]) as client:
        closed_code, reason = await client.closed_with(timeout=10)
    assert closed_code == code
    assert reason is not None and reason.startswith("Invalid token: ")


async def test_query_token_is_ignored_unless_enabled(node: NodeProcess) -> None:
    async with WireClient(f"{node.url}/?token={token(roles=['a'])}") as client:
        assert (await register(client, "a", None))["error"] == "Authentication required"


async def test_query_token_when_enabled_is_never_logged() -> None:
    tok = token(roles=["a"])
    with NodeProcess(
        extra_args=["--auth-query-token", "--auth-audience", "brokers"], env=AUTH_ENV
    ) as process:
        async with WireClient(f"{process.url}/?token={tok}&errors=legacy") as client:
            assert (await register(client, "a", None))["type"] == "registered"
        output = process.output()
    assert "listening" in output
    assert tok not in output and tok.split(".")[2] not in output


async def test_no_token_in_time_closes_with_reconnect_code(client: WireClient) -> None:
    code, reason = await client.closed_with(timeout=10)
    assert (code, reason) == (CLOSE_TOKEN_EXPIRED, "Not authenticated in time")


async def test_expired_token_closes_after_the_grace(client: WireClient) -> None:
    # exp two seconds ahead; the node's grace is one second.
    assert (await register(client, "a", token(roles=["a"], ttl=2)))["type"] == "registered"
    code, reason = await client.closed_with(timeout=15)
    assert (code, reason) == (CLOSE_TOKEN_EXPIRED, "Token expired")


async def test_refresh_before_expiry_keeps_the_connection(client: WireClient) -> None:
    short = claims(roles=["a"], ttl=3, aud="brokers")
    assert (await register(client, "a", hs256(short)))["type"] == "registered"
    reply = await client.request("refresh", token=token(roles=["a"], ttl=300))
    assert reply["type"] == "refreshed" and reply["expiresIn"] >= 290
    # Past the first token's exp + grace (and a few checks): the connection is still served.
    listen_until = short["exp"] + 1 + 1.5
    assert await frames_for(client, max(0.0, listen_until - time.time())) == []
    assert (await client.request("list_by_role", role="a"))["type"] == "connections"


async def test_refresh_after_expiry_within_the_grace(node: NodeProcess) -> None:
    # A node with a long grace: the token expires while connected, the refresh comes after.
    args = ["--auth-audience", "brokers", "--auth-grace", "30", "--auth-leeway", "0"]
    with NodeProcess(extra_args=args, env=AUTH_ENV) as process:
        async with WireClient(process.url) as client:
            short_claims = claims(roles=["a"], ttl=2, aud="brokers")
            short = hs256(short_claims)
            assert (await register(client, "a", short))["type"] == "registered"
            # Waiting out the token's lifetime on the wall clock is what this test is about.
            await asyncio.sleep(max(0.0, short_claims["exp"] + 0.1 - time.time()))
            stale = await client.request("refresh", token=short)
            assert stale == {
                "type": "refresh_failed",
                "id": 2,
                "replyTo": 2,
                "error": "Invalid token: expired",
            }
            reply = await client.request("refresh", token=token(roles=["a"], ttl=300))
            assert reply["type"] == "refreshed"
            other = await client.request("refresh", token=token(sub="mallory", roles=["a"]))
            assert other["error"] == "Token is for another subject"


async def test_refresh_on_a_node_without_auth() -> None:
    with NodeProcess() as process:
        async with WireClient(process.url) as client:
            await client.register("a")
            reply = await client.request("refresh", token="x")
            assert reply["error"] == "Authentication is not enabled on this node"


# --- the policy, across two nodes ---------------------------------------------------------


@pytest.fixture
async def policy_cluster(cluster: Cluster, tmp_path: Path) -> Cluster:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    args = [*fast_args(), "--auth-policy", str(policy)]
    await cluster.start(2, args=args, env=AUTH_ENV)
    return cluster


async def authed(cluster: Cluster, node: NodeProcess, role: str, **kw: Any) -> WireClient:
    client = await cluster.client(node)
    reply = await register(client, role, hs256(claims(sub=f"user-{role}", roles=[role], **kw)))
    assert reply["type"] == "registered", reply
    client.connection_id = reply["connectionId"]
    return client


async def test_policy_filters_list_and_hides_forbidden_targets(policy_cluster: Cluster) -> None:
    first, second = policy_cluster.nodes
    server = await authed(policy_cluster, first, "server")
    tab = await authed(policy_cluster, second, "tab")
    service = await authed(policy_cluster, second, "service")
    assert tab.connection_id is not None and server.connection_id is not None
    # Listing: the server sees tabs, not services nor servers; a tab sees nothing.
    assert await list_role(server, "tab") == {tab.connection_id}
    assert await list_role(server, "service") == set()
    assert await list_role(tab, "server") == set()
    assert await list_role(service, "tab") == {tab.connection_id}
    # Open: allowed across nodes.
    await server.open(tab.connection_id)
    await tab.notification("incoming_channel")
    # The tab accepts only servers: the service's open looks exactly like an unknown target.
    forbidden = await service.request("open", targetId=tab.connection_id)
    missing_id = "00000000-0000-4000-8000-000000000000"
    missing = await service.request("open", targetId=missing_id)
    assert forbidden["type"] == missing["type"] == "channel_open_failed"
    assert forbidden["error"] == missing["error"] == "Target connection not found"
    assert forbidden["targetId"] == tab.connection_id and missing["targetId"] == missing_id
    assert set(forbidden) == set(missing)
    # A tab may open to nobody (no rule), even to the server that opened to it.
    refused = await tab.request("open", targetId=server.connection_id)
    assert refused["error"] == "Target connection not found"
    # The service may open to the server (its rule is "*", servers have no accept rule).
    await service.open(server.connection_id)


async def test_token_claims_narrow_the_policy(policy_cluster: Cluster) -> None:
    first, second = policy_cluster.nodes
    tab = await authed(policy_cluster, second, "tab")
    narrow = await authed(policy_cluster, first, "server", list=[], open=["service"])
    assert tab.connection_id is not None
    assert await list_role(narrow, "tab") == set()
    reply = await narrow.request("open", targetId=tab.connection_id)
    assert reply["error"] == "Target connection not found"


async def test_websockets_client_connect_offers_the_subprotocol(node: NodeProcess) -> None:
    # A raw websockets connect, as a browser would do it: the echoed protocol is broker.v1.
    offered = ["broker.v1", f"broker.bearer.{token(roles=['a'])}"]
    async with connect(node.url, subprotocols=offered) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "broker.v1"


# --- keys and configuration -------------------------------------------------------------


async def test_public_key_file(tmp_path: Path) -> None:
    pair = ec_pair()
    key_file = tmp_path / "key.pem"
    key_file.write_text(pair.public_pem)
    with NodeProcess(extra_args=["--auth-public-key", str(key_file)]) as process:
        async with WireClient(process.url) as client:
            good = signed(pair, claims(roles=["a"]))
            assert (await register(client, "a", good))["type"] == "registered"
        async with WireClient(process.url) as client:
            forged = signed(ec_pair(), claims(roles=["a"]))
            reply = await register(client, "a", forged)
            assert reply["error"] == "Invalid token: signature verification failed"


async def test_jwks_file_is_read_again_in_the_background(tmp_path: Path) -> None:
    old, new = rsa_pair(), ed25519_pair()
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(jwks(("old", old)))
    args = ["--auth-jwks", str(jwks_file), "--auth-jwks-refresh", "1"]
    with NodeProcess(extra_args=args) as process:
        async with WireClient(process.url) as client:
            token_old = signed(old, claims(roles=["a"]), kid="old")
            assert (await register(client, "a", token_old))["type"] == "registered"
        jwks_file.write_text(jwks(("new", new)))
        token_new = signed(new, claims(roles=["a"]), kid="new")

        async def rotated() -> bool:
            async with WireClient(process.url) as probe:
                return bool((await register(probe, "a", token_new))["type"] == "registered")

        await wait_until(rotated, timeout=15, interval=0.2, message="the rotated key accepted")
        async with WireClient(process.url) as client:
            reply = await register(client, "a", signed(old, claims(roles=["a"]), kid="old"))
            assert reply["error"] == "Invalid token: signing key not known"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--auth-secret", "s", "--auth-jwks", "/nonexistent"], "give one of"),
        (["--auth-secret", "s", "--auth-algorithm", "none"], "cannot be used"),
        (["--auth-secret", "s", "--auth-algorithm", "RS256"], "cannot be used"),
        (["--auth-jwks", "/nonexistent/jwks.json"], "cannot read the JWKS"),
    ],
)
def test_bad_auth_settings_stop_the_node(args: list[str], message: str) -> None:
    run = subprocess.run(
        [BROKER_NODE, "--host", "127.0.0.1", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_bad_policy_file_stops_the_node(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[roles.a]\nlist = 'b'\n")
    run = subprocess.run(
        [BROKER_NODE, "--port", "0", "--auth-secret", "s", "--auth-policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2 and "roles.a.list" in run.stderr, run.stderr


def test_a_loud_warning_without_auth_on_a_public_address() -> None:
    with NodeProcess(extra_args=["--host", "0.0.0.0"]) as process:
        assert "AUTHENTICATION IS OFF" in process.output()
    with NodeProcess() as process:  # 127.0.0.1
        assert "AUTHENTICATION IS OFF" not in process.output()


async def test_jwks_url(tmp_path: Path) -> None:
    import functools
    import http.server
    import threading

    pair = ec_pair()
    (tmp_path / "jwks.json").write_text(jwks(("k", pair)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
        with NodeProcess(extra_args=["--auth-jwks", url]) as process:
            async with WireClient(process.url) as client:
                good = signed(pair, claims(roles=["a"]), kid="k")
                assert (await register(client, "a", good))["type"] == "registered"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_unreadable_public_key_stops_the_node(tmp_path: Path) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_text("not a PEM")
    run = subprocess.run(
        [BROKER_NODE, "--port", "0", "--auth-public-key", str(key_file)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 2 and "cannot read the public key" in run.stderr, run.stderr

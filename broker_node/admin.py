"""``broker-admin``: operator commands against a running cluster (through its Redis).

    broker-admin kick-user SUB [--ttl SECONDS]   close every connection of a user, everywhere,
                                                 and refuse the user's tokens issued until now
    broker-admin revoke JTI [--ttl SECONDS]      close the connections of one token and refuse it

``--ttl`` is how long the revocation is remembered: set it to your tokens' longest lifetime.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click
from redis.asyncio import Redis
from redis.exceptions import RedisError

from broker_node.auth.revocation import Revocation, RevocationKeys, RevocationKind, announce

#: A day: the longest token lifetime the revocation outlives unless told otherwise.
DEFAULT_TTL = 24 * 60 * 60


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis-url",
    envvar="BROKER_REDIS_URL",
    show_envvar=True,
    required=True,
    help="The cluster's Redis (the nodes' --redis-url).",
)
@click.option(
    "--redis-prefix",
    envvar="BROKER_REDIS_PREFIX",
    show_envvar=True,
    default="broker",
    show_default=True,
    help="The nodes' --redis-prefix.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@click.pass_context
def main(ctx: click.Context, redis_url: str, redis_prefix: str, as_json: bool) -> None:
    """Administer a connection-broker cluster."""
    ctx.obj = {"url": redis_url, "keys": RevocationKeys(redis_prefix), "json": as_json}


_TTL = click.option(
    "--ttl",
    default=DEFAULT_TTL,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds the revocation is remembered (the tokens' longest lifetime).",
)


@main.command("kick-user")
@click.argument("sub")
@_TTL
@click.pass_obj
def kick_user(obj: dict[str, Any], sub: str, ttl: float) -> None:
    """Close every connection of the user SUB and refuse the user's current tokens."""
    _revoke(obj, "sub", sub, ttl)


@main.command("revoke")
@click.argument("jti")
@_TTL
@click.pass_obj
def revoke(obj: dict[str, Any], jti: str, ttl: float) -> None:
    """Close every connection of the token JTI and refuse it from now on."""
    _revoke(obj, "jti", jti, ttl)


def _revoke(obj: dict[str, Any], kind: RevocationKind, value: str, ttl: float) -> None:
    now = time.time()
    revocation = Revocation(kind=kind, value=value, at=now, until=now + ttl)
    try:
        nodes = asyncio.run(_announce(obj["url"], obj["keys"], revocation))
    except (RedisError, OSError) as exc:
        _fail(obj, f"cannot reach Redis: {exc}")
        return
    outcome = {"kind": kind, "value": value, "nodes": nodes, "until": revocation.until}
    if obj["json"]:
        click.echo(json.dumps(outcome))
    else:
        what = "user" if kind == "sub" else "token"
        click.echo(f"revoked {what} {value}: {nodes} nodes told; remembered for {ttl:g} s")


async def _announce(url: str, keys: RevocationKeys, revocation: Revocation) -> int:
    redis = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        return await announce(redis, keys, revocation)
    finally:
        await redis.aclose()


def _fail(obj: dict[str, Any], message: str) -> None:
    if obj["json"]:
        click.echo(json.dumps({"error": message}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(1)

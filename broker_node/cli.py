"""The ``broker-node`` and ``connection-broker`` commands."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import click

from broker_node.admission import parse_networks
from broker_node.config import Settings
from broker_node.errors import ConfigurationError
from broker_node.logs import configure_logging
from broker_node.node import BrokerNode
from shared.ids import NodeId, incarnation_id, new_node_id

logger = logging.getLogger("broker_node.cli")
_DEFAULTS = Settings(node_id=NodeId("-"))


_F = TypeVar("_F", bound=Callable[..., Any])


def _option(name: str, *aliases: str, **kwargs: Any) -> Callable[[_F], _F]:
    """A click option that is also the environment variable BROKER_<NAME>."""
    envvar = "BROKER_" + name.lstrip("-").replace("-", "_").upper()
    return click.option(
        name, *aliases, envvar=envvar, show_envvar=True, show_default=True, **kwargs
    )


# --- hostile input and resource limits (issue 15): each maps to the Settings field of its name
_LIMIT_OPTIONS: list[Callable[[_F], _F]] = [
    _option(
        "--max-json-depth",
        default=_DEFAULTS.max_json_depth,
        type=click.IntRange(min=2, max=256),
        help="Deepest JSON nesting of a frame; deeper ones get their *_failed reply "
        "(or a 1003 close when too deep to read).",
    ),
    _option(
        "--max-channels-per-connection",
        default=_DEFAULTS.max_channels_per_connection,
        type=click.IntRange(min=1),
        help="Channels one connection may be an end of; past it open fails.",
    ),
    _option(
        "--max-list-page",
        default=_DEFAULTS.max_list_page,
        type=click.IntRange(min=1),
        help="Most ids in one connections reply (list_by_role pages with after).",
    ),
    _option(
        "--max-requests-per-second",
        default=_DEFAULTS.max_requests_per_second,
        type=click.FloatRange(min=0),
        help="Frames per second per connection, bursts of twice that (0: no limit); over "
        "it the node stops reading that socket for a while.",
    ),
    _option(
        "--max-bytes-per-second",
        default=_DEFAULTS.max_bytes_per_second,
        type=click.IntRange(min=0),
        help="Bytes per second per connection, bursts of twice that (0: no limit); over "
        "it the node stops reading that socket for a while.",
    ),
    _option(
        "--handshake-timeout",
        default=_DEFAULTS.handshake_timeout,
        type=click.FloatRange(min=0.1),
        help="Seconds a connection has to send its HTTP request; then it is dropped.",
    ),
    _option(
        "--max-header-bytes",
        default=_DEFAULTS.max_header_bytes,
        type=click.IntRange(min=1024),
        help="Bytes of an HTTP request line and headers; larger requests get 431.",
    ),
    _option(
        "--max-connections",
        default=_DEFAULTS.max_connections,
        type=click.IntRange(min=1),
        help="WebSocket clients of this node; further upgrades get 503.",
    ),
    _option(
        "--max-connections-per-ip",
        default=_DEFAULTS.max_connections_per_ip,
        type=click.IntRange(min=0),
        help="WebSocket clients from one address (0: no limit); further upgrades get 429.",
    ),
    _option(
        "--trusted-proxies",
        default="",
        callback=lambda _ctx, _param, value: _networks(value),
        help="Comma-separated addresses or CIDRs of proxies whose X-Forwarded-For / "
        "X-Real-IP name the client (for --max-connections-per-ip and logs).",
    ),
    _option(
        "--allowed-origins",
        default="",
        callback=lambda _ctx, _param, value: _origins(value),
        help="Comma-separated Origins browsers may connect from (e.g. "
        "https://app.example.com); others get 403. Empty: any.",
    ),
    _option(
        "--metrics-port",
        default=None,
        type=click.IntRange(0, 65535),
        help="Serve /metrics (and /healthz, /readyz) on this port instead of the client "
        "port, where /metrics then answers 404.",
    ),
    _option(
        "--metrics-host",
        default=None,
        help="Interface of the --metrics-port listener  [default: --host]",
    ),
]


def _csv(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _networks(value: str | None) -> tuple[str, ...]:
    items = _csv(value)
    try:
        parse_networks(items)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    return tuple(items)


def _origins(value: str | None) -> tuple[str, ...]:
    return tuple(item.rstrip("/").lower() for item in _csv(value))


# --- session resume (issue 14): likewise
_LIMIT_OPTIONS += [
    _option(
        "--resume-window",
        default=_DEFAULTS.resume_window,
        type=click.IntRange(min=0),
        help="Seconds a resumable session waits for its client after a disconnect (0: "
        "resume off; register's resume field is then ignored).",
    ),
    _option(
        "--resume-max-frames",
        default=_DEFAULTS.resume_max_frames,
        type=click.IntRange(min=1),
        help="Frames a session keeps until its client acknowledges them (attached or not); "
        "past it the session ends.",
    ),
    _option(
        "--resume-max-bytes",
        default=_DEFAULTS.resume_max_bytes,
        type=click.IntRange(min=1),
        help="The same bound in bytes.",
    ),
]


def _limit_options(command: _F) -> _F:
    for option in reversed(_LIMIT_OPTIONS):
        command = option(command)
    return command


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@_limit_options
@_option("--host", default=_DEFAULTS.host, help="Interface to listen on.")
@_option("--port", "-p", default=_DEFAULTS.port, type=click.IntRange(0, 65535), help="Port.")
@_option(
    "--redis-url",
    default=None,
    help="redis://, rediss:// or unix:// URL; absent: a standalone node with no Redis.",
)
@_option("--redis-prefix", default=_DEFAULTS.redis_prefix, help="Prefix of every Redis key.")
@_option(
    "--node-id",
    default=None,
    help="This node's name (e.g. the pod name); each start adds an incarnation  [default: random]",
)
@_option(
    "--heartbeat-interval",
    default=_DEFAULTS.heartbeat_interval,
    type=click.FloatRange(min=0.05),
    help="Seconds between heartbeats (peers are checked every second, or this, if shorter).",
)
@_option(
    "--node-ttl",
    default=_DEFAULTS.node_ttl,
    type=click.FloatRange(min=0.1),
    help="A node dead this long is lost: reaped, its peers told.",
)
@_option(
    "--bus-batch-delay",
    default=_DEFAULTS.bus_batch_delay,
    type=click.FloatRange(min=0, max=1),
    help="Seconds to gather cross-node envelopes per Redis publish (0: one loop turn); "
    "trades latency for CPU.",
)
@_option(
    "--max-message-size",
    default=_DEFAULTS.max_message_size,
    type=click.IntRange(min=1),
    help="Largest frame in bytes; larger ones close the connection with 1009.",
)
@_option(
    "--max-role-length",
    default=_DEFAULTS.max_role_length,
    type=click.IntRange(min=1),
    help="Longest role, in characters.",
)
@_option(
    "--max-outbound-buffer",
    default=_DEFAULTS.max_outbound_buffer,
    type=click.IntRange(min=1024),
    help="Bytes queued for one client before it is closed with 1008 (slow consumer).",
)
@_option(
    "--max-unconfirmed",
    default=_DEFAULTS.max_unconfirmed,
    type=click.IntRange(min=1),
    help="Messages of one client awaiting confirmation before the node stops reading its "
    "socket (flow control; it resumes once half are confirmed).",
)
@_option(
    "--max-unconfirmed-bytes",
    default=None,
    type=click.IntRange(min=1),
    help="The same bound in payload bytes (default: half of --max-outbound-buffer).",
)
@_option(
    "--slow-consumer-timeout",
    default=_DEFAULTS.slow_consumer_timeout,
    type=click.FloatRange(min=0.01),
    help="Seconds a client's socket may take nothing while frames wait for it before it is "
    "closed with 1008 (slow consumer).",
)
@_option(
    "--request-timeout",
    default=_DEFAULTS.request_timeout,
    type=click.FloatRange(min=0.01),
    help="Seconds a request may wait for Redis or another node before it fails.",
)
@_option(
    "--drain-timeout",
    default=_DEFAULTS.drain_timeout,
    type=click.FloatRange(min=0),
    help="Seconds a graceful stop may take.",
)
@_option(
    "--ping-interval",
    default=_DEFAULTS.ping_interval,
    type=click.FloatRange(min=0),
    help="Seconds between keepalive pings to each client (0: none).",
)
@_option(
    "--ping-timeout",
    default=_DEFAULTS.ping_timeout,
    type=click.FloatRange(min=0.01),
    help="Seconds a client may take to answer a ping before it is closed (1011).",
)
@_option(
    "--log-level",
    default=_DEFAULTS.log_level,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@_option("--log-format", default=_DEFAULTS.log_format, type=click.Choice(["text", "json"]))
# --- authentication (issue 13) ---------------------------------------------------------
@_option(
    "--auth-secret",
    default=None,
    help="Turn authentication on: HS256 shared secret of the tokens (prefer the env var).",
)
@_option(
    "--auth-public-key",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Turn authentication on: PEM file of the public key (RS256, ES256, EdDSA).",
)
@_option(
    "--auth-jwks",
    default=None,
    help="Turn authentication on: JWKS file or http(s) URL, re-read in the background.",
)
@_option(
    "--auth-jwks-refresh",
    default=_DEFAULTS.auth_jwks_refresh,
    type=click.FloatRange(min=1),
    help="Seconds between JWKS refreshes.",
)
@_option(
    "--auth-algorithm",
    "auth_algorithms",
    multiple=True,
    help="Accepted token algorithm (repeat)  [default: HS256 for a secret, "
    "RS256/ES256/EdDSA for keys; never none]",
)
@_option("--auth-audience", default=None, help="Required token aud.")
@_option("--auth-issuer", default=None, help="Required token iss.")
@_option(
    "--auth-leeway",
    default=_DEFAULTS.auth_leeway,
    type=click.FloatRange(min=0),
    help="Seconds of clock skew allowed on exp and nbf.",
)
@_option(
    "--auth-timeout",
    default=_DEFAULTS.auth_timeout,
    type=click.FloatRange(min=0.1),
    help="Seconds a connection may stay without a valid token (then closed with 4001).",
)
@_option(
    "--auth-grace",
    default=_DEFAULTS.auth_grace,
    type=click.FloatRange(min=0),
    help="Seconds a connection may outlive its token without a refresh (then 4001).",
)
@_option(
    "--auth-policy",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="TOML role policy: who may list and open to which roles.",
)
@_option(
    "--auth-query-token",
    is_flag=True,
    default=False,
    help="Also accept ?token= on the URL (for the original JS client; never logged).",
)
@_option(
    "--auth-max-connections-per-user",
    default=_DEFAULTS.auth_max_connections_per_user,
    type=click.IntRange(min=0),
    help="Connections one user (token sub) may hold across the cluster (0: no limit).",
)
def main(
    *,
    host: str,
    port: int,
    redis_url: str | None,
    redis_prefix: str,
    node_id: str | None,
    heartbeat_interval: float,
    node_ttl: float,
    bus_batch_delay: float,
    max_message_size: int,
    max_role_length: int,
    max_outbound_buffer: int,
    max_unconfirmed: int,
    max_unconfirmed_bytes: int | None,
    slow_consumer_timeout: float,
    request_timeout: float,
    drain_timeout: float,
    ping_interval: float,
    ping_timeout: float,
    log_level: str,
    log_format: str,
    auth_secret: str | None = None,
    auth_public_key: str | None = None,
    auth_jwks: str | None = None,
    auth_jwks_refresh: float = _DEFAULTS.auth_jwks_refresh,
    auth_algorithms: tuple[str, ...] = (),
    auth_audience: str | None = None,
    auth_issuer: str | None = None,
    auth_leeway: float = _DEFAULTS.auth_leeway,
    auth_timeout: float = _DEFAULTS.auth_timeout,
    auth_grace: float = _DEFAULTS.auth_grace,
    auth_policy: str | None = None,
    auth_query_token: bool = False,
    auth_max_connections_per_user: int = 0,
    **limits: Any,
) -> None:
    """Run one node of the connection broker (standalone without --redis-url)."""
    resume_bytes = limits.get("resume_max_bytes", _DEFAULTS.resume_max_bytes)
    if resume_bytes > max_outbound_buffer:
        # A resume replays what the session kept into the client's outbound buffer.
        raise click.BadParameter(
            "must not exceed --max-outbound-buffer", param_hint="--resume-max-bytes"
        )
    if heartbeat_interval >= node_ttl:
        raise click.BadParameter(
            "must be shorter than --node-ttl", param_hint="--heartbeat-interval"
        )
    settings = Settings(
        host=host,
        port=port,
        redis_url=redis_url or None,
        redis_prefix=redis_prefix,
        node_id=incarnation_id(node_id) if node_id else new_node_id(),
        heartbeat_interval=heartbeat_interval,
        node_ttl=node_ttl,
        bus_batch_delay=bus_batch_delay,
        max_message_size=max_message_size,
        max_role_length=max_role_length,
        max_outbound_buffer=max_outbound_buffer,
        max_unconfirmed=max_unconfirmed,
        max_unconfirmed_bytes=max_unconfirmed_bytes,
        slow_consumer_timeout=slow_consumer_timeout,
        request_timeout=request_timeout,
        drain_timeout=drain_timeout,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        log_level=log_level,
        log_format="json" if log_format == "json" else "text",
        auth_secret=auth_secret or None,
        auth_public_key=_read_text(auth_public_key),
        auth_jwks=auth_jwks or None,
        auth_jwks_refresh=auth_jwks_refresh,
        auth_algorithms=tuple(auth_algorithms),
        auth_audience=auth_audience or None,
        auth_issuer=auth_issuer or None,
        auth_leeway=auth_leeway,
        auth_timeout=auth_timeout,
        auth_grace=auth_grace,
        auth_policy=auth_policy or None,
        auth_query_token=auth_query_token,
        auth_max_connections_per_user=auth_max_connections_per_user,
        **limits,
    )
    run(settings)


def _read_text(path: str | None) -> str | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as file:
        return file.read()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--port", "-p", default=3004, show_default=True, type=click.IntRange(0, 65535))
def connection_broker(port: int) -> None:
    """Drop-in for the original package's `connection-broker --port N`: a standalone node."""
    run(Settings(port=port))


def run(settings: Settings) -> None:
    configure_logging(
        level=settings.log_level, log_format=settings.log_format, node_id=settings.node_id
    )
    _raise_open_files_limit()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_serve(settings))
    else:
        uvloop.run(_serve(settings))


def _raise_open_files_limit() -> None:
    """One socket per client: allow as many as the hard limit does (often 1024 by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            logger.warning("could not raise the open files limit above %d", soft)


async def _serve(settings: Settings) -> None:
    try:
        node = BrokerNode(settings)
    except ConfigurationError as exc:
        raise click.UsageError(str(exc)) from exc
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    try:
        await node.start()
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        if settings.metrics_port is not None:
            where += f" or {settings.metrics_host or settings.host}:{settings.metrics_port}"
        raise click.ClickException(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    await stopping.wait()
    logger.info("signal received; draining")
    await node.stop()

"""The node's settings: one frozen object, every default in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shared.ids import NodeId, new_node_id

LogFormat = Literal["text", "json"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything a node can be told; the CLI maps each field to an option and a BROKER_* var."""

    # Listening
    host: str = "0.0.0.0"
    port: int = 3004

    # Cluster
    redis_url: str | None = None
    redis_prefix: str = "broker"
    node_id: NodeId = field(default_factory=new_node_id)
    heartbeat_interval: float = 5.0
    node_ttl: float = 15.0
    #: Seconds the bus outbox waits to gather envelopes before a publish (0: one loop turn).
    #: A millisecond batches several cross-node messages per Redis publish: less CPU per
    #: message for both nodes and Redis, about that much more latency per hop.
    bus_batch_delay: float = 0.0

    # Limits
    max_message_size: int = 1024 * 1024
    max_role_length: int = 256
    #: Bytes queued for one client before it is closed with 1008 "slow consumer".
    max_outbound_buffer: int = 4 * 1024 * 1024
    #: Flow control: messages of one connection awaiting confirmation before the node stops
    #: reading its socket (it resumes once half are confirmed); nothing is refused for it.
    max_unconfirmed: int = 4096
    #: The same bound in payload bytes (None: half of max_outbound_buffer, so that what one
    #: sender has in flight never makes its recipient a slow consumer by itself).
    max_unconfirmed_bytes: int | None = None
    #: A client whose socket takes nothing for this long while the node has frames for it is
    #: closed with 1008 "slow consumer" (as is one with more than max_outbound_buffer queued).
    slow_consumer_timeout: float = 30.0

    # Hostile input and resource limits (issue 15)
    #: Deepest JSON nesting of a frame (the request object is level 1); deeper frames are
    #: refused before the core or the bus sees them, since past ~1,000 levels no node can
    #: parse them.
    max_json_depth: int = 64
    #: Channels one connection may be an end of; past it ``open`` fails.
    max_channels_per_connection: int = 1000
    #: Most ids in one ``connections`` reply (more pages with ``after``).
    max_list_page: int = 1000
    #: Frames per second one connection may send (0: no limit), with bursts of twice that;
    #: over it the node stops reading the socket until the client is within its rate.
    max_requests_per_second: float = 10_000.0
    #: Bytes per second one connection may send (0: no limit), likewise; bursts of two
    #: seconds' worth, and at least two frames of the largest size.
    max_bytes_per_second: int = 64 * 1024 * 1024

    #: Seconds a connection has to send its whole HTTP request (the WebSocket upgrade).
    handshake_timeout: float = 5.0
    #: Bytes an HTTP request's line and headers may take (431 past it).
    max_header_bytes: int = 16 * 1024
    #: WebSocket clients of this node; further upgrades get 503 (/healthz still answers).
    max_connections: int = 50_000
    #: WebSocket clients from one client address (0: no limit); further upgrades get 429.
    max_connections_per_ip: int = 10_000
    #: Addresses or CIDR ranges of proxies whose X-Forwarded-For / X-Real-IP are believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Origins (scheme://host[:port], lower case) browsers may connect from; empty: any.
    allowed_origins: tuple[str, ...] = ()
    #: Serve /metrics on this port (and host) instead of the client port; None: client port.
    metrics_port: int | None = None
    metrics_host: str | None = None

    @property
    def request_burst(self) -> float:
        return 2 * self.max_requests_per_second

    @property
    def byte_burst(self) -> float:
        return max(2 * self.max_bytes_per_second, 2 * self.max_message_size)

    # Session resume (issue 14)
    #: Seconds a resumable session waits for its client after a disconnect; 0: resume off.
    resume_window: int = 120
    #: Frames (and bytes) a session keeps until its client acknowledges them; past either,
    #: the session ends (a slow consumer while attached; peers notified while detached).
    #: Above twice max_unconfirmed: a client that pipelines as much as flow control lets it
    #: has that many replies in flight before its acknowledgement comes back. At most
    #: max_outbound_buffer bytes, so that a resume's replay fits in the client's buffer.
    resume_max_frames: int = 10_000
    resume_max_bytes: int = 4 * 1024 * 1024

    # Timing
    #: How long a request that needs the cluster backend (or a cross-node confirmation) may
    #: take before it gets its ``*_failed`` reply; below the JS client's own 3 s timeout.
    request_timeout: float = 2.5
    #: Graceful stop: time to close clients and clean the registry before exiting.
    drain_timeout: float = 10.0
    #: Keepalive: a ping to every client this often (0: never). It finds clients whose host
    #: vanished without closing (they would stay listed by role), and keeps proxies from
    #: cutting idle connections.
    ping_interval: float = 20.0
    #: A client that has not answered a ping within this many seconds is closed (1011).
    ping_timeout: float = 20.0

    # Logging
    log_level: str = "info"
    log_format: LogFormat = "text"

    # Authentication (issue 13): on when one of the three key settings is given.
    #: HS256 shared secret (kept out of reprs and logs).
    auth_secret: str | None = field(default=None, repr=False)
    #: PEM text of a public key (RS256, ES256, EdDSA).
    auth_public_key: str | None = None
    #: A JWKS file path or http(s) URL, read again every ``auth_jwks_refresh`` seconds.
    auth_jwks: str | None = None
    auth_jwks_refresh: float = 300.0
    #: Accepted ``alg`` values; empty: HS256 for a secret, RS256/ES256/EdDSA for public keys.
    auth_algorithms: tuple[str, ...] = ()
    auth_audience: str | None = None
    auth_issuer: str | None = None
    #: Seconds of clock skew allowed on ``exp`` and ``nbf``.
    auth_leeway: float = 5.0
    #: Seconds a connection may stay without a valid token before it is closed (4001).
    auth_timeout: float = 10.0
    #: Seconds a connection may outlive its token's ``exp`` without a refresh (then 4001).
    auth_grace: float = 25.0
    #: Path of the TOML role policy (see broker_node/auth/policy.py); absent: token claims.
    auth_policy: str | None = None
    #: Accept ``?token=`` on the URL (for the original JS client; tokens in URLs end up in
    #: proxy logs, so it is off unless asked for).
    auth_query_token: bool = False
    #: Connections one user (``sub``) may hold across the cluster; 0: no limit.
    auth_max_connections_per_user: int = 0

    @property
    def unconfirmed_bytes_bound(self) -> int:
        if self.max_unconfirmed_bytes is not None:
            return self.max_unconfirmed_bytes
        return max(1, self.max_outbound_buffer // 2)

    @property
    def node_ttl_ms(self) -> int:
        return int(self.node_ttl * 1000)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_secret or self.auth_public_key or self.auth_jwks)

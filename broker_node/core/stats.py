"""Plain counters of one node, read by the metrics collector at scrape time.

Counting is a single integer increment on the hot path; Prometheus objects are built only
when /metrics is scraped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class NodeStats:
    messages_local: int = 0
    messages_cross_node_out: int = 0
    messages_cross_node_in: int = 0
    confirmations_sent: int = 0
    slow_consumers: int = 0
    #: Times a client's socket stopped being read because it had too much unconfirmed.
    flow_pauses: int = 0
    #: Bus payloads sent again because no node was listening on the inbox at the time.
    bus_retries: int = 0
    reaped_nodes: int = 0
    lost_nodes: int = 0
    bus_batches_in: int = 0
    bus_publishes: int = 0
    bus_publish_seconds: float = 0.0
    #: ``*_failed`` / ``error`` replies by reply type and reason (bounded label sets).
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Refused frames by kind (invalid_json, invalid_utf8, binary, too_big, bad_shape,
    #: unknown_type, bad_fields, too_deep, uncarriable).
    bad_frames: Counter[str] = field(default_factory=Counter)
    # --- hostile input and resource limits (issue 15, issue 11 item 3)
    #: Bus envelopes that could not be decoded and were dropped alone.
    bus_envelopes_dropped: int = 0
    #: Requests or connections refused, or sockets paused, at a limit, by limit name
    #: (channels, connections, connections_per_ip, handshake_timeout, header_bytes, origin,
    #: requests_rate, bytes_rate).
    limit_refusals: Counter[str] = field(default_factory=Counter)
    #: Registry calls: operation -> [count, total seconds, errors].
    registry_calls: dict[str, list[float]] = field(default_factory=dict)
    # Authentication (issue 13).
    #: Tokens refused, by reason (expired, signature verification failed, revoked, ...).
    token_refusals: Counter[str] = field(default_factory=Counter)
    #: Connections closed by authentication: timeout, expired, revoked, invalid_token.
    auth_closes: Counter[str] = field(default_factory=Counter)

    # Session resume (issue 14).
    #: Sessions resumed here, resumes refused, sessions handed over to another node, adopted
    #: from a lost node, ended by their window, ended by passing a bound of kept frames.
    resumes: int = 0
    resumes_refused: int = 0
    sessions_handed_over: int = 0
    sessions_adopted: int = 0
    sessions_expired: int = 0
    sessions_overflowed: int = 0

    def registry_call(self, operation: str, seconds: float, failed: bool) -> None:
        entry = self.registry_calls.setdefault(operation, [0, 0.0, 0])
        entry[0] += 1
        entry[1] += seconds
        if failed:
            entry[2] += 1

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

    @property
    def unconfirmed_bytes_bound(self) -> int:
        if self.max_unconfirmed_bytes is not None:
            return self.max_unconfirmed_bytes
        return max(1, self.max_outbound_buffer // 2)

    @property
    def node_ttl_ms(self) -> int:
        return int(self.node_ttl * 1000)

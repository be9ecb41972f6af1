"""Prometheus metrics of one node, built from its counters when /metrics is scraped.

Labels are bounded: reply types and a fixed set of reasons, frame kinds, registry operations.
No per-connection or per-role label exists.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from broker_node.core.stats import NodeStats
from broker_node.status import NodeStatus
from shared.ids import ConnectionId, node_name


class _Client(Protocol):
    @property
    def role(self) -> str | None: ...


class CoreCounts(Protocol):
    """What /metrics reads of the core (``BrokerCore`` is one)."""

    @property
    def connections(self) -> Mapping[ConnectionId, _Client]: ...

    @property
    def channels(self) -> Sized: ...

    def detached_sessions(self) -> Sized: ...

    def pending_counts(self) -> tuple[int, int]: ...


class NodeCollector(Collector):
    def __init__(
        self,
        status: Callable[[], NodeStatus],
        stats: NodeStats,
        core: CoreCounts,
        *,
        outbox_length: Callable[[], int],
        handshaking_count: Callable[[], int],
    ) -> None:
        self._status = status
        self._stats = stats
        self._core = core
        self._outbox_length = outbox_length
        self._handshaking_count = handshaking_count

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        core = self._core
        yield GaugeMetricFamily(
            "broker_connections", "Clients connected to this node.", value=len(core.connections)
        )
        yield GaugeMetricFamily(
            "broker_registered_connections",
            "Clients of this node that registered a role.",
            value=sum(1 for c in core.connections.values() if c.role is not None),
        )
        yield GaugeMetricFamily(
            "broker_channels", "Channels with an end on this node.", value=len(core.channels)
        )
        routed = CounterMetricFamily(
            "broker_messages_routed",
            "Channel messages routed, by path (local: both ends on this node; "
            "cross_node_out: published to the recipient's node; cross_node_in: delivered "
            "here for a sender on another node).",
            labels=["path"],
        )
        routed.add_metric(["local"], stats.messages_local)
        routed.add_metric(["cross_node_out"], stats.messages_cross_node_out)
        routed.add_metric(["cross_node_in"], stats.messages_cross_node_in)
        yield routed
        yield CounterMetricFamily(
            "broker_cross_node_confirmations",
            "channel_message_sent replies for messages confirmed by another node.",
            value=stats.confirmations_sent,
        )
        failures = CounterMetricFamily(
            "broker_request_failures",
            "Failure replies sent, by reply type and reason.",
            labels=["type", "reason"],
        )
        for (reply_type, reason), count in sorted(stats.failures.items()):
            failures.add_metric([reply_type, reason], count)
        yield failures
        bad = CounterMetricFamily(
            "broker_bad_frames", "Frames refused by the bad-input table, by kind.", labels=["kind"]
        )
        for kind, count in sorted(stats.bad_frames.items()):
            bad.add_metric([kind], count)
        yield bad
        yield CounterMetricFamily(
            "broker_flow_control_pauses",
            "Times reading a client's socket paused because it had more unconfirmed messages "
            "(or bytes) in flight than --max-unconfirmed allows.",
            value=stats.flow_pauses,
        )
        yield CounterMetricFamily(
            "broker_bus_retries",
            "Bus payloads sent again because the destination node was not subscribed to its "
            "inbox at the time (Redis restarted, a subscriber connection lost).",
            value=stats.bus_retries,
        )
        yield GaugeMetricFamily(
            "broker_sessions_detached",
            "Resumable sessions held here whose client is away.",
            value=len(core.detached_sessions()),
        )
        sessions = CounterMetricFamily(
            "broker_session_events",
            "Session resume events: resumed here, resume refused, handed over to the node a "
            "client resumed on, adopted from a lost node, ended by their window, ended past "
            "their bound of kept frames.",
            labels=["event"],
        )
        for event, count in (
            ("resumed", stats.resumes),
            ("refused", stats.resumes_refused),
            ("handed_over", stats.sessions_handed_over),
            ("adopted", stats.sessions_adopted),
            ("expired", stats.sessions_expired),
            ("overflowed", stats.sessions_overflowed),
        ):
            sessions.add_metric([event], count)
        yield sessions
        yield CounterMetricFamily(
            "broker_slow_consumer_closes",
            "Clients closed with 1008 for reading too slowly.",
            value=stats.slow_consumers,
        )
        calls = CounterMetricFamily(
            "broker_registry_calls", "Registry calls, by operation.", labels=["operation"]
        )
        seconds = CounterMetricFamily(
            "broker_registry_call_seconds",
            "Time spent in registry calls (Redis round trips), by operation.",
            labels=["operation"],
        )
        errors = CounterMetricFamily(
            "broker_registry_call_errors",
            "Registry calls that failed or timed out, by operation.",
            labels=["operation"],
        )
        for operation, entry in sorted(stats.registry_calls.items()):
            calls.add_metric([operation], entry[0])
            seconds.add_metric([operation], entry[1])
            errors.add_metric([operation], entry[2])
        yield calls
        yield seconds
        yield errors
        yield CounterMetricFamily(
            "broker_bus_publishes", "Payloads published to other nodes.", value=stats.bus_publishes
        )
        yield CounterMetricFamily(
            "broker_bus_publish_seconds",
            "Time spent in pipelined publishes (bus lag on the sending side).",
            value=stats.bus_publish_seconds,
        )
        yield CounterMetricFamily(
            "broker_bus_batches_received", "Bus payloads received.", value=stats.bus_batches_in
        )
        deliveries, opens = core.pending_counts()
        yield GaugeMetricFamily(
            "broker_bus_pending_confirmations",
            "Cross-node messages awaiting the recipient node's confirmation.",
            value=deliveries,
        )
        yield GaugeMetricFamily(
            "broker_bus_pending_opens", "Cross-node opens awaiting the target's node.", value=opens
        )
        yield GaugeMetricFamily(
            "broker_bus_outbox", "Envelopes waiting to be published.", value=self._outbox_length()
        )
        yield CounterMetricFamily(
            "broker_reaped_nodes", "Lost nodes this node reaped.", value=stats.reaped_nodes
        )
        yield CounterMetricFamily(
            "broker_lost_nodes",
            "Times a node holding a channel peer was found gone.",
            value=stats.lost_nodes,
        )
        # --- hostile input and resource limits (issue 15, issue 11 item 3)
        yield CounterMetricFamily(
            "broker_bus_envelopes_dropped",
            "Bus envelopes that could not be decoded, dropped alone (the rest of the batch "
            "was handled).",
            value=stats.bus_envelopes_dropped,
        )
        yield GaugeMetricFamily(
            "broker_asyncio_tasks",
            "asyncio tasks alive in the node's event loop (flat under steady load).",
            value=_task_count(),
        )
        yield GaugeMetricFamily(
            "broker_handshaking_sockets",
            "TCP connections still in their HTTP handshake.",
            value=self._handshaking_count(),
        )
        limited = CounterMetricFamily(
            "broker_limit_refusals",
            "Requests refused, connections refused or closed, and sockets paused at a "
            "configured limit, by limit.",
            labels=["limit"],
        )
        for limit, count in sorted(stats.limit_refusals.items()):
            limited.add_metric([limit], count)
        yield limited
        # One status value for the four gauges: they never disagree within a scrape.
        status = self._status()
        yield GaugeMetricFamily("broker_ready", "1 when /readyz answers 200.", value=status.ready)
        yield GaugeMetricFamily("broker_draining", "1 while draining.", value=status.draining)
        yield GaugeMetricFamily(
            "broker_backend_up", "1 while the cluster backend answers.", value=status.backend_up
        )
        yield GaugeMetricFamily(
            "broker_bus_subscribed",
            "1 while the bus subscription is active.",
            value=status.subscribed,
        )
        # --- registry: which incarnation of which configured node this is (issue 11) ---
        info = GaugeMetricFamily(
            "broker_node_info",
            "This node: its id in the cluster (name plus this start's incarnation) and name.",
            labels=["node_id", "node_name"],
        )
        info.add_metric([status.node_id, node_name(status.node_id)], 1)
        yield info
        # Authentication (issue 13).
        refusals = CounterMetricFamily(
            "broker_token_refusals", "Tokens refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.token_refusals.items()):
            refusals.add_metric([reason], count)
        yield refusals
        auth_closes = CounterMetricFamily(
            "broker_auth_closes",
            "Connections closed by authentication (timeout, expired, revoked, invalid_token).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.auth_closes.items()):
            auth_closes.add_metric([reason], count)
        yield auth_closes


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # pragma: no cover - scraped outside the loop (tests)
        return 0


def metrics_registry(collector: NodeCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    # process_resident_memory_bytes, process_open_fds, ... (Linux /proc): for soak runs.
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)

"""The HTTP routes answer from the published status alone."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from broker_node.health import HealthEndpoints
from broker_node.status import NodeStatus, StatusBoard
from shared.ids import NodeId

TEXT = "text/plain; charset=utf-8"


def endpoints(board: StatusBoard, *, metrics_on_client_port: bool = True) -> HealthEndpoints:
    return HealthEndpoints(
        board,
        CollectorRegistry(auto_describe=False),
        metrics_on_client_port=metrics_on_client_port,
        handshake_timeout=1.0,
    )


def test_readyz_follows_the_status_board() -> None:
    board = StatusBoard(NodeStatus(NodeId("n"), standalone=False))
    health = endpoints(board)
    assert health.route("/readyz", client_port=True) == (
        503,
        TEXT,
        b"not ready: bus subscription down, starting\n",
    )
    board.update(started=True, subscribed=True)
    assert health.route("/readyz?probe=1", client_port=True) == (200, TEXT, b"ready\n")
    assert health.route("/healthz", client_port=True) == (200, TEXT, b"ok\n")


def test_metrics_are_served_on_one_port_only() -> None:
    board = StatusBoard(NodeStatus(NodeId("n"), standalone=True))
    separate = endpoints(board, metrics_on_client_port=False)
    status, content_type, body = separate.route("/metrics", client_port=True)
    assert (status, content_type) == (404, TEXT)
    assert body == b"Not found. This is a WebSocket broker; also /healthz, /readyz.\n"
    assert separate.route("/metrics", client_port=False)[:2] == (200, CONTENT_TYPE_LATEST)
    status, _, body = endpoints(board).route("/nothing", client_port=True)
    assert status == 404 and body.endswith(b"also /healthz, /readyz, /metrics.\n")

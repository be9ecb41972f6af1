"""Plain HTTP on the WebSocket port: /healthz, /readyz and /metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from broker_node.metrics import render

if TYPE_CHECKING:
    from broker_node.node import BrokerNode


def http_response(node: BrokerNode, ws: ServerProtocol, request: Request) -> Response:
    path = urlsplit(request.path).path
    if path == "/healthz":
        return ws.reject(200, "ok\n")
    if path == "/readyz":
        if node.ready:
            return ws.reject(200, "ready\n")
        reasons = []
        if node.draining:
            reasons.append("draining")
        if not node.backend_up:
            reasons.append("cluster backend unavailable")
        if not node.subscribed and not node.backend.standalone:
            reasons.append("bus subscription down")
        if not node.started:
            reasons.append("starting")
        return ws.reject(503, "not ready: " + ", ".join(reasons or ["unknown"]) + "\n")
    if path == "/metrics":
        body = render(node.metrics)
        response = ws.reject(200, "")
        headers = Headers(response.headers)
        headers["Content-Type"] = CONTENT_TYPE_LATEST
        del headers["Content-Length"]
        headers["Content-Length"] = str(len(body))
        return Response(200, "OK", headers, body)
    return ws.reject(
        404, "Not found. This is a WebSocket broker; also /healthz, /readyz, /metrics.\n"
    )

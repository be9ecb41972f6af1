"""Plain HTTP on the WebSocket port (/healthz, /readyz, /metrics) and on the metrics port."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from broker_node.metrics import render

if TYPE_CHECKING:
    from broker_node.node import BrokerNode


def http_response(node: BrokerNode, ws: ServerProtocol, request: Request) -> Response:
    status, content_type, body = route(node, request.path, client_port=True)
    response = ws.reject(status, "")
    headers = Headers(response.headers)
    del headers["Content-Type"]
    headers["Content-Type"] = content_type
    del headers["Content-Length"]
    headers["Content-Length"] = str(len(body))
    return Response(status, response.reason_phrase, headers, body)


def route(node: BrokerNode, target: str, *, client_port: bool) -> tuple[int, str, bytes]:
    """Status, content type and body of a GET on ``target``."""
    path = urlsplit(target).path
    metrics_here = not client_port or node.settings.metrics_port is None
    if path == "/metrics" and metrics_here:
        return 200, CONTENT_TYPE_LATEST, render(node.metrics)
    status, text = _text_route(node, path, metrics_here)
    return status, "text/plain; charset=utf-8", text.encode()


def _text_route(node: BrokerNode, path: str, metrics_here: bool) -> tuple[int, str]:
    if path == "/healthz":
        return 200, "ok\n"
    if path == "/readyz":
        if node.ready:
            return 200, "ready\n"
        reasons = []
        if node.draining:
            reasons.append("draining")
        if not node.backend_up:
            reasons.append("cluster backend unavailable")
        if not node.subscribed and not node.backend.standalone:
            reasons.append("bus subscription down")
        if not node.started:
            reasons.append("starting")
        return 503, "not ready: " + ", ".join(reasons or ["unknown"]) + "\n"
    also = "/healthz, /readyz, /metrics" if metrics_here else "/healthz, /readyz"
    return 404, f"Not found. This is a WebSocket broker; also {also}.\n"


# --- the separate metrics listener (--metrics-port) -----------------------------------------

_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


async def serve_metrics_connection(
    node: BrokerNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """One HTTP/1.1 request on the metrics listener: GET only, answered, then closed."""
    try:
        async with asyncio.timeout(node.settings.handshake_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0].decode("ascii", "replace")
        if method != b"GET" or not target.startswith("/"):
            status, content_type, body = 400, "text/plain; charset=utf-8", b"GET only\n"
        else:
            status, content_type, body = route(node, target, client_port=False)
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n"
            % (status, _REASONS.get(status, "").encode(), content_type.encode(), len(body))
            + body
        )
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        writer.close()

"""Plain HTTP on the WebSocket port (/healthz, /readyz, /metrics) and on the metrics port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from broker_node.metrics import render
from broker_node.status import NodeStatus

_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


class HealthEndpoints:
    """Answers the probes and scrapes from the node's published status and its metrics."""

    def __init__(
        self,
        status: Callable[[], NodeStatus],
        metrics: CollectorRegistry,
        *,
        metrics_on_client_port: bool,
        handshake_timeout: float,
    ) -> None:
        self._status = status
        self._metrics = metrics
        self._metrics_on_client_port = metrics_on_client_port
        self._handshake_timeout = handshake_timeout

    def http_response(self, ws: ServerProtocol, request: Request) -> Response:
        status, content_type, body = self.route(request.path, client_port=True)
        response = ws.reject(status, "")
        headers = Headers(response.headers)
        del headers["Content-Type"]
        headers["Content-Type"] = content_type
        del headers["Content-Length"]
        headers["Content-Length"] = str(len(body))
        return Response(status, response.reason_phrase, headers, body)

    def route(self, target: str, *, client_port: bool) -> tuple[int, str, bytes]:
        """Status, content type and body of a GET on ``target``."""
        path = urlsplit(target).path
        metrics_here = not client_port or self._metrics_on_client_port
        if path == "/metrics" and metrics_here:
            return 200, CONTENT_TYPE_LATEST, render(self._metrics)
        status, text = self._text_route(path, metrics_here)
        return status, "text/plain; charset=utf-8", text.encode()

    def _text_route(self, path: str, metrics_here: bool) -> tuple[int, str]:
        if path == "/healthz":
            return 200, "ok\n"
        if path == "/readyz":
            node = self._status()
            if node.ready:
                return 200, "ready\n"
            return 503, "not ready: " + ", ".join(node.unready_reasons) + "\n"
        also = "/healthz, /readyz, /metrics" if metrics_here else "/healthz, /readyz"
        return 404, f"Not found. This is a WebSocket broker; also {also}.\n"

    # --- the separate metrics listener (--metrics-port) -------------------------------------

    async def serve_metrics_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One HTTP/1.1 request on the metrics listener: GET only, answered, then closed."""
        try:
            async with asyncio.timeout(self._handshake_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
            method, _, rest = head.partition(b" ")
            target = rest.partition(b" ")[0].decode("ascii", "replace")
            if method != b"GET" or not target.startswith("/"):
                status, content_type, body = 400, "text/plain; charset=utf-8", b"GET only\n"
            else:
                status, content_type, body = self.route(target, client_port=False)
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

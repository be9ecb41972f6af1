"""deploy/nginx.conf: the load balancer's directives, checked as text and run by a real nginx."""

from __future__ import annotations

import asyncio
import re
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from tests.support.nginx import (
    LOCAL_UPSTREAM,
    NGINX_CONF,
    NginxProcess,
    render_local_nginx_conf,
    write_local_nginx_conf,
)
from tests.support.ports import free_port

CONF = NGINX_CONF.read_text(encoding="utf-8")


def _directives(text: str) -> list[str]:
    """Every directive line, comments stripped, whitespace collapsed."""
    lines = (re.sub(r"#.*", "", line).strip() for line in text.splitlines())
    return [" ".join(line.split()) for line in lines if line]


def _seconds(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)([smhd]?)", value)
    assert match is not None, value
    return int(match.group(1)) * units[match.group(2) or "s"]


# --- the file as text ---------------------------------------------------------------------


def test_upgrades_websockets() -> None:
    directives = _directives(CONF)
    assert "map $http_upgrade $connection_upgrade {" in directives
    assert "proxy_http_version 1.1;" in directives
    assert "proxy_set_header Upgrade $http_upgrade;" in directives
    assert "proxy_set_header Connection $connection_upgrade;" in directives


def test_long_timeouts_and_no_buffering() -> None:
    directives = _directives(CONF)
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = (d.split()[1].rstrip(";") for d in directives if d.startswith(name + " "))
        assert _seconds(value) >= 3600, name
    assert "proxy_buffering off;" in directives


def test_resolves_every_replica_at_request_time() -> None:
    directives = _directives(CONF)
    # Docker's DNS, re-asked often; the target is a variable, so it is not pinned at start.
    assert "resolver 127.0.0.11 valid=5s ipv6=off;" in directives
    assert "set $broker_backend broker:3004;" in directives
    assert "proxy_pass http://$broker_backend;" in directives
    assert not any(re.match(r"proxy_pass http://broker\b", d) for d in directives)


def test_own_health_location_and_port() -> None:
    directives = _directives(CONF)
    assert "location = /lb-health {" in directives
    assert "listen 3004;" in directives


# --- the renderer (pure) --------------------------------------------------------------------


def test_render_rewrites_only_the_docker_specific_lines(tmp_path: Path) -> None:
    text = render_local_nginx_conf(backend_ports=[4001, 4002], listen_port=5000, workdir=tmp_path)
    rendered = _directives(text)
    assert f"upstream {LOCAL_UPSTREAM} {{" in rendered
    assert "server 127.0.0.1:4001 max_fails=0;" in rendered
    assert "server 127.0.0.1:4002 max_fails=0;" in rendered
    assert f"set $broker_backend {LOCAL_UPSTREAM};" in rendered
    assert "listen 127.0.0.1:5000;" in rendered
    assert f"pid {tmp_path.resolve() / 'nginx.pid'};" in rendered
    assert not any("127.0.0.11" in d or "broker:3004" in d for d in rendered)
    # Everything else is verbatim, in order.
    rewritten = re.compile(
        r"^(resolver|set \$broker_backend|listen|pid|error_log|\w+_temp_path) "
        r"|^access_log (?!off;)"
    )
    upstream = re.compile(rf"upstream {LOCAL_UPSTREAM} {{[^}}]*}}")

    def kept(text: str) -> list[str]:
        return [d for d in _directives(upstream.sub("", text)) if not rewritten.match(d)]

    assert kept(text) == kept(CONF)


@pytest.mark.parametrize("line", ["listen 3004;", "resolver 127.0.0.11 valid=5s ipv6=off;"])
def test_render_refuses_a_file_of_another_shape(tmp_path: Path, line: str) -> None:
    missing = tmp_path / "missing.conf"
    missing.write_text(CONF.replace(line, ""), encoding="utf-8")
    with pytest.raises(ValueError, match="expected exactly one"):
        render_local_nginx_conf(backend_ports=[1], listen_port=2, workdir=tmp_path, source=missing)
    doubled = tmp_path / "doubled.conf"
    doubled.write_text(CONF.replace(line, line + "\n" + line), encoding="utf-8")
    with pytest.raises(ValueError, match="found 2"):
        render_local_nginx_conf(backend_ports=[1], listen_port=2, workdir=tmp_path, source=doubled)


def test_render_needs_a_backend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        render_local_nginx_conf(backend_ports=[], listen_port=2, workdir=tmp_path)


# --- a real nginx ---------------------------------------------------------------------------


def _nginx_test(nginx: Path, conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(nginx), "-t", "-p", str(conf.parent), "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_deploy_conf_passes_nginx_t(nginx: Path, tmp_path: Path) -> None:
    # `nginx -t` creates the pid file and temp folders the conf names: the conf is checked
    # verbatim but for its /tmp paths, which point into this test's folder instead, so that
    # the suite leaves no /tmp/nginx-* or /tmp/nginx.pid on the host.
    source = NGINX_CONF.read_text(encoding="utf-8")
    assert "/tmp/nginx" in source
    conf = tmp_path / "nginx.conf"
    conf.write_text(source.replace("/tmp/", f"{tmp_path}/"), encoding="utf-8")
    result = _nginx_test(nginx, conf)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "nginx.pid").exists() or (tmp_path / "nginx-proxy").exists()
    assert "test is successful" in result.stderr


def test_rendered_conf_passes_nginx_t(nginx: Path, tmp_path: Path) -> None:
    conf = write_local_nginx_conf(
        backend_ports=[free_port(), free_port()], listen_port=free_port(), workdir=tmp_path
    )
    result = _nginx_test(nginx, conf)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr, result.stderr


async def _backend(port_box: list[int]) -> Server:
    """A WebSocket echo server that also answers ``GET /whoami`` with its own port."""

    def whoami(connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/whoami":
            return connection.respond(HTTPStatus.OK, f"{port_box[0]}\n")
        return None

    async def echo(connection: ServerConnection) -> None:
        async for message in connection:
            await connection.send(f"{port_box[0]}:{message!s}")

    server = await serve(echo, "127.0.0.1", 0, process_request=whoami)
    port_box.append(server.sockets[0].getsockname()[1])
    return server


@pytest.fixture
async def backends() -> AsyncIterator[list[int]]:
    boxes: list[list[int]] = [[] for _ in range(3)]
    servers = [await _backend(box) for box in boxes]
    try:
        yield [box[0] for box in boxes]
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


async def test_rendered_conf_spreads_and_upgrades(
    nginx: Path, backends: list[int], tmp_path: Path
) -> None:
    # A node that is gone (nothing listens on its port) costs nothing: nginx moves on.
    gone = free_port()
    lb = NginxProcess(nginx, backend_ports=[gone, *backends], workdir=tmp_path)
    await asyncio.to_thread(lb.start, 10.0)
    try:
        assert await asyncio.to_thread(_get, f"{lb.http}/lb-health") == (200, "ok\n")

        # Plain requests go round-robin over every live backend.
        served = {int((await asyncio.to_thread(_get, f"{lb.http}/whoami"))[1]) for _ in range(6)}
        assert served == set(backends)

        # WebSocket upgrades pass through, and land on different backends too.
        landed: set[int] = set()
        for _ in range(6):
            async with asyncio.timeout(5), connect(lb.url + "/") as ws:
                await ws.send("ping")
                port, _, echoed = str(await ws.recv()).partition(":")
                assert echoed == "ping"
                landed.add(int(port))
        assert landed == set(backends)
    finally:
        await asyncio.to_thread(lb.stop, 10.0)

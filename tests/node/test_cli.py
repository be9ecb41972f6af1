"""The commands as users run them: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shared.ids import node_name
from tests.support.nodes import NodeProcess, wait_http
from tests.support.ports import free_port
from tests.support.wire import WireClient, pair

BIN = Path(sys.executable).parent


def test_help_shows_every_option_with_default_and_env_var() -> None:
    result = subprocess.run(
        [BIN / "broker-node", "--help"], capture_output=True, text=True, check=True
    )
    text = " ".join(result.stdout.split())
    for option, env, default in [
        ("--host", "BROKER_HOST", "0.0.0.0"),
        ("--port", "BROKER_PORT", "3004"),
        ("--redis-url", "BROKER_REDIS_URL", None),
        ("--node-id", "BROKER_NODE_ID", "random"),
        ("--max-message-size", "BROKER_MAX_MESSAGE_SIZE", "1048576"),
        ("--max-role-length", "BROKER_MAX_ROLE_LENGTH", "256"),
        ("--heartbeat-interval", "BROKER_HEARTBEAT_INTERVAL", "5.0"),
        ("--node-ttl", "BROKER_NODE_TTL", "15.0"),
        ("--drain-timeout", "BROKER_DRAIN_TIMEOUT", "10.0"),
        ("--log-level", "BROKER_LOG_LEVEL", "info"),
        ("--log-format", "BROKER_LOG_FORMAT", "text"),
    ]:
        assert option in text and env in text, option
        if default is not None:
            assert f"default: {default}" in text, option


def test_settings_are_checked() -> None:
    result = subprocess.run(
        [BIN / "broker-node", "--heartbeat-interval", "20", "--node-ttl", "10"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--heartbeat-interval" in result.stderr
    bad_url = subprocess.run(
        [BIN / "broker-node", "--port", "0", "--redis-url", "http://example"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert bad_url.returncode != 0 and "http" in bad_url.stderr


async def test_environment_variables_configure_the_node() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        BIN / "broker-node",
        "--host",
        "127.0.0.1",
        env={"BROKER_PORT": str(port), "BROKER_LOG_FORMAT": "json", "BROKER_NODE_ID": "env-node"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz")
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    assert process.returncode == 0
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    # The configured id is the node's name; each start adds an incarnation of its own.
    assert lines and all(node_name(line["node"]) == "env-node" for line in lines)
    assert len({line["node"] for line in lines}) == 1
    assert any("listening" in line["message"] for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_clients_with_1001_and_exits_cleanly(signum: signal.Signals) -> None:
    with NodeProcess() as node:
        a, b, _ = await pair(node.url)
        assert node.process is not None
        node.process.send_signal(signum)
        assert (await a.closed_with(timeout=10))[0] == 1001
        assert (await b.closed_with(timeout=10))[0] == 1001
        assert node.process.wait(timeout=20) == 0
        await a.close()
        await b.close()
        output = node.output()
        assert "draining" in output and "stopped" in output
        assert "Traceback" not in output
        assert "never retrieved" not in output and "ERROR" not in output


async def test_connection_broker_drop_in_command() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        BIN / "connection-broker",
        "-p",
        str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        async with WireClient(f"ws://127.0.0.1:{port}") as client:
            assert await client.register("drop-in")
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await process.wait() == 0


@pytest.mark.parametrize(
    "command", ["broker-node", "connection-broker", "broker-bench", "broker-admin"]
)
def test_every_command_takes_h_and_shows_plain_help(command: str) -> None:
    result = subprocess.run(
        [BIN / command, "-h"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    # click prints docstrings as they are: reStructuredText markup would show raw.
    assert "``" not in result.stdout and ":func:" not in result.stdout


def test_a_busy_port_is_one_clear_line_and_a_failure() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [BIN / "broker-node", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in errors[0] and "in use" in errors[0]


async def test_an_unreachable_redis_is_logged_at_once_with_its_password_masked() -> None:
    unreachable = free_port()  # nothing listens there
    url = f"redis://broker:s3cret@127.0.0.1:{unreachable}/0?password=s3cret"
    process = await asyncio.create_subprocess_exec(
        BIN / "broker-node",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--redis-url",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    seen: list[str] = []
    try:
        # Before the node gives up waiting for its bus inbox (twice the request timeout).
        async with asyncio.timeout(30):
            while not any("cannot subscribe" in line for line in seen):
                line = await process.stderr.readline()
                assert line, "".join(seen)
                seen.append(line.decode())
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, rest = await process.communicate()
    assert process.returncode == 0
    output = "".join(seen) + rest.decode()
    complaint = next(line for line in seen if "cannot subscribe" in line)
    assert f"redis://broker:***@127.0.0.1:{unreachable}/0?password=***" in complaint
    # The connection error as the OS gave it (errno 111: nothing listens there).
    assert "Connection refused" in complaint or "Connect call failed" in complaint
    assert "s3cret" not in output and "Traceback" not in output


async def test_metrics_answer_with_one_content_type() -> None:
    with NodeProcess() as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(15):
            head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        writer.close()
    assert head.startswith("http/1.1 200")
    assert head.count("\r\ncontent-type:") == 1
    assert head.count("\r\ncontent-length:") == 1

"""Real ``broker-node`` processes for integration tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.support.polling import wait_until, wait_until_serving
from tests.support.ports import free_port

BROKER_NODE = str(Path(sys.executable).parent / "broker-node")


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    """Status and body of a GET; (0, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


async def wait_http(url: str, *, status: int = 200, timeout: float = 15.0) -> None:
    """Until ``url`` answers ``status`` (a process starting: it signals nothing)."""

    async def answers() -> bool:
        return (await asyncio.to_thread(http_get, url, 0.5))[0] == status

    await wait_until(answers, timeout=timeout, message=f"{url} to answer {status}")


def metric_sample(body: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition. A labelled counter that never counted has
    no sample yet: 0. An unlabelled one is always there: LookupError when it is not."""
    shown = "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"
    match = re.search(rf"^{re.escape(name)}{re.escape(shown if labels else '')} (\S+)$", body, re.M)
    if match is not None:
        return float(match.group(1))
    if labels:
        return 0.0
    raise LookupError(f"{name} not in the metrics:\n{body}")


async def status(node: NodeProcess, path: str = "/readyz") -> int:
    """The HTTP status of ``path`` on the node (0 when nothing answers)."""
    code, _ = await asyncio.to_thread(http_get, node.http + path, 0.5)
    return code


async def wait_readiness(nodes: Sequence[NodeProcess], *, ready: bool, timeout: float) -> None:
    """Until every node's ``/readyz`` answers 200 (``ready``) or 503 (not ready)."""
    wanted = 200 if ready else 503

    async def all_answer() -> bool:
        return all([await status(node) == wanted for node in nodes])

    ports = [node.port for node in nodes]
    await wait_until(all_answer, timeout=timeout, message=f"/readyz {wanted} on ports {ports}")


async def metric(node: NodeProcess, name: str, **labels: str) -> float:
    """One sample of the node's /metrics (see :func:`metric_sample`)."""
    code, body = await asyncio.to_thread(http_get, node.http + "/metrics", 2.0)
    assert code == 200, f"/metrics answered {code}: {body}"
    return metric_sample(body, name, **labels)


class NodeProcess:
    """One broker-node subprocess on a free port (or a given one, to restart in place)."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        port: int | None = None,
        node_id: str | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        binary: str = BROKER_NODE,
        wrapper: list[str] | None = None,
    ) -> None:
        self.binary = binary
        self.port = port if port is not None else free_port()
        self.redis_url = redis_url
        self.node_id = node_id
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        #: A command the node runs under (e.g. ``prlimit --nofile=...``).
        self.wrapper = list(wrapper or [])
        self.process: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="broker-node-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, timeout: float = 15.0, wait_ready: bool = True) -> NodeProcess:
        args = [
            *self.wrapper,
            self.binary,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "debug",
        ]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        if self.node_id:
            args += ["--node-id", self.node_id]
        args += self.extra_args
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
        env.update(self.env)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        path = "/readyz" if wait_ready else "/healthz"
        wait_until_serving(
            self.process,
            lambda: http_get(self.http + path, timeout=0.5)[0] == 200,
            timeout=timeout,
            message=f"broker-node on port {self.port} to answer {path}",
            output=self.output,
        )
        return self

    def effective_id(self) -> str:
        """The id the running node uses in the cluster (its keys, its inbox), from its log:
        the configured ``node_id`` plus this start's incarnation."""
        # The log is appended to across restarts: the latest start is the last line.
        found = re.findall(r"listening on \S+ \(\w+, node (\S+)\)", self.output())
        if not found:
            raise LookupError(f"no node id in the log of the node on port {self.port}")
        return str(found[-1])

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node vanishes without cleaning anything."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait: a graceful drain. Returns the exit code."""
        assert self.process is not None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def pause(self) -> None:
        if self.alive():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.resume()
        if self.alive():
            try:
                self.terminate(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.unlink(missing_ok=True)

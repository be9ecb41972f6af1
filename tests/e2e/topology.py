"""The compose topology (``docker-compose.yml``) as real processes on 127.0.0.1.

No Docker engine runs here, so each service becomes a process: ``redis`` a
:class:`~tests.support.redis_server.RedisServer`, each ``broker`` replica a ``broker-node``
(:class:`~tests.support.nodes.NodeProcess`), ``lb`` an nginx running ``deploy/nginx.conf``
rendered for local ports by :mod:`tests.deploy.nginx_local` (only the Docker-specific lines
change). A node can be stopped with SIGTERM and started again on the same port, as
``docker compose restart broker`` or a Kubernetes rollout does; it comes back with a fresh,
random node id (the compose service sets none), and what the stopped process left behind is
kept (:attr:`ComposeTopology.retired`) for the test to inspect.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.deploy.nginx_local import nginx_command, write_local_nginx_conf
from tests.support.nodes import NodeProcess, http_get
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer


@dataclass(frozen=True)
class RetiredNode:
    """A node process that was stopped: how it ended and what it logged."""

    port: int
    node_id: str
    exit_code: int
    log: str


class ComposeTopology:
    """``redis``, ``broker`` x N and ``lb`` of the compose file, as local processes.

    ``node_args`` are extra ``broker-node`` options (the compose file's settings, with
    timings shortened for a test). Every wait polls with a deadline.
    """

    def __init__(
        self,
        *,
        redis: RedisServer,
        nginx: Path,
        workdir: Path,
        replicas: int = 3,
        node_args: list[str] | None = None,
    ) -> None:
        self.redis = redis
        self.nginx = nginx
        self.workdir = workdir
        self.node_args = list(node_args or [])
        self.ports = [free_port() for _ in range(replicas)]
        self.lb_port = free_port()
        self.nodes: list[NodeProcess] = []
        self.retired: list[RetiredNode] = []
        self.lb: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The load balancer's WebSocket URL: the only address clients are given."""
        return f"ws://127.0.0.1:{self.lb_port}"

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start every replica (each ready), then nginx (answering /lb-health)."""
        for port in self.ports:
            node = self._node(port)
            self.nodes.append(node)  # before it starts: stop() ends it even if start() fails
            node.start(timeout=timeout)
        conf = write_local_nginx_conf(
            backend_ports=self.ports, listen_port=self.lb_port, workdir=self.workdir
        )
        with (self.workdir / "nginx.out").open("ab") as out:
            self.lb = subprocess.Popen(
                nginx_command(self.nginx, conf), stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while http_get(f"http://127.0.0.1:{self.lb_port}/lb-health", timeout=0.5)[0] != 200:
            if self.lb.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.lb.returncode}:\n{self.nginx_log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx not answering in {timeout}s:\n{self.nginx_log()}")
            time.sleep(0.05)

    def restart(
        self, index: int, *, stop_timeout: float = 10.0, start_timeout: float = 20.0
    ) -> RetiredNode:
        """SIGTERM replica ``index``, wait for its exit, start a new one on its port (ready).

        A node that has not exited ``stop_timeout`` seconds after SIGTERM is killed (exit
        code -9). Blocking: call it with ``asyncio.to_thread`` while clients run.
        """
        retired = self._retire(self.nodes[index], timeout=stop_timeout)
        node = self.nodes[index] = self._node(self.ports[index])
        node.start(timeout=start_timeout)
        return retired

    def stop(self, timeout: float = 20.0) -> None:
        """Stop nginx (SIGTERM), then every replica (SIGTERM, kept in ``retired``).

        Safe after a partial start and when called twice; a process that does not stop in
        time is killed (and a replica so killed is recorded with exit code -9).
        """
        if self.lb is not None:
            if self.lb.poll() is None:
                self.lb.send_signal(signal.SIGTERM)
                try:
                    self.lb.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.lb.kill()
                    self.lb.wait(timeout=timeout)
            self.lb = None
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            self._retire(node, timeout=timeout)

    # --- what the processes say -------------------------------------------------------------

    def node_id(self, index: int) -> str:
        return node_id_of(self.nodes[index])

    def node_ids(self) -> list[str]:
        return [node_id_of(node) for node in self.nodes]

    def nginx_log(self) -> str:
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    # --- internals --------------------------------------------------------------------------

    def _node(self, port: int) -> NodeProcess:
        return NodeProcess(redis_url=self.redis.url, port=port, extra_args=self.node_args)

    def _retire(self, node: NodeProcess, *, timeout: float) -> RetiredNode:
        if node.process is None:  # never started
            node.log.unlink(missing_ok=True)
            return RetiredNode(node.port, "", -1, "")
        try:
            node_id = node_id_of(node)
        except LookupError:
            node_id = ""
        try:
            code = node.terminate(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.kill()
            code = -9
        retired = RetiredNode(node.port, node_id, code, node.output())
        node.log.unlink(missing_ok=True)
        self.retired.append(retired)
        return retired


def node_id_of(node: NodeProcess) -> str:
    """The node id a running ``broker-node`` logs on every line (``--log-format json``)."""
    for line in node.output().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("node"):
                return str(entry["node"])
    raise LookupError(f"no node id in the log of the node on port {node.port}")

"""The compose topology (``docker-compose.yml``) as real processes on 127.0.0.1.

No Docker engine runs here, so each service becomes a process of the cluster builder
(:class:`~tests.support.cluster.Cluster`): ``redis`` a redis-server, each ``broker`` replica a
``broker-node`` with a random node id (the compose service sets none), ``lb`` nginx running
``deploy/nginx.conf`` rendered for local ports. A replica can be stopped with SIGTERM and
started again on the same port, as ``docker compose restart broker`` or a Kubernetes rollout
does; what the stopped process left behind is kept (:attr:`ComposeTopology.retired`) for the
test to inspect.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.cluster import Cluster
from tests.support.nodes import NodeProcess
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

    ``node_args`` are the ``broker-node`` options (the compose file's settings, with timings
    shortened for a test).
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
        self.cluster = Cluster(redis, args=node_args or [], named=False)
        self.nginx = nginx
        self.workdir = workdir
        self.replicas = replicas
        self.retired: list[RetiredNode] = []

    @property
    def redis(self) -> RedisServer:
        return self.cluster.redis

    @property
    def nodes(self) -> list[NodeProcess]:
        return self.cluster.nodes

    @property
    def url(self) -> str:
        """The load balancer's WebSocket URL: the only address clients are given."""
        assert self.cluster.nginx is not None, "not started"
        return self.cluster.nginx.url

    def start(self) -> None:
        """Start every replica (each ready), then nginx (answering /lb-health)."""
        self.cluster.launch(self.replicas)
        self.cluster.front_with_nginx(self.nginx, self.workdir)

    def restart(self, index: int, *, stop_timeout: float = 10.0) -> RetiredNode:
        """SIGTERM replica ``index``, wait for its exit, start a new one on its port (ready).

        A node that has not exited ``stop_timeout`` seconds after SIGTERM is killed (exit
        code -9). Blocking: call it with ``asyncio.to_thread`` while clients run.
        """
        node = self.nodes[index]
        retired = self._retire(node, timeout=stop_timeout)
        assert retired is not None, f"replica {index} never started"
        self.cluster.replace(node)
        return retired

    def stop(self, timeout: float = 20.0) -> None:
        """Stop nginx, then every replica (SIGTERM, kept in ``retired``). Safe after a partial
        start and when called twice."""
        if self.cluster.nginx is not None:
            self.cluster.nginx.stop(timeout)
        for node in self.nodes:
            self._retire(node, timeout=timeout)
        self.cluster.stop()

    def node_ids(self) -> list[str]:
        return [node_id_of(node) for node in self.nodes]

    def _retire(self, node: NodeProcess, *, timeout: float) -> RetiredNode | None:
        if node.process is None:  # never started
            return None
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

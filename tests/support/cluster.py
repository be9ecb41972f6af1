"""Several ``broker-node`` processes on one redis-server, nginx in front if asked: the one way
the tests, the benchmarks and the soak start a cluster.

Nodes start in parallel (a start is mostly waiting for ``/readyz``) with short failure
detection by default (:func:`fast_args`), named ``node-0``, ``node-1``... in start order
(``named=False`` leaves each a random id, as the compose file does). A node can be replaced
in place: a new process on its port, as a restarted pod. nginx runs ``deploy/nginx.conf``
rendered for the nodes' ports (:mod:`tests.support.nginx`).

Blocking calls (``launch``, ``replace``, ``stop``) suit synchronous code; async tests use
``start`` and ``aclose``, which run them in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final, TypeVar

from tests.support.nginx import NginxProcess
from tests.support.nodes import BROKER_NODE, NodeProcess
from tests.support.redis_server import RedisServer
from tests.support.wire import WireClient

T = TypeVar("T")

#: Failure detection in a second or so (the defaults are 5 s / 15 s / 2.5 s).
HEARTBEAT: Final = 0.2
TTL: Final = 1.0
REQUEST_TIMEOUT: Final = 1.0
DRAIN_TIMEOUT: Final = 5.0
#: Scheduling noise on a busy two-core CI machine running Redis, nodes and the test.
SLACK: Final = 1.0


def fast_args(
    *,
    heartbeat: float = HEARTBEAT,
    ttl: float = TTL,
    request_timeout: float = REQUEST_TIMEOUT,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> list[str]:
    """``broker-node`` options for quick failure detection, quick failures and a short drain."""
    return [
        "--heartbeat-interval", str(heartbeat),
        "--node-ttl", str(ttl),
        "--request-timeout", str(request_timeout),
        "--drain-timeout", str(drain_timeout),
    ]  # fmt: skip


def in_parallel(action: Callable[[T], object], items: Sequence[T]) -> None:
    """``action`` on every item at once, each in a thread; the first error is raised."""
    if not items:
        return
    with ThreadPoolExecutor(len(items)) as pool:
        for done in [pool.submit(action, item) for item in items]:
            done.result()


class Cluster:
    """``broker-node`` processes sharing ``redis``, and the test clients connected to them."""

    def __init__(
        self,
        redis: RedisServer,
        *,
        args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        named: bool = True,
        binary: str = BROKER_NODE,
    ) -> None:
        self.redis = redis
        #: Every node's options (``fast_args()`` unless given); ``launch`` may override.
        self.args = list(fast_args() if args is None else args)
        self.env = dict(env or {})
        self.named = named
        self.binary = binary
        self.nodes: list[NodeProcess] = []
        self.clients: list[WireClient] = []
        self.nginx: NginxProcess | None = None
        self._made = 0

    # --- nodes ---------------------------------------------------------------------------

    def launch(
        self,
        count: int,
        *,
        args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[NodeProcess]:
        """Start ``count`` more nodes at once and wait until every one is ready (blocking).

        ``args`` replace the cluster's options, ``env`` adds to its environment, ``names``
        are the nodes' ids (instead of ``node-<n>``)."""
        assert names is None or len(names) == count
        made = [
            self._node(args=args, env=env, name=names[n] if names else None) for n in range(count)
        ]
        self.nodes += made  # before they start: stop() ends them even if a start fails
        in_parallel(NodeProcess.start, made)
        return made

    async def start(
        self,
        count: int,
        *,
        args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        names: Sequence[str] | None = None,
    ) -> list[NodeProcess]:
        """:meth:`launch` for async tests."""
        return await asyncio.to_thread(self.launch, count, args=args, env=env, names=names)

    def replace(self, node: NodeProcess, *, node_id: str | None = None) -> NodeProcess:
        """A new process in place of ``node`` (stopped now if it still runs, its log gone):
        same port and options, ``node_id`` if given (else the same name), started and ready."""
        index = self.nodes.index(node)
        node.__exit__(None, None, None)
        fresh = NodeProcess(
            redis_url=self.redis.url,
            port=node.port,
            node_id=node_id if node_id is not None else node.node_id,
            extra_args=node.extra_args,
            env=node.env,
            binary=self.binary,
        )
        self.nodes[index] = fresh
        return fresh.start()

    def _node(
        self, *, args: Sequence[str] | None, env: Mapping[str, str] | None, name: str | None
    ) -> NodeProcess:
        node_id = name if name is not None else f"node-{self._made}" if self.named else None
        self._made += 1
        return NodeProcess(
            redis_url=self.redis.url,
            node_id=node_id,
            extra_args=list(self.args if args is None else args),
            env={**self.env, **(env or {})},
            binary=self.binary,
        )

    # --- the load balancer ---------------------------------------------------------------

    def front_with_nginx(self, binary: Path, workdir: Path) -> NginxProcess:
        """nginx in front of every node started so far (blocking); clients use its ``url``."""
        assert self.nginx is None, "one load balancer per cluster"
        self.nginx = NginxProcess(
            binary, backend_ports=[node.port for node in self.nodes], workdir=workdir
        )
        return self.nginx.start()

    # --- clients -------------------------------------------------------------------------

    async def client(self, node: NodeProcess, role: str | None = None) -> WireClient:
        """A connected client of ``node``, registered with ``role`` unless it is None; closed
        by :meth:`aclose`."""
        client = await WireClient(node.url).__aenter__()
        self.clients.append(client)
        if role is not None:
            await client.register(role)
        return client

    # --- the end -------------------------------------------------------------------------

    def stop(self) -> None:
        """nginx, then every node at once (SIGTERM, SIGKILL if a drain outlasts its bound).
        Safe after a partial start and when called twice."""
        if self.nginx is not None:
            self.nginx.stop()
            self.nginx = None
        nodes, self.nodes = self.nodes, []
        in_parallel(lambda node: node.__exit__(None, None, None), nodes)

    async def aclose(self) -> None:
        """Close the clients (each bounded), then :meth:`stop`."""
        for client in self.clients:
            try:
                async with asyncio.timeout(2):
                    await client.close()
            except (TimeoutError, OSError):
                pass
        self.clients = []
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

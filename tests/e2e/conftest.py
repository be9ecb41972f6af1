"""The compose topology of the end-to-end tests: a redis-server, three ``broker-node``
processes and nginx in front, with the ``deploy/`` config files; each test module gives the
nodes' options as its ``node_args`` fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.topology import ComposeTopology
from tests.support.redis_server import RedisServer


@pytest.fixture
def topology(
    nginx: Path, tmp_path: Path, redis_server: RedisServer, node_args: list[str]
) -> Iterator[ComposeTopology]:
    topology = ComposeTopology(
        redis=redis_server, nginx=nginx, workdir=tmp_path, replicas=3, node_args=node_args
    )
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()

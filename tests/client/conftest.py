"""Fixtures of the SDK tests: real broker nodes (clusters come from the root ``cluster``).

In-process nodes (``BrokerNode`` on port 0) for the API tests; ``broker-node`` subprocesses
(``NodeProcess``) wherever a node must die.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from broker_node.config import Settings
from broker_node.node import BrokerNode
from tests.support.nodes import NodeProcess


@pytest.fixture
async def standalone() -> AsyncIterator[str]:
    """The URL of a standalone node in this process."""
    async with BrokerNode(Settings(host="127.0.0.1", port=0)) as node:
        yield f"ws://127.0.0.1:{node.port}"


@pytest.fixture
def node_process() -> Iterator[NodeProcess]:
    """A standalone broker-node process (for tests that kill it)."""
    with NodeProcess() as node:
        yield node

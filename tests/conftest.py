from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker_node.config import Settings
from broker_node.node import BrokerNode
from shared.ids import NodeId
from tests.differential import profiles  # noqa: F401 - registers the differential profiles


@pytest.fixture
async def node() -> AsyncIterator[BrokerNode]:
    """A standalone node in this process, on a free port."""
    settings = Settings(host="127.0.0.1", port=0, node_id=NodeId("test-node"))
    async with BrokerNode(settings) as running:
        yield running


@pytest.fixture
def url(node: BrokerNode) -> str:
    return f"ws://127.0.0.1:{node.port}"

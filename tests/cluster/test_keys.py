"""The key schema: one prefix, and no two records sharing a name."""

from __future__ import annotations

import itertools

from broker_node.cluster.keys import RedisKeys
from shared.ids import ChannelId, ConnectionId, NodeId


def test_every_name_is_under_the_prefix_and_unambiguous() -> None:
    keys = RedisKeys("app:1")
    tricky = ["", "x", "x:y", ":", "conn:x", "role:x", "node-conns:x", "nodes", "*", "ü"]
    names: list[str] = [keys.nodes]
    for value in tricky:
        names += [
            keys.connection(ConnectionId(value)),
            keys.role(value),
            keys.channel(ChannelId(value)),
            keys.node_connections(NodeId(value)),
            keys.node_channels(NodeId(value)),
            keys.heartbeat(NodeId(value)),
            keys.tombstone(NodeId(value)),
        ]
    assert len(set(names)) == len(names)
    assert all(name.startswith("app:1:") for name in names)
    inboxes = [keys.inbox(NodeId(value)) for value in tricky]
    assert len(set(inboxes)) == len(inboxes)


def test_family_prefixes_do_not_overlap() -> None:
    keys = RedisKeys()
    families = [
        keys.connection_prefix,
        keys.role_prefix,
        keys.channel_prefix,
        keys.node_connections_prefix,
        keys.node_channels_prefix,
        keys.heartbeat_prefix,
        keys.tombstone_prefix,
    ]
    for one, other in itertools.permutations(families, 2):
        assert not one.startswith(other)
    assert not any(keys.nodes.startswith(family) for family in families)
    assert keys.role("x") == "broker:role:x"

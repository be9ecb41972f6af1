"""The Redis audit of the end-to-end test (pure): it must see every kind of leftover."""

from __future__ import annotations

from broker_node.cluster.keys import RedisKeys
from tests.e2e.registry import Snapshot, Value, leftovers

KEYS = RedisKeys("broker")
CURRENT = ["new-a", "new-b"]
LIVE = ["c1", "c2"]


def clean() -> dict[str, Value]:
    return {
        "broker:nodes": {"new-a", "new-b"},
        "broker:hb:new-a": "1",
        "broker:hb:new-b": "1",
        "broker:conn:c1": {"node": "new-a", "role": "echo"},
        "broker:conn:c2": {"node": "new-b", "role": "requester"},
        "broker:role:echo": {"c1"},
        "broker:role:requester": {"c2"},
        "broker:node-conns:new-a": {"c1"},
        "broker:node-conns:new-b": {"c2"},
        "broker:chan:h1": {
            "opener": "c2",
            "opener_node": "new-b",
            "target": "c1",
            "target_node": "new-a",
        },
        "broker:node-chans:new-a": {"h1"},
        "broker:node-chans:new-b": {"h1"},
    }


def audit(values: dict[str, Value]) -> list[str]:
    return leftovers(Snapshot(KEYS, values), node_ids=CURRENT, connection_ids=LIVE)


def test_the_state_of_the_current_nodes_is_clean() -> None:
    assert audit(clean()) == []


def test_every_kind_of_leftover_is_reported() -> None:
    cases: list[tuple[dict[str, Value], str]] = [
        ({"broker:tomb:old": "1"}, "tombstone of node old"),
        ({"broker:hb:old": "1"}, "heartbeat of old node old"),
        ({"broker:nodes": {"new-a", "new-b", "old"}}, "broker:nodes is"),
        ({"broker:conn:c9": {"node": "old", "role": "echo"}}, "connection c9 of old node old"),
        ({"broker:conn:c9": {"node": "new-a", "role": "echo"}}, "c9 (node new-a) is no live"),
        ({"broker:role:echo": {"c1", "c9"}}, "role 'echo' lists connection c9"),
        ({"broker:node-conns:old": {"c9"}}, "connection index of old node old"),
        ({"broker:node-chans:old": {"h9"}}, "channel index of old node old"),
        ({"broker:node-chans:new-a": {"h1", "h9"}}, "indexes channel h9"),
        ({"broker:node-conns:new-a": {"c1", "c2"}}, "indexes connection c2, not its own"),
        (
            {
                "broker:chan:h9": {
                    "opener": "c1",
                    "opener_node": "new-a",
                    "target": "c9",
                    "target_node": "old",
                }
            },
            "channel h9: target on old node old",
        ),
        ({"broker:something:else": "1"}, "unknown key broker:something:else"),
    ]
    for extra, expected in cases:
        problems = audit({**clean(), **extra})
        assert any(expected in problem for problem in problems), (extra, problems)
    missing = clean()
    del missing["broker:conn:c2"]
    assert any("live connection c2 is not registered" in p for p in audit(missing))
    del missing["broker:hb:new-b"]
    assert any("no heartbeat for current nodes ['new-b']" in p for p in audit(missing))

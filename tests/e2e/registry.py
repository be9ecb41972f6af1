"""What the cluster keeps in Redis, read with SCAN, and checked against who is alive.

:func:`snapshot` reads every key under the cluster's prefix; :func:`leftovers` (pure) lists
every entry that does not belong to the current node processes and their live connections,
following the key table of ``docs/redis-keys.md``. An empty list means Redis holds exactly
the state of the running cluster: no tombstone, heartbeat, index, connection or channel of a
node process that is gone, and no connection that is not a live client.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from redis.asyncio import Redis

from broker_node.cluster.keys import RedisKeys

#: A Redis value as the snapshot holds it: a hash, a set, or a string.
Value = dict[str, str] | set[str] | str


@dataclass(frozen=True)
class Snapshot:
    """Every key under one prefix with its value, read key by key (not atomic)."""

    keys: RedisKeys
    values: Mapping[str, Value]

    def family(self, prefix: str) -> dict[str, Value]:
        """The keys of one family, by their variable part."""
        return {k[len(prefix) :]: v for k, v in self.values.items() if k.startswith(prefix)}


async def snapshot(url: str, keys: RedisKeys) -> Snapshot:
    """SCAN every key of the cluster and read it (a key gone in between is skipped)."""
    redis = Redis.from_url(url)
    try:
        values: dict[str, Value] = {}
        async for raw_key in redis.scan_iter(match=keys.pattern, count=1000):
            key = _text(raw_key)
            kind = _text(await redis.type(raw_key))
            if kind == "hash":
                fields = await redis.hgetall(raw_key)
                values[key] = {_text(k): _text(v) for k, v in fields.items()}
            elif kind == "set":
                values[key] = {_text(m) for m in await redis.smembers(raw_key)}
            elif kind == "string":
                value = await redis.get(raw_key)
                if value is not None:
                    values[key] = _text(value)
            elif kind != "none":
                values[key] = f"<unexpected type {kind}>"
        return Snapshot(keys, values)
    finally:
        await redis.aclose()


def leftovers(
    snap: Snapshot, *, node_ids: Collection[str], connection_ids: Collection[str]
) -> list[str]:
    """Every entry that is not state of ``node_ids`` and ``connection_ids``; empty if clean."""
    keys = snap.keys
    nodes = set(node_ids)
    live = set(connection_ids)
    problems: list[str] = []
    families = (
        keys.connection_prefix,
        keys.role_prefix,
        keys.channel_prefix,
        keys.node_connections_prefix,
        keys.node_channels_prefix,
        keys.heartbeat_prefix,
        keys.tombstone_prefix,
    )
    for key in snap.values:
        if key != keys.nodes and not key.startswith(families):
            problems.append(f"unknown key {key}")

    for node in snap.family(keys.tombstone_prefix):
        problems.append(f"tombstone of node {node}")
    for node in snap.family(keys.heartbeat_prefix):
        if node not in nodes:
            problems.append(f"heartbeat of old node {node}")
    missing_beats = nodes - set(snap.family(keys.heartbeat_prefix))
    if missing_beats:
        problems.append(f"no heartbeat for current nodes {sorted(missing_beats)}")
    registered = snap.values.get(keys.nodes, set())
    if not isinstance(registered, set) or registered != nodes:
        problems.append(f"{keys.nodes} is {registered!r}, not the current nodes {sorted(nodes)}")

    connections = snap.family(keys.connection_prefix)
    for cid, record in connections.items():
        owner = record.get("node") if isinstance(record, dict) else None
        if owner not in nodes:
            problems.append(f"connection {cid} of old node {owner}")
        elif cid not in live:
            problems.append(f"connection {cid} (node {owner}) is no live client")
    for cid in sorted(live - set(connections)):
        problems.append(f"live connection {cid} is not registered")
    for role, members in snap.family(keys.role_prefix).items():
        for cid in sorted(_members(members) - set(connections)):
            problems.append(f"role {role!r} lists connection {cid}, which is gone")

    for chid, record in snap.family(keys.channel_prefix).items():
        fields = record if isinstance(record, dict) else {}
        for end in ("opener", "target"):
            if fields.get(f"{end}_node") not in nodes:
                problems.append(f"channel {chid}: {end} on old node {fields.get(f'{end}_node')}")
            elif fields.get(end) not in connections:
                problems.append(f"channel {chid}: {end} {fields.get(end)} is gone")

    for node, members in snap.family(keys.node_connections_prefix).items():
        if node not in nodes:
            problems.append(f"connection index of old node {node}")
            continue
        for cid in sorted(_members(members)):
            entry = connections.get(cid)
            if not isinstance(entry, dict) or entry.get("node") != node:
                problems.append(f"node {node} indexes connection {cid}, not its own")
    channels = snap.family(keys.channel_prefix)
    for node, members in snap.family(keys.node_channels_prefix).items():
        if node not in nodes:
            problems.append(f"channel index of old node {node}")
            continue
        for chid in sorted(_members(members) - set(channels)):
            problems.append(f"node {node} indexes channel {chid}, which is gone")
    return problems


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _members(value: Value) -> set[str]:
    return value if isinstance(value, set) else set()

"""The cluster seam's contract, run over memory, fakeredis and a real redis-server alike (the
bus over memory and the real server: it needs real sockets)."""

from __future__ import annotations

import asyncio

from broker_node.cluster.base import Heartbeat, PublishResult, publish
from broker_node.errors import BackendUnavailable
from shared.ids import NodeId
from tests.cluster.harness import (
    KEYS,
    LONG_TTL_MS,
    SHORT_TTL_MS,
    A,
    B,
    C,
    Harness,
    channel,
    connection,
    listen,
    receive,
)
from tests.support.polling import wait_for_value, wait_until


async def lapse(harness: Harness, node_id: NodeId) -> None:
    """Give ``node_id`` a short heartbeat and wait until it has lapsed."""
    registry = harness.backend.registry
    await registry.heartbeat(node_id, SHORT_TTL_MS)
    harness.advance_ms(SHORT_TTL_MS + 1)

    async def lapsed() -> bool:
        return node_id in await registry.lapsed_nodes()

    await wait_until(lapsed, timeout=3, message=f"{node_id} lapsed")


# Connections


async def test_add_find_remove_connection(harness: Harness) -> None:
    registry = harness.backend.registry
    record = connection(A, role="viewer")
    assert await registry.find_connection(record.connection_id) is None

    await registry.add_connection(record)
    assert await registry.find_connection(record.connection_id) == record
    assert await registry.list_by_role("viewer") == [record.connection_id]

    await registry.remove_connection(record)
    assert await registry.find_connection(record.connection_id) is None
    assert await registry.list_by_role("viewer") == []
    await registry.remove_connection(record)  # absent entries are fine
    assert await harness.stored_keys() == set()


async def test_list_by_role_holds_only_that_role(harness: Harness) -> None:
    registry = harness.backend.registry
    # Roles that a careless key schema would confuse: a prefix of another, with separators.
    roles = ["x", "x:y", "x:", ":x", "conn:x", "ünï cødé", "*"]
    members = {role: [connection(node, role) for node in (A, B)] for role in roles}
    for records in members.values():
        for record in records:
            await registry.add_connection(record)

    for role, records in members.items():
        assert sorted(await registry.list_by_role(role)) == sorted(r.connection_id for r in records)
    assert await registry.list_by_role("nobody") == []

    # The last member out takes the role's index with it: no empty set lingers.
    for record in members["x:y"]:
        await registry.remove_connection(record)
    assert await registry.list_by_role("x:y") == []
    assert KEYS.role("x:y") not in await harness.stored_keys()
    assert KEYS.role("x") in await harness.stored_keys()


async def test_connections_are_seen_by_every_node(harness: Harness) -> None:
    record = connection(A)
    await harness.backend.registry.add_connection(record)
    other = harness.peer().registry
    assert await other.find_connection(record.connection_id) == record


# Channels


async def test_channels_are_indexed_under_both_nodes(harness: Harness) -> None:
    registry = harness.backend.registry
    a, b = connection(A), connection(B)
    await registry.add_connection(a)
    await registry.add_connection(b)
    record = channel(a, b)

    assert await registry.find_channel(record.channel_id) is None
    await registry.add_channel(record)
    assert await registry.find_channel(record.channel_id) == record
    stored = await harness.stored_keys()
    assert {KEYS.channel(record.channel_id), KEYS.node_channels(A), KEYS.node_channels(B)} <= stored

    await registry.remove_channel(record)
    await registry.remove_channel(record)  # absent entries are fine
    assert await registry.find_channel(record.channel_id) is None
    stored = await harness.stored_keys()
    assert stored.isdisjoint(
        {KEYS.channel(record.channel_id), KEYS.node_channels(A), KEYS.node_channels(B)}
    )


# Heartbeats, lapses, reaping


async def test_heartbeat_rejoined_then_renewed(harness: Harness) -> None:
    registry = harness.backend.registry
    assert await registry.heartbeat(A, LONG_TTL_MS) is Heartbeat.REJOINED
    assert await registry.heartbeat(A, LONG_TTL_MS) is Heartbeat.RENEWED
    assert await registry.lapsed_nodes() == []
    assert await registry.live_nodes() == {A}


async def test_lapsed_nodes_after_ttl(harness: Harness) -> None:
    registry = harness.backend.registry
    await registry.heartbeat(A, LONG_TTL_MS)
    await lapse(harness, B)
    assert await registry.lapsed_nodes() == [B]
    assert await registry.live_nodes() == {A}
    # A lapsed node that renews in time is simply alive again.
    assert await registry.heartbeat(B, LONG_TTL_MS) is Heartbeat.RENEWED
    assert await registry.lapsed_nodes() == []


async def test_reap_removes_everything_of_the_dead_node(harness: Harness) -> None:
    registry = harness.backend.registry
    await registry.heartbeat(B, LONG_TTL_MS)
    a1, a2 = connection(A, "shared"), connection(A, "only-on-a")
    b1 = connection(B, "shared")
    for record in (a1, a2, b1):
        await registry.add_connection(record)
    across = channel(b1, a1)  # B's index must lose it too
    local = channel(a1, a2)  # both ends on the dead node
    await registry.add_channel(across)
    await registry.add_channel(local)
    await lapse(harness, A)

    survivor = harness.peer().registry
    removed = await survivor.reap(A)

    assert removed is not None
    assert sorted(removed, key=lambda c: c.channel_id) == sorted(
        [across, local], key=lambda c: c.channel_id
    )
    assert await registry.find_connection(a1.connection_id) is None
    assert await registry.list_by_role("shared") == [b1.connection_id]
    assert await registry.list_by_role("only-on-a") == []
    assert await registry.lapsed_nodes() == []
    # Nothing of A is left but its tombstone; B's own state is untouched.
    assert await harness.stored_keys() == {
        KEYS.tombstone(A),
        KEYS.nodes,
        KEYS.heartbeat(B),
        KEYS.connection(b1.connection_id),
        KEYS.role("shared"),
        KEYS.node_connections(B),
    }


async def test_reap_spares_live_and_unknown_nodes(harness: Harness) -> None:
    registry = harness.backend.registry
    await registry.heartbeat(A, LONG_TTL_MS)
    record = connection(A)
    await registry.add_connection(record)
    assert await registry.reap(A) is None
    assert await registry.reap(C) is None
    assert await registry.find_connection(record.connection_id) == record


async def test_reap_of_a_node_with_nothing_returns_an_empty_list(harness: Harness) -> None:
    await lapse(harness, A)
    assert await harness.backend.registry.reap(A) == []
    assert await harness.stored_keys() == {KEYS.tombstone(A)}


async def test_racing_reapers_exactly_one_wins(harness: Harness) -> None:
    registry = harness.backend.registry
    a, b = connection(A), connection(B)
    await registry.add_connection(a)
    await registry.add_connection(b)
    await registry.add_channel(channel(a, b))
    await lapse(harness, A)

    reapers = [harness.peer().registry for _ in range(4)]
    results = await asyncio.gather(*(r.reap(A) for r in reapers))

    winners = [result for result in results if result is not None]
    assert len(winners) == 1
    assert len(winners[0]) == 1
    assert results.count(None) == len(reapers) - 1


async def test_a_reaped_node_is_fenced_until_it_rejoins(harness: Harness) -> None:
    registry = harness.backend.registry
    record = connection(A)
    await registry.add_connection(record)
    await lapse(harness, A)
    assert await harness.peer().registry.reap(A) == []

    assert await registry.heartbeat(A, LONG_TTL_MS) is Heartbeat.FENCED
    assert await registry.heartbeat(A, LONG_TTL_MS) is Heartbeat.FENCED  # nothing renewed
    assert await registry.live_nodes() == set()

    await registry.rejoin(A, LONG_TTL_MS)
    assert await registry.heartbeat(A, LONG_TTL_MS) is Heartbeat.RENEWED
    assert await registry.live_nodes() == {A}
    assert await harness.stored_keys() == {KEYS.nodes, KEYS.heartbeat(A)}


async def test_rejoin_drops_state_written_while_fenced(harness: Harness) -> None:
    registry = harness.backend.registry
    await lapse(harness, A)
    assert await registry.reap(A) == []
    stale = connection(A)
    await registry.add_connection(stale)  # a fenced node's late write
    await registry.rejoin(A, LONG_TTL_MS)
    assert await registry.find_connection(stale.connection_id) is None
    assert await harness.stored_keys() == {KEYS.nodes, KEYS.heartbeat(A)}


async def test_leave_removes_everything_without_tombstone(harness: Harness) -> None:
    registry = harness.backend.registry
    await registry.heartbeat(A, LONG_TTL_MS)
    await registry.heartbeat(B, LONG_TTL_MS)
    a, b = connection(A), connection(B)
    await registry.add_connection(a)
    await registry.add_connection(b)
    await registry.add_channel(channel(a, b))

    await registry.leave(A)

    assert await registry.find_connection(a.connection_id) is None
    assert await registry.live_nodes() == {B}
    assert await registry.lapsed_nodes() == []
    assert await harness.stored_keys() == {
        KEYS.nodes,
        KEYS.heartbeat(B),
        KEYS.connection(b.connection_id),
        KEYS.role("worker"),
        KEYS.node_connections(B),
    }
    # Not fenced: it may come back.
    assert await registry.heartbeat(A, LONG_TTL_MS) is Heartbeat.REJOINED


async def test_restore_after_the_store_was_wiped(harness: Harness) -> None:
    registry = harness.backend.registry
    await registry.heartbeat(A, LONG_TTL_MS)
    a1, a2, b1 = connection(A, "r1"), connection(A, "r2"), connection(B, "r1")
    channels = [channel(a1, b1), channel(a2, a1)]
    for record in (a1, a2, b1):
        await registry.add_connection(record)
    for chan in channels:
        await registry.add_channel(chan)
    before = await harness.stored_keys()

    await harness.wipe()
    assert await registry.heartbeat(A, LONG_TTL_MS) is Heartbeat.REJOINED
    await registry.restore(A, [a1, a2], channels)
    await harness.peer().registry.restore(B, [b1], channels[:1])
    await registry.restore(A, [a1, a2], channels)  # idempotent

    assert await harness.stored_keys() == before
    assert await registry.find_connection(a2.connection_id) == a2
    assert sorted(await registry.list_by_role("r1")) == sorted([a1.connection_id, b1.connection_id])
    await lapse(harness, A)
    removed = await registry.reap(A)
    assert removed is not None
    assert sorted(c.channel_id for c in removed) == sorted(c.channel_id for c in channels)


async def test_bulk_removal_removes_every_entry_of_the_records(harness: Harness) -> None:
    registry = harness.backend.registry
    keep = connection(A, "r")
    gone = [connection(A, "r") for _ in range(603)] + [connection(A, "other")]
    await registry.restore(A, [keep, *gone], [])
    kept_channel = channel(keep, keep)
    gone_channels = [channel(keep, record) for record in gone[:550]]
    await registry.restore(A, [], [kept_channel, *gone_channels])

    await registry.remove_channels(gone_channels)
    await registry.remove_connections(gone)
    await registry.remove_connections(gone)  # absent entries are fine

    assert await registry.list_by_role("r") == [keep.connection_id]
    assert await registry.list_by_role("other") == []
    assert await registry.node_index(A) == ({keep.connection_id}, {kept_channel.channel_id})
    assert await harness.stored_keys() == {
        KEYS.connection(keep.connection_id),
        KEYS.role("r"),
        KEYS.node_connections(A),
        KEYS.channel(kept_channel.channel_id),
        KEYS.node_channels(A),
    }


async def test_prune_removes_only_the_nodes_own_entries(harness: Harness) -> None:
    registry = harness.backend.registry
    a_live, a_ghost, b1 = connection(A, "r"), connection(A, "r"), connection(B, "r")
    live_channel = channel(a_live, b1)  # opened from A
    ghost_channel = channel(a_ghost, b1)  # opened from A, its opener gone
    foreign_channel = channel(b1, a_live)  # opened from B: B's to keep or remove
    await registry.restore(A, [a_live, a_ghost], [live_channel, ghost_channel, foreign_channel])
    await registry.restore(B, [b1], [])
    connections, channels = await registry.node_index(A)
    assert connections == {a_live.connection_id, a_ghost.connection_id}
    assert channels == {c.channel_id for c in (live_channel, ghost_channel, foreign_channel)}

    await registry.prune(
        A,
        [a_ghost.connection_id, b1.connection_id],
        [ghost_channel.channel_id, foreign_channel.channel_id],
    )

    assert await registry.find_connection(a_ghost.connection_id) is None
    assert await registry.find_connection(b1.connection_id) == b1  # another node's
    assert sorted(await registry.list_by_role("r")) == sorted(
        [a_live.connection_id, b1.connection_id]
    )
    assert await registry.node_index(A) == (
        {a_live.connection_id},
        {live_channel.channel_id, foreign_channel.channel_id},
    )
    assert await registry.node_index(B) == (
        {b1.connection_id},
        {live_channel.channel_id, foreign_channel.channel_id},
    )
    assert KEYS.channel(ghost_channel.channel_id) not in await harness.stored_keys()
    await registry.prune(A, [], [])


async def test_restore_nothing(harness: Harness) -> None:
    await harness.backend.registry.restore(A, [], [])
    await harness.backend.registry.ping()
    assert await harness.stored_keys() == set()


# Bus


async def test_publish_order_is_kept_across_pipelined_batches(bus_harness: Harness) -> None:
    bus = bus_harness.backend.bus
    total, batches = 10_000, 5
    payloads = [b'{"n":%d}' % i for i in range(total)]
    size = total // batches
    async with listen(bus_harness.peer().bus, B) as subscription:

        async def publish_all() -> list[int]:
            counts: list[int] = []
            for start in range(0, total, size):
                counts += await publish(bus, [(B, p) for p in payloads[start : start + size]])
            return counts

        async with asyncio.timeout(20):
            received, counts = await asyncio.gather(receive(subscription, total), publish_all())
    assert counts == [1] * total
    assert received == payloads


async def test_concurrent_publishes_do_not_interleave(bus_harness: Harness) -> None:
    bus = bus_harness.backend.bus
    batches = [[(A, b"%d:%d" % (call, i)) for i in range(200)] for call in range(6)]
    async with listen(bus, A) as subscription, asyncio.timeout(10):
        receiving = asyncio.create_task(receive(subscription, 1200))
        counts = await asyncio.gather(*(publish(bus, batch) for batch in batches))
        received = await receiving
    assert counts == [[1] * 200] * 6
    # Each call's payloads arrive together and in order; calls come one after another.
    runs = [received[i : i + 200] for i in range(0, 1200, 200)]
    assert sorted(runs) == sorted([payload for _, payload in batch] for batch in batches)


async def test_publish_routes_to_the_addressed_node_only(bus_harness: Harness) -> None:
    bus = bus_harness.backend.bus
    async with listen(bus, A) as to_a, listen(bus_harness.peer().bus, B) as to_b:
        counts = await publish(bus, [(B, b"for b"), (A, b"for a"), (C, b"for nobody")])
        assert counts == [1, 1, 0]
        async with asyncio.timeout(5):
            assert await receive(to_a, 1) == [b"for a"]
            assert await receive(to_b, 1) == [b"for b"]


async def test_a_publish_given_up_before_its_outcome_leaves_the_bus_working(
    bus_harness: Harness,
) -> None:
    bus = bus_harness.backend.bus
    async with listen(bus, A) as to_a:
        given_up = asyncio.ensure_future(publish(bus, [(A, b"given up")]))
        await asyncio.sleep(0)  # one turn: the payload is sent, its outcome not back yet
        given_up.cancel()
        # Its outcome comes after all, for a caller who is gone: nothing breaks.
        assert await publish(bus, [(A, b"after")]) == [1]
        async with asyncio.timeout(5):
            assert await receive(to_a, 2) == [b"given up", b"after"]
    assert given_up.cancelled()


async def test_publish_without_subscriber_returns_zero(bus_harness: Harness) -> None:
    bus = bus_harness.backend.bus
    assert await publish(bus, []) == []
    assert await publish(bus, [(C, b"lost")]) == [0]
    async with listen(bus, C):
        assert await publish(bus, [(C, b"heard")]) == [1]
    # Leaving the context ends the subscription: at once in memory; on a real Redis once the
    # server has read the UNSUBSCRIBE sent on the subscriber's own connection, which a
    # publish on another connection may overtake.
    await wait_for_value(
        lambda: publish(bus, [(C, b"lost again")]),
        lambda counts: counts == [0],
        timeout=5,
        message="the subscription ended",
    )


async def test_payloads_are_opaque_bytes(bus_harness: Harness) -> None:
    bus = bus_harness.backend.bus
    payloads = [b"", b"\x00\xff\r\n", "ünïcødé".encode(), b"x" * 100_000]
    async with listen(bus, A) as subscription:
        assert await publish(bus, [(A, p) for p in payloads]) == [1] * len(payloads)
        async with asyncio.timeout(5):
            assert await receive(subscription, len(payloads)) == payloads


async def test_send_reports_later_in_call_order(bus_harness: Harness) -> None:
    bus = bus_harness.backend.bus
    outcomes: list[tuple[str, list[int] | BackendUnavailable]] = []

    def record(name: str) -> PublishResult:
        return lambda result: outcomes.append((name, result))

    async with listen(bus, A) as subscription:
        for name in ("first", "second", "empty", "third"):
            batch = [] if name == "empty" else [(A, name.encode()), (C, b"nobody")]
            bus.send(batch, record(name))
        # Never from within send: a caller may send again from its callback.
        assert outcomes == []
        async with asyncio.timeout(5):
            assert await receive(subscription, 3) == [b"first", b"second", b"third"]

        async def all_reported() -> bool:
            return len(outcomes) == 4

        await wait_until(all_reported, timeout=3, message="four outcomes reported")
    assert outcomes == [
        ("first", [1, 0]),
        ("second", [1, 0]),
        ("empty", []),
        ("third", [1, 0]),
    ]


async def test_a_failing_deliver_callback_does_not_end_the_subscription(
    bus_harness: Harness,
) -> None:
    bus = bus_harness.backend.bus
    seen: list[bytes] = []

    def deliver(payload: bytes) -> None:
        seen.append(payload)
        if payload == b"bad":
            raise ValueError("a bug in the consumer")

    async with bus.subscribe(A, deliver):
        assert await publish(bus, [(A, b"bad"), (A, b"good")]) == [1, 1]
        await publish(bus, [(A, b"later")])

        async def all_seen() -> bool:
            return len(seen) == 3

        await wait_until(all_seen, timeout=3, message="three payloads delivered")
    assert seen == [b"bad", b"good", b"later"]

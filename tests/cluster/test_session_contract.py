"""The registry's part of session resume (issue 14), over memory, fakeredis and a real
redis-server alike: claims, detach marks, guarded ends, channel moves, adoption by the reaper."""

from __future__ import annotations

import asyncio

from broker_node.cluster.base import ClaimRefusal
from broker_node.core.records import ChannelRecord, ConnectionRecord, SessionClaim, SessionKey
from shared.ids import NodeId
from tests.cluster.harness import KEYS, LONG_TTL_MS, A, B, C, Harness, channel, connection
from tests.cluster.test_contract import lapse

WINDOW = 120


def resumable(node_id: NodeId, token_hash: str = "h1", role: str = "worker") -> ConnectionRecord:
    plain = connection(node_id, role)
    return ConnectionRecord(plain.connection_id, node_id, role, SessionKey(token_hash, WINDOW))


async def test_a_session_is_found_with_its_key(harness: Harness) -> None:
    registry = harness.backend.registry
    record = resumable(A)
    await registry.add_connection(record)
    assert await registry.find_connection(record.connection_id) == record


async def test_a_claim_moves_the_session_and_rotates_its_token(harness: Harness) -> None:
    registry = harness.backend.registry
    record = resumable(A, "h1", role="viewer")
    await registry.add_connection(record)

    claim = await registry.claim_session(record.connection_id, "h1", "h2", B, 1_000)

    assert claim == SessionClaim(A, "viewer", WINDOW, 1)
    moved = await registry.find_connection(record.connection_id)
    assert moved == ConnectionRecord(record.connection_id, B, "viewer", SessionKey("h2", WINDOW))
    assert await registry.node_index(A) == (set(), set())
    assert await registry.node_index(B) == ({record.connection_id}, set())
    assert await registry.list_by_role("viewer") == [record.connection_id]
    # The token is single use: the old one no longer claims, the new one does.
    assert await registry.claim_session(record.connection_id, "h1", "h3", C, 2_000) is (
        ClaimRefusal.UNKNOWN
    )
    again = await registry.claim_session(record.connection_id, "h2", "h3", C, 2_000)
    assert again == SessionClaim(B, "viewer", WINDOW, 2)


async def test_claims_of_unknown_or_plain_connections_are_refused(harness: Harness) -> None:
    registry = harness.backend.registry
    plain = connection(A)
    await registry.add_connection(plain)
    assert await registry.claim_session(plain.connection_id, "h", "h2", B, 0) is (
        ClaimRefusal.UNKNOWN
    )
    gone = resumable(A)
    assert await registry.claim_session(gone.connection_id, "h1", "h2", B, 0) is (
        ClaimRefusal.UNKNOWN
    )


async def test_a_claim_after_the_window_is_refused(harness: Harness) -> None:
    registry = harness.backend.registry
    record = resumable(A)
    await registry.add_connection(record)
    await registry.mark_detached(record.connection_id, A, 10_000)
    late = 10_000 + WINDOW * 1000
    assert await registry.claim_session(record.connection_id, "h1", "h2", B, late) is (
        ClaimRefusal.EXPIRED
    )
    claim = await registry.claim_session(record.connection_id, "h1", "h2", B, late - 1)
    assert isinstance(claim, SessionClaim)


async def test_a_detach_mark_only_counts_for_the_holder(harness: Harness) -> None:
    registry = harness.backend.registry
    record = resumable(A)
    await registry.add_connection(record)
    await registry.claim_session(record.connection_id, "h1", "h2", B, 0)
    await registry.mark_detached(record.connection_id, A, 0)  # A no longer holds it
    far = WINDOW * 1000 * 10
    assert isinstance(
        await registry.claim_session(record.connection_id, "h2", "h3", C, far), SessionClaim
    )


async def test_of_two_claims_at_once_exactly_one_wins(harness: Harness) -> None:
    registry = harness.backend.registry
    record = resumable(A)
    await registry.add_connection(record)
    claimers = [harness.peer().registry for _ in range(4)]
    results = await asyncio.gather(
        *(
            r.claim_session(record.connection_id, "h1", f"new{n}", B, 0)
            for n, r in enumerate(claimers)
        )
    )
    assert sum(isinstance(result, SessionClaim) for result in results) == 1
    assert results.count(ClaimRefusal.UNKNOWN) == len(claimers) - 1


async def test_a_session_ends_only_where_it_is_held(harness: Harness) -> None:
    registry = harness.backend.registry
    record = resumable(A)
    await registry.add_connection(record)
    await registry.claim_session(record.connection_id, "h1", "h2", B, 0)
    assert not await registry.end_session(record)  # A's timer lost the race to B's resume
    assert await registry.find_connection(record.connection_id) is not None
    held_by_b = ConnectionRecord(record.connection_id, B, record.role, SessionKey("h2", WINDOW))
    assert await registry.end_session(held_by_b)
    assert await registry.find_connection(record.connection_id) is None
    assert await registry.list_by_role(record.role) == []
    assert await registry.node_index(B) == (set(), set())


async def test_moving_channels_reindexes_them(harness: Harness) -> None:
    registry = harness.backend.registry
    a, b = resumable(A), connection(B)
    await registry.add_connection(a)
    await registry.add_connection(b)
    across = channel(a, b)
    await registry.add_channel(across)
    moved = ChannelRecord(across.channel_id, across.opener, C, across.target, B)

    await registry.move_channels([moved], from_node=A)

    assert await registry.find_channel(across.channel_id) == moved
    assert await registry.node_index(A) == ({a.connection_id}, set())
    assert await registry.node_index(C) == (set(), {across.channel_id})
    assert await registry.node_index(B) == ({b.connection_id}, {across.channel_id})


async def test_the_reaper_adopts_resumable_sessions_and_their_channels(harness: Harness) -> None:
    registry = harness.backend.registry
    await registry.heartbeat(B, LONG_TTL_MS)
    session, plain = resumable(A, role="r"), connection(A, role="r")
    on_b = connection(B)
    other_session = resumable(A, "h9", role="r")
    for record in (session, plain, on_b, other_session):
        await registry.add_connection(record)
    await registry.mark_detached(other_session.connection_id, A, 5)
    kept_across = channel(session, on_b)
    kept_local = channel(session, other_session)
    lost_half = channel(plain, session)  # the plain end dies with its node
    lost_across = channel(on_b, plain)
    for channel_record in (kept_across, kept_local, lost_half, lost_across):
        await registry.add_channel(channel_record)
    await lapse(harness, A)

    reaped = await harness.peer().registry.reap_adopting(A, C, 777)

    assert reaped is not None
    assert sorted(c.channel_id for c in reaped.removed) == sorted(
        [lost_half.channel_id, lost_across.channel_id]
    )
    adopted = {s.record.connection_id: s for s in reaped.adopted}
    assert set(adopted) == {session.connection_id, other_session.connection_id}
    assert adopted[session.connection_id].record == ConnectionRecord(
        session.connection_id, C, "r", SessionKey("h1", WINDOW)
    )
    assert adopted[session.connection_id].detached_at_ms == 777
    assert adopted[other_session.connection_id].detached_at_ms == 5
    moved = {c.channel_id: c for c in reaped.moved}
    assert moved == {
        kept_across.channel_id: ChannelRecord(
            kept_across.channel_id, session.connection_id, C, on_b.connection_id, B
        ),
        kept_local.channel_id: ChannelRecord(
            kept_local.channel_id, session.connection_id, C, other_session.connection_id, C
        ),
    }
    for channel_id, moved_record in moved.items():
        assert await registry.find_channel(channel_id) == moved_record
    assert await registry.find_connection(plain.connection_id) is None
    assert sorted(await registry.list_by_role("r")) == sorted(
        [session.connection_id, other_session.connection_id]
    )
    assert await registry.node_index(C) == (
        {session.connection_id, other_session.connection_id},
        set(moved),
    )
    assert await registry.node_index(A) == (set(), set())
    # The adopted session's window runs from its adoption (or from its earlier detach).
    assert (
        await registry.claim_session(other_session.connection_id, "h9", "x", B, 5 + WINDOW * 1000)
        is ClaimRefusal.EXPIRED
    )
    assert KEYS.tombstone(A) in await harness.stored_keys()


async def test_a_plain_reap_still_removes_sessions(harness: Harness) -> None:
    registry = harness.backend.registry
    session = resumable(A)
    await registry.add_connection(session)
    await lapse(harness, A)
    assert await harness.peer().registry.reap(A) == []
    assert await registry.find_connection(session.connection_id) is None


async def test_a_channel_whose_session_end_resumed_elsewhere_survives_the_reap(
    harness: Harness,
) -> None:
    registry = harness.backend.registry
    await registry.heartbeat(B, LONG_TTL_MS)
    session, on_b = resumable(A), connection(B)
    await registry.add_connection(session)
    await registry.add_connection(on_b)
    across = channel(session, on_b)
    await registry.add_channel(across)
    # The client resumed on C before A's death was noticed; C has not moved the channel yet.
    await registry.claim_session(session.connection_id, "h1", "h2", C, 0)
    await lapse(harness, A)

    reaped = await harness.peer().registry.reap_adopting(A, B, 0)

    assert reaped is not None
    assert reaped.removed == []
    assert reaped.adopted == []
    moved = ChannelRecord(across.channel_id, session.connection_id, C, on_b.connection_id, B)
    assert reaped.moved == [moved]
    assert await registry.find_channel(across.channel_id) == moved
    assert await registry.node_index(C) == ({session.connection_id}, {across.channel_id})


async def test_a_draining_node_transfers_a_session_it_still_holds(harness: Harness) -> None:
    registry = harness.backend.registry
    record = resumable(A)
    await registry.add_connection(record)
    await registry.mark_detached(record.connection_id, A, 10)
    assert await registry.transfer_session(record.connection_id, A, B)
    assert await registry.node_index(B) == ({record.connection_id}, set())
    assert not await registry.transfer_session(record.connection_id, A, C)
    # The window still runs from the detach.
    late = 10 + WINDOW * 1000
    assert await registry.claim_session(record.connection_id, "h1", "h2", C, late) is (
        ClaimRefusal.EXPIRED
    )


async def test_leaving_keeps_the_channels_of_sessions_resumed_elsewhere(harness: Harness) -> None:
    registry = harness.backend.registry
    session, on_b, plain = resumable(A), connection(B), connection(A)
    for record in (session, on_b, plain):
        await registry.add_connection(record)
    kept, gone = channel(session, on_b), channel(plain, on_b)
    await registry.add_channel(kept)
    await registry.add_channel(gone)
    await registry.claim_session(session.connection_id, "h1", "h2", C, 0)

    await registry.leave(A)

    assert await registry.find_channel(kept.channel_id) == ChannelRecord(
        kept.channel_id, session.connection_id, C, on_b.connection_id, B
    )
    assert await registry.find_channel(gone.channel_id) is None
    assert await registry.node_index(C) == ({session.connection_id}, {kept.channel_id})

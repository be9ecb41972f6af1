"""Liveness rules without a clock or a registry: TTL arithmetic, what a beat's answer asks,
the grace window, whom a check judges."""

from __future__ import annotations

import pytest

from broker_node.core.liveness import (
    PEER_CHECK_INTERVAL,
    AfterBeat,
    GraceWindow,
    Stale,
    after_beat,
    heartbeat_ttl_ms,
    lost_nodes,
    nodes_to_reap,
    peer_check_interval,
    stale_entries,
)
from shared.ids import ChannelId, ConnectionId, NodeId

ME, A, B = NodeId("me"), NodeId("a"), NodeId("b")


def test_peers_are_checked_at_most_once_per_heartbeat() -> None:
    assert peer_check_interval(5.0) == PEER_CHECK_INTERVAL
    assert peer_check_interval(0.2) == 0.2


def test_the_heartbeat_key_lives_one_peer_check_less_than_the_node_ttl() -> None:
    assert heartbeat_ttl_ms(node_ttl=15.0, heartbeat_interval=5.0) == 14_000


def test_without_room_for_the_slack_the_key_keeps_the_whole_node_ttl() -> None:
    assert heartbeat_ttl_ms(node_ttl=3.0, heartbeat_interval=2.5) == 3_000


def beat(
    *,
    fenced: bool = False,
    rejoined: bool = False,
    first: bool = False,
    after_outage: bool = False,
    dirty: bool = False,
) -> AfterBeat:
    return after_beat(
        fenced=fenced, rejoined=rejoined, first=first, after_outage=after_outage, dirty=dirty
    )


def test_a_fenced_node_only_fences() -> None:
    assert beat(fenced=True, rejoined=True, after_outage=True, dirty=True) == AfterBeat(fence=True)


def test_a_renewed_beat_resends_close_notices_and_judges_as_before() -> None:
    assert beat() == AfterBeat(resend_close_notices=True)


def test_a_renewed_beat_with_writes_of_unknown_outcome_resyncs() -> None:
    assert beat(dirty=True) == AfterBeat(resync=True, resend_close_notices=True)


def test_after_an_outage_nobody_is_judged_for_a_while() -> None:
    assert beat(after_outage=True) == AfterBeat(start_grace=True, resend_close_notices=True)


@pytest.mark.parametrize("dirty", [False, True])
def test_a_rejoined_node_restores_rather_than_resyncs(dirty: bool) -> None:
    assert beat(rejoined=True, dirty=dirty) == AfterBeat(
        start_grace=True, restore=True, came_back_empty=True, resend_close_notices=True
    )


def test_the_first_beat_of_a_new_node_rejoins_quietly() -> None:
    assert not beat(rejoined=True, first=True).came_back_empty


def test_the_grace_window_lasts_one_node_ttl() -> None:
    grace = GraceWindow(node_ttl=10.0)
    assert grace.judging(0.0)
    grace.start(100.0)
    assert not grace.judging(109.9)
    assert grace.judging(110.0)


def test_every_lapsed_node_but_this_one_is_reaped() -> None:
    assert nodes_to_reap([A, ME, B], ME) == [A, B]


def test_a_remote_node_without_a_heartbeat_is_lost() -> None:
    assert lost_nodes({A, B}, {ME, B}) == {A}


def test_a_resync_removes_only_what_is_neither_live_nor_on_its_way() -> None:
    c = [ConnectionId(f"c{n}") for n in range(4)]
    h = [ChannelId(f"h{n}") for n in range(5)]
    stale = stale_entries(
        indexed_connections={c[3], c[0], c[1], c[2]},
        indexed_channels=set(h),
        live_connections={c[0]},
        live_channels={h[0]},
        writing_connections={c[1]},
        writing_channels={h[1]},
        opening_channels={h[2]},
    )
    assert stale == Stale([c[2], c[3]], [h[3], h[4]])

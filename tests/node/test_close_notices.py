"""Close notices sent again after an outage: kept, tried a few times, bounded."""

from __future__ import annotations

from broker_node.core.close_notices import CLOSED_ATTEMPTS, CloseNotices
from broker_node.core.envelopes import Closed, CloseRequest, Confirm
from shared.ids import ChannelId, ConnectionId, NodeId

A, B = NodeId("a"), NodeId("b")


def closed(n: int) -> Closed:
    return Closed(ChannelId(f"ch-{n}"), ConnectionId("c"))


def test_only_close_notices_are_kept_and_a_close_request_becomes_a_notice() -> None:
    notices = CloseNotices()
    assert not notices
    request = CloseRequest(7, B, ChannelId("ch-9"), ConnectionId("r"))
    notices.keep(A, [Confirm([1], []), closed(1), request])
    assert notices
    assert notices.take() == [(A, closed(1)), (A, Closed(ChannelId("ch-9"), ConnectionId("r")))]
    assert not notices
    assert notices.take() == []


def test_a_notice_is_tried_at_most_the_allowed_number_of_times() -> None:
    notices = CloseNotices()
    sent = 0
    notices.keep(A, [closed(1)])
    while notices:
        assert notices.take() == [(A, closed(1))]
        sent += 1
        # Its fate is unknown again after each attempt.
        notices.keep(A, [closed(1)])
    assert sent == CLOSED_ATTEMPTS


def test_attempts_are_counted_per_node() -> None:
    notices = CloseNotices(max_attempts=1)
    notices.keep(A, [closed(1)])
    notices.take()
    notices.keep(A, [closed(1)])
    notices.keep(B, [closed(1)])
    assert notices.take() == [(B, closed(1))]


def test_the_kept_notices_are_bounded() -> None:
    notices = CloseNotices(max_kept=2)
    notices.keep(A, [closed(1), closed(2), closed(3)])
    assert notices.take() == [(A, closed(1)), (A, closed(2))]


def test_the_attempt_counts_are_forgotten_when_they_outgrow_the_bound() -> None:
    notices = CloseNotices(max_kept=2, max_attempts=1)
    notices.keep(A, [closed(1), closed(2)])
    notices.take()
    notices.keep(A, [closed(3)])
    notices.take()
    # Three counts are more than the bound: all were dropped, so the first may go again.
    notices.keep(A, [closed(1)])
    assert notices.take() == [(A, closed(1))]

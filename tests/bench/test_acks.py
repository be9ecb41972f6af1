from __future__ import annotations

import msgspec

from client.bench.acks import ACK_EVERY, AckDue, AckTracker


def test_the_first_unacknowledged_frame_starts_the_delay_and_the_count_acks_at_once() -> None:
    tracker = AckTracker()
    assert tracker.frame(1) is AckDue.LATER
    dues = [tracker.frame(frame_id) for frame_id in range(2, ACK_EVERY + 1)]
    assert dues[:-1] == [AckDue.NOTHING] * (ACK_EVERY - 2)
    assert dues[-1] is AckDue.NOW
    assert tracker.due


def test_an_ack_covers_every_frame_handled_and_the_channels_that_moved() -> None:
    tracker = AckTracker()
    tracker.frame(4)
    tracker.processed("a", 1)
    tracker.frame(5)
    tracker.processed("a", 2)
    tracker.processed("b", 7)
    assert msgspec.json.decode(tracker.ack(9)) == {
        "type": "ack",
        "id": 9,
        "lastId": 5,
        "channels": {"a": 2, "b": 7},
    }
    assert not tracker.due
    # Nothing moved since: the next ack names no channel, and the count starts over.
    assert tracker.frame(6) is AckDue.LATER
    assert msgspec.json.decode(tracker.ack(10)) == {"type": "ack", "id": 10, "lastId": 6}


def test_nothing_is_acknowledged_while_detached_until_resumed() -> None:
    tracker = AckTracker()
    tracker.frame(1)
    tracker.processed("a", 1)
    tracker.detach()
    assert not tracker.due
    assert [tracker.frame(i) for i in range(2, 2 + ACK_EVERY)] == [AckDue.NOTHING] * ACK_EVERY
    # The resume's lastId acknowledges everything handled so far.
    assert tracker.resume_from() == 1 + ACK_EVERY
    assert not tracker.due
    # Replayed frames and ``resumed`` are counted without acks, which go on after ``resumed``.
    assert tracker.frame(40) is AckDue.NOTHING
    assert tracker.frame(41) is AckDue.NOTHING
    tracker.resumed()
    assert tracker.due
    assert msgspec.json.decode(tracker.ack(50)) == {"type": "ack", "id": 50, "lastId": 41}

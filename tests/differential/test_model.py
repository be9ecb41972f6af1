"""The reference model on its own: the outcomes it allows are the ones one node could give."""

from __future__ import annotations

from tests.differential.model import (
    CHANNEL_NOT_FOUND,
    Close,
    Disconnect,
    Message,
    Model,
    Open,
    Register,
    Unordered,
    frame,
    interleavings,
    matches,
    may_become,
    outcomes,
)


def two_clients_and_a_channel() -> Model:
    model = Model.fresh(2)
    model.run([(0, Register("1", "r")), (1, Register("2", "r")), (0, Open("3", "conn-2"))], 2)
    return model


def test_interleavings_keep_each_clients_order() -> None:
    a1, a2, b1 = Close("a1", "x"), Close("a2", "x"), Close("b1", "x")
    merges = list(interleavings({0: [a1, a2], 1: [b1]}))
    assert merges == [
        [(0, a1), (0, a2), (1, b1)],
        [(0, a1), (1, b1), (0, a2)],
        [(1, b1), (0, a1), (0, a2)],
    ]


def test_both_ends_closing_at_once_have_two_outcomes_each_with_one_winner() -> None:
    found = outcomes(
        two_clients_and_a_channel(), {0: [Close("4", "chan-3")], 1: [Close("5", "chan-3")]}, 2
    )
    closed = frame(type="channel_closed", replyTo="4", channelId="chan-3")
    told = frame(type="channel_closed_notification", channelId="chan-3")
    failed = frame(
        type="channel_close_failed", replyTo="5", channelId="chan-3", error=CHANNEL_NOT_FOUND
    )
    assert {0: [closed], 1: [told, failed]} in [o.seen for o in found]
    assert len(found) == 2
    assert all(o.after.channels == {} for o in found)


def test_a_message_racing_a_close_is_delivered_or_refused_never_both() -> None:
    found = outcomes(
        two_clients_and_a_channel(), {0: [Message("4", "chan-3", 1)], 1: [Close("5", "chan-3")]}, 2
    )
    delivered = [
        o
        for o in found
        if frame(type="channel_message", channelId="chan-3", payload=1) in o.seen[1]
    ]
    assert len(found) == 2 and len(delivered) == 1


def test_a_disconnect_notifies_each_peer_in_any_order() -> None:
    model = two_clients_and_a_channel()
    model.run([(0, Open("4", "conn-2"))], 2)
    seen = model.run([(1, Disconnect())], 2)
    notes = [frame(type="channel_closed_notification", channelId=c) for c in ("chan-3", "chan-4")]
    assert seen == {0: [Unordered(tuple(notes))], 1: []}
    assert matches(list(reversed(notes)), seen[0])
    assert may_become(notes[1:], seen[0])
    assert not matches(notes[:1], seen[0])
    assert not may_become([frame(type="x")], seen[0])

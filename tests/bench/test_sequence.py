from __future__ import annotations

from client.bench.sequence import SequenceChecker, SequenceCounts


def feed(*seqs: int) -> SequenceChecker:
    checker = SequenceChecker()
    for seq in seqs:
        checker.observe(seq)
    return checker


def test_in_order_is_clean() -> None:
    assert feed(1, 2, 3, 4).counts(sent=4) == SequenceCounts(received=4, unique=4)


def test_trailing_messages_never_received_are_lost() -> None:
    assert feed(1, 2).counts(sent=5) == SequenceCounts(received=2, unique=2, lost=3)


def test_a_gap_that_never_fills_is_loss() -> None:
    assert feed(1, 2, 5, 6).counts(sent=6) == SequenceCounts(received=4, unique=4, lost=2)


def test_a_gap_filled_late_is_reordering_not_loss() -> None:
    checker = feed(1, 3, 4, 2, 5)
    assert checker.counts(sent=5) == SequenceCounts(received=5, unique=5, reordered=1)
    assert not checker.missing


def test_repeats_are_duplicates() -> None:
    counts = feed(1, 2, 2, 3, 1).counts(sent=3)
    assert counts == SequenceCounts(received=5, unique=3, duplicates=2)


def test_a_late_arrival_seen_twice_is_reordered_once_then_duplicate() -> None:
    counts = feed(1, 3, 2, 2).counts(sent=3)
    assert counts == SequenceCounts(received=4, unique=3, duplicates=1, reordered=1)


def test_numbers_never_sent_are_duplicates_not_deliveries() -> None:
    # 7 was never sent (the sender sent 3): corruption, counted with duplicates.
    counts = feed(1, 2, 3, 7).counts(sent=3)
    assert counts == SequenceCounts(received=4, unique=3, duplicates=1)
    # A number below 1 cannot have been sent either.
    assert feed(0, 1).counts(sent=1) == SequenceCounts(received=2, unique=1, duplicates=1)


def test_numbers_beyond_sent_with_gaps_among_them() -> None:
    counts = feed(1, 5, 8).counts(sent=2)
    assert counts == SequenceCounts(received=3, unique=1, lost=1, duplicates=2)


def test_nothing_received() -> None:
    assert SequenceChecker().counts(sent=3) == SequenceCounts(lost=3)


def test_counts_add_up() -> None:
    a = SequenceCounts(received=1, unique=2, lost=3, duplicates=4, reordered=5)
    assert a + a == SequenceCounts(received=2, unique=4, lost=6, duplicates=8, reordered=10)


def test_in_order_is_the_end_of_the_run_without_a_gap() -> None:
    assert SequenceChecker().in_order == 0
    assert feed(1, 2, 3).in_order == 3
    checker = feed(1, 2, 5, 6)
    assert checker.in_order == 2
    checker.observe(3)
    assert checker.in_order == 3
    checker.observe(4)
    assert checker.in_order == 6

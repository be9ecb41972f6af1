"""Per-channel sequence accounting: loss, duplicates and reordering (pure).

Theory of operation: a sender numbers the messages of its channel 1, 2, 3, ...; the receiver
feeds every number it sees to one :class:`SequenceChecker`. ``next_expected`` is one past the
highest number seen; numbers skipped on the way up are held in ``missing``. A number below
``next_expected`` that is in ``missing`` arrived late (reordered, and no longer missing); one
that is not was seen before (duplicate). When the run ends the sender says how many it sent;
every number up to that count that never arrived is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SequenceChecker", "SequenceCounts"]


@dataclass(frozen=True, slots=True)
class SequenceCounts:
    """What one channel (or a sum of channels) saw."""

    received: int = 0
    unique: int = 0
    lost: int = 0
    duplicates: int = 0
    reordered: int = 0

    def __add__(self, other: SequenceCounts) -> SequenceCounts:
        return SequenceCounts(
            received=self.received + other.received,
            unique=self.unique + other.unique,
            lost=self.lost + other.lost,
            duplicates=self.duplicates + other.duplicates,
            reordered=self.reordered + other.reordered,
        )


class SequenceChecker:
    """Accounts for the sequence numbers (from 1) of one channel in one direction."""

    __slots__ = ("duplicates", "missing", "next_expected", "received", "reordered")

    def __init__(self) -> None:
        self.next_expected = 1
        self.missing: set[int] = set()
        self.received = 0
        self.duplicates = 0
        self.reordered = 0

    def observe(self, seq: int) -> None:
        """Account for one received sequence number."""
        self.received += 1
        if seq == self.next_expected:  # the common case: in order
            self.next_expected = seq + 1
        elif seq > self.next_expected:
            self.missing.update(range(self.next_expected, seq))
            self.next_expected = seq + 1
        elif seq in self.missing:
            self.missing.discard(seq)
            self.reordered += 1
        else:
            self.duplicates += 1

    @property
    def in_order(self) -> int:
        """The highest number up to which every number arrived (what a resumable client
        reports it processed: it drops a message that comes after a gap)."""
        if self.missing:
            return min(self.missing) - 1
        return self.next_expected - 1

    @property
    def unique(self) -> int:
        """How many distinct numbers from 1 up arrived (numbers below 1 count as duplicates)."""
        return self.next_expected - 1 - len(self.missing)

    def counts(self, sent: int) -> SequenceCounts:
        """The final counts once the sender says it sent ``sent`` messages (numbered 1..sent).

        A number above ``sent`` cannot have been sent: it counts as a duplicate (corruption).
        """
        highest = self.next_expected - 1
        beyond = 0
        if highest > sent:
            beyond = highest - sent - sum(1 for seq in self.missing if seq > sent)
        unique = self.unique - beyond
        return SequenceCounts(
            received=self.received,
            unique=unique,
            lost=sent - unique,
            duplicates=self.duplicates + beyond,
            reordered=self.reordered,
        )

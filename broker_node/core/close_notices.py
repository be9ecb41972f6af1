"""Close notices to send again after an outage.

A close notice that may not have gone out (its node did not listen for a whole retry window,
or Redis did not answer) is sent again once Redis answers (it is idempotent there): otherwise
the far end could keep a channel that is gone. A few attempts, then it is dropped (its node
is likely gone too, and then its clients were told).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from broker_node.core.envelopes import Closed, CloseRequest, Envelope
from shared.ids import NodeId

#: Close notices kept to send again after an outage, and how often each is tried.
MAX_CLOSED_RETRY: Final = 10_000
CLOSED_ATTEMPTS: Final = 3


class CloseNotices:
    """The close notices waiting to be sent again, with how often each was tried."""

    def __init__(
        self, *, max_kept: int = MAX_CLOSED_RETRY, max_attempts: int = CLOSED_ATTEMPTS
    ) -> None:
        self._max_kept = max_kept
        self._max_attempts = max_attempts
        self._retry: list[tuple[NodeId, Closed, int]] = []
        self._attempts: dict[tuple[NodeId, Closed], int] = {}

    def __bool__(self) -> bool:
        """True while some notice waits to be sent again."""
        return bool(self._retry)

    def keep(self, node_id: NodeId, envelopes: Iterable[Envelope]) -> None:
        """Keep the close notices among ``envelopes``, which may not have reached ``node_id``."""
        for envelope in envelopes:
            if isinstance(envelope, CloseRequest):
                envelope = Closed(envelope.channel_id, envelope.recipient)
            if isinstance(envelope, Closed) and len(self._retry) < self._max_kept:
                attempts = self._attempts.pop((node_id, envelope), 0) + 1
                if attempts <= self._max_attempts:
                    self._retry.append((node_id, envelope, attempts))

    def take(self) -> list[tuple[NodeId, Closed]]:
        """The notices to send again now; each counts as one more attempt."""
        retry, self._retry = self._retry, []
        for node_id, envelope, attempts in retry:
            self._attempts[(node_id, envelope)] = attempts
        # Attempts of notices that went through are not needed any more; keep the map small.
        if len(self._attempts) > self._max_kept:
            self._attempts.clear()
        return [(node_id, envelope) for node_id, envelope, _ in retry]

"""The divergences from one node known on the current code, in one place.

Remove a mark with the fix. The checkers themselves are not weakened; the marks only say
that a failure is expected while the divergence is open.
"""

from __future__ import annotations

import pytest

#: Found by the differential test on main d1ecbd5: an end of a channel that was just closed
#: (by itself or by the other end) gets "Not authorized for this channel" for `message` or
#: `close` on it instead of "Channel not found". The node no longer holds the channel and asks
#: the registry (`channel_exists`, node.py `_open_elsewhere`), which still holds it while its
#: removal is in flight; "open elsewhere" is then read as "you are not an end" without
#: checking the ends. It depends on timing (the removal racing the lookup), so these marks
#: are not strict: a run may miss it.
CLOSED_CHANNEL_SAID_NOT_AUTHORIZED = pytest.mark.xfail(
    strict=False,
    reason="a just-closed channel's end is told 'Not authorized for this channel' "
    "(registry lookup races the channel's removal)",
)

#: The same, as a regression test that meets it within 30 rounds on every run tried (3 of 3).
CLOSED_CHANNEL_SAID_NOT_AUTHORIZED_REPRODUCED = pytest.mark.xfail(
    strict=True, reason=CLOSED_CHANNEL_SAID_NOT_AUTHORIZED.kwargs["reason"]
)

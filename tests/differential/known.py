"""The divergences from one node known on the current code, in one place.

Remove a mark with the fix (the marks are strict: a test that starts passing fails until its
mark goes). The checkers themselves are not weakened. The three divergences of issue 10
item 1 are fixed on main (tests/integration/test_like_one_node.py) and have no mark here.
"""

from __future__ import annotations

import pytest

#: Found by the differential test: a connection on a third node that is not an end of a
#: channel gets "Channel not found" for `message` and `close` on it (its node does not know
#: the channel); one node answers "Not authorized for this channel".
STRANGER_TOLD_CHANNEL_NOT_FOUND = pytest.mark.xfail(
    strict=True, reason="a non-end on a third node gets 'Channel not found'"
)

#: The differential workload meets the finding above within a few examples (the CI profile
#: is derandomized, so the run, and this mark, are repeatable).
DIFFERENTIAL_WORKLOAD = pytest.mark.xfail(
    strict=True, reason="the workload finds STRANGER_TOLD_CHANNEL_NOT_FOUND"
)

"""Hypothesis profiles of the differential tests.

``ci`` (the default) keeps each differential test file to a minute or two on a two-core
machine; ``long`` is the thorough run before a release. Select ``long`` with
``pytest --hypothesis-profile=long tests/differential`` or ``BROKER_DIFF_PROFILE=long``.
They are registered from the root conftest so that ``--hypothesis-profile`` (read when pytest
configures itself, before this folder is collected) finds them; the tests here apply them
with :func:`chosen`, so the other Hypothesis tests keep their own settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

#: Each example drives real processes: no per-example deadline, and slow data generation is
#: the processes' time, not a slow strategy.
_COMMON = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)

# CI reports a failing example as found (shrinking a race replays it for minutes), and is
# derandomized: the same code meets the same examples, so a known divergence's mark holds.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=20,
    stateful_step_count=25,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    parent=_COMMON,
)
settings.register_profile("long", max_examples=400, stateful_step_count=40, parent=_COMMON)


def chosen() -> settings:
    """The differential tests' settings: the profile named by BROKER_DIFF_PROFILE, else the
    one ``--hypothesis-profile`` loaded if it is ``long``, else ``ci``; BROKER_DIFF_EXAMPLES,
    if set, overrides its number of examples. Other Hypothesis tests keep their own."""
    name = os.environ.get("BROKER_DIFF_PROFILE")
    if name is None:
        name = "long" if settings.get_current_profile_name() == "long" else "ci"
    profile = settings.get_profile(name)
    examples = os.environ.get("BROKER_DIFF_EXAMPLES")
    if examples:
        return settings(profile, max_examples=int(examples))
    return profile

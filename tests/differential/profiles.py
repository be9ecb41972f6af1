"""Hypothesis profiles of the differential tests.

``ci`` (the default) keeps each differential test file to a minute or two on a two-core
machine; ``long`` is the thorough run before a release. Select ``long`` with
``pytest --hypothesis-profile=long tests/differential`` or ``BROKER_DIFF_PROFILE=long``.
They are registered from the root conftest so that ``--hypothesis-profile`` (read when pytest
configures itself, before this folder is collected) finds them.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Each example drives real processes: no per-example deadline, and slow data generation is
#: the processes' time, not a slow strategy.
_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}

settings.register_profile("ci", max_examples=20, stateful_step_count=25, **_COMMON)
settings.register_profile("long", max_examples=400, stateful_step_count=40, **_COMMON)


def load() -> None:
    settings.load_profile(os.environ.get("BROKER_DIFF_PROFILE", "ci"))

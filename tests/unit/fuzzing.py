"""Shared settings of the hypothesis fuzz tests (config, site folders, checkpoints).

In CI they are derandomized (the same examples every run) and bounded (the fuzz tests take a
few seconds in all). ``FEDMETA_FUZZ_EXAMPLES=N`` explores instead: N fresh random examples per
test, to hunt for new crashes locally (a crash found so gets a fix and a pinned test).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

__all__ = ["fuzz_settings"]


def fuzz_settings(max_examples: int) -> settings:
    """Hypothesis settings of one fuzz test: ``max_examples`` derandomized examples, no deadline.

    Args:
        max_examples: examples per run in CI (replaced by ``FEDMETA_FUZZ_EXAMPLES`` when set).

    Returns:
        The settings object to decorate the test with.
    """
    explore = os.environ.get("FEDMETA_FUZZ_EXAMPLES")
    return settings(
        max_examples=int(explore) if explore else max_examples,
        derandomize=not explore,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

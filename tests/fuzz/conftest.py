"""Fuzz targets for every parser of outside input (docs/reliability.md, Fuzzing).

Hypothesis settings profiles, chosen with HYPOTHESIS_PROFILE:

* ``ci`` (default; ``make test``, ``make unit``, plain pytest): a few dozen
  examples per target, derandomized (the same inputs every run, so CI never
  fails by chance), no example database; the whole directory well under 60 s.
* ``long`` (``make fuzz``): FUZZ_EXAMPLES examples per target (default
  20000), random, with the example database in .hypothesis/ so a failure
  found once is replayed first next time.

Every test here carries the marker ``fuzz``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, **_common)
settings.register_profile("long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")), **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(fraction: float) -> int:
    """A share of the profile's budget, for targets that touch the file system per example."""
    return max(10, int(settings.default.max_examples * fraction))


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.fuzz)

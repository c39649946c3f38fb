"""What the property-based op tests share: the example budget and a count of the cases each op ran.

The budget is small by default (CI); ``EYECOOL_FUZZ_EXAMPLES=2000`` runs a long campaign on demand. Every
generated case calls ``ran(op)``; the op tests' conftest prints the counts at the end of the session (and
``EYECOOL_FUZZ_COUNTS=file.json`` writes them), so a report can say how many cases each op ran.
"""
from __future__ import annotations

import collections
import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("EYECOOL_FUZZ_EXAMPLES", "40"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CASES: "collections.Counter[str]" = collections.Counter()


def ran(op: str) -> None:
    CASES[op] += 1

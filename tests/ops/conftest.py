import json
import os
import sys

# Lets the op tests import the shared op_tester helpers.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter):
    """The number of generated cases each op ran in the property-based tests (fuzz_tools.CASES)."""
    from fuzz_tools import CASES

    if not CASES:
        return
    terminalreporter.section("generated op cases (hypothesis)")
    for op, count in sorted(CASES.items()):
        terminalreporter.write_line(f"{op:32s} {count}")
    path = os.environ.get("EYECOOL_FUZZ_COUNTS")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(CASES), f, indent=1, sort_keys=True)

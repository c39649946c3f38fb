import json
import os
import sys

import pytest

# Lets the op tests import the shared op_tester helpers.
sys.path.insert(0, os.path.dirname(__file__))

import cuda_emulation  # noqa: E402  (after the path insert)

# Every test of an op with a CUDA kernel runs twice: on the CPU kernels, and on the CUDA kernels emulated on the
# CPU (tests/ops/cuda_emulation.py) when the build has them.
KERNELS = ["cpu_kernels"] + (["cuda_emulated"] if cuda_emulation.available() else [])


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_kernels_only(reason): a behaviour of the CPU kernels alone (documented per device); not run "
        "on the emulated CUDA kernels")


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "kernels" in metafunc.fixturenames and module in cuda_emulation.EMULATED_TEST_MODULES:
        metafunc.parametrize("kernels", KERNELS, indirect=True, scope="module")


@pytest.fixture(autouse=True, scope="module")
def kernels(request):
    """Which kernels ``torch.ops.eyecool.*`` runs on CPU tensors for this module's tests: "cpu_kernels" (the
    default) or "cuda_emulated"."""
    which = getattr(request, "param", "cpu_kernels")
    if which == "cuda_emulated":
        with cuda_emulation.emulated_cuda_kernels():
            yield which
    else:
        yield which


@pytest.fixture(autouse=True)
def _skip_cpu_only_on_emulation(request, kernels):
    marker = request.node.get_closest_marker("cpu_kernels_only")
    if marker is not None and kernels == "cuda_emulated":
        pytest.skip("CPU kernels only: " + (marker.args[0] if marker.args else ""))


def pytest_terminal_summary(terminalreporter):
    """How many tests ran on the emulated CUDA kernels, and the number of generated cases each op ran in the
    property-based tests (fuzz_tools.CASES)."""
    from fuzz_tools import CASES

    outcomes = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        outcomes[outcome] = sum(1 for r in terminalreporter.stats.get(outcome, [])
                                if cuda_emulation.runs_emulated_kernels(getattr(r, "nodeid", "")))
    if any(outcomes.values()):
        terminalreporter.section("emulated CUDA kernels")
        terminalreporter.write_line(
            f"tests on the emulated CUDA kernels: {outcomes['passed']} passed, {outcomes['failed']} failed, "
            f"{outcomes['skipped']} skipped, {outcomes['error']} errors")
    elif not cuda_emulation.available():
        terminalreporter.section("emulated CUDA kernels")
        terminalreporter.write_line("not built (EYECOOL_CUDA_EMULATION=1 builds them; make install does)")
    if not CASES:
        return
    terminalreporter.section("generated op cases (hypothesis)")
    for op, count in sorted(CASES.items()):
        terminalreporter.write_line(f"{op:32s} {count}")
    path = os.environ.get("EYECOOL_FUZZ_COUNTS")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(CASES), f, indent=1, sort_keys=True)

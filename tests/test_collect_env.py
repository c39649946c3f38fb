import os
import subprocess
import sys

import pytest

import eyecool_ext


def test_collect_env_reports_the_build():
    out = subprocess.run([sys.executable, "-m", "eyecool_ext.collect_env"], capture_output=True, text=True,
                         check=True).stdout
    for key in ("torch", "CUDA_HOME (toolkit found)", "C++ compiler", "eyecool_ext._C loaded", "GPU", "CPU"):
        assert key in out
    if eyecool_ext.compiled():
        assert "eyecool_ext built with CUDA" in out
        assert "eyecool_ext CPU kernels' ISA" in out


def isa_line(cap):
    env = dict(os.environ, EYECOOL_CPU_ISA=cap)
    out = subprocess.run([sys.executable, "-m", "eyecool_ext.collect_env"], capture_output=True, text=True,
                         check=True, env=env).stdout
    return next(line for line in out.splitlines() if line.startswith("eyecool_ext CPU kernels' ISA"))


@pytest.mark.skipif(not eyecool_ext.compiled(), reason="compiled extension not loaded")
def test_collect_env_reports_the_cpu_isa_under_the_cap_and_a_bad_cap():
    """The row names the variant the kernels run, the CPU's best and the cap; a bad cap is reported, not raised."""
    line = isa_line("baseline")
    expected = f"baseline (CPU: {eyecool_ext.cpu_isa_supported()}, EYECOOL_CPU_ISA=baseline)"
    assert line.split(None, 4)[-1].strip() == expected, line
    bad = isa_line("sse9")
    assert "error: EYECOOL_CPU_ISA must be one of baseline, avx2, avx512" in bad and "'sse9'" in bad

import subprocess
import sys

import eyecool_ext


def test_collect_env_reports_the_build():
    out = subprocess.run([sys.executable, "-m", "eyecool_ext.collect_env"], capture_output=True, text=True,
                         check=True).stdout
    for key in ("torch", "CUDA_HOME (toolkit found)", "C++ compiler", "eyecool_ext._C loaded", "GPU"):
        assert key in out
    if eyecool_ext.compiled():
        assert "eyecool_ext built with CUDA" in out

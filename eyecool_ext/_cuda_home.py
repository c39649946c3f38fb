"""Where the CUDA toolkit is: the rule shared by setup.py and collect_env (standard library only, so that
setup.py can load it before anything is built)."""
from __future__ import annotations

import glob
import os
import shutil
from typing import Optional


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root, or None.

    On these machines the ``nvcc`` on PATH is a wrapper script outside the toolkit, so torch's own guess
    (the parent of ``which nvcc``) names a folder whose lib64 has no libcudart and the link fails with
    ``cannot find -lcudart``. Prefer CUDA_HOME / CUDA_PATH, then /usr/local/cuda, and accept a candidate
    only when it holds both bin/nvcc and lib64/libcudart.so.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A wrapper script that execs the real nvcc: look for the path it names.
        try:
            with open(nvcc, "r", errors="ignore") as f:
                for token in f.read().split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    for root in candidates:
        if not root:
            continue
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "lib64", "libcudart.so")
        ):
            return os.path.realpath(root)
    return None

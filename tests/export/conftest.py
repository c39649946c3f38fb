import os
import sys

# Lets the export tests import their shared helpers (export_models).
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one intra-op thread is fastest, and on a shared 2-core machine a second OpenMP worker that
    spins while descheduled slows the network tests down many times over (as tests/modeling/conftest.py says)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Running the op tests on the CUDA kernels without a GPU.

A build with ``EYECOOL_CUDA_EMULATION=1`` (``make install``) also compiles every ``csrc/cuda/*.cu`` file as host
code and registers its kernels as ``torch.ops.eyecool_emu.<op>`` on CPU tensors (csrc/emulation/): each launch
runs every (block, thread) of its grid in turn, the same source the GPU build compiles. ``emulated_cuda_kernels()``
points the CPU kernels of ``torch.ops.eyecool.<op>`` at those for a while, so every public wrapper, autograd
formula, ``opcheck`` and ``torch.compile`` path of the op tests runs the CUDA code instead of the CPU code.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch

import eyecool_ext

# The ops with a CUDA kernel (csrc/cuda/*.cu), i.e. with an emulated one.
EMULATED_OPS = (
    "roi_align", "_roi_align_backward", "multilevel_roi_align", "_multilevel_roi_align_backward",
    "deform_conv2d", "_deform_conv2d_backward", "fg_fusion", "_fg_fusion_backward",
    "upsnet_panoptic_merge", "pq_pair_counts",
)

# The test modules of those ops: tests/ops/conftest.py runs each of them twice, on the CPU kernels and on the
# emulated CUDA kernels.
EMULATED_TEST_MODULES = {
    "test_roi_align", "test_roi_align_fuzz", "test_deform_conv2d", "test_deform_conv2d_fuzz", "test_fg_fusion",
    "test_fg_fusion_fuzz", "test_panoptic_merge", "test_panoptic_merge_fuzz", "test_pq_pair_counts",
    "test_pq_pair_counts_fuzz", "test_hostile_inputs_fuzz",
}


# The test modules that call the emulated kernels (torch.ops.eyecool_emu) directly, on every run.
EMULATION_TEST_MODULES = {"test_cuda_emulation", "test_deform_conv2d_cuda_paths"}


def runs_emulated_kernels(nodeid: str) -> bool:
    """Whether the test of pytest node ``nodeid`` runs the emulated CUDA kernels."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return "cuda_emulated" in nodeid or module in EMULATION_TEST_MODULES


def available() -> bool:
    """Whether the loaded extension holds the emulated CUDA kernels (``torch.ops.eyecool_emu``)."""
    return eyecool_ext.compiled_with_cuda_emulation()


def _forward_to(kernel):
    def run(*args, **kwargs):
        return kernel(*args, **kwargs)

    return run


@contextlib.contextmanager
def emulated_cuda_kernels() -> Iterator[None]:
    """Within the block, ``torch.ops.eyecool.<op>`` on CPU tensors runs the emulated CUDA kernel of every op in
    ``EMULATED_OPS``; the CPU kernels are back afterwards (the dispatcher restores them when the override goes)."""
    library = torch.library.Library("eyecool", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            for name in EMULATED_OPS:
                library.impl(name, _forward_to(getattr(torch.ops.eyecool_emu, name).default), "CPU")
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def launch_limits(max_blocks: int = 0, max_column_elements: int = 0,
                  force_64bit_index: bool = False) -> Iterator[None]:
    """Emulated launches capped at ``max_blocks`` blocks of 256 threads, and deform_conv2d's column buffer at
    ``max_column_elements`` (0: the real limits), so that small tensors take the grid-stride rounds and the batch
    chunks that real sizes take on a GPU; ``force_64bit_index`` runs the 64-bit index path of the kernels that
    have a 32-bit one (deform_conv2d's sampling), which only tensors of 2^31 elements or more take otherwise."""
    previous = torch.ops.eyecool_emu._set_launch_limits(max_blocks, max_column_elements, force_64bit_index)
    try:
        yield
    finally:
        torch.ops.eyecool_emu._set_launch_limits(previous[0], previous[1], bool(previous[2]))


def assert_kernels_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """An emulated CUDA result against the CPU kernel's in ``dtype``: the same arithmetic, rounded at different
    steps (the CUDA kernels round half and bfloat16 columns, the CPU runs them in float)."""
    atol, rtol = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 1e-2),
                  torch.bfloat16: (1e-1, 4e-2)}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def launch_count() -> int:
    """Emulated kernel launches so far."""
    return torch.ops.eyecool_emu._launch_count()

"""What every op test shares: the devices to run on, the memory layouts to feed, tolerances per dtype, and the
standard checks (gradcheck over seeds, torch.library.opcheck, torch.compile). Modelled on torchvision's
RoIOpTester: an op's test file subclasses nothing fancier than pytest parametrisation over these."""
from __future__ import annotations

import pytest
import torch

import eyecool_ext


def devices():
    """cpu always; cuda when a GPU is present (the kernels run there even in a CPU-only build, via fallback)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


DEVICES = devices()
LAYOUTS = ["contiguous", "channels_last", "strided_slice"]
needs_compiled = pytest.mark.skipif(not eyecool_ext.compiled(), reason="compiled extension not loaded")


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` ([N, C, H, W]) in one of three memory layouts."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided_slice":
        # Every second channel of a tensor twice as wide: non-contiguous, not channels-last either.
        wide = torch.zeros(x.shape[0], x.shape[1] * 2, *x.shape[2:], dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        # (Non-contiguous unless a size-1 dimension makes the strides irrelevant.)
        return wide[:, ::2]
    raise ValueError(layout)


def tolerances(dtype: torch.dtype):
    """(atol, rtol) for comparing a kernel to its reference in ``dtype``."""
    return {
        torch.float64: (1e-10, 1e-8),
        torch.float32: (1e-5, 1e-4),
        torch.float16: (5e-3, 5e-3),
        torch.bfloat16: (3e-2, 3e-2),
    }[dtype]


def assert_close(actual, expected, dtype=None, **kw):
    atol, rtol = tolerances(dtype or expected.dtype)
    kw.setdefault("atol", atol)
    kw.setdefault("rtol", rtol)
    torch.testing.assert_close(actual, expected, **kw)

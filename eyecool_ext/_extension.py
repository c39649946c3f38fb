"""Loading the compiled kernels (``eyecool_ext._C``), and the fallback when they cannot be loaded.

Importing ``eyecool_ext`` never fails because of the extension: when ``_C`` is missing or broken, every op runs
its pure-PyTorch reference implementation (``eyecool_ext.reference``) and a warning says once why and how to
rebuild.
"""
from __future__ import annotations

import warnings

import torch

_REBUILD_HINT = (
    "Rebuild it with `make install` (or `pip install --no-build-isolation -e .` in the environment that has "
    "torch); `python -m eyecool_ext.collect_env` shows what was built."
)

try:
    from eyecool_ext import _C  # noqa: F401  (importing it registers torch.ops.eyecool.*)

    _load_error: Exception | None = None
except (ImportError, OSError) as exc:  # OSError: a .so built against another torch
    _C = None
    _load_error = exc

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


if _C is None:
    _warn_once(
        "load",
        f"eyecool_ext: the compiled extension could not be loaded ({_load_error}); ops fall back to the slow "
        f"pure-PyTorch reference implementations. {_REBUILD_HINT}",
    )


def compiled() -> bool:
    """Whether the compiled extension is loaded (torch.ops.eyecool.* exist)."""
    return _C is not None


def compiled_with_cuda() -> bool:
    """Whether the compiled extension holds CUDA kernels."""
    return _C is not None and bool(_C.with_cuda())


def compiled_with_cuda_emulation() -> bool:
    """Whether the extension also holds the CUDA kernels compiled as host code (``torch.ops.eyecool_emu.*``, built
    with ``EYECOOL_CUDA_EMULATION=1``), which the tests run on the CPU."""
    if _C is None:
        return False
    try:
        torch.ops.eyecool_emu._launch_count
    except (AttributeError, RuntimeError):
        return False
    return True


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels' vectorised loops run: ``"baseline"`` (x86-64 SSE2, or any non-x86
    CPU), ``"avx2"`` (AVX2 + FMA) or ``"avx512"`` (F/VL/DQ/BW): the widest this CPU supports, capped by the
    environment variable ``EYECOOL_CPU_ISA=baseline|avx2|avx512`` (read once per process, at the first kernel
    call; a cap above the CPU's support gives the CPU's best). None when the compiled extension is not loaded.

    Raises ValueError when ``EYECOOL_CPU_ISA`` is set to anything else (the kernels then raise RuntimeError).
    """
    if _C is None:
        return None
    return _C.cpu_isa()


def cpu_isa_supported() -> str | None:
    """The widest instruction set this CPU can run the kernels' loops with, ignoring ``EYECOOL_CPU_ISA``
    (``"baseline"``, ``"avx2"`` or ``"avx512"``); None when the compiled extension is not loaded."""
    if _C is None:
        return None
    return _C.cpu_isa_supported()


def load_error() -> Exception | None:
    """Why the compiled extension could not be loaded, or None."""
    return _load_error


def has_op(name: str) -> bool:
    """Whether the loaded extension registers ``torch.ops.eyecool.<name>`` (an older build may not)."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.eyecool, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def use_compiled(op_name: str, *tensors: torch.Tensor) -> bool:
    """True when the compiled kernel of ``op_name`` can run on the devices of ``tensors``; else the reference runs.

    A CPU-only build given CUDA tensors, or a build older than the op, warns once and falls back instead of
    failing in the dispatcher.
    """
    if _C is None:
        return False
    if not has_op(op_name):
        _warn_once(f"op:{op_name}", f"eyecool_ext: this build has no kernel for {op_name}; using the reference "
                   f"implementation. {_REBUILD_HINT}")
        return False
    for t in tensors:
        if t.device.type == "cuda" and not compiled_with_cuda():
            _warn_once(
                "cuda",
                "eyecool_ext was built without CUDA kernels; CUDA tensors use the reference implementations. "
                "Rebuild on a machine with the CUDA toolkit (or with FORCE_CUDA=1). " + _REBUILD_HINT,
            )
            return False
        if t.device.type not in ("cpu", "cuda", "meta"):
            return False
    return True

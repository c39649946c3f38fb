"""Autocast kernels (AutocastCPU and AutocastCUDA) for every eyecool op, as torchvision registers for its ops.

Without them, ``torch.autocast`` hands the ops whatever dtypes the surrounding autocast ops produced: in
``DeformConv2d`` the offset convolution's bfloat16 output meets the float32 input, and the op refuses the mix.
Each kernel casts the floating inputs per the op's policy (``eyecool_ext._autocast.POLICIES``: float32 for the
ops that compute coordinates, the widest input dtype for ``fg_fusion``), re-dispatches with autocast excluded
(the autograd kernel below it records the casts, so gradients flow back in each input's dtype) and casts the
output back where the policy says so. The integer-only ops (``pq_pair_counts``, the PNG decoders) need no
kernel: the dispatcher's fallthrough for the Autocast keys runs them as they are.

Importing this module (``eyecool_ext.ops`` does) registers the kernels once; :data:`REGISTERED` lists them.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from eyecool_ext import _extension
from eyecool_ext._autocast import INTEGER_OPS, POLICIES, AutocastPolicy, cast_args, cast_outputs

# The Autocast dispatch key of each device type whose autocast eyecool's kernels serve.
_DEVICE_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}

REGISTERED: List[Tuple[str, str]] = []  # (op, dispatch key) pairs registered by this module
_lib = None


def _make_kernel(op: torch._ops.OpOverload, policy: AutocastPolicy, key: str):
    dispatch_key = getattr(torch._C.DispatchKey, key)

    def run(*args):
        cast, back = cast_args(policy, args)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            return cast_outputs(op(*cast), back)

    return run


def _register() -> None:
    global _lib
    if _lib is not None or not _extension.compiled():
        return
    _lib = torch.library.Library("eyecool", "IMPL")
    for name, policy in POLICIES.items():
        if not _extension.has_op(name):
            continue
        op = getattr(torch.ops.eyecool, name).default
        for device_type, key in _DEVICE_KEYS.items():
            if not torch.amp.is_autocast_available(device_type):
                continue
            run = _make_kernel(op, policy, key)
            # The C++ dispatcher entry serves eager calls; the Python-kernel entry serves tracers
            # (make_fx / torch.export under autocast), which look up py_kernels before the dispatcher.
            _lib.impl(name, lambda _keyset, *args, _run=run: _run(*args), key, with_keyset=True)
            dispatch_key = getattr(torch._C.DispatchKey, key)
            if op.has_kernel_for_dispatch_key(dispatch_key) and dispatch_key in op.py_kernels:
                op.py_kernels.pop(dispatch_key)
            op.py_impl(dispatch_key)(run)
            REGISTERED.append((name, key))


_register()

__all__ = ["POLICIES", "INTEGER_OPS", "REGISTERED"]

"""The autocast policy of every eyecool op, in one table, and the casts that apply it.

Kept apart from ``eyecool_ext.ops.autocast`` (which registers the AutocastCPU / AutocastCUDA kernels) because the
reference implementations use it too, and ``eyecool_ext.reference`` must not import ``eyecool_ext.ops``.

Two policies, as torchvision's autocast kernels have:

- ``float32``: every half / bfloat16 / float32 input is cast to float32, the op runs with autocast off, and its
  floating output is cast back to the dtype of the op's main input (torchvision's rule for ``roi_align`` and
  ``deform_conv2d``). For ops whose arithmetic depends on coordinates: a box edge or a sampling position in
  bfloat16 (8 significant bits) is off by a whole pixel beyond x = 256, and an argmax over bfloat16 logits ties.
- ``widest``: every half / bfloat16 / float32 input is cast to the widest of their dtypes (so mixed bf16 / fp32
  inputs meet in fp32, all-bf16 inputs stay bf16). For ops whose kernel accumulates in float32 anyway and whose
  inputs carry no coordinates (``fg_fusion``: online softmax in float).

float64 inputs are never cast (ATen's autocast leaves them alone too). Integer inputs are never cast.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AutocastPolicy:
    """How one op runs under ``torch.autocast``.

    Attributes:
        compute: ``"float32"`` or ``"widest"`` (see the module doc).
        output_like: index of the argument whose dtype the floating outputs are cast back to (for a list
            argument: its first tensor), or None to return what the op computed.
        skip: argument indices that are never cast (e.g. op-math statistics saved by a forward pass).
        reason: why this policy (shown in the docs and the README).
    """

    compute: str
    output_like: Optional[int]
    skip: FrozenSet[int] = frozenset()
    reason: str = ""


_COORDS = "box / sampling coordinates lose whole pixels in bfloat16 (torchvision's rule)"
POLICIES: Dict[str, AutocastPolicy] = {
    "deform_conv2d": AutocastPolicy("float32", 0, reason="sampling positions " + _COORDS),
    "_deform_conv2d_backward": AutocastPolicy("float32", None, reason="as its forward"),
    "roi_align": AutocastPolicy("float32", 0, reason=_COORDS),
    "_roi_align_backward": AutocastPolicy("float32", None, reason="as its forward"),
    "multilevel_roi_align": AutocastPolicy("float32", 0, reason=_COORDS + "; the level is chosen from box areas"),
    "_multilevel_roi_align_backward": AutocastPolicy("float32", None, reason="as its forward"),
    "fg_fusion": AutocastPolicy("widest", None, reason="the kernel's softmax accumulates in float32 already"),
    # softmax_stats (argument 3) are op-math (float32) statistics that must stay as the forward wrote them.
    "_fg_fusion_backward": AutocastPolicy("widest", None, skip=frozenset({3}), reason="as its forward"),
    "upsnet_panoptic_merge": AutocastPolicy("float32", None,
                                            reason="per-pixel argmax over logit sums and pasted boxes: bfloat16 "
                                                   "ties and shifts change labels; the output is int64"),
}
# Ops whose inputs are all integer (ids, PNG bytes): autocast has nothing to cast, and the dispatcher's
# fallthrough for the Autocast keys runs them unchanged. Listed so that "every op" is checked by the tests.
INTEGER_OPS: Tuple[str, ...] = ("pq_pair_counts", "read_panoptic_png", "panoptic_png_file_pq_statistics")


def _tensors(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, Tensor):
                yield v


def compute_dtype(policy: AutocastPolicy, args: Sequence[Any]) -> Optional[torch.dtype]:
    """The dtype the eligible (half, bfloat16, float32) inputs of ``args`` are cast to, or None if none are."""
    dtypes = [t.dtype for i, a in enumerate(args) if i not in policy.skip for t in _tensors(a)
              if t.dtype in _ELIGIBLE]
    if not dtypes:
        return None
    if policy.compute == "float32":
        return torch.float32
    widest = dtypes[0]
    for d in dtypes[1:]:
        widest = torch.promote_types(widest, d)
    return widest


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor):
        return value.to(dtype) if value.dtype in _ELIGIBLE and value.dtype != dtype else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def cast_args(policy: AutocastPolicy, args: Sequence[Any]) -> Tuple[Tuple[Any, ...], Optional[torch.dtype]]:
    """``args`` with every eligible floating tensor (also inside lists) cast per ``policy``; and the dtype the
    outputs go back to (None: leave them)."""
    dtype = compute_dtype(policy, args)
    if dtype is None:
        return tuple(args), None
    cast = tuple(a if i in policy.skip else _cast(a, dtype) for i, a in enumerate(args))
    back = None
    if policy.output_like is not None:
        like = next(iter(_tensors(args[policy.output_like])), None)
        if like is not None and like.is_floating_point() and like.dtype != dtype:
            back = like.dtype
    return cast, back


def cast_outputs(out: Any, dtype: Optional[torch.dtype]) -> Any:
    """Floating tensors of ``out`` (a tensor, or a tuple / list of tensors and lists of tensors) cast to ``dtype``."""
    if dtype is None:
        return out
    if isinstance(out, Tensor):
        return out.to(dtype) if out.is_floating_point() else out
    if isinstance(out, (list, tuple)):
        return type(out)(cast_outputs(o, dtype) for o in out)
    return out


def autocast_on(*tensors: Tensor) -> bool:
    """Whether autocast is enabled for the device type of the first tensor (None of them: False)."""
    for t in tensors:
        if isinstance(t, Tensor):
            device_type = t.device.type
            return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    return False


def reference_policy(op_name: str, arg_names: Sequence[str]) -> Callable[[Callable], Callable]:
    """Decorator for a reference implementation: under autocast, apply ``op_name``'s policy to the arguments
    named ``arg_names`` (positional order of the op's tensor arguments) and run the body with autocast off, so
    that the fallback computes what the compiled op's autocast kernel computes."""
    import inspect

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            tensors = [bound.arguments.get(name) for name in arg_names]
            if not autocast_on(*(t for a in tensors for t in _tensors(a))):
                return fn(*args, **kwargs)
            policy = POLICIES[op_name]
            cast, back = cast_args(policy, tensors)
            for name, value in zip(arg_names, cast):
                if name in bound.arguments:
                    bound.arguments[name] = value
            device_type = next(t.device.type for a in tensors for t in _tensors(a))
            with torch.autocast(device_type, enabled=False):
                return cast_outputs(fn(*bound.args, **bound.kwargs), back)

        return wrapper

    return wrap

"""The op backend of the network (``model.ops``): eyecool's kernels, or torchvision's ops for comparison.

``eyecool``: ``eyecool_ext.ops.deform_conv2d``, ``multilevel_roi_align`` (one launch for all FPN levels, level
assignment inside the kernel), ``roi_align``, ``fg_fusion`` and ``upsnet_panoptic_merge`` (each falls back to its
reference where no kernel exists). ``torchvision``: ``torchvision.ops.deform_conv2d``, the per-level
``torchvision.ops.roi_align`` loop of torchvision's ``MultiScaleRoIAlign`` (with detectron2's level rule), and,
where torchvision has no op, eyecool's plain-PyTorch references (``eyecool_ext.reference``): the unfused RFF and
the UPSNet merge that materialises the logit stack and takes its argmax. No eyecool kernel runs under it. Both
backends compute the same function, so a checkpoint runs under either; the end-to-end benchmark compares them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torchvision
from torch import Tensor

import eyecool_ext
from eyecool_ext._utils import fpn_level_index, pyramid_levels


def _torchvision_multilevel_roi_align(features: List[Tensor], rois: Tensor, output_size: int,
                                      scales: Sequence[float], sampling_ratio: int = 0, aligned: bool = True,
                                      canonical_box_size: float = 224.0, canonical_level: int = 4) -> Tensor:
    """torchvision's MultiScaleRoIAlign algorithm: assign levels, one ``roi_align`` per level, scatter back."""
    min_level, max_level = pyramid_levels(scales)
    level = fpn_level_index(rois, min_level, max_level, canonical_box_size, canonical_level)
    out = features[0].new_zeros((rois.size(0), features[0].size(1), output_size, output_size))
    for index, (feature, scale) in enumerate(zip(features, scales)):
        selected = torch.nonzero(level == index).squeeze(1)
        pooled = torchvision.ops.roi_align(feature, rois[selected], output_size, scale, sampling_ratio, aligned)
        out.index_copy_(0, selected, pooled.to(out.dtype))
    return out


@dataclass(frozen=True)
class OpBackend:
    """The five op entry points the network calls, with the signatures of ``eyecool_ext.ops``."""

    name: str
    deform_conv2d: Callable[..., Tensor]
    multilevel_roi_align: Callable[..., Tensor]
    roi_align: Callable[..., Tensor]
    fg_fusion: Callable[..., List[Tensor]]
    upsnet_panoptic_merge: Callable[..., Tensor]


def op_backend(name: str = "eyecool") -> OpBackend:
    """``"eyecool"`` or ``"torchvision"`` -> :class:`OpBackend`."""
    if name == "eyecool":
        return OpBackend("eyecool", eyecool_ext.ops.deform_conv2d, eyecool_ext.ops.multilevel_roi_align,
                         eyecool_ext.ops.roi_align, eyecool_ext.ops.fg_fusion, eyecool_ext.ops.upsnet_panoptic_merge)
    if name == "torchvision":
        return OpBackend("torchvision", torchvision.ops.deform_conv2d, _torchvision_multilevel_roi_align,
                         torchvision.ops.roi_align, eyecool_ext.reference.fg_fusion,
                         eyecool_ext.reference.upsnet_panoptic_merge)
    raise ValueError(f"ops must be 'eyecool' or 'torchvision', got {name!r}")


def pool_rois(backend: OpBackend, features: List[Tensor], rois: Tensor, output_size: int,
              scales: Sequence[float]) -> Tensor:
    """FPN ROIAlign (aligned, adaptive sampling) of ``rois [R, 5]`` from ``features`` -> ``[R, C, s, s]``.

    Pools in float32 (as torchvision's autocast rule for roi_align does): box coordinates in half precision
    would be off by several pixels on large images. The result has the features' dtype.
    """
    dtype = features[0].dtype
    with torch.autocast(features[0].device.type, enabled=False):
        pooled = backend.multilevel_roi_align([f.float() for f in features], rois.float(), output_size, list(scales),
                                              0, True)
    return pooled.to(dtype)


def deformable_conv(backend: OpBackend, x: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor],
                    padding: int, dilation: int) -> Tensor:
    """``deform_conv2d`` (DCN v1) run in float32 under autocast, returning the input's dtype."""
    dtype = x.dtype
    with torch.autocast(x.device.type, enabled=False):
        out = backend.deform_conv2d(x.float(), offset.float(), weight.float(),
                                    None if bias is None else bias.float(), stride=(1, 1),
                                    padding=(padding, padding), dilation=(dilation, dilation))
    return out.to(dtype)

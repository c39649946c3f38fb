"""ROIAlign (torchvision's op, drop-in) and the multilevel FPN pooler, on eyecool's kernels.

The ops are registered in C++ (``torch.ops.eyecool.roi_align`` ...); this module adds the typed wrappers, the
fake kernels that let ``torch.compile`` trace them, and their autograd formulas, whose backward calls the
registered backward op.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from eyecool_ext import _extension, reference
from eyecool_ext._utils import BoxesLike, boxes_to_rois, pair
from eyecool_ext.reference.roi_align import pyramid_levels


def _check_same_device(input: Tensor, rois: Tensor, name: str) -> None:
    if rois.device != input.device:
        raise ValueError(f"boxes must be on the same device as {name} ({input.device}), got {rois.device}")


def roi_align(input: Tensor, boxes: BoxesLike, output_size: Union[int, Tuple[int, int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Region of Interest Align (Mask R-CNN), with torchvision's exact semantics.

    Args:
        input: ``Tensor[N, C, H, W]`` feature map (float, double; half and bfloat16 accumulate in float).
        boxes: ``Tensor[K, 5]`` rows (batch index, x1, y1, x2, y2), or a list of ``Tensor[L_i, 4]`` (x1, y1, x2,
            y2), one per image. Same dtype and device as ``input``. Coordinates are in input-image pixels.
        output_size: ``(ph, pw)`` or an int for square bins.
        spatial_scale: map size / image size (e.g. 1/4 for a stride-4 map).
        sampling_ratio: sampling points per bin along each axis; ``<= 0`` chooses ``ceil(roi_size / output_size)``
            adaptively per ROI.
        aligned: shift boxes by -0.5 pixel (pixel centres), the correct convention; ``False`` is Detectron's
            legacy one, which also forces ROIs to at least 1x1.

    Returns:
        ``Tensor[K, C, ph, pw]``.

    An inverted box (x2 < x1 or y2 < y1) never crashes: in aligned mode with adaptive sampling it has no
    sampling points and pools to 0 (torchvision's CUDA result); otherwise it is sampled as torchvision does.
    """
    pooled_h, pooled_w = pair(output_size, "output_size")
    rois = boxes_to_rois(boxes, input)
    _check_same_device(input, rois, "input")
    if not _extension.use_compiled("roi_align", input, rois):
        return reference.roi_align(input, rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned)
    return torch.ops.eyecool.roi_align(input, rois, float(spatial_scale), pooled_h, pooled_w, int(sampling_ratio),
                                       bool(aligned))


def multilevel_roi_align(features: List[Tensor], boxes: BoxesLike, output_size: Union[int, Tuple[int, int]],
                         scales: Sequence[float], sampling_ratio: int = 0, aligned: bool = True,
                         canonical_box_size: float = 224.0, canonical_level: int = 4) -> Tensor:
    """The FPN ROI pooler (detectron2's ``ROIPooler``) in one op.

    Each ROI is pooled from the level ``floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))``,
    clamped to the levels given; the assignment happens inside the kernel, with no host synchronisation.

    Args:
        features: one ``Tensor[N, C, H_l, W_l]`` per level, finest first.
        boxes: ``Tensor[K, 5]`` (batch index, x1, y1, x2, y2) or a list of ``Tensor[L_i, 4]``.
        output_size: ``(ph, pw)`` or an int.
        scales: ``1 / stride`` of each level, powers of two halving from level to level (e.g. 1/4 .. 1/32).
        sampling_ratio, aligned: as in :func:`roi_align` (defaults: adaptive sampling, aligned).
        canonical_box_size, canonical_level: a box of ``canonical_box_size`` pixels maps to ``canonical_level``.

    Returns:
        ``Tensor[K, C, ph, pw]``, rows in the order of ``boxes``.
    """
    pooled_h, pooled_w = pair(output_size, "output_size")
    features = list(features)
    scales = [float(s) for s in scales]
    if len(features) != len(scales):
        raise ValueError(f"multilevel_roi_align: got {len(features)} feature levels but {len(scales)} scales")
    pyramid_levels(scales)  # ValueError unless the scales are consecutive powers of 2
    rois = boxes_to_rois(boxes, features[0])
    _check_same_device(features[0], rois, "features")
    if not _extension.use_compiled("multilevel_roi_align", features[0], rois):
        return reference.multilevel_roi_align(features, rois, (pooled_h, pooled_w), scales, sampling_ratio, aligned,
                                              canonical_box_size, canonical_level)
    return torch.ops.eyecool.multilevel_roi_align(features, rois, pooled_h, pooled_w, scales, int(sampling_ratio),
                                                  bool(aligned), float(canonical_box_size), int(canonical_level))


class RoIAlign(nn.Module):
    """``nn.Module`` form of :func:`roi_align` (torchvision's ``RoIAlign``)."""

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        """input ``[N, C, H, W]``, rois ``[K, 5]`` or list of ``[L, 4]`` -> ``[K, C, ph, pw]``."""
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class MultiLevelRoIAlign(nn.Module):
    """``nn.Module`` form of :func:`multilevel_roi_align`: the FPN pooler of the box and mask heads."""

    def __init__(self, output_size: Union[int, Tuple[int, int]], scales: Sequence[float], sampling_ratio: int = 0,
                 aligned: bool = True, canonical_box_size: float = 224.0, canonical_level: int = 4):
        super().__init__()
        self.output_size = output_size
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level

    def forward(self, features: List[Tensor], boxes: BoxesLike) -> Tensor:
        """features: ``[N, C, H_l, W_l]`` per level; boxes ``[K, 5]`` or list of ``[L, 4]`` -> ``[K, C, ph, pw]``."""
        return multilevel_roi_align(features, boxes, self.output_size, self.scales, self.sampling_ratio,
                                    self.aligned, self.canonical_box_size, self.canonical_level)


if _extension.has_op("roi_align"):

    @torch.library.register_fake("eyecool::roi_align")
    def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
        torch._check(input.dtype == rois.dtype, lambda: "input and rois must have the same dtype")
        return input.new_empty((rois.size(0), input.size(1), pooled_height, pooled_width))

    @torch.library.register_fake("eyecool::_roi_align_backward")
    def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                                 height, width, sampling_ratio, aligned):
        return grad.new_empty((batch_size, channels, height, width))

    def _roi_align_setup_context(ctx, inputs, output):
        input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        ctx.input_shape = input.shape

    def _roi_align_backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
        n, c, h, w = ctx.input_shape
        grad_input = torch.ops.eyecool._roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width,
                                                           n, c, h, w, sampling_ratio, aligned)
        return grad_input, None, None, None, None, None, None

    torch.library.register_autograd("eyecool::roi_align", _roi_align_backward,
                                    setup_context=_roi_align_setup_context)

    @torch.library.register_fake("eyecool::multilevel_roi_align")
    def _multilevel_fake(features, rois, pooled_height, pooled_width, scales, sampling_ratio, aligned,
                         canonical_box_size, canonical_level):
        torch._check(len(features) == len(scales), lambda: "one scale per feature level")
        torch._check(rois.dim() == 2 and rois.size(1) == 5, lambda: "rois must be [K, 5]")
        return features[0].new_empty((rois.size(0), features[0].size(1), pooled_height, pooled_width))

    @torch.library.register_fake("eyecool::_multilevel_roi_align_backward")
    def _multilevel_backward_fake(grad, rois, pooled_height, pooled_width, scales, sampling_ratio, aligned,
                                  canonical_box_size, canonical_level, batch_size, channels, heights, widths):
        return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]

    def _multilevel_setup_context(ctx, inputs, output):
        features, rois, pooled_height, pooled_width, scales, sampling_ratio, aligned, cbs, clvl = inputs
        ctx.save_for_backward(rois)
        ctx.args = (pooled_height, pooled_width, scales, sampling_ratio, aligned, cbs, clvl)
        ctx.batch, ctx.channels = features[0].shape[:2]
        ctx.heights = [f.shape[2] for f in features]
        ctx.widths = [f.shape[3] for f in features]

    def _multilevel_backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        grads = torch.ops.eyecool._multilevel_roi_align_backward(grad, rois, *ctx.args, ctx.batch, ctx.channels,
                                                                 ctx.heights, ctx.widths)
        return list(grads), None, None, None, None, None, None, None, None

    torch.library.register_autograd("eyecool::multilevel_roi_align", _multilevel_backward,
                                    setup_context=_multilevel_setup_context)

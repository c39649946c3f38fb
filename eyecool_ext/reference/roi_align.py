"""ROIAlign in plain PyTorch: the test oracle for the kernels and their fallback.

Vectorised over ROIs, bins and sampling points (adaptive grids are padded to the largest grid and masked),
with the arithmetic of torchvision's kernels: the same box geometry, sampling positions, border clamping and
weights. Memory grows with K * C * bins * samples, so it is meant for tests and small inputs.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from eyecool_ext._autocast import reference_policy
from eyecool_ext._utils import BoxesLike, boxes_to_rois, fpn_level_index, pair, pyramid_levels


def _axis_taps(start: Tensor, bin_size: Tensor, grid: Tensor, pooled: int, max_grid: int, size: int):
    """Sampling coordinates along one axis and their bilinear taps.

    start, bin_size, grid: [K]. Returns (low, high, w_low, w_high, inside, used), each [K, pooled, max_grid]:
    the two neighbouring indices, their weights, whether the coordinate lies within [-1, size] and whether the
    sampling point exists (index < grid).
    """
    dtype = start.dtype
    p = torch.arange(pooled, device=start.device, dtype=dtype).view(1, pooled, 1)
    i = torch.arange(max_grid, device=start.device, dtype=dtype).view(1, 1, max_grid)
    g = grid.to(dtype).clamp(min=1).view(-1, 1, 1)
    coord = start.view(-1, 1, 1) + p * bin_size.view(-1, 1, 1) + (i + 0.5) * bin_size.view(-1, 1, 1) / g
    used = i < grid.view(-1, 1, 1).to(dtype)
    inside = (coord >= -1.0) & (coord <= size)
    # A NaN coordinate (NaN box) is outside; give it a harmless index instead of casting NaN to an integer.
    coord = torch.nan_to_num(coord, nan=0.0).clamp(min=0)
    low = coord.floor().clamp(max=size - 1).to(torch.long)
    at_edge = low >= size - 1
    high = torch.where(at_edge, low, low + 1)
    coord = torch.where(at_edge, low.to(dtype), coord)
    frac = coord - low.to(dtype)
    inside = inside & used & torch.isfinite(frac)
    frac = torch.nan_to_num(frac)
    return low, high, 1.0 - frac, frac, inside


def _roi_geometry(rois: Tensor, spatial_scale, pooled_h: int, pooled_w: int, sampling_ratio: int, aligned: bool):
    offset = 0.5 if aligned else 0.0
    scale = spatial_scale if isinstance(spatial_scale, Tensor) else float(spatial_scale)
    start_w = rois[:, 1] * scale - offset
    start_h = rois[:, 2] * scale - offset
    roi_w = rois[:, 3] * scale - offset - start_w
    roi_h = rois[:, 4] * scale - offset - start_h
    if not aligned:
        roi_w = torch.where(roi_w > 1.0, roi_w, torch.ones_like(roi_w))
        roi_h = torch.where(roi_h > 1.0, roi_h, torch.ones_like(roi_h))
    bin_h = roi_h / pooled_h
    bin_w = roi_w / pooled_w
    if sampling_ratio > 0:
        grid_h = torch.full_like(roi_h, sampling_ratio, dtype=torch.long)
        grid_w = torch.full_like(roi_w, sampling_ratio, dtype=torch.long)
    else:
        # Negative or NaN extents (inverted boxes in aligned mode) give no samples, as in the kernels.
        grid_h = torch.nan_to_num(torch.ceil(roi_h / pooled_h), nan=0.0).clamp(0, 1e6).to(torch.long)
        grid_w = torch.nan_to_num(torch.ceil(roi_w / pooled_w), nan=0.0).clamp(0, 1e6).to(torch.long)
    return start_h, start_w, bin_h, bin_w, grid_h, grid_w


def _zeros_on_graph(input: Tensor, shape) -> Tensor:
    """Zeros that still depend on ``input`` in autograd (so a backward through them gives zero gradients)."""
    return input.new_zeros(shape) + input.narrow(0, 0, 0).sum()


def _roi_align_rois(input: Tensor, rois: Tensor, spatial_scale, pooled_h: int, pooled_w: int,
                    sampling_ratio: int, aligned: bool) -> Tensor:
    n_img, channels, height, width = input.shape
    acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    k = rois.size(0)
    if k == 0:
        return _zeros_on_graph(input, (0, channels, pooled_h, pooled_w))
    x = input.to(acc)
    r = rois.to(acc)
    start_h, start_w, bin_h, bin_w, grid_h, grid_w = _roi_geometry(r, spatial_scale, pooled_h, pooled_w,
                                                                    sampling_ratio, aligned)
    max_gh = int(grid_h.max().item())
    max_gw = int(grid_w.max().item())
    if max_gh == 0 or max_gw == 0:
        return _zeros_on_graph(input, (k, channels, pooled_h, pooled_w))
    yl, yh, wyl, wyh, iny = _axis_taps(start_h, bin_h, grid_h, pooled_h, max_gh, height)  # [K, ph, gh]
    xl, xh, wxl, wxh, inx = _axis_taps(start_w, bin_w, grid_w, pooled_w, max_gw, width)  # [K, pw, gw]
    batch = r[:, 0].to(torch.long)
    if k and (batch.min() < 0 or batch.max() >= n_img):
        raise ValueError(f"rois[:, 0] (batch index) must be in [0, {n_img}), got values in "
                         f"[{int(batch.min())}, {int(batch.max())}]")
    # Broadcast to [K, ph, gh, pw, gw].
    b = batch.view(k, 1, 1, 1, 1)
    Y = lambda t: t.view(k, pooled_h, max_gh, 1, 1)  # noqa: E731
    X = lambda t: t.view(k, 1, 1, pooled_w, max_gw)  # noqa: E731
    valid = (Y(iny) & X(inx)).to(acc)

    def tap(yi, xi):  # -> [K, ph, gh, pw, gw, C]
        return x.permute(0, 2, 3, 1)[b, Y(yi), X(xi)]

    val = (
        (Y(wyl) * X(wxl)).unsqueeze(-1) * tap(yl, xl)
        + (Y(wyl) * X(wxh)).unsqueeze(-1) * tap(yl, xh)
        + (Y(wyh) * X(wxl)).unsqueeze(-1) * tap(yh, xl)
        + (Y(wyh) * X(wxh)).unsqueeze(-1) * tap(yh, xh)
    )
    val = val * valid.unsqueeze(-1)
    count = (grid_h * grid_w).clamp(min=1).to(acc).view(k, 1, 1, 1)
    out = val.sum(dim=(2, 4)) / count  # [K, ph, pw, C]
    return out.permute(0, 3, 1, 2).to(input.dtype).contiguous()


@reference_policy("roi_align", ("input", "boxes"))
def roi_align(input: Tensor, boxes: BoxesLike, output_size: Union[int, Tuple[int, int]],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Reference ROIAlign with torchvision's signature and semantics; see ``eyecool_ext.ops.roi_align``."""
    pooled_h, pooled_w = pair(output_size, "output_size")
    rois = boxes_to_rois(boxes, input)
    return _roi_align_rois(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned)


@reference_policy("multilevel_roi_align", ("features", "boxes"))
def multilevel_roi_align(features: List[Tensor], boxes: BoxesLike, output_size: Union[int, Tuple[int, int]],
                         scales: Sequence[float], sampling_ratio: int = 0, aligned: bool = True,
                         canonical_box_size: float = 224.0, canonical_level: int = 4) -> Tensor:
    """Reference FPN pooler: assign levels, pool each level's ROIs, scatter back into ROI order."""
    pooled_h, pooled_w = pair(output_size, "output_size")
    if len(features) != len(scales):
        raise ValueError(f"got {len(features)} feature levels but {len(scales)} scales")
    min_level, max_level = pyramid_levels(scales)
    rois = boxes_to_rois(boxes, features[0])
    level = fpn_level_index(rois, min_level, max_level, canonical_box_size, canonical_level)
    n, c = features[0].shape[:2]
    out = features[0].new_zeros((rois.size(0), c, pooled_h, pooled_w))
    for idx, (feat, scale) in enumerate(zip(features, scales)):
        sel = torch.nonzero(level == idx).squeeze(1)
        if sel.numel():
            out[sel] = _roi_align_rois(feat, rois[sel], scale, pooled_h, pooled_w, sampling_ratio, aligned)
    return out

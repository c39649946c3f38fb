"""ROIAlign (torchvision's op, drop-in) and the multilevel FPN pooler, on eyecool's kernels.

The ops are registered in C++ (``torch.ops.eyecool.roi_align`` ...); this module adds the typed wrappers, the
fake kernels that let ``torch.compile`` trace them, their autograd formulas, whose backward calls the
registered backward op, and the QuantizedCPU kernel of ``roi_align`` (torchvision's quantized semantics).

As torchvision's, ``roi_align`` and ``RoIAlign`` work under ``torch.jit.script`` (typed signatures; the eager
checks and fallbacks sit behind ``torch.jit.is_scripting()``) and ``torch.fx.symbolic_trace`` (a call with
traced values records one ``call_function`` node, wherever it is called from).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
import torch.fx
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from eyecool_ext import _extension, reference
from eyecool_ext._utils import BoxesLike, boxes_to_rois, pair
from eyecool_ext._utils import pyramid_levels

_Proxy = torch.fx.Proxy


def _check_same_device(input: Tensor, rois: Tensor, name: str) -> None:
    if rois.device != input.device:
        raise ValueError(f"boxes must be on the same device as {name} ({input.device}), got {rois.device}")


def roi_align(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: BroadcastingList2[int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Region of Interest Align (Mask R-CNN), with torchvision's exact semantics.

    Args:
        input: ``Tensor[N, C, H, W]`` feature map (float, double; half and bfloat16 accumulate in float), or a
            quantized one (``torch.quint8``, ``qint8``, ``qint32``, per-tensor affine, CPU, ``N = 1``; see below).
        boxes: ``Tensor[K, 5]`` rows (batch index, x1, y1, x2, y2), or a list (or tuple) of ``Tensor[L_i, 4]``
            (x1, y1, x2, y2), one per image. Same dtype and device as ``input``. Coordinates are in input-image
            pixels.
        output_size: ``(ph, pw)`` or an int for square bins.
        spatial_scale: map size / image size (e.g. 1/4 for a stride-4 map).
        sampling_ratio: sampling points per bin along each axis; ``<= 0`` chooses ``ceil(roi_size / output_size)``
            adaptively per ROI.
        aligned: shift boxes by -0.5 pixel (pixel centres), the correct convention; ``False`` is Detectron's
            legacy one, which also forces ROIs to at least 1x1.

    Returns:
        ``Tensor[K, C, ph, pw]``.

    Raises:
        BoxesShapeError (``eyecool_ext._utils``): ``boxes`` is neither ``Tensor[K, 5]`` nor a list of
            ``Tensor[L, 4]``; a ValueError that is also an AssertionError (what torchvision raises there), so
            either ``except`` catches it.
        ValueError: a bad ``output_size``, boxes on another device. RuntimeError (from the kernel): another dtype,
            a batch index out of range.

    An inverted box (x2 < x1 or y2 < y1) never crashes: in aligned mode with adaptive sampling it has no
    sampling points and pools to 0 (torchvision's CUDA result); otherwise it is sampled as torchvision does.
    A map of height or width 0 pools to 0 (zero gradient). A batch index outside ``[0, N)`` or NaN raises on the
    CPU and pools to 0 on CUDA, where checking it would cost a host synchronisation.

    Quantized input (CPU): torchvision's QuantizedCPU kernel, operation for operation in float32, so the results
    are the same integers: the boxes must be quantized too (ValueError otherwise, as in torchvision) and are
    dequantized; each output value is ``scale * (sum of weights x raw values - zero_point * sum of weights) /
    count``, requantized with the input's scale and zero point (round half to even, clamped to the dtype's
    range); the output is a quantized tensor with those parameters. As in torchvision, only one image per
    batch is allowed (RuntimeError otherwise: a batch index column need not be representable in the boxes'
    quantization, so it is ignored). It runs as Python tensor code, ROI group by ROI group: it is meant for
    correctness, not speed, and has no gradient (quantized tensors have none).

    TorchScript: ``torch.jit.script`` compiles this function (and ``RoIAlign``) to a direct call of
    ``torch.ops.eyecool.roi_align``, boxes of either format; scripted code needs the compiled extension, skips the
    Python checks above (the kernel's checks raise ``torch.jit.Error`` instead) and runs no reference fallback.
    ``torch.fx.symbolic_trace`` records the call as one node.
    """
    if not torch.jit.is_scripting():
        if isinstance(input, _Proxy) or isinstance(boxes, _Proxy):
            proxy = input if isinstance(input, _Proxy) else boxes
            return proxy.tracer.create_proxy("call_function", roi_align,
                                             (input, boxes, output_size, spatial_scale, sampling_ratio, aligned), {})
        pooled_h, pooled_w = pair(output_size, "output_size")
        rois = boxes_to_rois(boxes, input)
        _check_same_device(input, rois, "input")
        if not _extension.use_compiled("roi_align", input, rois):
            if input.is_quantized or rois.is_quantized:
                return _quantized_roi_align(input, rois, float(spatial_scale), pooled_h, pooled_w,
                                            int(sampling_ratio), bool(aligned))
            return reference.roi_align(input, rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned)
        return torch.ops.eyecool.roi_align(input, rois, float(spatial_scale), pooled_h, pooled_w,
                                           int(sampling_ratio), bool(aligned))
    return _roi_align_scripted(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)


def _rois_scripted(input: Tensor, boxes: Union[Tensor, List[Tensor]]) -> Tensor:
    """:func:`boxes_to_rois` in TorchScript (torchvision's ``convert_boxes_to_roi_format``)."""
    if isinstance(boxes, Tensor):
        torch._assert(boxes.dim() == 2 and boxes.size(1) == 5,
                      "boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[L, 4]")
        return boxes
    parts: List[Tensor] = []
    for i, b in enumerate(boxes):
        torch._assert(b.dim() == 2 and b.size(1) == 4, "every tensor of a boxes list must be a Tensor[L, 4]")
        parts.append(torch.cat([torch.full_like(b[:, :1], i), b], dim=1))
    if len(parts) == 0:
        return input.new_zeros((0, 5))
    return torch.cat(parts, dim=0)


if _extension.has_op("roi_align"):

    def _roi_align_scripted(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: List[int],
                            spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
        rois = _rois_scripted(input, boxes)
        return torch.ops.eyecool.roi_align(input, rois, spatial_scale, output_size[0], output_size[1],
                                           sampling_ratio, aligned)
else:

    def _roi_align_scripted(input: Tensor, boxes: Union[Tensor, List[Tensor]], output_size: List[int],
                            spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
        raise RuntimeError("eyecool_ext: roi_align under torch.jit.script needs the compiled extension (the "
                           "reference fallback is not scriptable); rebuild it with `make install`")


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

    ``torch.fx.symbolic_trace`` records the call as one node (features traced as one list or level by level).
    """
    if (isinstance(boxes, _Proxy) or isinstance(features, _Proxy)
            or (isinstance(features, (list, tuple)) and len(features) and isinstance(features[0], _Proxy))):
        proxy = boxes if isinstance(boxes, _Proxy) else features if isinstance(features, _Proxy) else features[0]
        return proxy.tracer.create_proxy("call_function", multilevel_roi_align,
                                         (features, boxes, output_size, scales, sampling_ratio, aligned,
                                          canonical_box_size, canonical_level), {})
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
    """``nn.Module`` form of :func:`roi_align` (torchvision's ``RoIAlign``); scriptable and fx-traceable.

    ``spatial_scale`` is kept as a float and ``sampling_ratio`` as an int (so that ``torch.jit.script`` also
    accepts ``spatial_scale=1``, which torchvision's module refuses there).
    """

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Union[Tensor, List[Tensor]]) -> Tensor:
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


# ---------------------------------------------------------------------------------------------------------------
# Quantized roi_align (CPU): torchvision's QuantizedCPU kernel (csrc/ops/quantized/cpu/qroi_align_kernel.cpp with
# the bilinear pre-calculation of csrc/ops/cpu/roi_align_common.h), in float32 tensor operations issued in the
# kernel's order, so that every rounding is the same and the integers come out identical.

_F32 = torch.float32


def _f32(value: float) -> Tensor:
    return torch.tensor(value, dtype=_F32)


def _bilinear_taps(coord: Tensor, size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One axis of torchvision's ``pre_calc_for_bilinear_interpolate``: ``(low, high, l, h)`` for sampling
    coordinates already known to lie in ``[-1, size]`` (clamped at 0, snapped to the last pixel)."""
    coord = torch.where(coord <= 0, torch.zeros_like(coord), coord)
    low = coord.to(torch.int64)  # (int) truncation; coord >= 0 here
    last = low >= size - 1
    low = torch.where(last, torch.full_like(low, size - 1), low)
    high = torch.where(last, low, low + 1)
    coord = torch.where(last, low.to(_F32), coord)
    lo = coord - low.to(_F32)
    return low, high, lo, 1 - lo


def _quantized_roi_align(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                         pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """torchvision's ``roi_align`` on quantized tensors (see :func:`roi_align`); ``rois`` is ``Tensor[K, 5]``."""
    if not input.is_quantized:
        raise ValueError(f"roi_align: the boxes are quantized ({rois.dtype}) but the input is not ({input.dtype}); "
                         f"quantize both or neither")
    if not rois.is_quantized:
        # torchvision's words, for code that matches them
        raise ValueError("If input is quantized, rois must also be quantized.")
    for name, t in (("input", input), ("boxes", rois)):
        if t.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ValueError(f"roi_align: quantized {name} must be quantized per tensor, got {t.qscheme()}")
        if t.device.type != "cpu":
            raise ValueError(f"roi_align: quantized {name} must be a CPU tensor, got {t.device}")
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be a Tensor[N, C, H, W], got shape {tuple(input.shape)}")
    if rois.dim() != 2 or rois.size(1) != 5:
        raise ValueError(f"roi_align: rois must be a Tensor[K, 5], got shape {tuple(rois.shape)}")
    if input.size(0) != 1:
        # torchvision's words and type: its kernel reads image 0 whatever the batch index column says.
        raise RuntimeError(f"Only one image per batch is allowed in roi_align when quantized tensors are passed "
                           f"(got a batch of {input.size(0)}): quantized boxes cannot represent every batch index")
    scale, zero_point = input.q_scale(), input.q_zero_point()
    n_rois, channels, height, width = rois.size(0), input.size(1), input.size(2), input.size(3)
    int_repr = input.int_repr()
    out_int = torch.zeros((n_rois, channels, pooled_height, pooled_width), dtype=int_repr.dtype)
    if out_int.numel() == 0:
        return torch._make_per_tensor_quantized_tensor(out_int, scale, zero_point)
    info = torch.iinfo(int_repr.dtype)
    data = int_repr[0].reshape(channels, height * width).to(_F32)  # static_cast<float>(raw value)

    # Dequantized boxes: (float(raw) - zero_point) * float(scale), as ATen's dequantize_val.
    boxes = (rois.int_repr().to(_F32) - _f32(float(rois.q_zero_point()))) * _f32(rois.q_scale())
    offset = _f32(0.5 if aligned else 0.0)
    start_w = boxes[:, 1] * _f32(spatial_scale) - offset
    start_h = boxes[:, 2] * _f32(spatial_scale) - offset
    roi_w = (boxes[:, 3] * _f32(spatial_scale) - offset) - start_w
    roi_h = (boxes[:, 4] * _f32(spatial_scale) - offset) - start_h
    if not aligned:  # malformed ROIs forced to 1x1
        roi_w = torch.clamp(roi_w, min=1.0)
        roi_h = torch.clamp(roi_h, min=1.0)
    bin_h = roi_h / _f32(float(pooled_height))
    bin_w = roi_w / _f32(float(pooled_width))
    if sampling_ratio > 0:
        grid_h = torch.full((n_rois,), sampling_ratio, dtype=torch.int64)
        grid_w = grid_h.clone()
    else:
        grid_h = torch.ceil(roi_h / _f32(float(pooled_height))).to(torch.int64)
        grid_w = torch.ceil(roi_w / _f32(float(pooled_width))).to(torch.int64)

    ph = torch.arange(pooled_height, dtype=_F32)
    pw = torch.arange(pooled_width, dtype=_F32)
    scale_f = _f32(scale)
    inv_scale = 1 / scale_f
    zero_f = _f32(float(zero_point))
    # ROIs of the same sampling grid run together; inside a group the samples are added one grid point after
    # the other, as the kernel's loop does, so the float32 sums are the same.
    grids = torch.stack([grid_h, grid_w], dim=1)
    for gh, gw in torch.unique(grids, dim=0).tolist():
        idx = torch.nonzero((grid_h == gh) & (grid_w == gw)).flatten()
        k = idx.numel()
        acc = torch.zeros((k, channels, pooled_height, pooled_width), dtype=_F32)
        sum_w = torch.zeros((k, 1, pooled_height, pooled_width), dtype=_F32)
        bh, bw = bin_h[idx, None], bin_w[idx, None]
        base_y = start_h[idx, None] + ph * bh  # roi_start_h + ph * bin_size_h
        base_x = start_w[idx, None] + pw * bw
        for iy in range(gh):
            yy = base_y + (_f32(iy + 0.5) * bh) / _f32(float(gh))  # [k, PH]
            for ix in range(gw):
                xx = base_x + (_f32(ix + 0.5) * bw) / _f32(float(gw))  # [k, PW]
                y = yy[:, :, None].expand(k, pooled_height, pooled_width)
                x = xx[:, None, :].expand(k, pooled_height, pooled_width)
                inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
                y_low, y_high, ly, hy = _bilinear_taps(y, height)
                x_low, x_high, lx, hx = _bilinear_taps(x, width)
                zero = torch.zeros((), dtype=_F32)
                w1 = torch.where(inside, hy * hx, zero)
                w2 = torch.where(inside, hy * lx, zero)
                w3 = torch.where(inside, ly * hx, zero)
                w4 = torch.where(inside, ly * lx, zero)
                taps = []
                for yi, xi in ((y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high)):
                    pos = torch.where(inside, yi * width + xi, torch.zeros_like(yi))
                    taps.append(data[:, pos.reshape(-1)].reshape(channels, k, pooled_height, pooled_width)
                                .transpose(0, 1))
                w1, w2, w3, w4 = (w.unsqueeze(1) for w in (w1, w2, w3, w4))
                acc = acc + (((w1 * taps[0] + w2 * taps[1]) + w3 * taps[2]) + w4 * taps[3])
                sum_w = sum_w + (((w1 + w2) + w3) + w4)
        count = _f32(float(max(gh * gw, 1)))
        value = (scale_f * (acc - zero_f * sum_w)) / count
        q = (zero_f + torch.round(value * inv_scale)).to(torch.float64).clamp(info.min, info.max)
        out_int[idx] = q.to(torch.int64).to(int_repr.dtype)
    return torch._make_per_tensor_quantized_tensor(out_int, scale, zero_point)


def _quantized_roi_align_kernel(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return _quantized_roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


_quantized_lib = None
if _extension.has_op("roi_align"):
    # The C++ extension has no QuantizedCPU kernel; this Python one serves torch.ops.eyecool.roi_align (and so the
    # wrapper and scripted code) for quantized tensors, at no cost to the float path's dispatch.
    _quantized_lib = torch.library.Library("eyecool", "IMPL")
    _quantized_lib.impl("roi_align", _quantized_roi_align_kernel, "QuantizedCPU")

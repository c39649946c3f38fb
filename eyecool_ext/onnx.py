"""ONNX export of the eyecool ops: each op mapped onto standard ONNX operators, for both of torch's exporters.

============================  =====================================================================  =======
op                            ONNX                                                                   opset
============================  =====================================================================  =======
``deform_conv2d``             ``DeformConv`` (groups and offset groups from the static shapes)       19
``roi_align``                 ``RoiAlign`` (avg; ``half_pixel`` when aligned, else                   16
                              ``output_half_pixel``; sampling ratio <= 0 -> 0, adaptive)
``multilevel_roi_align``      level assignment in ONNX ops (area, Sqrt, Log, Floor, Clip), then per   16
                              level ``NonZero`` -> ``Gather`` -> ``RoiAlign`` -> ``ScatterND``
``fg_fusion``                 its composition: ``Softmax``, ``Slice`` + ``ReduceSum`` of the thing    13
                              channels, adaptive average pooling as two ``MatMul`` with constant
                              pooling matrices (exact bins; needs static spatial sizes), ``Mul``
                              (and ``Sigmoid`` for mode ``prob``)
============================  =====================================================================  =======

``upsnet_panoptic_merge``, ``heuristic_panoptic_merge`` and ``pq_pair_counts`` have no mapping: the merge runs as
a post-processing step on the exported network's outputs (``eyecool.export``), the others are evaluation ops.

- TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): importing ``eyecool_ext`` registers the
  symbolic functions (:func:`register_symbolics`, through ``eyecool_ext.ops._registrations``), so any module
  that calls the ops exports with opset >= 19.
- Dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``): pass
  ``custom_translation_table=eyecool_ext.onnx.translation_table()``; :func:`export` does that for you.

Semantics that ONNX cannot express the same way: ``roi_align`` with ``aligned=False`` and an explicit positive
sampling ratio matches; ONNX's ``RoiAlign`` has no ``sampling_ratio < 0`` (eyecool's "adaptive"), which maps to
0, its adaptive mode; both compute ``ceil(roi_size / output_size)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from eyecool_ext import _extension

DEFORM_CONV_OPSET = 19  # the first opset with DeformConv; RoiAlign's coordinate_transformation_mode needs 16
_registered = False


# ------------------------------------------------------------------------------------------ shared arithmetic


def adaptive_pool_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """``[out_size, in_size]`` float32 matrix ``P`` with ``P @ x`` = ``adaptive_avg_pool1d(x, out_size)``.

    Bin ``i`` averages ``x[floor(i * in / out) : ceil((i + 1) * in / out)]`` (PyTorch's bins, overlapping when
    the sizes do not divide), so ``P_h @ X @ P_w^T`` is ``adaptive_avg_pool2d`` of ``X [.., in_h, in_w]``.
    """
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m.float()


def _fpn_levels(scales: Sequence[float]):
    levels = [-math.log2(s) for s in scales]
    return round(levels[0]), round(levels[0]) + len(scales) - 1


def _static_int(value: Any, what: str) -> int:
    if value is None or not isinstance(value, int):
        raise RuntimeError(f"eyecool ONNX export: {what} must be static (known at export), got {value!r}; "
                           f"export at a fixed input size")
    return value


# ------------------------------------------------------------------------------ TorchScript exporter symbolics


def _ts_sizes(value) -> List[Optional[int]]:
    from torch.onnx import symbolic_helper

    sizes = symbolic_helper._get_tensor_sizes(value)
    return list(sizes) if sizes is not None else []


def _ts_const(g, tensor: torch.Tensor):
    return g.op("Constant", value_t=tensor)


def _ts_deform_conv2d(g, input, offset, weight, mask, bias, stride, padding, dilation):
    from torch.onnx import symbolic_helper as sh

    stride = sh._maybe_get_const(stride, "is")
    padding = sh._maybe_get_const(padding, "is")
    dilation = sh._maybe_get_const(dilation, "is")
    w = _ts_sizes(weight)
    c_in = _static_int(_ts_sizes(input)[1], "deform_conv2d's input channels")
    off_c = _static_int(_ts_sizes(offset)[1], "deform_conv2d's offset channels")
    c_out, c_per_group, kh, kw = (_static_int(v, "deform_conv2d's weight shape") for v in w)
    inputs = [input, weight, offset]
    if not sh._is_none(bias):
        inputs.append(bias)
    elif not sh._is_none(mask):  # ONNX inputs are positional: a mask needs a bias before it
        zeros = g.op("ConstantOfShape", _ts_const(g, torch.tensor([c_out], dtype=torch.int64)))
        inputs.append(g.op("CastLike", zeros, input))
    if not sh._is_none(mask):
        inputs.append(mask)
    return g.op("DeformConv", *inputs, dilations_i=list(dilation), group_i=c_in // c_per_group,
                kernel_shape_i=[kh, kw], offset_group_i=off_c // (2 * kh * kw),
                pads_i=[padding[0], padding[1], padding[0], padding[1]], strides_i=list(stride))


def _ts_split_rois(g, rois):
    batch = g.op("Gather", rois, _ts_const(g, torch.tensor(0, dtype=torch.int64)), axis_i=1)  # [K]
    batch = g.op("Cast", batch, to_i=7)  # INT64
    boxes = g.op("Gather", rois, _ts_const(g, torch.tensor([1, 2, 3, 4], dtype=torch.int64)), axis_i=1)
    return boxes, batch


def _ts_roi_align_op(g, input, boxes, batch, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    return g.op("RoiAlign", input, boxes, batch,
                coordinate_transformation_mode_s="half_pixel" if aligned else "output_half_pixel", mode_s="avg",
                output_height_i=pooled_h, output_width_i=pooled_w, sampling_ratio_i=max(0, sampling_ratio),
                spatial_scale_f=spatial_scale)


def _ts_roi_align(g, input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
    from torch.onnx import symbolic_helper as sh

    boxes, batch = _ts_split_rois(g, rois)
    return _ts_roi_align_op(g, input, boxes, batch, sh._get_const(spatial_scale, "f", "spatial_scale"),
                            sh._get_const(pooled_h, "i", "pooled_height"), sh._get_const(pooled_w, "i", "pooled_width"),
                            sh._get_const(sampling_ratio, "i", "sampling_ratio"), sh._get_const(aligned, "b", "aligned"))


def _ts_multilevel_roi_align(g, features, rois, pooled_h, pooled_w, scales, sampling_ratio, aligned,
                             canonical_box_size, canonical_level):
    from torch.onnx import symbolic_helper as sh

    feats = sh._unpack_list(features)
    pooled_h = sh._get_const(pooled_h, "i", "pooled_height")
    pooled_w = sh._get_const(pooled_w, "i", "pooled_width")
    scales = sh._get_const(scales, "fs", "scales")
    sampling_ratio = sh._get_const(sampling_ratio, "i", "sampling_ratio")
    aligned = sh._get_const(aligned, "b", "aligned")
    canonical_box_size = sh._get_const(canonical_box_size, "f", "canonical_box_size")
    canonical_level = sh._get_const(canonical_level, "i", "canonical_level")
    boxes, batch = _ts_split_rois(g, rois)
    level = _ts_level_index(g, boxes, scales, canonical_box_size, canonical_level)  # [K] int64
    channels = _static_int(_ts_sizes(feats[0])[1], "multilevel_roi_align's channels")
    num_rois = g.op("Gather", g.op("Shape", rois), _ts_const(g, torch.tensor([0], dtype=torch.int64)), axis_i=0)
    shape = g.op("Concat", num_rois, _ts_const(g, torch.tensor([channels, pooled_h, pooled_w], dtype=torch.int64)),
                 axis_i=0)
    out = g.op("CastLike", g.op("ConstantOfShape", shape), feats[0])
    for index, (feat, scale) in enumerate(zip(feats, scales)):
        is_level = g.op("Equal", level, _ts_const(g, torch.tensor(index, dtype=torch.int64)))
        selected = g.op("Transpose", g.op("NonZero", is_level), perm_i=[1, 0])  # [K_l, 1]
        flat = g.op("Squeeze", selected, _ts_const(g, torch.tensor([1], dtype=torch.int64)))
        pooled = _ts_roi_align_op(g, feat, g.op("Gather", boxes, flat, axis_i=0), g.op("Gather", batch, flat, axis_i=0),
                                  scale, pooled_h, pooled_w, sampling_ratio, aligned)
        out = g.op("ScatterND", out, selected, pooled)
    return out


def _ts_level_index(g, boxes, scales, canonical_box_size, canonical_level):
    """detectron2's level rule, as in the kernels (csrc/roi_align.h): floor(c + log2(sqrt(area)/s + 1e-8))."""
    def c(v):
        return _ts_const(g, torch.tensor(v, dtype=torch.float32))

    min_level, max_level = _fpn_levels(scales)
    x1, y1, x2, y2 = (g.op("Gather", boxes, _ts_const(g, torch.tensor(i, dtype=torch.int64)), axis_i=1)
                      for i in range(4))
    area = g.op("Mul", g.op("Sub", x2, x1), g.op("Sub", y2, y1))
    area = g.op("Cast", area, to_i=1)  # FLOAT
    ratio = g.op("Add", g.op("Div", g.op("Sqrt", area), c(canonical_box_size)), c(1e-8))
    lvl = g.op("Floor", g.op("Add", c(float(canonical_level)), g.op("Div", g.op("Log", ratio), c(math.log(2.0)))))
    # NaN (negative area) -> the finest level, as the kernel's !(lvl >= min_level) test does.
    lvl = g.op("Where", g.op("IsNaN", lvl), c(float(min_level)), lvl)
    lvl = g.op("Clip", lvl, c(float(min_level)), c(float(max_level)))
    return g.op("Cast", g.op("Sub", lvl, c(float(min_level))), to_i=7)


def _ts_fg_fusion(g, sem_logits, rpn_logits, num_stuff, mode):
    from torch.onnx import symbolic_helper as sh

    num_stuff = sh._get_const(num_stuff, "i", "num_stuff")
    mode = sh._get_const(mode, "s", "mode")
    levels = sh._unpack_list(rpn_logits)
    sizes = _ts_sizes(sem_logits)
    channels = _static_int(sizes[1], "fg_fusion's sem_logits channels")
    in_h, in_w = (_static_int(v, "fg_fusion's sem_logits size") for v in sizes[2:])

    def i64(v):
        return _ts_const(g, torch.tensor(v, dtype=torch.int64))

    prob = g.op("Softmax", sem_logits, axis_i=1)
    things = g.op("Slice", prob, i64([num_stuff]), i64([channels]), i64([1]))
    fg = g.op("ReduceSum", things, i64([1]), keepdims_i=1)  # [N, 1, H, W]
    fused = []
    for level in levels:
        out_h, out_w = (_static_int(v, "fg_fusion's rpn_logits size") for v in _ts_sizes(level)[2:])
        pooled = fg
        if (out_h, out_w) != (in_h, in_w):
            ph = g.op("CastLike", _ts_const(g, adaptive_pool_matrix(in_h, out_h)), fg)
            pwt = g.op("CastLike", _ts_const(g, adaptive_pool_matrix(in_w, out_w).t().contiguous()), fg)
            pooled = g.op("MatMul", g.op("MatMul", ph, fg), pwt)
        gate = level if mode == "logit" else g.op("Sigmoid", level)
        fused.append(g.op("Mul", gate, pooled))
    stats = g.op("Constant", value_t=torch.zeros(0))  # softmax_stats are backward-only: never read at inference
    return g.op("prim::ListConstruct", *fused), stats


def register_symbolics() -> None:
    """Register the TorchScript-exporter symbolic functions of every mapped op (idempotent; importing
    ``eyecool_ext`` calls it)."""
    global _registered
    if _registered or not _extension.compiled():
        return
    table = {"deform_conv2d": (_ts_deform_conv2d, DEFORM_CONV_OPSET), "roi_align": (_ts_roi_align, 16),
             "multilevel_roi_align": (_ts_multilevel_roi_align, 16), "fg_fusion": (_ts_fg_fusion, 13)}
    for name, (fn, opset) in table.items():
        if _extension.has_op(name):
            torch.onnx.register_custom_op_symbolic(f"eyecool::{name}", fn, opset)
    _registered = True


# ------------------------------------------------------------------------------- dynamo exporter translations


def _ir_shape(value) -> List[Optional[int]]:
    shape = value.shape
    if shape is None:
        return []
    return [d if isinstance(d, int) else None for d in shape]


def translation_table() -> Dict[Callable, Callable]:
    """``{torch.ops.eyecool.<op>.default: onnxscript function}`` for ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)``. Needs ``onnxscript``."""
    import onnx_ir as ir
    from onnxscript import opset19 as op

    def i64(v):
        return op.Constant(value=ir.tensor(torch.tensor(v, dtype=torch.int64)))

    def f32(v):
        return op.Constant(value=ir.tensor(torch.tensor(v, dtype=torch.float32)))

    def deform_conv2d(input, offset, weight, mask=None, bias=None, stride=(1, 1), padding=(0, 0),
                      dilation=(1, 1)):
        c_in = _static_int(_ir_shape(input)[1], "deform_conv2d's input channels")
        off_c = _static_int(_ir_shape(offset)[1], "deform_conv2d's offset channels")
        c_out, c_per_group, kh, kw = (_static_int(v, "deform_conv2d's weight shape") for v in _ir_shape(weight))
        if bias is None and mask is not None:
            bias = op.CastLike(op.ConstantOfShape(i64([c_out])), input)
        return op.DeformConv(input, weight, offset, bias, mask, dilations=list(dilation), group=c_in // c_per_group,
                             kernel_shape=[kh, kw], offset_group=off_c // (2 * kh * kw),
                             pads=[padding[0], padding[1], padding[0], padding[1]], strides=list(stride))

    def split_rois(rois):
        batch = op.Cast(op.Gather(rois, i64(0), axis=1), to=ir.DataType.INT64)
        return op.Gather(rois, i64([1, 2, 3, 4]), axis=1), batch

    def roi_align_op(input, boxes, batch, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
        return op.RoiAlign(input, boxes, batch,
                           coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
                           mode="avg", output_height=int(pooled_h), output_width=int(pooled_w),
                           sampling_ratio=max(0, int(sampling_ratio)), spatial_scale=float(spatial_scale))

    def roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        boxes, batch = split_rois(rois)
        return roi_align_op(input, boxes, batch, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)

    def multilevel_roi_align(features, rois, pooled_height, pooled_width, scales, sampling_ratio, aligned,
                             canonical_box_size, canonical_level):
        boxes, batch = split_rois(rois)
        min_level, max_level = _fpn_levels(scales)
        x1, y1, x2, y2 = (op.Gather(boxes, i64(i), axis=1) for i in range(4))
        area = op.Cast(op.Mul(op.Sub(x2, x1), op.Sub(y2, y1)), to=ir.DataType.FLOAT)
        ratio = op.Add(op.Div(op.Sqrt(area), f32(float(canonical_box_size))), f32(1e-8))
        lvl = op.Floor(op.Add(f32(float(canonical_level)), op.Div(op.Log(ratio), f32(math.log(2.0)))))
        lvl = op.Where(op.IsNaN(lvl), f32(float(min_level)), lvl)
        lvl = op.Clip(lvl, f32(float(min_level)), f32(float(max_level)))
        level = op.Cast(op.Sub(lvl, f32(float(min_level))), to=ir.DataType.INT64)
        channels = _static_int(_ir_shape(features[0])[1], "multilevel_roi_align's channels")
        shape = op.Concat(op.Shape(rois, start=0, end=1), i64([channels, int(pooled_height), int(pooled_width)]),
                          axis=0)
        out = op.CastLike(op.ConstantOfShape(shape), features[0])
        for index, (feat, scale) in enumerate(zip(features, scales)):
            selected = op.Transpose(op.NonZero(op.Equal(level, i64(index))), perm=[1, 0])
            flat = op.Squeeze(selected, i64([1]))
            pooled = roi_align_op(feat, op.Gather(boxes, flat, axis=0), op.Gather(batch, flat, axis=0), scale,
                                  pooled_height, pooled_width, sampling_ratio, aligned)
            out = op.ScatterND(out, selected, pooled)
        return out

    def fg_fusion(sem_logits, rpn_logits, num_stuff, mode):
        sizes = _ir_shape(sem_logits)
        channels = _static_int(sizes[1], "fg_fusion's sem_logits channels")
        in_h, in_w = (_static_int(v, "fg_fusion's sem_logits size") for v in sizes[2:])
        prob = op.Softmax(sem_logits, axis=1)
        fg = op.ReduceSum(op.Slice(prob, i64([num_stuff]), i64([channels]), i64([1])), i64([1]), keepdims=1)
        fused = []
        for level in rpn_logits:
            out_h, out_w = (_static_int(v, "fg_fusion's rpn_logits size") for v in _ir_shape(level)[2:])
            pooled = fg
            if (out_h, out_w) != (in_h, in_w):
                ph = op.CastLike(op.Constant(value=ir.tensor(adaptive_pool_matrix(in_h, out_h))), fg)
                pwt = op.CastLike(op.Constant(value=ir.tensor(adaptive_pool_matrix(in_w, out_w).t().contiguous())),
                                  fg)
                pooled = op.MatMul(op.MatMul(ph, fg), pwt)
            fused.append(op.Mul(level if mode == "logit" else op.Sigmoid(level), pooled))
        return op.SequenceConstruct(*fused), op.Constant(value=ir.tensor(torch.zeros(0)))

    table: Dict[Callable, Callable] = {}
    for name, fn in (("deform_conv2d", deform_conv2d), ("roi_align", roi_align),
                     ("multilevel_roi_align", multilevel_roi_align), ("fg_fusion", fg_fusion)):
        if _extension.has_op(name):
            table[getattr(torch.ops.eyecool, name).default] = fn
    return table


def export(model: torch.nn.Module, args: tuple, path: str, *, dynamo: bool = False, opset_version: int = 19,
           **kwargs) -> None:
    """``torch.onnx.export`` of a module that calls eyecool ops, with their mappings, to ``path``.

    Args:
        model: any module (in eval mode for inference graphs).
        args: its example inputs (shapes are fixed at export: ``fg_fusion``'s pooling needs static sizes).
        dynamo: the dynamo exporter (``torch.export`` + onnxscript) instead of the TorchScript one.
        opset_version: >= 19 (DeformConv).
        kwargs: passed on (``input_names``, ``output_names``, ...).
    """
    if opset_version < DEFORM_CONV_OPSET:
        raise ValueError(f"eyecool ops need opset >= {DEFORM_CONV_OPSET} (DeformConv), got {opset_version}")
    if dynamo:
        program = torch.onnx.export(model, args, dynamo=True, opset_version=opset_version,
                                    custom_translation_table=translation_table(), **kwargs)
        program.save(path)
        return
    register_symbolics()
    torch.onnx.export(model, args, path, dynamo=False, opset_version=opset_version, **kwargs)


register_symbolics()

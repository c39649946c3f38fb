"""torchvision's own op tests (test/test_ops.py: TestRoIAlign, TestDeformConv), run against eyecool's ops.

A user who swaps ``torchvision.ops.roi_align`` / ``deform_conv2d`` / ``RoIAlign`` / ``DeformConv2d`` for eyecool's
expects what torchvision's tests check to hold. Each test below names the torchvision test it mirrors; the inputs
are the same, the checks are written here (torchvision's code is not copied), and the reference is torchvision's
op itself on the same inputs, where torchvision compares with a Python loop of its own. Where eyecool deliberately
differs, the test says so and checks eyecool's documented behaviour instead.
"""
from __future__ import annotations

import io
import random
import subprocess
import sys
from typing import List

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torch.autograd import gradcheck
from torchvision.models.feature_extraction import get_graph_node_names

from eyecool_ext import _extension, ops
from op_tester import needs_compiled

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.(script|save|load)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions.*:UserWarning"),
]

# torchvision's test_forward / test_torch_fx_trace boxes (x1, y1, x2, y2 after the batch index).
ROIS = [[0, 0, 0, 9, 9], [0, 0, 5, 4, 9], [0, 5, 5, 9, 9], [1, 0, 0, 9, 9]]


class _Wrapper2(nn.Module):
    """torchvision's RoIOpTesterModuleWrapper: calls the layer on two inputs, returns nothing."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, a, b):
        self.layer(a, b)


class _Wrapper3(_Wrapper2):
    """torchvision's DeformConvModuleWrapper: the same with three inputs."""

    def forward(self, a, b, c):
        self.layer(a, b, c)


class _PoolWrapper(nn.Module):
    """torchvision's PoolWrapper: a typed forward for torch.jit.script."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, imgs: Tensor, boxes: List[Tensor]) -> Tensor:
        return self.pool(imgs, boxes)


def _call_function_targets(graph_module) -> list:
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function"]


# ---------------------------------------------------------------------------------------------------------------
# TestRoIAlign


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("contiguous", [True, False])
def test_roi_align_forward(contiguous, x_dtype, aligned):
    """TestRoIAlign.test_forward (CPU; "deterministic" is skipped there on the CPU too)."""
    torch.manual_seed(0)
    x = torch.rand(2, 50, 10, 10, dtype=x_dtype)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor(ROIS, dtype=x_dtype)
    y = ops.RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1, aligned=aligned)(x, rois)
    assert y.dtype == x.dtype
    expected = torchvision.ops.RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1, aligned=aligned)(x.double(),
                                                                                                      rois.double())
    tol = 4e-3 if x_dtype is torch.float16 else 1e-5
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_roi_align_is_leaf_node():
    """TestRoIAlign.test_is_leaf_node: feature extraction's tracer sees the op as one node besides the inputs."""
    names = get_graph_node_names(_Wrapper2(ops.RoIAlign((5, 5), 1, -1)))
    assert names[0] == names[1] and len(names[0]) == 1 + 2
    assert names[0][-1] == "layer.roi_align"


def test_roi_align_torch_fx_trace():
    """TestRoIAlign.test_torch_fx_trace: symbolic_trace of the module gives the module's results."""
    layer = ops.RoIAlign((5, 5), spatial_scale=1, sampling_ratio=-1)
    graph_module = torch.fx.symbolic_trace(layer)
    assert _call_function_targets(graph_module) == [ops.roi_align]
    x = torch.rand(2, 50, 5, 5)
    rois = torch.tensor(ROIS, dtype=torch.float)
    expected = layer(x, rois)
    out = graph_module(x, rois)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torchvision.ops.roi_align(x, rois, 5, 1, -1), rtol=1e-5, atol=1e-5)


def test_roi_align_fx_trace_of_the_function_from_user_code():
    """Beyond torchvision's test: a user's module that calls the function (not the module) traces to one node as
    well, since the wrapper itself records the call (torchvision's torch.fx.wrap only patches its own module)."""

    class Head(nn.Module):
        def forward(self, feat, boxes):
            return ops.roi_align(feat, boxes, 3, 0.5, 2, True).flatten(1)

    graph_module = torch.fx.symbolic_trace(Head())
    assert _call_function_targets(graph_module) == [ops.roi_align]
    x, rois = torch.rand(2, 4, 8, 8), torch.tensor(ROIS, dtype=torch.float)
    torch.testing.assert_close(graph_module(x, rois), Head()(x, rois))


def test_multilevel_roi_align_fx_trace():
    """Not a torchvision test (its MultiScaleRoIAlign is another API): eyecool's FPN pooler traces to one node
    too, whether the levels arrive as one traced list or level by level."""

    class Pooler(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = ops.MultiLevelRoIAlign(2, [1.0, 0.5])

        def forward(self, p2, p3, boxes):
            return self.pool([p2, p3], boxes)

    levels = [torch.rand(2, 3, 16, 16), torch.rand(2, 3, 8, 8)]
    rois = torch.tensor([[0, 0, 0, 15, 15], [1, 2, 2, 300, 300], [0, 1, 1, 3, 3]], dtype=torch.float)
    for model, args in ((Pooler(), (*levels, rois)), (ops.MultiLevelRoIAlign(2, [1.0, 0.5]), (levels, rois))):
        graph_module = torch.fx.symbolic_trace(model)
        assert _call_function_targets(graph_module) == [ops.multilevel_roi_align]
        torch.testing.assert_close(graph_module(*args), model(*args))


@needs_compiled
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("contiguous", [True, False])
def test_roi_align_backward(seed, contiguous):
    """TestRoIAlign.test_backward: gradcheck of the op, and of ``torch.jit.script(roi_align)`` (3 of its 10
    seeds)."""
    torch.manual_seed(seed)
    x = torch.rand(1, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    if not contiguous:
        x = x.permute(0, 1, 3, 2)
    rois = torch.tensor([[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [0, 2, 2, 4, 4]], dtype=torch.float64)
    assert gradcheck(lambda z: ops.RoIAlign((2, 2), spatial_scale=1, sampling_ratio=1)(z, rois), (x,), atol=1e-5)
    scripted = torch.jit.script(ops.roi_align)
    assert gradcheck(lambda z: scripted(z, rois, 2), (x,), atol=1e-5)


def test_roi_align_boxes_shape():
    """TestRoIAlign.test_boxes_shape: a ``[K, 4]`` tensor (or a list holding a ``[L, 3]`` one) raises
    AssertionError, as torchvision's ``torch._assert`` does; eyecool's BoxesShapeError is a ValueError too."""
    a = torch.linspace(1, 8 * 8, 8 * 8).reshape(1, 1, 8, 8)
    with pytest.raises(AssertionError):
        ops.roi_align(a, torch.tensor([[0, 0, 3, 3]], dtype=a.dtype), output_size=(2, 2))
    with pytest.raises(AssertionError):
        ops.roi_align(a, [torch.tensor([[0, 0, 3]], dtype=a.dtype)], output_size=(2, 2))
    with pytest.raises(ValueError, match=r"boxes must be a Tensor\[K, 5\]"):
        ops.roi_align(a, torch.tensor([[0, 0, 3, 3]], dtype=a.dtype), output_size=(2, 2))


@needs_compiled
def test_roi_align_jit_boxes_list():
    """TestRoIAlign.test_jit_boxes_list: a scripted module takes a list of ``[L, 4]`` boxes."""
    model = torch.jit.script(_PoolWrapper(ops.RoIAlign(output_size=[3, 3], spatial_scale=1.0, sampling_ratio=-1)))
    x = torch.rand(2, 1, 10, 10)
    roi = torch.tensor(ROIS, dtype=torch.float).t()  # [5, 4]: five boxes per image
    y = model(x, [roi, roi])
    assert y.shape == (10, 1, 3, 3)
    torch.testing.assert_close(y, torchvision.ops.roi_align(x, [roi, roi], [3, 3], 1.0, -1))


@needs_compiled
def test_roi_align_script_matches_eager_and_accepts_int_scale():
    """Scripted function and module give the eager results; ``spatial_scale=1`` (an int) scripts too."""
    x, rois = torch.rand(2, 3, 10, 10), torch.tensor(ROIS, dtype=torch.float)
    scripted = torch.jit.script(ops.roi_align)
    torch.testing.assert_close(scripted(x, rois, 3, 0.5, 2, True), ops.roi_align(x, rois, 3, 0.5, 2, True))
    module = torch.jit.script(ops.RoIAlign(3, 1, 2))
    torch.testing.assert_close(module(x, rois), ops.roi_align(x, rois, 3, 1.0, 2))
    buffer = io.BytesIO()  # a scripted module saves and loads (the op is found by its schema name)
    torch.jit.save(module, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x, rois), module(x, rois))
    with pytest.raises(torch.jit.Error, match=r"Tensor\[K, 5\]"):
        scripted(x, rois[:, 1:], 3)


def _make_rois(img_size, num_imgs, dtype, num_rois=1000, generator=None):
    """torchvision's TestRoIAlign._make_rois: integer boxes, never degenerate."""
    rois = torch.randint(0, img_size // 2, size=(num_rois, 5), generator=generator).to(dtype)
    rois[:, 0] = torch.randint(0, num_imgs, size=(num_rois,), generator=generator)
    rois[:, 3:] += rois[:, 1:3]
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("scale, zero_point", [(1, 0), (2, 10), (0.1, 50)])
@pytest.mark.parametrize("qdtype", [torch.qint8, torch.quint8, torch.qint32])
def test_qroialign(aligned, scale, zero_point, qdtype):
    """TestRoIAlign.test_qroialign: quantized roi_align against the float op on the dequantized inputs
    (torchvision's tolerance: under 5% of the values one quantization step off), and, stricter, the very same
    integers and quantization parameters as torchvision's QuantizedCPU kernel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(50, 100, size=(1, 2, 10, 10), generator=g).float()
    qx = torch.quantize_per_tensor(x, scale=scale, zero_point=zero_point, dtype=qdtype)
    qrois = torch.quantize_per_tensor(_make_rois(10, 1, torch.float, generator=g), scale=scale,
                                      zero_point=zero_point, dtype=qdtype)
    qy = ops.roi_align(qx, qrois, output_size=5, spatial_scale=1, sampling_ratio=-1, aligned=aligned)
    assert qy.is_quantized and qy.dtype == qdtype
    assert (qy.q_scale(), qy.q_zero_point()) == (qx.q_scale(), qx.q_zero_point())

    y = ops.roi_align(qx.dequantize(), qrois.dequantize(), output_size=5, spatial_scale=1, sampling_ratio=-1,
                      aligned=aligned)
    quantized_float_y = torch.quantize_per_tensor(y, scale=scale, zero_point=zero_point, dtype=qdtype)
    differ = qy.int_repr() != quantized_float_y.int_repr()
    assert differ.float().mean() < 0.05
    steps = (qy.dequantize() - quantized_float_y.dequantize()).abs()[differ]
    torch.testing.assert_close(steps, torch.full_like(steps, scale), rtol=1e-5, atol=1e-5)

    theirs = torchvision.ops.roi_align(qx, qrois, output_size=5, spatial_scale=1, sampling_ratio=-1,
                                       aligned=aligned)
    assert torch.equal(qy.int_repr(), theirs.int_repr())


@pytest.mark.parametrize("qdtype", [torch.qint8, torch.quint8, torch.qint32])
def test_qroialign_bit_identical_to_torchvision_on_harder_cases(qdtype):
    """Beyond torchvision's test: fractional scales (rounding everywhere), boxes partly outside the map, inverted
    boxes, fixed and adaptive grids of several sizes, spatial scales below 1, both box formats."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 13, 11, generator=g) * 40
    for scale, zero_point in [(0.37, 3), (0.9, 0), (0.13, 7)]:
        qx = torch.quantize_per_tensor(x, scale, zero_point, qdtype)
        corner = torch.rand(60, 2, generator=g) * 30 - 6
        boxes = torch.cat([corner, corner + torch.rand(60, 2, generator=g) * 15], dim=1)
        rois = torch.cat([torch.zeros(60, 1), boxes], dim=1)
        box_zero_point = 0 if qdtype == torch.quint8 else -3
        qrois = torch.quantize_per_tensor(rois, 0.25, box_zero_point, qdtype)
        for spatial_scale, sampling_ratio, aligned in [(1.0, -1, False), (0.5, 2, True), (0.37, -1, True),
                                                       (0.25, 3, False)]:
            ours = ops.roi_align(qx, qrois, (3, 4), spatial_scale, sampling_ratio, aligned)
            theirs = torchvision.ops.roi_align(qx, qrois, (3, 4), spatial_scale, sampling_ratio, aligned)
            assert torch.equal(ours.int_repr(), theirs.int_repr()), (scale, spatial_scale, sampling_ratio, aligned)
        qlist = [qrois[:, 1:]]
        assert torch.equal(ops.roi_align(qx, qlist, 2, 0.5).int_repr(),
                           torchvision.ops.roi_align(qx, qlist, 2, 0.5).int_repr())
        # Inverted boxes (x2 < x1): sampled as torchvision does in legacy mode and with a fixed grid ...
        inverted = torch.quantize_per_tensor(rois[:, [0, 3, 4, 1, 2]], 0.25, box_zero_point, qdtype)
        for sampling_ratio, aligned in [(-1, False), (2, True), (2, False)]:
            ours = ops.roi_align(qx, inverted, 3, 0.5, sampling_ratio, aligned)
            theirs = torchvision.ops.roi_align(qx, inverted, 3, 0.5, sampling_ratio, aligned)
            assert torch.equal(ours.int_repr(), theirs.int_repr()), (scale, sampling_ratio, aligned)
        # ... and with aligned adaptive sampling, where torchvision's CPU kernel refuses to allocate a negative
        # sampling grid, they have no sampling points and pool to 0 (the zero point), as the float op does.
        ours = ops.roi_align(qx, inverted, 3, 0.5, -1, True)
        assert torch.equal(ours.dequantize(), ops.roi_align(qx.dequantize(), inverted.dequantize(), 3, 0.5, -1, True))
        assert (ours.int_repr() == zero_point).all()
    if _extension.has_op("roi_align"):  # the raw op dispatches to the same QuantizedCPU kernel
        raw = torch.ops.eyecool.roi_align(qx, qrois, 0.5, 3, 4, 2, True)
        assert torch.equal(raw.int_repr(), torchvision.ops.roi_align(qx, qrois, (3, 4), 0.5, 2, True).int_repr())


def test_qroialign_random_configurations_bit_identical_to_torchvision():
    """Beyond torchvision's test: 40 seeded random calls (dtype, map size, scales and zero points of input and
    boxes, output size, spatial scale, sampling ratio, aligned), the same integers as torchvision's kernel. (A
    90 s run of this generator, 1167 calls, found no difference either.)"""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        qdtype = rng.choice([torch.quint8, torch.qint8, torch.qint32])
        height, width, channels = rng.randint(1, 20), rng.randint(1, 20), rng.randint(1, 3)
        zero_point = rng.randint(0, 20) if qdtype == torch.quint8 else rng.randint(-10, 10)
        qx = torch.quantize_per_tensor(torch.rand(1, channels, height, width, generator=g) * 60,
                                       rng.choice([1.0, 0.5, 0.37, 0.013, 2.7]), zero_point, qdtype)
        k = rng.randint(0, 30)
        corner = torch.rand(k, 2, generator=g) * (max(height, width) * 1.5) - 3
        size = torch.rand(k, 2, generator=g) * rng.choice([2, 10, 40])
        rois = torch.cat([torch.zeros(k, 1), corner, corner + size], dim=1)
        qrois = torch.quantize_per_tensor(rois, rng.choice([0.25, 0.5, 1.0, 0.1]),
                                          rng.randint(0, 3) if qdtype == torch.quint8 else 0, qdtype)
        args = ((rng.randint(1, 5), rng.randint(1, 5)), rng.choice([1.0, 0.5, 0.25, 0.125, 2.0]),
                rng.choice([-1, 0, 1, 2, 3]), rng.random() < 0.5)
        ours, theirs = ops.roi_align(qx, qrois, *args), torchvision.ops.roi_align(qx, qrois, *args)
        assert torch.equal(ours.int_repr(), theirs.int_repr()), (qdtype, qx.shape, k, args)


def test_qroi_align_multiple_images():
    """TestRoIAlign.test_qroi_align_multiple_images: a quantized batch of two images is refused; so is a float
    input with quantized boxes and the reverse (torchvision's ValueError message for the latter)."""
    x = torch.randint(50, 100, size=(2, 3, 10, 10)).float()
    qx = torch.quantize_per_tensor(x, scale=1, zero_point=0, dtype=torch.qint8)
    rois = _make_rois(img_size=10, num_imgs=2, dtype=torch.float, num_rois=10)
    qrois = torch.quantize_per_tensor(rois, scale=1, zero_point=0, dtype=torch.qint8)
    with pytest.raises(RuntimeError, match="Only one image per batch is allowed"):
        ops.roi_align(qx, qrois, output_size=5)
    with pytest.raises(ValueError, match="If input is quantized, rois must also be quantized."):
        ops.roi_align(qx[:1], rois, output_size=5)
    with pytest.raises(ValueError, match="the boxes are quantized .* but the input is not"):
        ops.roi_align(x[:1], qrois, output_size=5)


@pytest.mark.parametrize("boxes", ["tensor", "list", "tuple"])
def test_box_sequences(boxes):
    """TestBoxConversionToRoi: a Tensor[K, 5], a list and a tuple of Tensor[L, 4] give the same result."""
    x = torch.rand(2, 2, 110, 110)
    as_tensor = torch.tensor([[0, 0, 0, 100, 100], [1, 0, 0, 100, 100]], dtype=torch.float)
    per_image = [torch.tensor([[0, 0, 100, 100]], dtype=torch.float)] * 2
    given = {"tensor": as_tensor, "list": per_image, "tuple": tuple(per_image)}[boxes]
    torch.testing.assert_close(ops.roi_align(x, given, 2), ops.roi_align(x, as_tensor, 2))


# ---------------------------------------------------------------------------------------------------------------
# TestDeformConv


def _deform_args(batch_sz, contiguous, dtype=torch.float64, seed=0):
    """torchvision's TestDeformConv.get_fn_args: 6 -> 2 channels, 2 weight groups, 3 offset groups, a 3x2 kernel,
    stride (2, 1), padding (1, 0), dilation (2, 1) on a 5x4 input."""
    g = torch.Generator().manual_seed(seed)
    stride, pad, dilation = (2, 1), (1, 0), (2, 1)
    out_h = (5 + 2 * 1 - (2 * 2 + 1)) // 2 + 1
    out_w = (4 - 2) // 1 + 1

    def rand(*shape, normal=True):
        t = (torch.randn if normal else torch.rand)(*shape, generator=g, dtype=dtype)
        return t.requires_grad_()

    x = rand(batch_sz, 6, 5, 4, normal=False)
    offset = rand(batch_sz, 3 * 2 * 3 * 2, out_h, out_w)
    mask = rand(batch_sz, 3 * 3 * 2, out_h, out_w)
    weight = rand(2, 3, 3, 2)
    bias = rand(2)
    if not contiguous:
        with torch.no_grad():
            x = x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2).requires_grad_()
            offset = offset.permute(1, 3, 0, 2).contiguous().permute(2, 0, 3, 1).requires_grad_()
            mask = mask.permute(1, 3, 0, 2).contiguous().permute(2, 0, 3, 1).requires_grad_()
            weight = weight.permute(3, 2, 0, 1).contiguous().permute(2, 3, 1, 0).requires_grad_()
    return x, weight, offset, mask, bias, stride, pad, dilation


def _layer(groups=2):
    """torchvision's TestDeformConv.make_obj, on eyecool's layer (which also owns offset convolutions, unused
    when offsets are given)."""
    return ops.DeformConv2d(6, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=groups)


def test_deform_conv_is_leaf_node():
    """TestDeformConv.test_is_leaf_node, adapted: torchvision's feature extraction treats its own DeformConv2d as
    a leaf module, so it sees the three inputs and one node. eyecool's layer is traced through: the op is still
    one node (``layer.deform_conv2d``), next to the layer's weight and bias."""
    names = get_graph_node_names(_Wrapper3(_layer()))
    assert names[0] == names[1]
    assert names[0][:3] == ["a", "b", "c"] and names[0][-1] == "layer.deform_conv2d"
    assert sorted(names[0][3:-1]) == ["layer.layer_bias", "layer.layer_weight"]


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("batch_sz", [0, 33])
def test_deform_conv_forward(contiguous, batch_sz):
    """TestDeformConv.test_forward: ``layer(x, offset, mask)`` and ``layer(x, offset)`` (torchvision's call)."""
    x, _, offset, mask, _, stride, padding, dilation = _deform_args(batch_sz, contiguous)
    layer = _layer().double()
    for m in (mask, None):
        with torch.no_grad():
            res = layer(x, offset, m)
            expected = torchvision.ops.deform_conv2d(x, offset, layer.weight, layer.bias, stride, padding, dilation,
                                                     m)
        assert res.shape == (batch_sz, 2, 2, 3)
        torch.testing.assert_close(res, expected, rtol=1e-5, atol=1e-5)


def test_deform_conv_wrong_sizes():
    """TestDeformConv.test_wrong_sizes: the same error type as torchvision (RuntimeError) for offsets with too few
    channels and a mask with the wrong number of channels, led by torchvision's words for the problem it reports
    first (its calls use a float32 layer on float64 inputs, which both also refuse, later); then eyecool's
    message with the expected shape."""
    x, _, offset, mask, _, stride, padding, dilation = _deform_args(10, True)
    layer = ops.DeformConv2d(6, 2, (3, 2), stride=stride, padding=padding, dilation=dilation, groups=2)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="the shape of the offset"):
            layer(x, torch.rand_like(offset[:, :2]))
        with pytest.raises(RuntimeError, match=r"mask.shape\[1\] is not valid"):
            layer(x, offset, torch.rand_like(mask[:, :2]))
        layer = layer.double()
        with pytest.raises(RuntimeError, match=r"offset must have 2 \* offset_groups \* kh \* kw"):
            layer(x, torch.rand_like(offset[:, :2]))
        with pytest.raises(RuntimeError, match=r"mask.shape\[1\] is not valid: mask must have shape \(10, 18, 2, 3\)"):
            layer(x, offset, torch.rand_like(mask[:, :2]))
        with pytest.raises(ValueError, match="mask"):  # the same errors are ValueErrors for eyecool's callers
            layer(x, offset, torch.rand_like(mask[:, :2]))
        with pytest.raises(ValueError, match="a mask was given without offsets"):
            layer(x, None, mask)


@needs_compiled
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("batch_sz", [0, 3])
def test_deform_conv_backward(contiguous, batch_sz):
    """TestDeformConv.test_backward: gradcheck with and without mask, eager and through ``torch.jit.script``
    functions with torchvision's type comments (batch 3 instead of 33: the same code paths, faster)."""
    x, weight, offset, mask, bias, stride, padding, dilation = _deform_args(batch_sz, contiguous)

    def func(x_, offset_, mask_, weight_, bias_):
        return ops.deform_conv2d(x_, offset_, weight_, bias_, stride=stride, padding=padding, dilation=dilation,
                                 mask=mask_)

    def func_no_mask(x_, offset_, weight_, bias_):
        return ops.deform_conv2d(x_, offset_, weight_, bias_, stride=stride, padding=padding, dilation=dilation,
                                 mask=None)

    assert gradcheck(func, (x, offset, mask, weight, bias), nondet_tol=1e-5, fast_mode=True)
    assert gradcheck(func_no_mask, (x, offset, weight, bias), nondet_tol=1e-5, fast_mode=True)

    @torch.jit.script
    def script_func(x_, offset_, mask_, weight_, bias_, stride_, pad_, dilation_):
        # type:(Tensor, Tensor, Tensor, Tensor, Tensor, Tuple[int, int], Tuple[int, int], Tuple[int, int])->Tensor
        return ops.deform_conv2d(x_, offset_, weight_, bias_, stride=stride_, padding=pad_, dilation=dilation_,
                                 mask=mask_)

    @torch.jit.script
    def script_func_no_mask(x_, offset_, weight_, bias_, stride_, pad_, dilation_):
        # type:(Tensor, Tensor, Tensor, Tensor, Tuple[int, int], Tuple[int, int], Tuple[int, int])->Tensor
        return ops.deform_conv2d(x_, offset_, weight_, bias_, stride=stride_, padding=pad_, dilation=dilation_,
                                 mask=None)

    assert gradcheck(lambda z, off, msk, wei, bi: script_func(z, off, msk, wei, bi, stride, padding, dilation),
                     (x, offset, mask, weight, bias), nondet_tol=1e-5, fast_mode=True)
    assert gradcheck(lambda z, off, wei, bi: script_func_no_mask(z, off, wei, bi, stride, padding, dilation),
                     (x, offset, weight, bias), nondet_tol=1e-5, fast_mode=True)
    with torch.no_grad():
        torch.testing.assert_close(script_func(x, offset, mask, weight, bias, stride, padding, dilation),
                                   func(x, offset, mask, weight, bias))


@needs_compiled
@pytest.mark.parametrize("modulated", [False, True])
def test_deform_conv_forward_scriptability(modulated):
    """TestDeformConv.test_forward_scriptability (torchvision issue 4078): the layer scripts; here also with
    eyecool's mask convolution and no bias, and the scripted layer computes what the eager one does, both with
    its own offsets and with given ones."""
    torch.jit.script(ops.DeformConv2d(in_channels=8, out_channels=8, kernel_size=3))
    layer = ops.DeformConv2d(4, 4, 3, padding=1, modulated=modulated, bias=not modulated)
    with torch.no_grad():
        layer.offset_conv.weight.normal_(0, 0.3)
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 4, 6, 6)
    offset = torch.randn(2, 18, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), layer(x))
        torch.testing.assert_close(scripted(x, offset), layer(x, offset))


def test_deform_conv_torch_fx_trace():
    """symbolic_trace of a model whose DeformConv2d predicts its offsets: the offset and mask convolutions and one
    deform_conv2d node; the traced model computes the same."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.dcn = ops.DeformConv2d(4, 3, 3, padding=1, modulated=True)

        def forward(self, x):
            return torch.relu(self.dcn(x))

    model = Head()
    with torch.no_grad():
        model.dcn.offset_conv.weight.normal_(0, 0.3)
    graph_module = torch.fx.symbolic_trace(model)
    assert _call_function_targets(graph_module).count(ops.deform_conv2d) == 1
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x))
    # As the root module: torchvision's call (offset and mask as inputs), or the self-predicting form with
    # concrete_args (DeformConv2d's docstring).
    layer = model.dcn
    offset, mask = layer.offsets_and_mask(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(layer)(x, offset, mask), layer(x, offset, mask))
        traced = torch.fx.symbolic_trace(layer, concrete_args={"offset": None, "mask": None})
        torch.testing.assert_close(traced(x), layer(x))


def test_quantized_and_scripted_without_the_compiled_extension():
    """With ``_C`` unimportable: quantized roi_align still gives torchvision's integers (the wrapper calls the
    Python kernel itself), and scripted roi_align / deform_conv2d say that they need the extension."""
    code = (
        "import sys, warnings; sys.modules['eyecool_ext._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import torch, torchvision, eyecool_ext\n"
        "assert not eyecool_ext.compiled()\n"
        "qx = torch.quantize_per_tensor(torch.rand(1, 2, 9, 9) * 9, 0.3, 4, torch.quint8)\n"
        "qr = torch.quantize_per_tensor(torch.tensor([[0, 1.0, 1.5, 7.25, 6.0]]), 0.25, 0, torch.quint8)\n"
        "ours = eyecool_ext.ops.roi_align(qx, qr, 3, 0.5, -1, True)\n"
        "assert torch.equal(ours.int_repr(), torchvision.ops.roi_align(qx, qr, 3, 0.5, -1, True).int_repr())\n"
        "for fn, args in ((eyecool_ext.ops.roi_align, (torch.rand(1, 1, 4, 4), torch.zeros(1, 5), 2)),\n"
        "                 (eyecool_ext.ops.deform_conv2d, (torch.rand(1, 1, 3, 3), torch.zeros(1, 2, 3, 3),\n"
        "                                                  torch.rand(1, 1, 1, 1)))):\n"
        "    try:\n"
        "        torch.jit.script(fn)(*args)\n"
        "    except Exception as e:\n"
        "        assert 'needs the compiled extension' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('scripted call ran without the extension')\n"
        "print('fallback ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fallback ok" in res.stdout

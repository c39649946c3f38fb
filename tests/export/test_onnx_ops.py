"""Every ONNX-mapped eyecool op, exported inside a small user module with both of torch's exporters and run in
onnxruntime on the CPU, against the eager eyecool op (which the op tests tie to torchvision / plain PyTorch)."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import eyecool_ext
from eyecool_ext import ops

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
eyecool_onnx = pytest.importorskip("eyecool_ext.onnx")
pytestmark = pytest.mark.skipif(not eyecool_ext.compiled(), reason="compiled extension not loaded")

EXPORTERS = ["torchscript", "dynamo"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _onnxscript_or_skip(exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")


def run_onnx(module, args, tmp_path, exporter, **kwargs):
    """Export ``module`` on ``args`` and return (onnxruntime session, its input names)."""
    _onnxscript_or_skip(exporter)
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the wrappers' shape checks
        eyecool_onnx.export(module.eval(), args, path, dynamo=exporter == "dynamo", **kwargs)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session, [i.name for i in session.get_inputs()]


def ort_outputs(session, names, args):
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})


def assert_matches(onnx_out, torch_out, atol=1e-5, rtol=1e-4):
    expected = torch_out.detach().numpy()
    assert onnx_out.shape == expected.shape
    assert np.abs(expected).max() > 0  # a non-trivial comparison
    np.testing.assert_allclose(onnx_out, expected, atol=atol, rtol=rtol)


def random_rois(num, batch, extent, max_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num, 2, generator=g) * extent
    wh = torch.rand(num, 2, generator=g) * max_size + 1
    index = torch.randint(0, batch, (num, 1), generator=g).float()
    return torch.cat([index, xy, xy + wh], 1)


class DeformBlock(torch.nn.Module):
    """A user's module: the public ``DeformConv2d`` layer (offsets from its own convolution) and a ReLU."""

    def __init__(self, modulated, groups, offset_groups, stride, bias=True):
        super().__init__()
        self.layer = ops.DeformConv2d(4, 6, 3, stride=stride, padding=1, dilation=1, groups=groups,
                                      offset_groups=offset_groups, modulated=modulated, bias=bias)
        torch.nn.init.normal_(self.layer.offset_conv.weight, std=0.5)  # offsets of about a pixel
        if modulated:
            torch.nn.init.normal_(self.layer.mask_conv.weight, std=0.5)

    def forward(self, x):
        return torch.relu(self.layer(x))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("modulated,groups,offset_groups,stride,bias", [
    (False, 1, 1, 1, True), (True, 1, 1, 1, True), (True, 2, 2, 2, False), (False, 1, 2, 1, False)])
def test_deform_conv2d(tmp_path, exporter, modulated, groups, offset_groups, stride, bias):
    torch.manual_seed(0)
    module = DeformBlock(modulated, groups, offset_groups, stride, bias)
    x = torch.randn(2, 4, 9, 11)
    session, names = run_onnx(module, (x,), tmp_path, exporter)
    assert_matches(ort_outputs(session, names, [x])[0], module(x))
    assert any(n.op_type == "DeformConv" for n in _graph(tmp_path).node)


def _graph(tmp_path):
    import onnx

    return onnx.load(str(tmp_path / "m.onnx")).graph


class RoIAlignModule(torch.nn.Module):
    def __init__(self, aligned, sampling_ratio):
        super().__init__()
        self.aligned, self.sampling_ratio = aligned, sampling_ratio

    def forward(self, x, rois):
        return ops.roi_align(x, rois, (5, 4), 0.25, self.sampling_ratio, self.aligned)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 2])
def test_roi_align(tmp_path, exporter, aligned, sampling_ratio):
    x = torch.randn(2, 3, 16, 20)
    rois = random_rois(9, 2, 60, 40)
    rois[0, 3:] = rois[0, 1:3] + 0.3  # a box smaller than a pixel: aligned=False makes it 1x1
    module = RoIAlignModule(aligned, sampling_ratio)
    session, names = run_onnx(module, (x, rois), tmp_path, exporter)
    assert_matches(ort_outputs(session, names, [x, rois])[0], module(x, rois))


class MultiLevelModule(torch.nn.Module):
    def forward(self, p2, p3, p4, p5, rois):
        return ops.multilevel_roi_align([p2, p3, p4, p5], rois, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 0, True, 56.0, 4)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_multilevel_roi_align_assigns_levels_in_onnx(tmp_path, exporter):
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 5, 128 // s, 128 // s, generator=g) for s in (4, 8, 16, 32)]
    rois = random_rois(12, 2, 60, 200)
    # Boxes of every level, and exactly on a level boundary (sqrt(area) = 112 -> level 5 at canonical 56 / 4).
    rois[0, 1:] = torch.tensor([0.0, 0.0, 112.0, 112.0])
    rois[1, 1:] = torch.tensor([3.0, 4.0, 9.0, 8.0])
    level = eyecool_ext.reference.fpn_level_index(rois, 2, 5, 56.0, 4)
    assert set(level.tolist()) == {0, 1, 2, 3}
    module = MultiLevelModule()
    session, names = run_onnx(module, (*feats, rois), tmp_path, exporter)
    assert_matches(ort_outputs(session, names, [*feats, rois])[0], module(*feats, rois))
    assert not any(n.op_type.startswith("eyecool") or n.domain.startswith("eyecool") for n in _graph(tmp_path).node)


def test_multilevel_roi_align_any_number_of_rois(tmp_path):
    """Exported with 12 ROIs, run with 0 and 30: the level routing is data-dependent ONNX, not baked in."""
    feats = [torch.randn(1, 4, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    module = MultiLevelModule()
    session, names = run_onnx(module, (*feats, random_rois(12, 1, 30, 100)), tmp_path, "torchscript",
                              input_names=["p2", "p3", "p4", "p5", "rois"], dynamic_axes={"rois": [0]})
    for num in (0, 30):
        rois = random_rois(num, 1, 30, 100, seed=num)
        out = ort_outputs(session, names, [*feats, rois])[0]
        expected = module(*feats, rois).numpy()
        assert out.shape == expected.shape == (num, 4, 7, 7)
        np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-4)


class FusionModule(torch.nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode

    def forward(self, sem, a, b, c, d):
        return tuple(ops.fg_fusion(sem, [a, b, c, d], 3, self.mode))


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("mode", ["logit", "prob"])
def test_fg_fusion_composition(tmp_path, exporter, mode):
    """Levels of the map's size, halved, and of sizes that do not divide it (overlapping adaptive bins)."""
    g = torch.Generator().manual_seed(2)
    sem = torch.randn(2, 7, 20, 28, generator=g) * 3
    levels = [torch.randn(2, 3, h, w, generator=g) for h, w in ((20, 28), (10, 14), (3, 5), (7, 9))]
    module = FusionModule(mode)
    session, names = run_onnx(module, (sem, *levels), tmp_path, exporter)
    for got, want in zip(ort_outputs(session, names, [sem, *levels]), module(sem, *levels)):
        assert_matches(got, want)


def test_adaptive_pool_matrix_is_adaptive_avg_pool():
    x = torch.randn(3, 23, 17, dtype=torch.float64)
    for out_h, out_w in ((23, 17), (5, 4), (7, 9), (1, 1), (30, 20)):
        ph = eyecool_onnx.adaptive_pool_matrix(23, out_h).double()
        pw = eyecool_onnx.adaptive_pool_matrix(17, out_w).double()
        torch.testing.assert_close(ph @ x @ pw.t(), torch.nn.functional.adaptive_avg_pool2d(x, (out_h, out_w)),
                                   atol=1e-6, rtol=1e-6)


def test_plain_torch_onnx_export_after_import_eyecool_ext(tmp_path):
    """The issue's failure (``UnsupportedOperatorError ... eyecool::deform_conv2d``) is gone for a user who only
    imports ``eyecool_ext`` and calls ``torch.onnx.export`` (TorchScript exporter), in a fresh interpreter."""
    script = (
        "import sys, warnings, torch, eyecool_ext\n"
        "warnings.simplefilter('ignore')\n"
        "layer = eyecool_ext.ops.DeformConv2d(4, 6, 3, padding=1, modulated=True).eval()\n"
        "torch.nn.init.normal_(layer.offset_conv.weight, std=0.5)\n"
        "x = torch.randn(1, 4, 8, 8)\n"
        "torch.onnx.export(layer, (x,), sys.argv[1], dynamo=False, opset_version=19)\n"
        "torch.save((x, layer(x).detach()), sys.argv[1] + '.pt')\n")
    path = str(tmp_path / "m.onnx")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")] + sys.path))
    result = subprocess.run([sys.executable, "-c", script, path], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    x, expected = torch.load(path + ".pt")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert_matches(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected)
    assert any(n.op_type == "DeformConv" for n in _graph(tmp_path).node)


def test_opset_below_deform_conv_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset >= 19"):
        eyecool_onnx.export(DeformBlock(False, 1, 1, 1), (torch.randn(1, 4, 8, 8),), str(tmp_path / "m.onnx"),
                            opset_version=17)

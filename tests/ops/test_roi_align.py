"""roi_align and multilevel_roi_align against torchvision and the pure-PyTorch reference."""
import subprocess
import sys

import pytest
import torch
import torchvision

from eyecool_ext import ops, reference
from op_tester import DEVICES, LAYOUTS, assert_close, needs_compiled, to_layout

FLOAT_DTYPES = [torch.float32, torch.float64]


def random_rois(num, batch, height, width, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    """[num, 5] ROIs in image coordinates (the map is height x width at ``scale``), some partly outside."""
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = height / scale, width / scale
    xy = torch.rand(num, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.2 - torch.tensor([img_w, img_h]) * 0.1
    wh = torch.rand(num, 2, generator=g) * torch.tensor([img_w, img_h]) * 0.6 + 0.5
    idx = torch.randint(0, batch, (num, 1), generator=g).float()
    return torch.cat([idx, xy, xy + wh], dim=1).to(dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_forward_matches_torchvision_and_reference(device, dtype, layout, aligned, sampling_ratio):
    x = to_layout(torch.randn(2, 5, 17, 23, dtype=dtype, device=device), layout)
    rois = random_rois(40, 2, 17, 23, dtype, device, scale=0.5)
    out = ops.roi_align(x, rois, (5, 4), 0.5, sampling_ratio, aligned)
    expected = torchvision.ops.roi_align(x, rois, (5, 4), 0.5, sampling_ratio, aligned)
    assert out.shape == (40, 5, 5, 4)
    assert_close(out, expected)
    assert_close(reference.roi_align(x, rois, (5, 4), 0.5, sampling_ratio, aligned), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision kernels are CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_half_precision_cuda(dtype):
    x = torch.randn(2, 8, 20, 20, device="cuda")
    rois = random_rois(30, 2, 20, 20, torch.float32, "cuda")
    out = ops.roi_align(x.to(dtype), rois.to(dtype), 7, 1.0, -1, True)
    assert_close(out.float(), ops.roi_align(x, rois, 7, 1.0, -1, True), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_list_of_boxes_equals_rois_tensor(device):
    x = torch.randn(3, 4, 16, 16, device=device)
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0]], device=device), torch.zeros(0, 4, device=device),
             torch.tensor([[0.0, 0.0, 15.0, 15.0], [3.5, 3.5, 7.25, 9.0]], device=device)]
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 12.0], [2, 0.0, 0.0, 15.0, 15.0], [2, 3.5, 3.5, 7.25, 9.0]],
                        device=device)
    assert_close(ops.roi_align(x, boxes, 3, 1.0, 2, True), ops.roi_align(x, rois, 3, 1.0, 2, True))
    assert_close(ops.roi_align(x, boxes, 3, 1.0, 2, True), torchvision.ops.roi_align(x, boxes, 3, 1.0, 2, True))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_boxes(device):
    x = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    out = ops.roi_align(x, torch.zeros(0, 5, device=device), (2, 3))
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("device", DEVICES)
def test_boxes_outside_the_image(device):
    x = torch.randn(1, 2, 10, 10, device=device)
    rois = torch.tensor([[0, -30.0, -30.0, -15.0, -12.0],  # entirely outside: zeros
                         [0, -4.0, -3.0, 5.0, 6.0],        # partly outside
                         [0, 8.0, 8.0, 25.0, 30.0]], device=device)
    for aligned in (False, True):
        out = ops.roi_align(x, rois, 4, 1.0, -1, aligned)
        assert_close(out, torchvision.ops.roi_align(x, rois, 4, 1.0, -1, aligned))
    assert torch.count_nonzero(ops.roi_align(x, rois[:1], 4, 1.0, -1, True)) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_inverted_boxes_are_defined(device):
    """x2 < x1: adaptive aligned sampling has no points and pools to 0; fixed sampling follows torchvision."""
    x = torch.randn(1, 3, 12, 12, device=device, requires_grad=True)
    rois = torch.tensor([[0, 9.0, 9.0, 1.0, 2.0], [0, 6.0, 2.0, 4.0, 10.0]], device=device)
    out = ops.roi_align(x, rois, 3, 1.0, -1, True)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    fixed = ops.roi_align(x, rois, 3, 1.0, 2, True)
    assert_close(fixed, torchvision.ops.roi_align(x, rois, 3, 1.0, 2, True))
    legacy = ops.roi_align(x, rois, 3, 1.0, -1, False)  # legacy mode clamps the extent to 1
    assert_close(legacy, torchvision.ops.roi_align(x, rois, 3, 1.0, -1, False))


@pytest.mark.parametrize("device", DEVICES)
def test_large_boxes_skip_samples_off_the_map_exactly(device):
    """Boxes far larger than the map: only on-map samples are visited, with torchvision's result."""
    x = torch.randn(1, 3, 6, 7, device=device, requires_grad=True)
    rois = torch.tensor([[0, -300.0, -250.0, 310.0, 280.0], [0, 2.0, -500.0, 5.0, 400.0]], device=device)
    grad = torch.randn(2, 3, 2, 2, device=device)
    out = ops.roi_align(x, rois, 2, 1.0, 0, True)
    (g,) = torch.autograd.grad(out, x, grad)
    xt = x.detach().clone().requires_grad_()
    expected = torchvision.ops.roi_align(xt, rois, 2, 1.0, 0, True)
    expected.backward(grad)
    assert_close(out, expected)
    assert_close(g, xt.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_huge_and_nan_boxes_finish_and_stay_finite(device):
    """A 10^8-pixel box has an adaptive grid of ~10^7 x 10^7 points: still instant. NaN boxes pool to 0."""
    x = torch.randn(1, 2, 8, 8, device=device, requires_grad=True)
    nan = float("nan")
    rois = torch.tensor([[0, -1e8, -1e8, 1e8, 1e8], [0, nan, 0.0, 4.0, 4.0], [0, 0.0, 0.0, float("inf"), 4.0]],
                        device=device)
    out = ops.roi_align(x, rois, 3, 1.0, 0, True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
def test_backward_matches_torchvision(device, layout, aligned):
    base = torch.randn(2, 6, 15, 19, device=device)
    rois = random_rois(25, 2, 15, 19, torch.float32, device, scale=0.5)
    grad = torch.randn(25, 6, 7, 7, device=device)
    x = to_layout(base.clone(), layout).requires_grad_()
    ops.roi_align(x, rois, 7, 0.5, -1, aligned).backward(grad)
    xt = base.detach().clone().requires_grad_()
    torchvision.ops.roi_align(xt, rois, 7, 0.5, -1, aligned).backward(grad)
    assert_close(x.grad, xt.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_gradcheck(device, seed, aligned):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64, device=device, requires_grad=True)
    rois = random_rois(6, 2, 9, 11, torch.float64, device, seed=seed)
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (3, 2), 1.0, 2, aligned), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, (2, 2), 1.0, -1, aligned), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic_on_cpu_threads(device):
    if device != "cpu":
        pytest.skip("the CPU backward partitions by channel; CUDA uses atomics")
    x = torch.randn(2, 64, 20, 20, requires_grad=True)
    rois = random_rois(200, 2, 20, 20)
    grads = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            x.grad = None
            ops.roi_align(x, rois, 7, 1.0, -1, True).sum().backward()
            grads.append(x.grad.clone())
        finally:
            torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1])


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 10, 10, device=device, requires_grad=True)
    rois = random_rois(5, 2, 10, 10, device=device)
    torch.library.opcheck(torch.ops.eyecool.roi_align.default, (x, rois, 0.5, 3, 3, 2, True))
    grad = torch.randn(5, 3, 3, 3, device=device)
    torch.library.opcheck(torch.ops.eyecool._roi_align_backward.default,
                          (grad, rois, 0.5, 3, 3, 2, 3, 10, 10, 2, True))
    feats = [torch.randn(2, 3, 16, 16, device=device, requires_grad=True),
             torch.randn(2, 3, 8, 8, device=device, requires_grad=True)]
    torch.library.opcheck(torch.ops.eyecool.multilevel_roi_align.default,
                          (feats, random_rois(6, 2, 16, 16, device=device, scale=0.25), 2, 2, [0.25, 0.125], 0,
                           True, 224.0, 4))


@needs_compiled
def test_torch_compile_fullgraph():
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    rois = random_rois(7, 2, 12, 12)

    def f(t, r):
        return ops.roi_align(t, r, 3, 1.0, -1, True).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, rois)
    out.backward()
    g = x.grad.clone()
    x.grad = None
    f(x, rois).backward()
    assert_close(out, f(x, rois))
    assert_close(g, x.grad)


def test_bad_input_messages():
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="boxes must be a Tensor\\[K, 5\\]"):
        ops.roi_align(x, torch.zeros(3, 4), 2)
    with pytest.raises(ValueError, match="boxes\\[0\\] must be a Tensor\\[L, 4\\]"):
        ops.roi_align(x, [torch.zeros(3, 5)], 2)
    with pytest.raises(ValueError, match="output_size must be positive"):
        ops.roi_align(x, torch.zeros(1, 5), (0, 2))
    with pytest.raises((RuntimeError, ValueError), match="floating point"):
        ops.roi_align(x.long(), torch.zeros(1, 5).long(), 2)
    with pytest.raises((RuntimeError, ValueError), match="same dtype"):
        ops.roi_align(x, torch.zeros(1, 5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="same device"):
        ops.roi_align(x, torch.zeros(1, 5, device="meta"), 2)
    with pytest.raises(ValueError, match="powers of 2"):
        ops.multilevel_roi_align([x], torch.zeros(1, 5), 2, [0.3])


@pytest.mark.cpu_kernels_only("the CUDA kernels pool zeros for an invalid batch index (checking would synchronise)")
def test_invalid_batch_index_raises_on_cpu():
    x = torch.randn(1, 2, 8, 8)
    with pytest.raises((RuntimeError, ValueError), match="batch index"):
        ops.roi_align(x, torch.tensor([[1.0, 0, 0, 4, 4]]), 2)


def test_module_wrappers():
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]])
    m = ops.RoIAlign((2, 2), 1.0, 2, aligned=True)
    assert "RoIAlign(output_size=(2, 2)" in repr(m)
    assert_close(m(x, rois), torchvision.ops.RoIAlign((2, 2), 1.0, 2, aligned=True)(x, rois))
    pooler = ops.MultiLevelRoIAlign(2, [1.0, 0.5])
    assert pooler([x, x[..., ::2, ::2]], rois).shape == (1, 2, 2, 2)


def pyramid(device, dtype=torch.float32, channels=4):
    sizes = [(32, 40), (16, 20), (8, 10), (4, 5)]
    return [torch.randn(2, channels, h, w, device=device, dtype=dtype) for h, w in sizes], [1 / 4, 1 / 8, 1 / 16, 1 / 32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_multilevel_matches_per_level_torchvision(device, dtype):
    feats, scales = pyramid(device, dtype)
    rois = random_rois(60, 2, 128, 160, dtype, device)
    for i, size in enumerate([150.0, 300.0, 500.0]):  # reach the coarser levels too
        rois[2 * i:2 * i + 2, 3:] = rois[2 * i:2 * i + 2, 1:3] + size
    out = ops.multilevel_roi_align(feats, rois, 7, scales, 0, True)
    level = reference.fpn_level_index(rois, 2, 5)
    assert set(level.tolist()) == {0, 1, 2, 3}, "the test should cover every level"
    expected = torch.zeros_like(out)
    for i, (f, s) in enumerate(zip(feats, scales)):
        sel = level == i
        expected[sel] = torchvision.ops.roi_align(f, rois[sel], 7, s, 0, True)
    assert_close(out, expected)
    assert_close(reference.multilevel_roi_align(feats, rois, 7, scales), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_multilevel_backward_matches_per_level_torchvision(device):
    feats, scales = pyramid(device)
    rois = random_rois(50, 2, 128, 160, device=device)
    grad = torch.randn(50, 4, 7, 7, device=device)
    ours = [f.clone().requires_grad_() for f in feats]
    ops.multilevel_roi_align(ours, rois, 7, scales).backward(grad)
    theirs = [f.clone().requires_grad_() for f in feats]
    level = reference.fpn_level_index(rois, 2, 5)
    out = torch.zeros(50, 4, 7, 7, device=device)
    for i, (f, s) in enumerate(zip(theirs, scales)):
        sel = level == i
        out[sel] = torchvision.ops.roi_align(f, rois[sel], 7, s, 0, True)
    out.backward(grad)
    for a, b in zip(ours, theirs):
        assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_multilevel_gradcheck(device):
    feats = [torch.randn(1, 2, 8, 8, dtype=torch.float64, device=device, requires_grad=True),
             torch.randn(1, 2, 4, 4, dtype=torch.float64, device=device, requires_grad=True)]
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [0, 0.5, 0.0, 30.0, 31.0]], dtype=torch.float64, device=device)
    fn = lambda a, b: ops.multilevel_roi_align([a, b], rois, 2, [0.25, 0.125], 2, True, 16.0, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(feats))


def test_level_assignment_formula():
    rois = torch.tensor([[0, 0, 0, 224.0, 224.0], [0, 0, 0, 112.0, 112.0], [0, 0, 0, 447.0, 448.0],
                         [0, 0, 0, 10.0, 10.0], [0, 0, 0, 2000.0, 2000.0], [0, 5, 5, 1.0, 9.0]])
    # 224 -> level 4, 112 -> 3, just under 448 -> 4, tiny -> clamped to 2, huge -> clamped to 5, NaN -> 2.
    assert reference.fpn_level_index(rois, 2, 5).tolist() == [2, 1, 2, 0, 3, 0]


def test_fallback_when_extension_cannot_load():
    """With _C unimportable, eyecool_ext still imports, warns once, and the ops give the reference result."""
    code = (
        "import sys, warnings; sys.modules['eyecool_ext._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import eyecool_ext, torch, torchvision\n"
        "assert not eyecool_ext.compiled()\n"
        "assert any('could not be loaded' in str(x.message) and 'make install' in str(x.message) for x in w)\n"
        "x = torch.randn(1, 2, 8, 8); r = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0]])\n"
        "torch.testing.assert_close(eyecool_ext.ops.roi_align(x, r, 2, 1.0, 2, True),"
        " torchvision.ops.roi_align(x, r, 2, 1.0, 2, True))\n"
        "print('fallback ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fallback ok" in res.stdout

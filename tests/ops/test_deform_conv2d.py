"""deform_conv2d and DeformConv2d against torchvision and the pure-PyTorch reference."""
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from eyecool_ext import ops, reference
from op_tester import DEVICES, assert_close, needs_compiled, to_layout


def output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def make_inputs(batch=2, in_channels=4, out_channels=6, size=(7, 8), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=1, offset_groups=1, masked=True, offset_scale=2.0, dtype=torch.float64,
                device="cpu", seed=0):
    """(input, offset, weight, bias, mask) for one call; offsets of a few pixels so that samples cross cells."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = kernel
    out_h = output_size(size[0], kh, stride[0], padding[0], dilation[0])
    out_w = output_size(size[1], kw, stride[1], padding[1], dilation[1])

    def rand(*shape, scale=1.0, uniform=False):
        t = torch.rand(*shape, generator=g) if uniform else torch.randn(*shape, generator=g) * scale
        return t.to(dtype=dtype, device=device)

    x = rand(batch, in_channels, *size)
    offset = rand(batch, 2 * offset_groups * kh * kw, out_h, out_w, scale=offset_scale)
    weight = rand(out_channels, in_channels // groups, kh, kw)
    bias = rand(out_channels)
    mask = rand(batch, offset_groups * kh * kw, out_h, out_w, uniform=True) if masked else None
    return x, offset, weight, bias, mask


# (name, keyword arguments of make_inputs): stride, padding, dilation, non-square kernels, weight and offset
# groups (also offset groups that straddle weight groups), v1 and v2, batch 0, 1 and 3.
CONFIGS = {
    "v2_basic": dict(),
    "v1_basic": dict(masked=False),
    "stride2_pad0": dict(stride=(2, 2), padding=(0, 0), size=(9, 9)),
    "anisotropic": dict(kernel=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), size=(8, 9)),
    "kernel_1x3_dilated": dict(kernel=(1, 3), padding=(0, 2), dilation=(1, 2)),
    "weight_groups": dict(in_channels=6, out_channels=4, groups=2),
    "offset_groups": dict(in_channels=6, offset_groups=3, masked=False),
    "groups_and_offset_groups": dict(in_channels=6, out_channels=6, groups=3, offset_groups=2),
    "batch0": dict(batch=0),
    "batch1": dict(batch=1),
    "batch3_v1": dict(batch=3, masked=False),
    "wide_channels": dict(in_channels=150, out_channels=5, offset_groups=2, size=(5, 6)),
    # The CPU GEMM (csrc/cpu/gemm.cpp) in float32: 20 output channels per group (partial 32- and 16-wide
    # panels), backward blocks of 20 channels (180 GEMM columns), 17x19 = 323 pixels (two column tiles, the
    # second partial, and partial 12- and 6-row tiles).
    "gemm_partial_tiles": dict(batch=2, in_channels=40, out_channels=40, groups=2, size=(17, 19)),
}


def torchvision_call(x, offset, weight, bias, mask, cfg):
    return torchvision.ops.deform_conv2d(x, offset, weight, bias, cfg.get("stride", (1, 1)), cfg.get("padding", (1, 1)),
                                         cfg.get("dilation", (1, 1)), mask)


def our_call(fn, x, offset, weight, bias, mask, cfg):
    return fn(x, offset, weight, bias, cfg.get("stride", (1, 1)), cfg.get("padding", (1, 1)), cfg.get("dilation", (1, 1)),
              mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_torchvision_and_reference(device, dtype, name):
    cfg = CONFIGS[name]
    x, offset, weight, bias, mask = make_inputs(dtype=dtype, device=device, **cfg)
    expected = torchvision_call(x, offset, weight, bias, mask, cfg)
    assert_close(our_call(ops.deform_conv2d, x, offset, weight, bias, mask, cfg), expected)
    assert_close(our_call(reference.deform_conv2d, x, offset, weight, bias, mask, cfg), expected)
    assert_close(our_call(ops.deform_conv2d, x, offset, weight, None, mask, cfg),
                 torchvision_call(x, offset, weight, None, mask, cfg))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_backward_matches_torchvision(device, dtype, name):
    """float64 runs at::mm on the CPU, float32 the CPU's own GEMM (when the CPU has AVX2); torchvision computes
    in float64 in both cases, so the float32 gradients meet the float32 tolerance against exact values."""
    cfg = CONFIGS[name]
    tensors = [t for t in make_inputs(device=device, **cfg)]
    ours = [t.to(dtype, copy=True).requires_grad_() if t is not None else None for t in tensors]
    theirs = [t.clone().requires_grad_() if t is not None else None for t in tensors]
    out = our_call(ops.deform_conv2d, *ours, cfg)
    grad = torch.randn_like(out, dtype=torch.float64)
    out.backward(grad.to(dtype))
    torchvision_call(*theirs, cfg).backward(grad)
    # float32 sums over up to ~1400 products (wide_channels): the float32 tolerance, scaled for that depth.
    loose = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else {}
    for label, a, b in zip(["input", "offset", "weight", "bias", "mask"], ours, theirs):
        if a is not None:
            assert_close(a.grad, b.grad.to(dtype), msg=lambda m, label=label: f"grad of {label}: {m}", **loose)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "strided_slice"])
def test_memory_layouts(device, layout):
    x, offset, weight, bias, mask = make_inputs(dtype=torch.float32, device=device)
    expected = ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    out = ops.deform_conv2d(to_layout(x, layout), to_layout(offset, layout), weight, bias, 1, 1, 1,
                            to_layout(mask, layout))
    assert_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck(device, masked, seed):
    x, offset, weight, bias, mask = make_inputs(batch=2, in_channels=4, out_channels=2, size=(5, 4), kernel=(2, 3),
                                                stride=(1, 1), padding=(1, 1), groups=2, offset_groups=2,
                                                masked=masked, offset_scale=1.5, device=device, seed=seed)
    inputs = [t.requires_grad_() for t in (x, offset, weight, bias) + ((mask,) if masked else ())]

    def fn(x, offset, weight, bias, mask=None):
        return ops.deform_conv2d(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)

    # One seed in full mode (every Jacobian entry), the other in fast mode (random projections) to stay quick.
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=seed > 0)


@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_float32_gemm_path(masked):
    """gradcheck of the float32 path (the CPU's own GEMM in the forward and both backward GEMMs) with respect to
    the inputs the op is linear in (input, weight, bias, mask: central differences are exact there up to
    float32 rounding); the offsets, where a float32 step could cross a cell edge, are held fixed (their float32
    gradient is compared with torchvision's above). 20 output channels and 7x9 pixels: partial tiles."""
    x, offset, weight, bias, mask = make_inputs(batch=1, in_channels=6, out_channels=20, size=(7, 9), groups=2,
                                                masked=masked, dtype=torch.float32, seed=4)
    inputs = [t.requires_grad_() for t in (x, weight, bias) + ((mask,) if masked else ())]

    def fn(x, weight, bias, mask=None):
        return ops.deform_conv2d(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-2, atol=2e-3, rtol=2e-3, fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_samples_outside_the_image(device):
    """Offsets far outside give zeros (bias only) and no gradient; partly outside ones match torchvision."""
    cfg = dict(size=(6, 6))
    x, offset, weight, bias, mask = make_inputs(device=device, **cfg)
    far = torch.full_like(offset, 50.0)
    far[:, 1::2] = -50.0
    x.requires_grad_()
    far.requires_grad_()
    out = ops.deform_conv2d(x, far, weight, bias, 1, 1, 1, mask)
    assert_close(out, bias.view(1, -1, 1, 1).expand_as(out))
    out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(far.grad) == 0
    for scale in (4.0, 8.0):  # many samples straddle the border band (-1, 0) and (H - 1, H)
        x, offset, weight, bias, mask = make_inputs(device=device, offset_scale=scale, seed=3, **cfg)
        assert_close(ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask),
                     torchvision.ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_integer_offsets_are_a_shifted_convolution(device):
    """An offset of exactly (1, 0) everywhere samples the input one row down: a convolution of the shifted map."""
    x, offset, weight, bias, _ = make_inputs(batch=1, masked=False, device=device)
    offset = torch.zeros_like(offset)
    offset[:, 0::2] = 1.0
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    shifted = torch.cat([padded[:, :, 1:], torch.zeros_like(padded[:, :, :1])], dim=2)
    assert_close(ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1),
                 nn.functional.conv2d(shifted, weight, bias, 1, 0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("padding", [1, 2])
def test_exact_integer_positions_at_every_border_match_torchvision(device, masked, padding):
    """Sampling points on exact integers, on row/column -1, 0, H - 1 and H and beyond, for all five gradients.

    On row or column -1 exactly torchvision's offset gradient is the border pixel's value, not 0: the state of
    every DCN at initialisation (zero offsets, padding >= 1). The report's case first, then integer offsets."""
    x = torch.arange(1.0, 10.0, dtype=torch.float64, device=device).view(1, 1, 3, 3).requires_grad_()
    offset = torch.zeros(1, 2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    ops.deform_conv2d(x, offset, torch.ones(1, 1, 1, 1, dtype=torch.float64, device=device),
                      padding=1).sum().backward()
    assert offset.grad[0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0]

    g = torch.Generator().manual_seed(padding)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    out_h, out_w = 5 + 2 * padding - 2, 6 + 2 * padding - 2
    offsets = [torch.zeros(2, 18, out_h, out_w, dtype=torch.float64),
               torch.randint(-3, 4, (2, 18, out_h, out_w), generator=g).double()]
    weight = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 9, out_h, out_w, generator=g, dtype=torch.float64) if masked else None
    for offset in offsets:
        tensors = [t.to(device).clone().requires_grad_() if t is not None else None
                   for t in (x, offset, weight, bias, mask)]
        theirs = [t.clone().detach().requires_grad_() if t is not None else None for t in tensors]
        ours = ops.deform_conv2d(tensors[0], tensors[1], tensors[2], tensors[3], 1, padding, 1, tensors[4])
        expected = torchvision.ops.deform_conv2d(theirs[0], theirs[1], theirs[2], theirs[3], 1, padding, 1, theirs[4])
        assert_close(ours, expected)
        grad = torch.randn(ours.shape, generator=g, dtype=torch.float64).to(device)
        ours.backward(grad)
        expected.backward(grad)
        for name, a, b in zip(("input", "offset", "weight", "bias", "mask"), tensors, theirs):
            if a is not None:
                assert_close(a.grad, b.grad, msg=lambda m, name=name: f"grad of {name}: {m}")
        # The reference takes the same convention.
        ref = [t.clone().detach().requires_grad_() if t is not None else None for t in tensors]
        reference.deform_conv2d(ref[0], ref[1], ref[2], ref[3], 1, padding, 1, ref[4]).backward(grad)
        assert_close(ref[1].grad, theirs[1].grad)


def test_backward_is_deterministic_across_threads():
    x, offset, weight, bias, mask = make_inputs(batch=2, in_channels=160, out_channels=8, size=(9, 9),
                                                offset_groups=2, dtype=torch.float32)
    results = []
    for threads in (1, 2, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            tensors = [t.clone().requires_grad_() for t in (x, offset, weight, bias, mask)]
            ops.deform_conv2d(tensors[0], tensors[1], tensors[2], tensors[3], 1, 1, 1, tensors[4]).sum().backward()
            results.append([t.grad.clone() for t in tensors])
        finally:
            torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_in_float(dtype):
    x, offset, weight, bias, mask = make_inputs(dtype=torch.float32)
    out = ops.deform_conv2d(x.to(dtype), offset.to(dtype), weight.to(dtype), bias.to(dtype), 1, 1, 1, mask.to(dtype))
    assert out.dtype == dtype
    expected = ops.deform_conv2d(*(t.to(dtype).float() for t in (x, offset, weight, bias)), 1, 1, 1,
                                 mask.to(dtype).float())
    assert_close(out.float(), expected, dtype=dtype, atol=0.1, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_backward_runs_in_float(dtype):
    """The backward of half and bfloat16 runs the float32 kernels (the CPU GEMM included) on the upcast inputs:
    the gradients match the float32 gradients of the rounded inputs to the half-precision tolerance."""
    rounded = [t.to(dtype) for t in make_inputs(in_channels=6, out_channels=20, groups=2, dtype=torch.float32)]
    half = [t.clone().requires_grad_() for t in rounded]
    single = [t.float().requires_grad_() for t in rounded]
    out = ops.deform_conv2d(half[0], half[1], half[2], half[3], 1, 1, 1, half[4])
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    out.backward(grad)
    ops.deform_conv2d(single[0], single[1], single[2], single[3], 1, 1, 1, single[4]).backward(grad.float())
    for a, b in zip(half, single):
        assert a.grad.dtype == dtype
        assert_close(a.grad.float(), b.grad, dtype=dtype, atol=0.05, rtol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cuda(dtype):
    tensors = make_inputs(dtype=torch.float32, device="cuda")
    out = ops.deform_conv2d(*(t.to(dtype) for t in tensors[:4]), 1, 1, 1, tensors[4].to(dtype))
    expected = ops.deform_conv2d(*(t.to(dtype).float() for t in tensors[:4]), 1, 1, 1, tensors[4].to(dtype).float())
    assert_close(out.float(), expected, dtype=dtype, atol=0.1, rtol=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_backward_alerts_under_deterministic_algorithms():
    x, offset, weight, bias, mask = make_inputs(device="cuda")
    x.requires_grad_()
    out = ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="_deform_conv2d_backward"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(device, masked):
    x, offset, weight, bias, mask = make_inputs(batch=2, in_channels=4, out_channels=4, size=(5, 5), groups=2,
                                                masked=masked, device=device)
    args = [t.requires_grad_() if t is not None else None for t in (x, offset, weight, mask, bias)]
    torch.library.opcheck(torch.ops.eyecool.deform_conv2d.default, (*args, [1, 1], [1, 1], [1, 1]))
    grad = torch.randn(2, 4, 5, 5, dtype=x.dtype, device=device)
    torch.library.opcheck(torch.ops.eyecool._deform_conv2d_backward.default,
                          (grad, x.detach(), offset.detach(), weight.detach(),
                           mask.detach() if masked else None, [1, 1], [1, 1], [1, 1]))


@needs_compiled
def test_torch_compile_fullgraph():
    x, offset, weight, bias, mask = make_inputs(dtype=torch.float32)
    tensors = [t.requires_grad_() for t in (x, offset, weight, bias, mask)]

    def f(x, offset, weight, bias, mask):
        return ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask).relu().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*tensors)
    grads = torch.autograd.grad(out, tensors)
    expected = f(*tensors)
    expected_grads = torch.autograd.grad(expected, tensors)
    assert_close(out, expected)
    for a, b in zip(grads, expected_grads):
        assert_close(a, b)


def test_bad_input_messages():
    x, offset, weight, bias, mask = make_inputs(dtype=torch.float32)  # 3x3 kernel, 7x8 input and output
    with pytest.raises(ValueError, match=r"offset must have 2 \* offset_groups \* kh \* kw .* multiple of 18 .*"
                                         r"got offset \(2, 17, 7, 8\)"):
        ops.deform_conv2d(x, offset[:, :17], weight, bias, 1, 1, 1, mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 9, 7, 8\).*got \(2, 8, 7, 8\)"):
        ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask[:, :8])
    with pytest.raises(ValueError, match=r"offset must have shape \(2, 18, 4, 4\).*got \(2, 18, 7, 8\)"):
        ops.deform_conv2d(x, offset, weight, bias, 2, 1, 1, mask)
    with pytest.raises(ValueError, match=r"input channels \(4\) must be divisible by weight.shape\[1\].*"
                                         r"weight \(6, 3, 3, 3\)"):
        ops.deform_conv2d(x, offset, torch.randn(6, 3, 3, 3), bias, 1, 1, 1, mask)
    with pytest.raises(ValueError, match=r"input channels \(4\) must be divisible by the 3 offset groups"):
        ops.deform_conv2d(x, torch.randn(2, 54, 7, 8), weight, bias, 1, 1, 1)
    with pytest.raises(ValueError, match=r"output channels .*6.* must be divisible by the 4 weight groups"):
        ops.deform_conv2d(x, offset, torch.randn(6, 1, 3, 3), bias, 1, 1, 1, mask)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\), got \(5,\)"):
        ops.deform_conv2d(x, offset, weight, bias[:5], 1, 1, 1, mask)
    with pytest.raises(ValueError, match="mask must have the dtype of input"):
        ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask.double())
    with pytest.raises(ValueError, match="padding must be >= 0"):
        ops.deform_conv2d(x, offset, weight, bias, 1, -1, 1, mask)


@needs_compiled
def test_kernel_checks_name_the_expected_shape():
    """The registered op checks its inputs too (it can be called without the wrapper)."""
    x, offset, weight, bias, mask = make_inputs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"mask must have shape \[2, 9, 7, 8\].*got \[2, 8, 7, 8\]"):
        torch.ops.eyecool.deform_conv2d(x, offset, weight, mask[:, :8], bias, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"offset must have shape \[2, 18, 4, 4\].*got \[2, 18, 7, 8\]"):
        torch.ops.eyecool.deform_conv2d(x, offset, weight, mask, bias, [2, 2], [1, 1], [1, 1])


@pytest.mark.parametrize("modulated", [False, True])
def test_module_starts_as_the_plain_convolution(modulated):
    layer = ops.DeformConv2d(6, 4, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1), groups=2, offset_groups=3,
                             modulated=modulated)
    conv = nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1), groups=2)
    conv.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.randn(2, 6, 9, 8)
    assert_close(layer(x), conv(x))
    assert ("modulated=True" in repr(layer)) == modulated


def test_fallback_when_extension_cannot_load():
    """With _C unimportable, the op runs the reference implementation and still matches torchvision."""
    code = (
        "import sys, warnings; sys.modules['eyecool_ext._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import torch, torchvision, eyecool_ext\n"
        "assert not eyecool_ext.compiled()\n"
        "x = torch.randn(1, 2, 5, 5); off = torch.randn(1, 18, 5, 5); w = torch.randn(3, 2, 3, 3)\n"
        "m = torch.rand(1, 9, 5, 5)\n"
        "torch.testing.assert_close(eyecool_ext.ops.deform_conv2d(x, off, w, None, 1, 1, 1, m),"
        " torchvision.ops.deform_conv2d(x, off, w, None, 1, 1, 1, m))\n"
        "print('fallback ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "fallback ok" in res.stdout


def test_module_learns_offsets():
    """The zero-initialised offset and mask convolutions still receive gradients."""
    torch.manual_seed(0)
    layer = ops.DeformConv2d(4, 3, 3, padding=1, modulated=True)
    layer(torch.randn(1, 4, 6, 6)).square().sum().backward()
    assert layer.offset_conv.weight.grad.abs().sum() > 0
    assert layer.mask_conv.weight.grad.abs().sum() > 0
    assert ops.DeformConv2d(4, 3, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="offset_groups"):
        ops.DeformConv2d(4, 3, 3, offset_groups=3)

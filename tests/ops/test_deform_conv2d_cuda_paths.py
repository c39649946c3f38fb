"""deform_conv2d's CUDA sampling kernels (csrc/cuda/deform_conv2d.cu), emulated on the CPU, path by path.

The kernels run one thread per sample (image, offset group, kernel tap, output pixel), split the sample index
with precomputed fast divisors, and loop over the offset group's channels; they index in 32 bits when every tensor
has fewer than 2^31 elements and in 64 bits otherwise. These tests force each path on small tensors: the 64-bit
one (``force_64bit_index``, which only the emulation can set), grids of one block (dozens of grid-stride rounds
per thread), batch chunks (a chunk's first image is not image 0), channel counts that are multiples of nothing,
one channel per offset group, offset groups that straddle weight groups, and samples on and beyond every border,
all four float dtypes against the CPU op, and gradcheck on both index paths.

It calls ``torch.ops.eyecool_emu`` directly, so it is not one of the modules that tests/ops/conftest.py runs
twice (cuda_emulation.EMULATED_TEST_MODULES).
"""
from __future__ import annotations

import pytest
import torch

import cuda_emulation
from cuda_emulation import assert_kernels_close as close
from cuda_emulation import emulated_cuda_kernels, launch_limits
from eyecool_ext import ops
from test_deform_conv2d import make_inputs, output_size

pytestmark = pytest.mark.skipif(not cuda_emulation.available(),
                                reason="built without the CUDA emulation (EYECOOL_CUDA_EMULATION=1; make install)")

cpu = torch.ops.eyecool
emu = torch.ops.eyecool_emu

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INDEX_PATHS = {"index32": False, "index64": True}

# (make_inputs keywords): channels per offset group 7, 3, 1 and 2 (with offset groups straddling weight groups),
# a non-square dilated kernel with strides, and v1.
CASES = {
    "channels7": dict(in_channels=7, out_channels=5),
    "offset_groups3": dict(in_channels=9, out_channels=6, groups=3, offset_groups=3),
    "one_channel_per_group": dict(in_channels=5, out_channels=3, offset_groups=5, masked=False),
    "groups_straddle": dict(in_channels=10, out_channels=4, groups=2, offset_groups=5),
    "anisotropic": dict(in_channels=6, out_channels=4, offset_groups=2, kernel=(3, 2), stride=(1, 2),
                        padding=(1, 0), dilation=(2, 1), size=(8, 9)),
}


def conv_args(case):
    return (case.get("stride", (1, 1)), case.get("padding", (1, 1)), case.get("dilation", (1, 1)))


def inputs(case, dtype, batch=3, seed=0):
    """(x, offset, weight, bias, mask, grad) in dtype, drawn in float64."""
    x, offset, weight, bias, mask = make_inputs(batch=batch, dtype=torch.float64, seed=seed, **case)
    stride, padding, dilation = conv_args(case)
    kernel = case.get("kernel", (3, 3))
    out_h = output_size(x.shape[2], kernel[0], stride[0], padding[0], dilation[0])
    out_w = output_size(x.shape[3], kernel[1], stride[1], padding[1], dilation[1])
    grad = torch.randn(batch, weight.shape[0], out_h, out_w, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed + 1))
    cast = [t.to(dtype) if t is not None else None for t in (x, offset, weight, bias, mask, grad)]
    return cast


def run(ops_, x, offset, weight, bias, mask, grad, conv):
    return (ops_.deform_conv2d(x, offset, weight, mask, bias, *conv),
            *ops_._deform_conv2d_backward(grad, x, offset, weight, mask, *conv))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("index", INDEX_PATHS)
@pytest.mark.parametrize("grid", [0, 1])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_forward_and_backward_match_the_cpu(name, index, grid, dtype):
    case = CASES[name]
    x, offset, weight, bias, mask, grad = inputs(case, dtype)
    conv = conv_args(case)
    per_image = x.shape[1] * weight.shape[2] * weight.shape[3] * grad.shape[2] * grad.shape[3]
    # Chunks of two images: the second chunk starts at image 2, so its offset / mask channels do not start at 0.
    with launch_limits(max_blocks=grid, max_column_elements=2 * per_image, force_64bit_index=INDEX_PATHS[index]):
        results = run(emu, x, offset, weight, bias, mask, grad, conv)
    for got, expected in zip(results, run(cpu, x, offset, weight, bias, mask, grad, conv)):
        close(got, expected, dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", CASES)
def test_64bit_path_computes_what_the_32bit_path_does(dtype, name):
    """Same arithmetic, same (serial) order of the atomic adds: the two index types agree to the bit."""
    case = CASES[name]
    x, offset, weight, bias, mask, grad = inputs(case, dtype, seed=5)
    conv = conv_args(case)
    results = {}
    for index, wide in INDEX_PATHS.items():
        with launch_limits(max_blocks=3, force_64bit_index=wide):
            results[index] = run(emu, x, offset, weight, bias, mask, grad, conv)
    for narrow, wide in zip(results["index32"], results["index64"]):
        assert torch.equal(narrow, wide)


@pytest.mark.parametrize("index", INDEX_PATHS)
def test_many_grid_stride_rounds(index):
    """3 images x 2 offset groups x 9 taps x 13 x 11 pixels = 7722 samples on one block of 256 threads: 31 rounds,
    whose sample indices cross every boundary of the (pixel, tap, group, image) split."""
    case = dict(in_channels=6, out_channels=4, offset_groups=2, size=(13, 11))
    x, offset, weight, bias, mask, grad = inputs(case, torch.float64, seed=7)
    conv = conv_args(case)
    with launch_limits(max_blocks=1, force_64bit_index=INDEX_PATHS[index]):
        results = run(emu, x, offset, weight, bias, mask, grad, conv)
    for got, expected in zip(results, run(cpu, x, offset, weight, bias, mask, grad, conv)):
        close(got, expected, torch.float64)


@pytest.mark.parametrize("index", INDEX_PATHS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_samples_on_and_beyond_every_border(index, dtype):
    """Integer offsets put samples on rows and columns -1, 0, H - 1, H and beyond (the coordinate gradient is
    nonzero on -1 exactly, the value is not: DeformTaps::touches vs ::any); half-integer ones land inside the
    band; the first taps of the first offset group are far outside, and with an infinite mask there the forward
    must still give 0 (m * 0 would be NaN)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 6, 5, 6, generator=g, dtype=torch.float64)
    offset = (torch.randint(-6, 7, (2, 2 * 2 * 9, 5, 6), generator=g) / 2).double()
    offset[:, 0:4, :2] = 40.0
    mask = torch.rand(2, 2 * 9, 5, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    grad = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    x, offset, weight, bias, mask, grad = (t.to(dtype) for t in (x, offset, weight, bias, mask, grad))
    conv = ((1, 1), (1, 1), (1, 1))
    infinite = mask.clone()
    infinite[:, 0:2, :2] = float("inf")
    with launch_limits(max_blocks=1, force_64bit_index=INDEX_PATHS[index]):
        results = run(emu, x, offset, weight, bias, mask, grad, conv)
        out_infinite = emu.deform_conv2d(x, offset, weight, infinite, bias, *conv)
    for got, expected in zip(results, run(cpu, x, offset, weight, bias, mask, grad, conv)):
        close(got, expected, dtype)
    assert not out_infinite.isnan().any()
    close(out_infinite, cpu.deform_conv2d(x, offset, weight, infinite, bias, *conv), dtype)


@pytest.mark.parametrize("index", INDEX_PATHS)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(index, masked):
    """The public op's autograd on the emulated kernels, 2 offset groups of 3 channels, both index paths."""
    x, offset, weight, bias, mask = make_inputs(batch=2, in_channels=6, out_channels=2, size=(5, 4), kernel=(2, 3),
                                                groups=2, offset_groups=2, masked=masked, offset_scale=1.5, seed=3)
    tensors = [t.requires_grad_() for t in (x, offset, weight, bias) + ((mask,) if masked else ())]

    def fn(x, offset, weight, bias, mask=None):
        return ops.deform_conv2d(x, offset, weight, bias, (1, 1), (1, 1), (1, 1), mask)

    with emulated_cuda_kernels(), launch_limits(max_blocks=1, force_64bit_index=INDEX_PATHS[index]):
        assert torch.autograd.gradcheck(fn, tuple(tensors))


def test_launch_limits_restore_the_index_path():
    previous = emu._set_launch_limits(0, 0, True)
    try:
        assert emu._set_launch_limits(2, 3) == [0, 0, 1]  # force_64bit_index defaults to False
        with launch_limits(force_64bit_index=True):
            assert emu._set_launch_limits(2, 3, True) == [0, 0, 1]
        assert emu._set_launch_limits(0, 0) == [2, 3, 0]
    finally:
        emu._set_launch_limits(previous[0], previous[1], bool(previous[2]))

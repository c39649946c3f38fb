"""The CUDA kernels, emulated on the CPU (torch.ops.eyecool_emu.*, the very source of csrc/cuda/*.cu run one
(block, thread) at a time), against the CPU kernels and the references.

The op test modules already run whole on the emulated kernels (tests/ops/conftest.py); this file adds what only
the CUDA side has: all four float dtypes of every op against the CPU op, the grid-stride rounds and batch chunks
of real sizes forced with a tiny grid, and one test per finding of the review of the CUDA sources (issue 15), each
of which failed on the emulated kernels before its fix.

What the emulation cannot show (cuda_emulation.h): device math (CUDA's expf), FMA contraction by nvcc, the order
of real atomics, timing. FMA contraction in the panoptic merge is checked on the compiled SASS instead (below).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch

import cuda_emulation
from cuda_emulation import assert_kernels_close as close
from cuda_emulation import launch_count, launch_limits
from op_tester import LAYOUTS, assert_close, to_layout
from test_deform_conv2d import make_inputs
from test_panoptic_merge import NUM_STUFF, NUM_THINGS, random_instances
from test_pq_pair_counts import random_id_maps
from test_roi_align import random_rois

pytestmark = pytest.mark.skipif(not cuda_emulation.available(),
                                reason="built without the CUDA emulation (EYECOOL_CUDA_EMULATION=1; make install)")

cpu = torch.ops.eyecool
emu = torch.ops.eyecool_emu

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Grids of 1 and 3 blocks: every thread runs many grid-stride rounds at these sizes.
TINY_GRIDS = [0, 1, 3]


# ---- every op, every dtype, every layout, against the CPU op; also on a tiny grid ----

@pytest.mark.parametrize("grid", TINY_GRIDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_roi_align_forward_and_backward(grid, dtype, layout):
    x = to_layout(torch.randn(2, 3, 11, 13, dtype=torch.float64), layout).to(dtype)
    rois = random_rois(17, 2, 11, 13, torch.float64, scale=0.5).to(dtype)
    grad = to_layout(torch.randn(17, 3, 3, 4, dtype=torch.float64), layout).to(dtype)
    for aligned, ratio in ((True, -1), (False, 2)):
        args = (rois, 0.5, 3, 4, ratio, aligned)
        with launch_limits(max_blocks=grid):
            out = emu.roi_align(x, *args)
            grad_in = emu._roi_align_backward(grad, rois, 0.5, 3, 4, 2, 3, 11, 13, ratio, aligned)
        close(out, cpu.roi_align(x, *args), dtype)
        close(grad_in, cpu._roi_align_backward(grad, rois, 0.5, 3, 4, 2, 3, 11, 13, ratio, aligned), dtype)


@pytest.mark.parametrize("grid", TINY_GRIDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_multilevel_roi_align_forward_and_backward(grid, dtype):
    features = [torch.randn(2, 3, 32 // 2 ** l, 24 // 2 ** l, dtype=torch.float64).to(dtype) for l in range(3)]
    rois = random_rois(30, 2, 128, 96, torch.float64).to(dtype)
    args = (rois, 2, 2, [1 / 4, 1 / 8, 1 / 16], 0, True, 24.0, 4)
    grad = torch.randn(30, 3, 2, 2, dtype=torch.float64).to(dtype)
    sizes = ([f.shape[2] for f in features], [f.shape[3] for f in features])
    with launch_limits(max_blocks=grid):
        out = emu.multilevel_roi_align(features, *args)
        grads = emu._multilevel_roi_align_backward(grad, *args, 2, 3, *sizes)
    close(out, cpu.multilevel_roi_align(features, *args), dtype)
    for g_emu, g_cpu in zip(grads, cpu._multilevel_roi_align_backward(grad, *args, 2, 3, *sizes)):
        close(g_emu, g_cpu, dtype)


@pytest.mark.parametrize("grid", TINY_GRIDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("masked", [True, False])
def test_deform_conv2d_forward_and_backward(grid, dtype, layout, masked):
    x, offset, weight, bias, mask = make_inputs(batch=3, in_channels=4, out_channels=6, groups=2, offset_groups=2,
                                                masked=masked, dtype=torch.float64)
    grad = torch.randn(3, 6, 7, 8, dtype=torch.float64)
    x, offset, grad = (to_layout(t, layout).to(dtype) for t in (x, offset, grad))
    weight, bias = weight.to(dtype), bias.to(dtype)
    mask = mask.to(dtype) if masked else None
    conv = ((1, 1), (1, 1), (1, 1))
    # A column buffer of two images: the batch of three runs in two chunks.
    with launch_limits(max_blocks=grid, max_column_elements=2 * 4 * 9 * 7 * 8):
        out = emu.deform_conv2d(x, offset, weight, mask, bias, *conv)
        grads = emu._deform_conv2d_backward(grad, x, offset, weight, mask, *conv)
    # The CPU runs half and bfloat16 in float; the CUDA kernels round the columns to the dtype.
    close(out, cpu.deform_conv2d(x, offset, weight, mask, bias, *conv), dtype)
    for g_emu, g_cpu in zip(grads, cpu._deform_conv2d_backward(grad, x, offset, weight, mask, *conv)):
        close(g_emu, g_cpu, dtype)


@pytest.mark.parametrize("grid", TINY_GRIDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("mode", ["logit", "prob"])
def test_fg_fusion_forward_and_backward(grid, dtype, mode):
    sem = to_layout(torch.randn(2, 11, 9, 14, dtype=torch.float64) * 3, "strided_slice").to(dtype)
    levels = [torch.randn(2, 3, h, w, dtype=torch.float64).to(dtype) for h, w in ((9, 14), (4, 7), (5, 3))]
    grads = [torch.randn_like(r) for r in levels]
    with launch_limits(max_blocks=grid):
        fused, stats = emu.fg_fusion(sem, levels, 4, mode)
        grad_sem, grad_rpn = emu._fg_fusion_backward(grads, sem, levels, stats, 4, mode)
    fused_cpu, stats_cpu = cpu.fg_fusion(sem, levels, 4, mode)
    for a, b in zip(fused, fused_cpu):
        close(a, b, dtype)
    close(stats, stats_cpu, torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    grad_sem_cpu, grad_rpn_cpu = cpu._fg_fusion_backward(grads, sem, levels, stats_cpu, 4, mode)
    close(grad_sem, grad_sem_cpu, dtype)
    for a, b in zip(grad_rpn, grad_rpn_cpu):
        close(a, b, dtype)


@pytest.mark.parametrize("grid", TINY_GRIDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("output_size", [None, (37, 29)])
def test_upsnet_panoptic_merge(grid, dtype, output_size):
    sem = (torch.randn(NUM_STUFF + NUM_THINGS, 24, 20, dtype=torch.float64) * 2).to(dtype)
    boxes, classes, masks = random_instances(5, 24, 20, torch.float64)
    boxes, masks = boxes.to(dtype), masks.to(dtype)
    height, width = output_size or (24, 20)
    args = (NUM_STUFF, boxes, classes, masks, height, width)
    with launch_limits(max_blocks=grid):
        labels = emu.upsnet_panoptic_merge(sem, *args)
    # The same arithmetic in the same order: the same labels, in every dtype.
    assert torch.equal(labels, cpu.upsnet_panoptic_merge(sem, *args))


@pytest.mark.parametrize("grid", TINY_GRIDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("batch", [1, 3])
def test_pq_pair_counts(grid, dtype, batch):
    gt, pred = random_id_maps(batch, 19, 23, 9, dtype=dtype), random_id_maps(batch, 19, 23, 7, dtype=dtype, seed=1)
    with launch_limits(max_blocks=grid):
        result = emu.pq_pair_counts(gt, pred)
    for a, b in zip(result, cpu.pq_pair_counts(gt, pred)):
        assert torch.equal(a, b)


def test_pq_pair_counts_refuses_invalid_ids():
    gt, pred = random_id_maps(2, 5, 6, 4), random_id_maps(2, 5, 6, 4, seed=1)
    pred[1, 2, 3] = -7
    with pytest.raises(RuntimeError, match="segment ids must be in"):
        emu.pq_pair_counts(gt, pred)


def test_tiny_grid_really_runs_several_rounds():
    """The grid cap is in force: a launch over more elements than 1 block of 256 threads still covers them all."""
    x = torch.randn(1, 64, 8, 8)
    rois = torch.tensor([[0, 0.0, 0.0, 7.0, 7.0]])
    before = launch_count()
    with launch_limits(max_blocks=1):
        out = emu.roi_align(x, rois, 1.0, 4, 4, 2, True)  # 1024 output elements: 4 rounds of 256 threads
    assert launch_count() == before + 1
    assert torch.equal(out, cpu.roi_align(x, rois, 1.0, 4, 4, 2, True))


def test_deform_conv2d_batch_chunks_launch_per_chunk():
    x, offset, weight, bias, mask = make_inputs(batch=5, dtype=torch.float32)
    per_image = 4 * 9 * 7 * 8
    conv = ((1, 1), (1, 1), (1, 1))
    counts = {}
    for images in (5, 2, 1):
        before = launch_count()
        with launch_limits(max_column_elements=images * per_image):
            out = emu.deform_conv2d(x, offset, weight, mask, bias, *conv)
        counts[images] = launch_count() - before
        assert_close(out, cpu.deform_conv2d(x, offset, weight, mask, bias, *conv))
    assert counts == {5: 1, 2: 3, 1: 5}  # one im2col launch per chunk


def test_grid_limits_are_checked():
    with pytest.raises(RuntimeError, match="must be >= 0"):
        emu._set_launch_limits(-1, 0)


# ---- the review's findings (issue 15), one test each; each failed on the emulated kernels before its fix ----

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finding1_half_backward_accumulates_in_float(dtype):
    """3000 ROIs each add exactly 1.0 to one pixel: a bfloat16 (float16) running sum stops at 256 (2048)."""
    rois = torch.tensor([[0, 1.0, 1.0, 2.0, 2.0]], dtype=dtype).repeat(3000, 1)  # aligned: samples pixel (1, 1)
    grad = torch.ones(3000, 1, 1, 1, dtype=dtype)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 1, 1] = 3000
    for ops in (emu, cpu):
        got = ops._roi_align_backward(grad, rois, 1.0, 1, 1, 1, 1, 4, 4, 1, True)
        assert torch.equal(got, expected.to(dtype)), ops
        levels = ops._multilevel_roi_align_backward(grad, rois, 1, 1, [1.0, 0.5], 1, True, 224.0, 0, 1, 1, [4, 2],
                                                    [4, 2])
        assert torch.equal(levels[0], expected.to(dtype)), ops


def test_finding2_float64_scales_are_not_rounded_to_float():
    x = torch.randn(1, 2, 13, 17, dtype=torch.float64)
    rois = random_rois(25, 1, 13, 17, torch.float64, scale=0.3)
    for aligned in (True, False):
        torch.testing.assert_close(emu.roi_align(x, rois, 0.3, 3, 3, 2, aligned),
                                   cpu.roi_align(x, rois, 0.3, 3, 3, 2, aligned), atol=1e-12, rtol=1e-12)
    # The canonical box size too: boxes right at the level boundaries of a box size that float cannot hold.
    features = [torch.randn(1, 2, 16 // 2 ** l, 16 // 2 ** l, dtype=torch.float64) for l in range(3)]
    side = torch.tensor([100.3, 200.6, 100.3 * (1 + 1e-9), 200.6 * (1 - 1e-9)], dtype=torch.float64) - 1e-8
    rois = torch.stack([torch.zeros(4), torch.zeros(4), torch.zeros(4), side, side], dim=1).double()
    args = (rois, 2, 2, [1 / 4, 1 / 8, 1 / 16], 2, True, 100.3, 3)
    torch.testing.assert_close(emu.multilevel_roi_align(features, *args), cpu.multilevel_roi_align(features, *args),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("ops", [emu, cpu], ids=["cuda_emulated", "cpu"])
def test_finding3_backward_levels_must_match_the_scales(ops):
    grad = torch.randn(1, 2, 2, 2)
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0]])
    common = (grad, rois, 2, 2)
    with pytest.raises(RuntimeError, match="one size per level"):
        ops._multilevel_roi_align_backward(*common, [0.25, 0.125], 0, True, 224.0, 4, 1, 2, [8], [8, 4])
    with pytest.raises(RuntimeError, match="one size per level"):
        ops._multilevel_roi_align_backward(*common, [0.25], 0, True, 224.0, 4, 1, 2, [8, 4], [8, 4])
    nine = [2.0 ** -l for l in range(9)]
    with pytest.raises(RuntimeError, match="1 to 8 levels"):
        ops._multilevel_roi_align_backward(*common, nine, 0, True, 224.0, 4, 1, 2, [2] * 9, [2] * 9)
    with pytest.raises(RuntimeError, match="non-negative"):
        ops._roi_align_backward(grad, rois, 1.0, 2, 2, 1, 2, -3, 4, 2, True)


@pytest.mark.parametrize("ops", [emu, cpu], ids=["cuda_emulated", "cpu"])
def test_finding4_empty_maps_give_zeros_or_the_bias(ops):
    # The two calls of the report, which ended the process with SIGSEGV on the CPU.
    out = ops.deform_conv2d(torch.randn(1, 2, 0, 4), torch.full((1, 2, 2, 6), -0.5), torch.ones(3, 2, 1, 1),
                            None, torch.tensor([1.0, 2.0, 3.0]), (1, 1), (1, 1), (1, 1))
    assert torch.equal(out, torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).expand(1, 3, 2, 6))
    grads = ops._deform_conv2d_backward(torch.ones(1, 3, 2, 6), torch.randn(1, 2, 0, 4), torch.full((1, 2, 2, 6), -0.5),
                                        torch.ones(3, 2, 1, 1), None, (1, 1), (1, 1), (1, 1))
    for g in grads[:3]:
        assert torch.count_nonzero(g) == 0
    assert torch.equal(grads[4], torch.full((3,), 12.0))
    for h, w in ((0, 5), (4, 0), (0, 0)):
        x = torch.randn(1, 2, h, w)
        rois = torch.tensor([[0, -0.5, -0.5, 0.5, 0.5]])
        assert torch.equal(ops.roi_align(x, rois, 1.0, 2, 2, 2, True), torch.zeros(1, 2, 2, 2))
        assert torch.equal(ops._roi_align_backward(torch.ones(1, 2, 2, 2), rois, 1.0, 2, 2, 1, 2, h, w, 2, True),
                           torch.zeros(1, 2, h, w))
    # One pyramid level of height 0: ROIs assigned to it pool zeros, the others pool as usual.
    features = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 0, 4)]
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [0, 0.0, 0.0, 300.0, 300.0]])
    out = ops.multilevel_roi_align(features, rois, 2, 2, [0.25, 0.125], 0, True, 224.0, 3)
    assert torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[0]) > 0


def test_finding5_sample_outside_the_image_is_zero_whatever_the_mask():
    x = torch.randn(1, 2, 5, 5)
    offset = torch.full((1, 18, 5, 5), 100.0)  # every sample far outside the image
    weight = torch.randn(3, 2, 3, 3)
    bias = torch.randn(3)
    mask = torch.full((1, 9, 5, 5), float("inf"))
    conv = ((1, 1), (1, 1), (1, 1))
    out = emu.deform_conv2d(x, offset, weight, mask, bias, *conv)
    assert torch.equal(out, cpu.deform_conv2d(x, offset, weight, mask, bias, *conv))
    assert torch.equal(out, bias.view(1, 3, 1, 1).expand(1, 3, 5, 5))
    # And no gradient at all: the offset gradient is 0, not inf * 0.
    grad = torch.randn(1, 3, 5, 5)
    for g_emu, g_cpu in zip(emu._deform_conv2d_backward(grad, x, offset, weight, mask, *conv),
                            cpu._deform_conv2d_backward(grad, x, offset, weight, mask, *conv)):
        assert torch.equal(g_emu, g_cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finding5_half_bias_is_added_before_rounding(dtype):
    """1024 + 1025 = 2049 rounds to 2048 in half (and bfloat16); plus a bias of 1 it is 2050, which both hold
    exactly. Rounding the GEMM first gives 2048 + 1 = 2049 -> 2048."""
    x = torch.tensor([1024.0, 1025.0]).view(1, 2, 1, 1).to(dtype)
    if dtype == torch.bfloat16:  # bfloat16 holds neither 1025 nor 2049: scale the case down by 8
        x = torch.tensor([128.0, 129.0]).view(1, 2, 1, 1).to(dtype)
    weight = torch.ones(1, 2, 1, 1, dtype=dtype)
    bias = torch.ones(1, dtype=dtype)
    offset = torch.zeros(1, 2, 1, 1, dtype=dtype)
    conv = ((1, 1), (0, 0), (1, 1))
    expected = x.double().sum() + 1
    for ops in (emu, cpu):
        out = ops.deform_conv2d(x, offset, weight, None, bias, *conv)
        assert out.item() == expected.item(), ops


def test_finding5_half_grad_weight_products_stay_in_float():
    """Two images whose grad_weight products are +80000 and -80000: each overflows half (65504) on its own, the
    sum is 0. With one image per chunk, a half product per chunk gives inf - inf = NaN."""
    x = torch.full((2, 1, 1, 1), 200.0, dtype=torch.float16)
    grad = torch.tensor([400.0, -400.0], dtype=torch.float16).view(2, 1, 1, 1)
    offset = torch.zeros(2, 2, 1, 1, dtype=torch.float16)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float16)
    conv = ((1, 1), (0, 0), (1, 1))
    with launch_limits(max_column_elements=1):
        grad_weight = emu._deform_conv2d_backward(grad, x, offset, weight, None, *conv)[2]
    assert torch.equal(grad_weight, torch.zeros_like(weight))
    assert torch.equal(cpu._deform_conv2d_backward(grad, x, offset, weight, None, *conv)[2], torch.zeros_like(weight))


def test_finding6_invalid_batch_index_per_device():
    """Documented difference: the CPU op raises on a batch index outside [0, N) or NaN; the CUDA op pools zeros
    (checking would synchronise). Both without undefined behaviour (make sanitize runs this)."""
    x = torch.randn(2, 3, 6, 6)
    for bad in (2.0, -1.0, float("nan"), 1e30):
        rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0], [bad, 0.0, 0.0, 4.0, 4.0]])
        out = emu.roi_align(x, rois, 1.0, 2, 2, 2, True)
        assert torch.count_nonzero(out[1]) == 0
        assert torch.equal(out[0], cpu.roi_align(x, rois[:1], 1.0, 2, 2, 2, True)[0])
        grad = emu._roi_align_backward(torch.ones(2, 3, 2, 2), rois, 1.0, 2, 2, 2, 3, 6, 6, 2, True)
        assert torch.equal(grad, cpu._roi_align_backward(torch.ones(1, 3, 2, 2), rois[:1], 1.0, 2, 2, 2, 3, 6, 6, 2,
                                                         True))
        with pytest.raises(RuntimeError, match="batch index"):
            cpu.roi_align(x, rois, 1.0, 2, 2, 2, True)


def _cuobjdump():
    """The CUDA toolkit's cuobjdump, or the copy the triton wheel ships, or None."""
    candidates = [shutil.which("cuobjdump"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                          "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _fused_multiply_adds(cuobjdump, obj):
    """{kernel name: FFMA + DFMA count} of the upsnet_merge_kernel instantiations in an object's SASS."""
    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    counts = {}
    for body in sass.split("Function : ")[1:]:
        name = body.splitlines()[0].strip()
        if "upsnet_merge_kernel" in name:
            counts[name.split("upsnet_merge_kernel", 1)[1]] = body.count(" FFMA ") + body.count(" DFMA ")
    return counts


def test_finding7_panoptic_merge_has_no_contracted_multiply_add(tmp_path):
    """nvcc contracts a * b + c into one FFMA by default (one rounding where the CPU rounds twice), which moves
    labels at near-ties; the merge's products go through mul_rn. Checked on the build's own sm_90 object of
    csrc/cuda/panoptic_merge.cu: it has no more fused multiply-adds than the same file compiled with -fmad=false
    (the ones both have belong to the division routine). Compiling that twin takes about a minute."""
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    ninja = os.path.join(root, "build", "temp", "build.ninja")
    objects = glob.glob(os.path.join(root, "build", "temp", "csrc", "cuda", "panoptic_merge.o"))
    cuobjdump = _cuobjdump()
    if not objects or not os.path.exists(ninja) or cuobjdump is None:
        pytest.skip("needs the CUDA build's objects (FORCE_CUDA=1, as CI builds) and cuobjdump")
    settings = {}
    with open(ninja, encoding="utf-8") as f:
        for line in f:
            key, sep, value = line.partition(" = ")
            if sep and key in ("nvcc", "cuda_cflags", "cuda_post_cflags"):
                settings[key] = value.strip()
    twin = str(tmp_path / "panoptic_merge_no_fmad.o")
    command = (f"{settings['nvcc']} {settings['cuda_cflags']} csrc/cuda/panoptic_merge.cu -o {twin} "
               f"{settings['cuda_post_cflags']} -fmad=false")
    subprocess.run(command, shell=True, cwd=root, check=True, capture_output=True)
    built, uncontracted = _fused_multiply_adds(cuobjdump, objects[0]), _fused_multiply_adds(cuobjdump, twin)
    assert built and built.keys() == uncontracted.keys()
    assert built == uncontracted


def test_finding8_fg_fusion_backward_takes_more_than_eight_levels():
    sem = torch.randn(1, 6, 12, 10, dtype=torch.float64)
    levels = [torch.randn(1, 2, 12 - l, 10 - l // 2, dtype=torch.float64) for l in range(11)]
    grads = [torch.randn_like(r) for r in levels]
    fused, stats = emu.fg_fusion(sem, levels, 2, "logit")
    grad_sem, grad_rpn = emu._fg_fusion_backward(grads, sem, levels, stats, 2, "logit")
    grad_sem_cpu, grad_rpn_cpu = cpu._fg_fusion_backward(grads, sem, levels, stats, 2, "logit")
    assert_close(grad_sem, grad_sem_cpu)
    for a, b in zip(grad_rpn, grad_rpn_cpu):
        assert_close(a, b)

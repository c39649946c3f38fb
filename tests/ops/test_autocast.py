"""Every op under ``torch.autocast`` (bfloat16 on the CPU; float16 and bfloat16 on CUDA when a GPU is present).

The inputs mix dtypes the way autocast produces them (activations of an autocast convolution in the low dtype,
parameters and the network input in float32). The oracle is the same op called without autocast on the inputs
cast to the policy's compute dtype by hand (float32, or the widest input dtype for fg_fusion), its output cast
to the policy's output dtype: so the autocast result must equal it to float tolerance, its output dtype must be
the policy's, and every gradient must reach its input in that input's dtype with the oracle's value. Each op is
checked through its public wrapper, through ``torch.ops.eyecool.*`` (the registered Autocast kernels) and through
the reference fallback.
"""
import pytest
import torch

import eyecool_ext
from eyecool_ext import _extension, ops
from eyecool_ext._autocast import INTEGER_OPS, POLICIES
from eyecool_ext.ops.autocast import REGISTERED
from op_tester import needs_compiled

AMP = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    AMP += [("cuda", torch.float16), ("cuda", torch.bfloat16)]

PATHS = ["compiled", "reference"]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "reference":
        monkeypatch.setattr(_extension, "use_compiled", lambda *a, **k: False)
    elif not eyecool_ext.compiled():
        pytest.skip("compiled extension not loaded")
    return request.param


def _leaf(t):
    return t.detach().clone().requires_grad_(t.is_floating_point())


def _check(fn, args, low, device, expected_dtype, cast_to, atol=1e-5, rtol=1e-4, backward_in_autocast=True):
    """Run ``fn(*args)`` under autocast and without it on ``args`` cast to ``cast_to``; compare outputs and grads.

    ``args`` holds tensors (or lists of tensors) in their "autocast" dtypes; every floating one is differentiated.
    ``backward_in_autocast``: run the backward inside the autocast region too (as a loop that calls
    ``loss.backward()`` under ``with autocast`` does), which the registered backward ops' Autocast kernels
    serve; the reference fallback's plain PyTorch backward then runs matmuls in the low dtype, as any PyTorch
    code would, so it is checked with the backward outside (PyTorch's recommended use).
    """
    leaves = [[_leaf(t) for t in a] if isinstance(a, list) else _leaf(a) if torch.is_tensor(a) else a for a in args]
    flat = [t for a in leaves for t in (a if isinstance(a, list) else [a]) if torch.is_tensor(t)
            and t.requires_grad]
    with torch.autocast(device, dtype=low):
        out = fn(*leaves)
    outs = out if isinstance(out, (list, tuple)) else [out]
    for o in outs:
        assert o.dtype == expected_dtype, (o.dtype, expected_dtype)

    ref_leaves = [[_leaf(t.to(cast_to)) for t in a] if isinstance(a, list) else
                  _leaf(a.to(cast_to)) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref_flat = [t for a in ref_leaves for t in (a if isinstance(a, list) else [a]) if torch.is_tensor(t)
                and t.requires_grad]
    ref = fn(*ref_leaves)
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r.to(o.dtype), atol=atol, rtol=rtol)
    if not expected_dtype.is_floating_point:
        return
    # Output gradients in the outputs' dtype (exact in the oracle's wider dtype), so both runs feed the kernels
    # the same values.
    grads_out = [torch.randn(o.shape, device=o.device).to(o.dtype) for o in outs]
    with torch.autocast(device, dtype=low, enabled=backward_in_autocast):
        grads = torch.autograd.grad(outs, flat, grads_out, allow_unused=True)
    ref_grads = torch.autograd.grad(refs, ref_flat, [go.to(r.dtype) for go, r in zip(grads_out, refs)],
                                    allow_unused=True)
    for leaf, g, rg in zip(flat, grads, ref_grads):
        assert (g is None) == (rg is None)
        if g is None:
            continue
        assert g.dtype == leaf.dtype, (g.dtype, leaf.dtype)
        torch.testing.assert_close(g, rg.to(g.dtype), atol=max(atol, 2e-2 if g.dtype != torch.float32 else atol),
                                   rtol=max(rtol, 2e-2 if g.dtype != torch.float32 else rtol))


def test_every_float_op_has_a_kernel_per_device():
    if not eyecool_ext.compiled():
        pytest.skip("compiled extension not loaded")
    for name in POLICIES:
        if _extension.has_op(name):
            assert (name, "AutocastCPU") in REGISTERED
            assert (name, "AutocastCUDA") in REGISTERED
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eyecool::{name}", "AutocastCPU")


@pytest.mark.parametrize("device,low", AMP)
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("masked", [False, True])
def test_deform_conv2d(device, low, path, masked):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 6, generator=g).to(device)  # float32 network input
    offset = (torch.randn(2, 18, 7, 6, generator=g) * 2).to(device, low)  # autocast conv output
    weight = torch.randn(5, 4, 3, 3, generator=g).to(device)
    bias = torch.randn(5, generator=g).to(device)
    mask = torch.rand(2, 9, 7, 6, generator=g).to(device, low) if masked else None

    def fn(x, offset, weight, bias, mask):
        return ops.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    _check(fn, [x, offset, weight, bias, mask], low, device, torch.float32, torch.float32,
           backward_in_autocast=path == "compiled")
    # A low-precision input: the result comes back in the input's dtype (torchvision's rule), computed in fp32.
    _check(fn, [x.to(low), offset, weight, bias, mask], low, device, low, torch.float32, atol=2e-2, rtol=2e-2,
           backward_in_autocast=path == "compiled")


@needs_compiled
@pytest.mark.parametrize("device,low", AMP)
def test_deform_conv2d_layer_of_the_issue(device, low):
    """The report: ``DeformConv2d(8, 8, 3, padding=1, modulated=True)`` under autocast, forward and backward."""
    layer = ops.DeformConv2d(8, 8, 3, padding=1, modulated=True).to(device)
    torch.nn.init.normal_(layer.offset_conv.weight, std=0.3)  # non-zero offsets, so sampling is bilinear
    x = torch.randn(2, 8, 9, 9, device=device)
    with torch.autocast(device, dtype=low):
        out = layer(x)
        out.square().mean().backward()
    assert out.dtype == torch.float32
    grads = {n: p.grad for n, p in layer.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    layer.zero_grad()
    # Oracle: the layer's arithmetic without autocast, with the offset/mask convolutions rounded as autocast does.
    with torch.autocast(device, dtype=low):
        offset, mask = layer.offsets_and_mask(x)
    expected = ops.deform_conv2d(x, offset.float(), layer.weight, layer.bias, padding=1, mask=mask.float())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device,low", AMP)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_roi_align(device, low, path):
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 3, 16, 20, generator=g).to(device, low)
    xy = torch.rand(6, 2, generator=g) * 60
    wh = torch.rand(6, 2, generator=g) * 30 + 2
    rois = torch.cat([torch.tensor([0, 1, 1, 0, 1, 0.0]).view(-1, 1), xy, xy + wh], 1).to(device)  # float32 boxes

    def fn(feat, rois):
        return ops.roi_align(feat, rois, (5, 4), 0.25, 0, True)

    _check(fn, [feat, rois], low, device, low, torch.float32, atol=2e-2, rtol=2e-2,
           backward_in_autocast=path == "compiled")


@pytest.mark.parametrize("device,low", AMP)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_multilevel_roi_align(device, low, path):
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 3, 64 // s, 64 // s, generator=g).to(device, low) for s in (4, 8, 16, 32)]
    xy = torch.rand(8, 2, generator=g) * 30
    wh = torch.rand(8, 2, generator=g) * 200 + 4  # spans every level (canonical size 56 below)
    rois = torch.cat([torch.tensor([0, 1] * 4, dtype=torch.float32).view(-1, 1), xy, xy + wh], 1).to(device)

    def fn(feats, rois):
        return ops.multilevel_roi_align(feats, rois, 3, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2, True, 56.0, 4)

    _check(fn, [feats, rois], low, device, low, torch.float32, atol=2e-2, rtol=2e-2,
           backward_in_autocast=path == "compiled")


@pytest.mark.parametrize("device,low", AMP)
@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("mode", ["logit", "prob"])
@pytest.mark.parametrize("mixed", [False, True])
def test_fg_fusion(device, low, path, mode, mixed):
    """Widest policy: all-low inputs run (and return) in the low dtype, low + float32 inputs meet in float32."""
    g = torch.Generator().manual_seed(3)
    sem = (torch.randn(2, 7, 12, 16, generator=g) * 3).to(device, torch.float32 if mixed else low)
    levels = [torch.randn(2, 3, h, w, generator=g).to(device, low) for h, w in ((12, 16), (6, 8), (3, 4))]

    def fn(sem, levels):
        return ops.fg_fusion(sem, levels, 3, mode)

    widest = torch.float32 if mixed else low
    tol = 1e-5 if mixed else 2e-2
    _check(fn, [sem, levels], low, device, widest, widest, atol=tol, rtol=tol,
           backward_in_autocast=path == "compiled")


@pytest.mark.parametrize("device,low", AMP)
@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_upsnet_panoptic_merge(device, low, path):
    """float32 policy: the labels equal the float32 merge of the (rounded) inputs exactly."""
    g = torch.Generator().manual_seed(4)
    sem = (torch.randn(7, 10, 12, generator=g) * 2).to(device, low)  # 1/4-scale logits from an autocast conv
    boxes = torch.tensor([[3.2, 4.1, 30.5, 25.0], [10.0, 0.0, 47.9, 39.5], [0.0, 20.0, 20.0, 40.0]]).to(device)
    classes = torch.tensor([0, 3, 1], device=device)
    masks = torch.randn(3, 28, 28, generator=g).to(device, low)

    def fn(sem, boxes, classes, masks):
        return ops.upsnet_panoptic_merge(sem, 3, boxes, classes, masks, (40, 48))

    _check(fn, [sem, boxes, classes, masks], low, device, torch.int64, torch.float32, atol=0, rtol=0)


@needs_compiled
@pytest.mark.parametrize("device,low", AMP)
def test_integer_ops_and_the_heuristic_merge_run_unchanged(device, low):
    """The ops without floating inputs (dispatcher fallthrough) and the plain-PyTorch heuristic merge."""
    assert "pq_pair_counts" in INTEGER_OPS
    g = torch.Generator().manual_seed(5)
    gt = torch.randint(0, 4, (2, 9, 11), generator=g).to(device)
    pred = torch.randint(0, 5, (2, 9, 11), generator=g).to(device)
    sem = torch.randint(0, 5, (9, 11), generator=g).to(device)
    masks = torch.rand(3, 9, 11, generator=g).to(device) > 0.5
    scores = torch.rand(3, generator=g).to(device, low)
    plain = (ops.batched_pq_pair_counts(gt, pred), ops.heuristic_panoptic_merge(sem, 3, masks, scores.float(),
                                                                                 stuff_area_limit=2))
    with torch.autocast(device, dtype=low):
        amp = (ops.batched_pq_pair_counts(gt, pred), ops.heuristic_panoptic_merge(sem, 3, masks, scores.float(),
                                                                                   stuff_area_limit=2))
    for a, b in zip(amp[0], plain[0]):
        assert torch.equal(a, b)
    assert torch.equal(amp[1], plain[1])


@needs_compiled
def test_registered_kernels_apply_without_the_python_wrapper():
    """``torch.ops.eyecool.deform_conv2d`` itself (what torch.compile and exported graphs call) under autocast."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 5, 5, generator=g)
    offset = torch.randn(1, 18, 5, 5, generator=g).bfloat16()
    weight = torch.randn(3, 2, 3, 3, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.ops.eyecool.deform_conv2d(x, offset, weight, None, None, [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError):  # without autocast the kernel refuses the mix: the cast is the kernel's
        torch.ops.eyecool.deform_conv2d(x, offset, weight, None, None, [1, 1], [1, 1], [1, 1])
    expected = torch.ops.eyecool.deform_conv2d(x, offset.float(), weight, None, None, [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(out, expected)


@needs_compiled
def test_autocast_kernels_under_torch_compile():
    """Traced under autocast (the Python kernels registered for the Autocast keys), the graph computes the same."""
    layer = ops.DeformConv2d(4, 4, 3, padding=1, modulated=True)
    torch.nn.init.normal_(layer.offset_conv.weight, std=0.3)
    x = torch.randn(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = layer(x)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)

"""fg_fusion (RFF) against the plain PyTorch composition: softmax, thing sum, adaptive_avg_pool2d, multiply."""
import pytest
import torch
import torch.nn.functional as F

from eyecool_ext import ops, reference
from op_tester import DEVICES, assert_close, needs_compiled, to_layout


def composition(sem_logits, rpn_logits, num_stuff, mode):
    """What the op fuses, written out with torch functions only."""
    fg = torch.softmax(sem_logits, dim=1)[:, num_stuff:].sum(dim=1, keepdim=True)
    gate = (lambda r: r) if mode == "logit" else torch.sigmoid
    return [gate(r) * F.adaptive_avg_pool2d(fg, r.shape[-2:]) for r in rpn_logits]


def inputs(device, dtype, sem_size=(20, 30), level_sizes=((20, 30), (7, 9), (13, 4), (40, 11)), channels=9,
           anchors=3, batch=2, scale=3.0):
    sem = (torch.randn(batch, channels, *sem_size, dtype=dtype, device=device) * scale)
    levels = [torch.randn(batch, anchors, h, w, dtype=dtype, device=device) for h, w in level_sizes]
    return sem, levels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["logit", "prob"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided_slice"])
def test_forward_and_backward_match_composition(device, dtype, mode, layout):
    sem, levels = inputs(device, dtype)
    sem = to_layout(sem, layout).requires_grad_()
    levels = [lvl.requires_grad_() for lvl in levels]
    grads = [torch.randn_like(lvl) for lvl in levels]
    ours = ops.fg_fusion(sem, levels, 4, mode)
    expected = composition(sem, levels, 4, mode)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape
        assert_close(a, b)
    for a, b in zip(torch.autograd.grad(ours, [sem, *levels], grads),
                    torch.autograd.grad(expected, [sem, *levels], grads)):
        assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["logit", "prob"])
def test_non_integer_level_ratios(device, mode):
    """A 13x19 level pooled from a 200x304 map: overlapping bins of unequal sizes; also levels larger than the map."""
    sem, levels = inputs(device, torch.float64, sem_size=(200, 304), level_sizes=((13, 19), (50, 76), (250, 310)),
                         channels=5, batch=1)
    sem.requires_grad_()
    grads = [torch.randn_like(lvl) for lvl in levels]
    ours = ops.fg_fusion(sem, levels, 2, mode)
    expected = composition(sem, levels, 2, mode)
    for a, b in zip(ours, expected):
        assert_close(a, b)
    assert_close(torch.autograd.grad(ours, sem, grads)[0], torch.autograd.grad(expected, sem, grads)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_stay_finite(device):
    """Max-subtracted softmax: logits of +-1e4 give exact 0/1 foreground probabilities, no inf or NaN."""
    sem = torch.full((1, 4, 3, 3), -1e4, device=device)
    sem[0, 3, 0, 0] = 1e4  # a thing wins by far
    sem[0, 0, 1, 1] = 1e4  # a stuff class wins by far
    level = torch.ones(1, 1, 3, 3, device=device)
    out = ops.fg_fusion(sem, [level], 2)[0]
    assert torch.isfinite(out).all()
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 1, 1] == 0.0
    assert_close(out, composition(sem, [level], 2, "logit")[0])


@pytest.mark.parametrize("device", DEVICES)
def test_every_channel_count_and_stuff_split(device):
    """The kernels fold the channels eight at a time, then four, two and one: every channel count up to 19
    (every mix of those group sizes) with the stuff/thing boundary anywhere, inside a group included."""
    torch.manual_seed(0)
    for channels in range(1, 20):
        sem = (torch.randn(2, channels, 4, 5, dtype=torch.float64, device=device) * 4).requires_grad_()
        level = torch.randn(2, 2, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
        grad = torch.randn(2, 2, 3, 2, dtype=torch.float64, device=device)
        for num_stuff in range(channels):
            ours = ops.fg_fusion(sem, [level], num_stuff, "prob")[0]
            expected = composition(sem, [level], num_stuff, "prob")[0]
            assert_close(ours, expected)
            for a, b in zip(torch.autograd.grad(ours, [sem, level], grad),
                            torch.autograd.grad(expected, [sem, level], grad)):
                assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_rows_of_every_alignment(device, dtype):
    """The CPU backward streams gradient rows that start 16-byte aligned and stores the others plainly: a 17x129
    map puts channel planes and bands of rows at every alignment, each longer than a streamed chunk."""
    sem, levels = inputs(device, dtype, sem_size=(17, 129), level_sizes=((17, 129), (5, 7)), channels=6)
    sem.requires_grad_()
    grads = [torch.randn_like(level) for level in levels]
    ours = torch.autograd.grad(ops.fg_fusion(sem, levels, 2, "prob"), sem, grads)[0]
    expected = torch.autograd.grad(composition(sem, levels, 2, "prob"), sem, grads)[0]
    assert_close(ours, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_minus_infinite_logits(device):
    """-inf logits (a class ruled out) are ordinary zeros of the softmax, also when a whole group of channels
    that the kernels fold together is -inf at a pixel, or every channel but one; a pixel whose every logit is
    -inf is NaN, as in torch.softmax."""
    torch.manual_seed(0)
    channels, num_stuff = 23, 11
    sem = torch.randn(1, channels, 3, 4) * 3
    sem[0, :10, 0, 0] = float("-inf")  # the first group and more
    sem[0, 8:16, 0, 1] = float("-inf")  # exactly the second group (stuff and things)
    sem[0, 1:, 0, 2] = float("-inf")  # all but channel 0
    sem[0, :-1, 0, 3] = float("-inf")  # all but the last channel
    sem[0, :, 1, 0] = float("-inf")  # all
    sem[0, ::3, 2, :] = float("-inf")  # every third channel
    sem = sem.to(device).requires_grad_()
    level = torch.randn(1, 2, 3, 4, device=device, requires_grad=True)
    ours = ops.fg_fusion(sem, [level], num_stuff)[0]
    expected = composition(sem, [level], num_stuff, "logit")[0]
    assert torch.isnan(ours[0, :, 1, 0]).all()
    assert_close(ours, expected, equal_nan=True)
    grad = torch.randn_like(ours)
    ours_grad = torch.autograd.grad(ours, sem, grad)[0]
    expected_grad = torch.autograd.grad(expected, sem, grad)[0]
    finite = torch.ones_like(ours_grad, dtype=torch.bool)
    finite[0, :, 1, 0] = False  # the all -inf pixel: NaN in both, through different products
    assert_close(ours_grad[finite], expected_grad[finite])


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", ["rising", "falling", "random"])
def test_softmax_statistics_output(device, order):
    """The op's second output is each pixel's (max, sum of exp(x - max), fg), computed by an online softmax; logits
    that rise with the channel make it rescale its sums at every channel (the worst case for its rounding)."""
    channels = 133
    ramp = torch.linspace(-20, 20, channels, device=device)[:, None, None]
    noise = torch.randn(2, channels, 6, 20, device=device) * 0.1
    sem = {"rising": ramp + noise, "falling": -ramp + noise, "random": noise * 40}[order]
    level = torch.randn(2, 3, 3, 10, device=device)
    _, stats = torch.ops.eyecool.fg_fusion(sem, [level], 53, "logit")
    assert stats.shape == (3, 2, 6, 20) and stats.dtype == torch.float32
    sem64 = sem.double()
    top = sem64.amax(dim=1)
    expected_fg = torch.softmax(sem64, dim=1)[:, 53:].sum(dim=1)
    assert torch.equal(stats[0], sem.amax(dim=1))  # the max is exact
    assert_close(stats[1].double(), torch.exp(sem64 - top[:, None]).sum(dim=1), atol=0, rtol=2e-6)
    assert_close(stats[2].double(), expected_fg, atol=1e-6, rtol=2e-6)


def test_reference_is_the_composition():
    sem, levels = inputs("cpu", torch.float64)
    for mode in ("logit", "prob"):
        for a, b in zip(reference.fg_fusion(sem, levels, 3, mode), composition(sem, levels, 3, mode)):
            assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["logit", "prob"])
def test_gradcheck(device, mode):
    sem, levels = inputs(device, torch.float64, sem_size=(6, 7), level_sizes=((3, 4), (4, 3)), channels=5, batch=2,
                         scale=1.0)
    sem.requires_grad_()
    levels = [lvl.requires_grad_() for lvl in levels]
    assert torch.autograd.gradcheck(lambda s, a, b: tuple(ops.fg_fusion(s, [a, b], 2, mode)), (sem, *levels))


def test_backward_is_deterministic_on_cpu_threads():
    sem, levels = inputs("cpu", torch.float32, sem_size=(33, 40), channels=7)
    sem.requires_grad_()
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            sem.grad = None
            sum(o.sum() for o in ops.fg_fusion(sem, levels, 3, "prob")).backward()
            results.append(sem.grad.clone())
        finally:
            torch.set_num_threads(old)
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision kernels are tested on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cuda(dtype):
    sem, levels = inputs("cuda", torch.float32)
    ours = ops.fg_fusion(sem.to(dtype), [lvl.to(dtype) for lvl in levels], 4, "prob")
    for a, b in zip(ours, composition(sem, levels, 4, "prob")):
        assert_close(a.float(), b, dtype=dtype)


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    sem, levels = inputs(device, torch.float32, sem_size=(8, 10), level_sizes=((8, 10), (3, 4)), channels=5)
    sem.requires_grad_()
    levels = [lvl.requires_grad_() for lvl in levels]
    for mode in ("logit", "prob"):
        torch.library.opcheck(torch.ops.eyecool.fg_fusion.default, (sem, levels, 2, mode))
    grads = [torch.randn_like(lvl) for lvl in levels]
    detached = [lvl.detach() for lvl in levels]
    _, stats = torch.ops.eyecool.fg_fusion(sem.detach(), detached, 2, "prob")
    torch.library.opcheck(torch.ops.eyecool._fg_fusion_backward.default,
                          (grads, sem.detach(), detached, stats, 2, "prob"))


@needs_compiled
def test_torch_compile_fullgraph():
    sem, levels = inputs("cpu", torch.float32, sem_size=(8, 12), level_sizes=((8, 12), (4, 6)), channels=6)
    sem.requires_grad_()

    def loss(s, a, b):
        fused = ops.fg_fusion(s, [a, b], 3, "prob")
        return sum(f.square().sum() for f in fused)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    out = compiled(sem, *levels)
    out.backward()
    grad = sem.grad.clone()
    sem.grad = None
    expected = loss(sem, *levels)
    expected.backward()
    assert_close(out, expected)
    assert_close(grad, sem.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_some_levels_only(device):
    """A loss that uses some of the fused levels: the others send no gradient into the op (undefined) and their
    inputs get zeros; the rest matches the composition."""
    sem, levels = inputs(device, torch.float64)
    sem.requires_grad_()
    levels = [lvl.requires_grad_() for lvl in levels]
    ours = ops.fg_fusion(sem, levels, 3, "prob")
    expected = composition(sem, levels, 3, "prob")
    got = torch.autograd.grad(ours[1].sum() + ours[3].square().sum(), [sem, *levels])
    want = torch.autograd.grad(expected[1].sum() + expected[3].square().sum(), [sem, *levels],
                               materialize_grads=True)  # zeros for the levels 0 and 2, which it does not use
    for a, b in zip(got, want):
        assert_close(a, b)
    assert not got[1].any() and not got[3].any()  # the unused levels 0 and 2


@needs_compiled
def test_double_backward_is_refused():
    """The backward is not differentiable; asking for a second derivative says so instead of returning a wrong
    one."""
    sem, levels = inputs("cpu", torch.float64, channels=5)
    sem.requires_grad_()
    out = ops.fg_fusion(sem, levels, 2)
    (grad,) = torch.autograd.grad(sum(o.sum() for o in out), sem, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad.sum(), sem)


def test_detached_semantics_get_no_gradient():
    sem, levels = inputs("cpu", torch.float32)
    sem.requires_grad_()
    levels = [lvl.requires_grad_() for lvl in levels]
    sum(o.sum() for o in ops.fg_fusion(sem.detach(), levels, 3)).backward()
    assert sem.grad is None and all(lvl.grad is not None for lvl in levels)


def test_bad_input_messages():
    sem, levels = inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"rpn_logits\[1\] must have the batch size of sem_logits \(2\)"):
        ops.fg_fusion(sem, [levels[0], levels[1][:1]], 3)
    with pytest.raises(ValueError, match=r"num_stuff must be an int in \[0, 9\).*got 9"):
        ops.fg_fusion(sem, levels, 9)
    with pytest.raises(ValueError, match=r"num_stuff must be an int in \[0, 9\).*got -1"):
        ops.fg_fusion(sem, levels, -1)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.fg_fusion(sem, levels, 3, "sum")
    with pytest.raises(ValueError, match=r"sem_logits must be a 4-d Tensor"):
        ops.fg_fusion(sem[0], levels, 3)
    with pytest.raises(ValueError, match="rpn_logits must be a non-empty list"):
        ops.fg_fusion(sem, [], 3)
    with pytest.raises(ValueError, match=r"rpn_logits\[0\] must have the dtype of sem_logits"):
        ops.fg_fusion(sem, [levels[0].double()], 3)


@needs_compiled
def test_kernel_checks_its_inputs():
    sem, levels = inputs("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="num_stuff must be in"):
        torch.ops.eyecool.fg_fusion(sem, levels, 9, "logit")
    with pytest.raises(RuntimeError, match="batch size of sem_logits"):
        torch.ops.eyecool.fg_fusion(sem, [levels[0][:1]], 3, "logit")
    with pytest.raises(RuntimeError, match="mode must be"):
        torch.ops.eyecool.fg_fusion(sem, levels, 3, "sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("empty_shape", [(0, 4), (3, 0), (0, 0)])
def test_empty_level_contributes_nothing(device, empty_shape):
    """A level without cells (the reference's adaptive_avg_pool2d cannot run backward through one) leaves the
    other levels' outputs and gradients as they are without it."""
    sem, (level,) = inputs(device, torch.float32, sem_size=(6, 7), level_sizes=((3, 5),), channels=5)
    sem.requires_grad_()
    level.requires_grad_()
    empty = torch.randn(2, 3, *empty_shape, device=device, requires_grad=True)
    ours = ops.fg_fusion(sem, [empty, level], 2, "prob")
    expected = composition(sem, [level], 2, "prob")
    assert ours[0].shape == empty.shape
    assert_close(ours[1], expected[0])
    grad_sem, grad_empty, grad_level = torch.autograd.grad(sum(o.square().sum() for o in ours), [sem, empty, level])
    expected_sem, expected_level = torch.autograd.grad(expected[0].square().sum(), [sem, level])
    assert grad_empty.shape == empty.shape
    assert_close(grad_sem, expected_sem)
    assert_close(grad_level, expected_level)

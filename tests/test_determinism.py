"""With ``torch.use_deterministic_algorithms(True)`` every op is deterministic on the CPU (two runs, also with
another thread count, give bit-identical outputs and gradients) and runs without complaint; on CUDA the
backward passes that use atomic adds (roi_align, multilevel_roi_align, deform_conv2d) raise the dispatcher's
error instead of returning run-to-run different gradients."""
import pytest
import torch

from eyecool_ext import ops


@pytest.fixture(autouse=True)
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * scale).to(device).requires_grad_()

    boxes = torch.rand(40, 4, generator=g) * 48
    boxes[:, 2:] += boxes[:, :2] + 4
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), boxes], dim=1).to(device)
    return {
        "feature": randn(2, 16, 24, 24),
        "pyramid": [randn(2, 8, 24 >> i, 24 >> i) for i in range(3)],
        "rois": rois,
        "offset": randn(2, 18, 24, 24, scale=2.0),
        "mask": torch.rand(2, 9, 24, 24, generator=g).to(device).requires_grad_(),
        "weight": randn(8, 16, 3, 3),
        "sem": randn(2, 7, 24, 24, scale=3.0),
        "rpn": [randn(2, 3, 24 >> i, 24 >> i) for i in range(3)],
    }


def _run_op(name, t):
    """(outputs, gradients) of op ``name`` on the tensors ``t``."""
    if name == "roi_align":
        outs, wrt = [ops.roi_align(t["feature"], t["rois"], 7, 0.5, 0, True)], [t["feature"]]
    elif name == "multilevel_roi_align":
        outs = [ops.multilevel_roi_align(t["pyramid"], t["rois"], 5, [0.5, 0.25, 0.125], canonical_box_size=16)]
        wrt = t["pyramid"]
    elif name == "deform_conv2d":
        outs = [ops.deform_conv2d(t["feature"], t["offset"], t["weight"], padding=1, mask=t["mask"])]
        wrt = [t["feature"], t["offset"], t["mask"], t["weight"]]
    elif name == "fg_fusion":
        outs, wrt = ops.fg_fusion(t["sem"], t["rpn"], 3, "prob"), [t["sem"], *t["rpn"]]
    else:
        raise ValueError(name)
    grads = torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
    return [o.detach() for o in outs], [g for g in grads if g is not None]


def _inference_op(name):
    g = torch.Generator().manual_seed(1)
    if name == "upsnet_panoptic_merge":
        boxes = torch.rand(12, 4, generator=g) * 40
        boxes[:, 2:] += boxes[:, :2] + 2
        return [ops.upsnet_panoptic_merge(torch.randn(7, 16, 16, generator=g), 3, boxes,
                                          torch.randint(0, 4, (12,), generator=g), torch.randn(12, 28, 28, generator=g),
                                          (64, 64))]
    if name == "pq_pair_counts":
        return list(ops.pq_pair_counts(torch.randint(0, 9, (64, 80), generator=g),
                                       torch.randint(0, 9, (64, 80), generator=g)))
    if name == "read_panoptic_png":
        import os
        import tempfile

        from PIL import Image

        pixels = torch.randint(0, 256, (20, 30, 3), generator=g, dtype=torch.uint8).numpy()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "ids.png")
            Image.fromarray(pixels).save(path)
            ids = ops.read_panoptic_png(path)
        return [ids] if ids is not None else []  # None: no compiled reader
    raise ValueError(name)


def _bitwise_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(-1).view(torch.uint8) if x.is_floating_point() else x,
                           y.view(-1).view(torch.uint8) if y.is_floating_point() else y)


@pytest.mark.parametrize("name", ["roi_align", "multilevel_roi_align", "deform_conv2d", "fg_fusion"])
def test_differentiable_ops_are_bitwise_deterministic_on_cpu(name):
    threads = torch.get_num_threads()
    first = _run_op(name, _inputs())
    second = _run_op(name, _inputs())
    torch.set_num_threads(1)
    try:
        single_thread = _run_op(name, _inputs())
    finally:
        torch.set_num_threads(threads)
    for run in (second, single_thread):
        _bitwise_equal(first[0], run[0])
        _bitwise_equal(first[1], run[1])


@pytest.mark.parametrize("name", ["upsnet_panoptic_merge", "pq_pair_counts", "read_panoptic_png"])
def test_inference_ops_are_deterministic_on_cpu(name):
    _bitwise_equal(_inference_op(name), _inference_op(name))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ["roi_align", "multilevel_roi_align", "deform_conv2d"])
def test_cuda_backward_with_atomics_raises_in_deterministic_mode(name):
    t = _inputs("cuda")
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        _run_op(name, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_forward_and_fg_fusion_are_deterministic():
    t = _inputs("cuda")
    first = _run_op("fg_fusion", t)
    second = _run_op("fg_fusion", t)
    _bitwise_equal(first[0], second[0])
    _bitwise_equal(first[1], second[1])
    with torch.no_grad():
        a = ops.roi_align(t["feature"], t["rois"], 7, 0.5, 0, True)
        b = ops.roi_align(t["feature"], t["rois"], 7, 0.5, 0, True)
    _bitwise_equal([a], [b])

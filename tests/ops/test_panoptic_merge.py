"""upsnet_panoptic_merge against the reference that materialises UPSNet's logit stack and takes its argmax, and
heuristic_panoptic_merge against the panopticapi rules."""
import pytest
import torch
import torch.nn.functional as F

from eyecool_ext import ops, reference
from op_tester import DEVICES, needs_compiled

NUM_STUFF, NUM_THINGS = 4, 5


def random_instances(num, height, width, dtype=torch.float32, device="cpu", seed=0, mask_size=28):
    """Boxes in pixels (some partly outside the image, some tiny), thing classes and mask logits."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float64)
    xy = torch.rand(num, 2, generator=g, dtype=torch.float64) * size * 1.2 - size * 0.2
    wh = torch.rand(num, 2, generator=g, dtype=torch.float64) * size * 0.7 + 0.3
    boxes = torch.cat([xy, xy + wh], dim=1).to(dtype=dtype, device=device)
    classes = torch.randint(0, NUM_THINGS, (num,), generator=g).to(device)
    masks = (torch.randn(num, mask_size, mask_size, generator=g, dtype=torch.float64) * 3).to(dtype=dtype,
                                                                                              device=device)
    return boxes, classes, masks


def assert_same_labels(labels, sem, boxes, classes, masks, output_size=None):
    """Equal to the reference argmax; in float32 a different label is allowed only at a numerical tie (the two
    stack entries within 1e-4), since the kernel and grid_sample / interpolate round differently."""
    expected = reference.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks, output_size)
    assert labels.dtype == torch.int64 and labels.shape == expected.shape
    if sem.dtype == torch.float64:
        assert torch.equal(labels, expected)
        return
    differ = labels != expected
    if differ.any():
        stack = reference.upsnet_logit_stack(reference.panoptic_merge.semantic_at_size(sem, output_size), NUM_STUFF,
                                             boxes, classes, masks)
        ours = stack.gather(0, labels.unsqueeze(0))[0][differ]
        theirs = stack.gather(0, expected.unsqueeze(0))[0][differ]
        assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)
        assert differ.float().mean() < 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_instances", [0, 1, 7, 30])
def test_matches_materialised_stack(device, dtype, num_instances):
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 37, 53, dtype=dtype, device=device) * 2
    boxes, classes, masks = random_instances(num_instances, 37, 53, dtype, device, seed=num_instances)
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks)
    assert_same_labels(labels, sem, boxes, classes, masks)
    assert labels.min() >= 0 and labels.max() <= NUM_STUFF + num_instances


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output_size", [(60, 84), (61, 90), (15, 21)])
def test_resized_semantic_logits(device, dtype, output_size):
    """1/4-scale logits upsampled on the fly equal F.interpolate(bilinear, align_corners=False) then the merge."""
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 15, 21, dtype=dtype, device=device) * 2
    boxes, classes, masks = random_instances(12, *output_size, dtype=dtype, device=device, seed=3)
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks, output_size)
    assert labels.shape == output_size
    assert_same_labels(labels, sem, boxes, classes, masks, output_size)
    full = F.interpolate(sem[None], size=output_size, mode="bilinear", align_corners=False)[0]
    assert_same_labels(ops.upsnet_panoptic_merge(full, NUM_STUFF, boxes, classes, masks), full, boxes, classes, masks)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_instances_compare_stuff_with_unknown(device):
    """With M = 0 the unknown logit is max over things minus 0."""
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 9, 11, device=device, dtype=torch.float64)
    empty = random_instances(0, 9, 11, torch.float64, device)
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, *empty)
    stuff_max, stuff_arg = sem[:NUM_STUFF].max(0)
    expected = torch.where(sem[NUM_STUFF:].max(0).values > stuff_max, torch.full_like(stuff_arg, NUM_STUFF), stuff_arg)
    assert torch.equal(labels, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_one_instance_covering_everything(device):
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 16, 16, device=device)
    boxes = torch.tensor([[-3.0, -3.0, 40.0, 40.0]], device=device)
    masks = torch.full((1, 28, 28), 50.0, device=device)  # a confident mask everywhere inside
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, torch.tensor([2], device=device), masks)
    assert (labels == NUM_STUFF).all()
    assert_same_labels(labels, sem, boxes, torch.tensor([2], device=device), masks)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_first_index(device):
    """Equal stack entries: stuff before instances before unknown, lower instance index first."""
    sem = torch.zeros(NUM_STUFF + NUM_THINGS, 8, 8, device=device)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 4.0, 4.0]], device=device)
    classes = torch.tensor([0, 1], device=device)
    masks = torch.zeros(2, 28, 28, device=device)
    # Every entry of the stack is 0: stuff class 0 wins.
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks)
    assert (labels == 0).all()
    # Stuff below 0: the instances (value 0 inside and outside their boxes) tie, instance 0 wins everywhere.
    sem[:NUM_STUFF] = -1.0
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks)
    assert (labels == NUM_STUFF).all()
    # Instance 1's semantic logit larger inside its box: it wins there only.
    sem[NUM_STUFF + 1, :4, :4] = 2.0
    sem[NUM_STUFF + 0] = -0.5
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks)
    assert (labels[:4, :4] == NUM_STUFF + 1).all()
    # Unknown = max thing - max Y = 2 - 2 = 0 inside box 1 ties with nothing larger; equality goes to the instance.
    assert_same_labels(labels, sem, boxes, classes, masks)


@pytest.mark.parametrize("device", DEVICES)
def test_pixel_centre_pasting_convention(device):
    """A box [2, 5) x [1, 3) holds pixel columns 2..4 (centres 2.5, 3.5, 4.5) and rows 1..2; 1.5 <= x < 2.5 holds
    column 1 only when its centre 1.5 is inside."""
    sem = torch.full((NUM_STUFF + NUM_THINGS, 6, 8), -5.0, device=device, dtype=torch.float64)
    sem[0] = 0.0  # stuff 0 everywhere else
    masks = torch.full((2, 28, 28), 30.0, device=device, dtype=torch.float64)  # half of it at the border: 15
    boxes = torch.tensor([[2.0, 1.0, 5.0, 3.0], [1.5, 4.0, 2.5, 5.5]], device=device, dtype=torch.float64)
    labels = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, torch.tensor([0, 0], device=device), masks)
    inside0 = torch.zeros(6, 8, dtype=torch.bool, device=device)
    inside0[1:3, 2:5] = True
    inside1 = torch.zeros(6, 8, dtype=torch.bool, device=device)
    inside1[4:5, 1:2] = True
    assert torch.equal(labels == NUM_STUFF, inside0)
    assert torch.equal(labels == NUM_STUFF + 1, inside1)


def test_batch_entry_point():
    sem = torch.randn(3, NUM_STUFF + NUM_THINGS, 10, 12)
    instances = [random_instances(n, 40, 48, seed=n) for n in (0, 3, 9)]
    boxes, classes, masks = (list(t) for t in zip(*instances))
    batch = ops.upsnet_panoptic_merge_batch(sem, NUM_STUFF, boxes, classes, masks, (40, 48))
    for labels, s, b, c, m in zip(batch, sem, boxes, classes, masks):
        assert torch.equal(labels, ops.upsnet_panoptic_merge(s, NUM_STUFF, b, c, m, (40, 48)))
    sizes = [(40, 48), (20, 24), (10, 12)]
    batch = ops.upsnet_panoptic_merge_batch(list(sem), NUM_STUFF, boxes, classes, masks, sizes)
    assert [tuple(b.shape) for b in batch] == sizes
    ref = reference.upsnet_panoptic_merge_batch(list(sem.double()), NUM_STUFF, [b.double() for b in boxes], classes,
                                                [m.double() for m in masks], sizes)
    assert [tuple(b.shape) for b in ref] == sizes


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 6, 7, device=device)
    boxes, classes, masks = random_instances(3, 12, 14, device=device)
    torch.library.opcheck(torch.ops.eyecool.upsnet_panoptic_merge.default,
                          (sem, NUM_STUFF, boxes, classes, masks, 12, 14))
    compiled = torch.compile(lambda *a: ops.upsnet_panoptic_merge(*a, (12, 14)), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(sem, NUM_STUFF, boxes, classes, masks),
                       ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks, (12, 14)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision kernels are tested on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_cuda(dtype):
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 20, 24, device="cuda")
    boxes, classes, masks = random_instances(6, 20, 24, device="cuda")
    labels = ops.upsnet_panoptic_merge(sem.to(dtype), NUM_STUFF, boxes.to(dtype), classes, masks.to(dtype))
    expected = ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks)
    assert (labels == expected).float().mean() > 0.95


def test_bad_input_messages():
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 8, 8)
    boxes, classes, masks = random_instances(2, 8, 8)
    with pytest.raises(ValueError, match=r"num_stuff must be an int in \[0, 9\)"):
        ops.upsnet_panoptic_merge(sem, 9, boxes, classes, masks)
    with pytest.raises(ValueError, match=r"classes must be thing indices in \[0, 5\)"):
        ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes + 5, masks)
    with pytest.raises(ValueError, match=r"boxes must be a Tensor\[M, 4\]"):
        ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes[:, :3], classes, masks)
    with pytest.raises(ValueError, match=r"mask_logits must be a Tensor\[2, s, s\]"):
        ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks[:1])
    with pytest.raises(ValueError, match=r"sem_logits must be a 3-d Tensor"):
        ops.upsnet_panoptic_merge(sem[None], NUM_STUFF, boxes, classes, masks)
    with pytest.raises(ValueError, match="boxes must have the dtype of sem_logits"):
        ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes.double(), classes, masks)
    with pytest.raises(ValueError, match="output_size must be positive"):
        ops.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes, masks, (0, 4))
    with pytest.raises(ValueError, match="same length"):
        ops.upsnet_panoptic_merge_batch([sem], NUM_STUFF, [boxes, boxes], [classes], [masks])


@needs_compiled
def test_kernel_checks_its_inputs(kernels):
    sem = torch.randn(NUM_STUFF + NUM_THINGS, 8, 8)
    boxes, classes, masks = random_instances(2, 8, 8)
    if kernels == "cpu_kernels":  # CUDA reads an out-of-range class as a 0 logit (a check would synchronise)
        with pytest.raises(RuntimeError, match=r"classes\[0\] must be a thing index"):
            torch.ops.eyecool.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, torch.tensor([7, 0]), masks, 8, 8)
    with pytest.raises(RuntimeError, match="classes must be an int64 tensor"):
        torch.ops.eyecool.upsnet_panoptic_merge(sem, NUM_STUFF, boxes, classes.int(), masks, 8, 8)


# ---- heuristic (panopticapi) merge ----

def test_heuristic_rules():
    sem_seg = torch.zeros(10, 10, dtype=torch.long)
    sem_seg[:, 5:] = 1  # stuff 1 on the right half (50 pixels)
    sem_seg[8:, :] = NUM_STUFF + 2  # a thing class at the bottom: never pasted as stuff
    masks = torch.zeros(4, 10, 10, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True       # score 0.9: kept
    masks[1, 0:4, 1:5] = True       # score 0.8: 12 of 16 pixels overlap instance 0 (> 0.5): dropped
    masks[2, 2:6, 3:7] = True       # score 0.7: 2 of 16 overlap: kept, takes its 14 free pixels
    masks[3, 6:8, 6:8] = True       # score 0.3: under the score threshold
    scores = torch.tensor([0.9, 0.8, 0.7, 0.3])
    out = ops.heuristic_panoptic_merge(sem_seg, NUM_STUFF, masks, scores, overlap_threshold=0.5,
                                       stuff_area_limit=20, score_threshold=0.5)
    void = NUM_STUFF + 4
    assert (out[0:4, 0:4] == NUM_STUFF + 0).all()
    assert int((out == NUM_STUFF + 1).sum()) == 0
    assert int((out == NUM_STUFF + 2).sum()) == 14
    assert int((out == NUM_STUFF + 3).sum()) == 0
    stuff1 = (sem_seg == 1) & (out != NUM_STUFF + 2)
    assert (out[stuff1] == 1).all()           # stuff 1 has >= 20 free pixels
    assert (out[8:, :] == void).all()           # thing pixels of the semantic map without instance: void
    stuff0_free = (sem_seg == 0) & (out < NUM_STUFF)
    assert int(stuff0_free.sum()) == 0          # stuff 0 keeps fewer than 20 free pixels: void
    out = ops.heuristic_panoptic_merge(sem_seg, NUM_STUFF, masks, scores, stuff_area_limit=5)
    assert (out[(sem_seg == 0) & (out >= NUM_STUFF + 4)] == void).all() and int((out == 0).sum()) > 0
    assert reference.heuristic_panoptic_merge is ops.heuristic_panoptic_merge

import torch

import eyecool_ext

from eyecool.modeling.boxes import paste_mask_logits
from eyecool.modeling.panoptic_head import choose_kept_instances, panoptic_logits, panoptic_training_target

S = 2  # stuff classes; things follow


def test_training_target_hand_made():
    # 8x8 image, stride 2 -> 4x4 grid sampling pixels 1, 3, 5, 7 (and void beyond the 7x8 image).
    sem = torch.zeros(7, 8, dtype=torch.long)
    sem[:, 4:] = 1
    sem[0:2, 0:2] = 255
    kept = torch.zeros(2, 7, 8, dtype=torch.bool)
    kept[0, 2:4, 0:4] = True  # instance 0 (kept)
    kept[1, 4:7, 4:8] = True  # instance 1 (kept)
    dropped = torch.zeros(1, 7, 8, dtype=torch.bool)
    dropped[0, 4:7, 0:2] = True
    crowd = torch.zeros(7, 8, dtype=torch.bool)
    crowd[0:2, 6:8] = True
    for m in list(kept) + list(dropped):
        sem[m] = S + 0
    sem[crowd] = S + 1
    target = panoptic_training_target(sem, kept, dropped, crowd, S, (4, 4), stride=2)
    unknown = S + 2
    expected = torch.tensor([
        [255, 0, 1, unknown],
        [S + 0, S + 0, 1, 1],
        [unknown, 0, S + 1, S + 1],
        [255, 255, 255, 255],
    ])
    assert torch.equal(target, expected)


def test_thing_pixels_of_no_kept_instance_are_unknown():
    sem = torch.full((4, 4), S + 1, dtype=torch.long)
    none = torch.zeros(0, 4, 4, dtype=torch.bool)
    target = panoptic_training_target(sem, none, none, torch.zeros(4, 4, dtype=torch.bool), S, (4, 4), stride=1)
    assert torch.equal(target, torch.full((4, 4), S))


def test_kept_fraction_is_exact_and_disjoint():
    kept, dropped = choose_kept_instances(10, 0.7)
    assert kept.numel() == 7 and dropped.numel() == 3
    assert sorted(torch.cat([kept, dropped]).tolist()) == list(range(10))


def test_paste_mask_logits_inside_box_only():
    logits = torch.arange(4.0).view(1, 2, 2)
    pasted = paste_mask_logits(logits, torch.tensor([[2.0, 1.0, 6.0, 3.0]]), 4, 8)[0]
    assert torch.all(pasted[:, :2] == 0) and torch.all(pasted[:, 6:] == 0) and torch.all(pasted[3] == 0)
    assert torch.all(pasted[0] == 0)
    # Box pixel centres x = 2.5..5.5 over a 2-wide mask: sampled at mask x = -0.25, 0.25, 0.75, 1.25 (zero padding).
    assert torch.allclose(pasted[1, 2:6], torch.tensor([0.0, 0.25, 0.75, 0.75]))
    assert torch.allclose(pasted[2, 2:6], torch.tensor([1.5, 2.25, 2.75, 2.25]))


def test_panoptic_logits_stack_formula():
    torch.manual_seed(0)
    k = 3
    sem = torch.randn(S + k, 6, 6)
    boxes = torch.tensor([[0.0, 0.0, 3.0, 3.0], [2.0, 2.0, 6.0, 5.0]])
    classes = torch.tensor([2, 0])
    masks = torch.randn(2, 4, 4)
    stack = panoptic_logits(sem, boxes, classes, masks, S)
    assert stack.shape == (S + 2 + 1, 6, 6)
    assert torch.equal(stack[:S], sem[:S])
    inside = torch.zeros(2, 6, 6)
    inside[0, 0:3, 0:3] = 1
    inside[1, 2:5, 2:6] = 1
    y = sem[S + classes] * inside
    expected_instances = y + paste_mask_logits(masks, boxes, 6, 6)
    assert torch.allclose(stack[S:S + 2], expected_instances)
    assert torch.allclose(stack[-1], sem[S:].max(0).values - y.max(0).values)
    # The inference merge's reference builds the same stack.
    reference = eyecool_ext.reference.upsnet_logit_stack(sem, S, boxes, classes, masks)
    assert torch.allclose(stack, reference, atol=1e-6)
    # No instances: unknown = max thing logit.
    empty = panoptic_logits(sem, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, 4), S)
    assert torch.allclose(empty[-1], sem[S:].max(0).values)

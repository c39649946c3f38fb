"""UPSNet panoptic inference around the fused merge: detection selection, mask removal, stuff area limit and the
COCO panoptic output (segment ids, segments_info with the dataset's category ids)."""
import torch

import eyecool_ext
from eyecool.modeling.panoptic_inference import (instance_masks, labels_to_panoptic, panoptic_inference,
                                                 select_instances)

STUFF_IDS = [92, 93, 95]          # S = 3 stuff channels
THING_IDS = [1, 2, 3, 4]          # K = 4 thing channels
S = len(STUFF_IDS)


def detection(box, score, cls, mask_value=5.0):
    return (torch.tensor(box, dtype=torch.float32), torch.tensor(score), torch.tensor(cls),
            torch.full((28, 28), mask_value))


def stack(*dets):
    boxes, scores, classes, masks = zip(*dets)
    return torch.stack(boxes), torch.stack(scores), torch.stack(classes), torch.stack(masks)


def test_instance_masks_match_the_full_image_paste():
    boxes = torch.tensor([[3.2, -4.0, 30.7, 11.5], [0.0, 0.0, 40.0, 24.0], [38.5, 20.2, 60.0, 30.0]])
    logits = torch.randn(3, 28, 28)
    inside, pasted = eyecool_ext.reference.paste_mask_logits(boxes, logits, 24, 40)
    for (y0, x0, mask), full in zip(instance_masks(boxes, logits, 24, 40), inside & (pasted > 0)):
        rebuilt = torch.zeros(24, 40, dtype=torch.bool)
        rebuilt[y0:y0 + mask.size(0), x0:x0 + mask.size(1)] = mask
        assert torch.equal(rebuilt, full)


def test_selection_threshold_nms_max_and_overlap_removal():
    boxes, scores, classes, masks = stack(
        detection([0, 0, 20, 20], 0.95, 0),
        detection([1, 1, 21, 21], 0.90, 1),    # NMS (IoU > 0.5 with the first, class-agnostic): dropped
        detection([10, 0, 30, 20], 0.85, 0),   # same class as the first, overlap 50% of its pixels: dropped
        detection([10, 0, 30, 20], 0.80, 2),   # NMS-suppressed too (IoU 1 with the previous box)
        detection([25, 0, 40, 20], 0.75, 0),   # same class, 0 overlap with kept masks: kept
        detection([0, 25, 10, 30], 0.70, 3, mask_value=-5.0),  # empty mask: dropped
        detection([30, 25, 40, 30], 0.50, 3),  # below the score threshold
    )
    kept = select_instances(boxes, scores, classes, masks, 32, 40)
    assert kept.tolist() == [0, 4]
    assert select_instances(boxes, scores, classes, masks, 32, 40, max_instances=1).tolist() == [0]
    # With a laxer overlap threshold the half-covered box stays (and the last one, a third covered by it, too).
    assert select_instances(boxes, scores, classes, masks, 32, 40, overlap_threshold=0.6).tolist() == [0, 2, 4]


def test_overlap_with_other_classes_is_allowed():
    boxes, scores, classes, masks = stack(detection([0, 0, 20, 20], 0.95, 0), detection([5, 5, 30, 30], 0.9, 1))
    assert select_instances(boxes, scores, classes, masks, 32, 32).tolist() == [0, 1]


def test_labels_to_panoptic_ids_and_stuff_area_limit():
    labels = torch.full((10, 10), S + 2, dtype=torch.long)   # unknown by default (M = 2)
    labels[:5] = 0                                          # stuff 0: 50 pixels
    labels[5, :3] = 1                                       # stuff 1: 3 pixels, under the limit
    labels[6:] = S + 1                                      # instance 1: 40 pixels; instance 0 empty
    seg, info = labels_to_panoptic(labels, S, torch.tensor([2, 3]), torch.tensor([0.9, 0.8]), STUFF_IDS, THING_IDS,
                                   stuff_area_limit=10)
    assert info == [
        {"id": 1, "category_id": 4, "isthing": True, "score": 0.800000011920929, "area": 40},
        {"id": 2, "category_id": 92, "isthing": False, "area": 50},
    ]
    assert seg.dtype == torch.int64
    assert (seg[:5] == 2).all() and (seg[6:] == 1).all()
    assert (seg[5] == 0).all()  # small stuff and unknown are void
    for segment in info:
        assert int((seg == segment["id"]).sum()) == segment["area"]


def test_end_to_end_on_a_constructed_scene():
    """Stuff 0 on top, stuff 2 at the bottom, one confident person-like instance in the middle."""
    sem = torch.full((S + len(THING_IDS), 64, 64), -4.0)
    sem[0, :32] = 3.0
    sem[2, 32:] = 3.0
    sem[S + 1, 16:48, 16:48] = 5.0
    boxes, scores, classes, masks = stack(detection([16, 16, 48, 48], 0.9, 1, 4.0),
                                          detection([0, 0, 8, 8], 0.3, 0))
    seg, info = panoptic_inference(sem, boxes, scores, classes, masks, S, STUFF_IDS, THING_IDS, stuff_area_limit=100)
    by_category = {s["category_id"]: s for s in info}
    assert set(by_category) == {2, 92, 95}
    assert by_category[2]["isthing"] and by_category[2]["area"] == 32 * 32
    assert abs(by_category[2]["score"] - 0.9) < 1e-6
    assert (seg[16:48, 16:48] == by_category[2]["id"]).all()
    assert by_category[92]["area"] + by_category[95]["area"] + 32 * 32 == 64 * 64
    # The same at 1/4 scale, resized inside the merge kernel.
    small = torch.nn.functional.interpolate(sem[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    seg_small, info_small = panoptic_inference(small, boxes, scores, classes, masks, S, STUFF_IDS, THING_IDS,
                                               output_size=(64, 64), stuff_area_limit=100)
    assert seg_small.shape == (64, 64)
    assert {s["category_id"] for s in info_small} == {2, 92, 95}


def test_no_detections_gives_stuff_only():
    sem = torch.randn(S + len(THING_IDS), 20, 20)
    sem[:S] += 10
    empty = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 28, 28))
    seg, info = panoptic_inference(sem, *empty, S, STUFF_IDS, THING_IDS, stuff_area_limit=0)
    assert all(not s["isthing"] for s in info)
    assert sum(s["area"] for s in info) == 400 and (seg > 0).all()
    seg, info = panoptic_inference(sem, *empty, S, STUFF_IDS, THING_IDS)  # default limit 4096 > 400 pixels
    assert info == [] and (seg == 0).all()

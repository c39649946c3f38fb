"""PanopticEvaluator (in-memory predictions) against pq_compute on the same predictions written as PNGs, and
its distributed gathering."""
import numpy as np
import pytest
import torch

from eyecool.evaluation import PanopticEvaluator, PanopticFormatError, pq_compute
from eyecool.evaluation import evaluator as evaluator_module
from panoptic_data import random_pair, write_split


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(5)
    pairs = [random_pair(rng, image_id) for image_id in range(8)]
    gt_json, gt_dir = write_split(str(tmp_path), "gt", [g for g, _ in pairs])
    pred_json, pred_dir = write_split(str(tmp_path), "pred", [p for _, p in pairs])
    return pairs, gt_json, gt_dir, pq_compute(gt_json, pred_json, gt_dir, pred_dir, verbose=False)


def assert_same(a, b):
    for name in ("All", "Things", "Stuff"):
        assert a[name]["n"] == b[name]["n"]
        for metric in ("pq", "sq", "rq"):
            assert a[name][metric] == pytest.approx(b[name][metric], abs=1e-12)
    for cat_id, r in b["per_class"].items():
        assert a["per_class"][cat_id] == pytest.approx(r, abs=1e-12)


def test_in_memory_equals_pq_compute(dataset, tmp_path, capsys):
    pairs, gt_json, gt_dir, expected = dataset
    out_json = str(tmp_path / "pq.json")
    evaluator = PanopticEvaluator(gt_json, gt_dir, output_json=out_json)
    for i, (_, pred) in enumerate(pairs):
        ids = pred["ids"]
        # Any integer map type works: numpy int64, torch int32, torch int64.
        pred_map = ids if i % 3 == 0 else torch.from_numpy(ids).to(torch.int32 if i % 3 == 1 else torch.int64)
        evaluator.update(pred["image_id"], pred_map, pred["segments_info"])
    results = evaluator.summarize(per_class=True)
    assert_same(results, expected)
    printed = capsys.readouterr().out
    assert "Things" in printed and "person" in printed  # the All/Things/Stuff and the per-class tables
    assert '"PQ_st"' in open(out_json).read()
    evaluator.reset()
    with pytest.raises(ValueError, match="no prediction for 8 of the 8 gt images"):
        evaluator.summarize()


def test_missing_images_allowed_on_request(dataset):
    pairs, gt_json, gt_dir, _ = dataset
    evaluator = PanopticEvaluator(gt_json, gt_dir, allow_missing_images=True, verbose=False)
    _, pred = pairs[0]
    evaluator.update(pred["image_id"], pred["ids"], pred["segments_info"])
    assert evaluator.summarize()["All"]["n"] >= 1


def test_bad_predictions_name_the_image(dataset):
    pairs, gt_json, gt_dir, _ = dataset
    evaluator = PanopticEvaluator(gt_json, gt_dir, verbose=False)
    _, pred = pairs[2]
    with pytest.raises(PanopticFormatError, match="image 2: prediction segment .* is in the PNG but not in"):
        evaluator.update(2, pred["ids"], pred["segments_info"][1:])
    with pytest.raises(PanopticFormatError, match="image 2: the prediction is"):
        evaluator.update(2, pred["ids"][:-1], pred["segments_info"])
    with pytest.raises(KeyError, match="image 99 is not in the gt JSON"):
        evaluator.update(99, pred["ids"], pred["segments_info"])


def test_distributed_ranks_gather_their_images(dataset, monkeypatch):
    """Two ranks, each with half the images (one image on both, as a DistributedSampler pads): the gathered
    result equals the single-process one."""
    pairs, gt_json, gt_dir, expected = dataset
    ranks = [PanopticEvaluator(gt_json, gt_dir, verbose=False) for _ in range(2)]
    for i, (_, pred) in enumerate(pairs):
        ranks[i % 2].update(pred["image_id"], pred["ids"], pred["segments_info"])
    _, padded = pairs[0]
    ranks[1].update(padded["image_id"], padded["ids"], padded["segments_info"])

    def all_gather_object(output, obj):
        output[:] = [ranks[0]._images, ranks[1]._images]

    monkeypatch.setattr(evaluator_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(evaluator_module.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(evaluator_module.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(evaluator_module.dist, "all_gather_object", all_gather_object)
    assert_same(ranks[1].summarize(), expected)


def _distributed_worker(rank, world_size, init_file, gt_json, gt_dir, pairs, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        evaluator = PanopticEvaluator(gt_json, gt_dir, verbose=False)
        for _, pred in pairs[rank::world_size]:
            evaluator.update(pred["image_id"], torch.from_numpy(pred["ids"]), pred["segments_info"])
        results = evaluator.summarize()
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_with_gloo(dataset, tmp_path):
    """Two real processes (gloo): every rank evaluates half the images; rank 0 gets the full result."""
    pairs, gt_json, gt_dir, expected = dataset
    result_file = str(tmp_path / "results.pt")
    torch.multiprocessing.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), gt_json, gt_dir, pairs,
                                                           result_file), nprocs=2, join=True)
    assert_same(torch.load(result_file, weights_only=False), expected)


def test_evaluation_reads_each_gt_png_once(tmp_path, monkeypatch):
    """inference_on_dataset on the val split: the data set yields images only (it opens no PNG), the evaluator
    reads each gt PNG once and takes the annotations the data set parsed (the gt JSON is not parsed again)."""
    import os

    from eyecool.data import CocoPanopticDataset, generate_synthetic_dataset
    from eyecool.data import coco_panoptic
    from eyecool.engine.api import inference_on_dataset
    from eyecool.engine.distributed import DistributedContext

    val = generate_synthetic_dataset(str(tmp_path), num_train=1, num_val=3, size=48, seed=0)["val"]
    reads, parses = [], []

    def counting(function, calls):
        def wrapper(path, *args, **kwargs):
            calls.append(os.path.basename(path))
            return function(path, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(coco_panoptic, "read_id_map", counting(coco_panoptic.read_id_map, reads))
    monkeypatch.setattr(evaluator_module, "read_id_map", counting(evaluator_module.read_id_map, reads))
    monkeypatch.setattr(evaluator_module, "load_json", counting(evaluator_module.load_json, parses))
    dataset = CocoPanopticDataset(*val, with_targets=False)
    assert reads == []  # opening the data set reads no PNG

    class VoidModel(torch.nn.Module):
        """Predicts void everywhere, at each image's original size."""

        def forward(self, images, image_sizes, orig_sizes):
            return [{"panoptic_seg": torch.zeros(tuple(size), dtype=torch.int32), "segments_info": []}
                    for size in orig_sizes]

    summary = inference_on_dataset(VoidModel(), dataset, DistributedContext(0, 1, 0, torch.device("cpu")))
    assert sorted(reads) == sorted(ann["file_name"] for ann in dataset.annotations)  # each gt PNG once
    assert parses == []
    assert summary["PQ"] == 0.0 and len(summary) == 9

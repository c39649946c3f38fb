"""``eyecool pq``: the table, the per-class table and the JSON summary."""
import json

import numpy as np

from eyecool.cli import main
from panoptic_data import random_pair, write_split


def test_pq_command(tmp_path, capsys):
    rng = np.random.default_rng(3)
    pairs = [random_pair(rng, image_id) for image_id in range(4)]
    gt_json, gt_dir = write_split(str(tmp_path), "gt", [g for g, _ in pairs])
    pred_json, pred_dir = write_split(str(tmp_path), "pred", [p for _, p in pairs])
    out = str(tmp_path / "pq.json")
    assert main(["pq", "--gt-json", gt_json, "--gt-dir", gt_dir, "--pred-json", pred_json, "--pred-dir", pred_dir,
                 "--per-class", "--json", out]) == 0
    printed = capsys.readouterr().out
    assert "All" in printed and "Things" in printed and "Stuff" in printed
    assert "person" in printed and "road" in printed
    with open(out) as f:
        written = json.load(f)
    assert set(written) == {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "per_class"}
    assert 0.0 <= written["PQ"] <= 100.0

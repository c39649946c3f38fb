"""``eyecool ablate`` end to end at toy size: two rows, one seed, two iterations of the tiny demo network; the
table, the JSON and the plot it promises, and a rerun that reads the finished runs back."""
import json

import pytest

pytest.importorskip("eyecool.modeling")

from eyecool.cli import main  # noqa: E402
from eyecool.config import load_config  # noqa: E402
from eyecool.engine.ablation import METRICS, schedule_overrides  # noqa: E402

# The demo network made tiny (as in test_cli_end_to_end.py): 64-pixel images, narrow layers.
TINY = ["model.fpn.channels=32", "model.semantic_head.hidden_channels=32", "model.semantic_head.out_channels=16",
        "model.roi_heads.box_fc_dim=64", "model.roi_heads.mask_conv_dim=32", "model.roi_heads.batch_size_per_image=32",
        "model.rpn.batch_size_per_image=32", "data.min_size=64", "data.max_size=64", "data.num_workers=0",
        "solver.ims_per_batch=2", "output.log_period=1"]


def test_schedule_keeps_the_demo_shape():
    assert schedule_overrides(400) == ["solver.max_iter=400", "solver.steps=[300, 370]", "solver.warmup_iters=50",
                                       "output.checkpoint_period=400"]
    assert schedule_overrides(2)[:3] == ["solver.max_iter=2", "solver.steps=[2]", "solver.warmup_iters=1"]


def test_ablate_writes_table_json_and_plot(tmp_path, capsys):
    args = ["ablate", "--out", str(tmp_path), "--rows", "baseline", "dam_rff_prob", "--seeds", "0",
            "--max-iter", "2", "--num-train", "4", "--num-val", "2", "--image-size", "64", *TINY]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| UPSNet baseline | 1 |" in table and "| +DAM +RFF (prob) | 1 |" in table and "+DAM |" not in table
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["row"] for r in result["summary"]] == ["baseline", "dam_rff_prob"]
    assert set(result["summary"][0]) >= set(METRICS) | {"row", "label", "seeds"}
    assert {"total_loss", "loss_rpn_cls"} <= set(result["runs"][0]["final_losses"])
    # Each row changes only DAM and RFF; the seed and the schedule are the same.
    baseline = load_config(tmp_path / "runs" / "baseline_seed0" / "config.yaml")
    prob = load_config(tmp_path / "runs" / "dam_rff_prob_seed0" / "config.yaml")
    assert (baseline.model.dam.enabled, baseline.model.rff.mode) == (False, "off")
    assert (prob.model.dam.enabled, prob.model.rff.mode) == (True, "prob")
    assert baseline.solver == prob.solver and baseline.seed == prob.seed == 0
    assert (tmp_path / "ablation.png").stat().st_size > 0
    assert (tmp_path / "ablation.md").read_text().count("\n| ") == 3  # header + 2 rows

    # Finished runs are read back, not retrained.
    assert main(args) == 0
    rerun = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["read_back"] for r in rerun["runs"]] == [True, True]
    assert [r["seconds"] for r in rerun["runs"]] == [r["seconds"] for r in result["runs"]]
    assert rerun["summary"] == result["summary"]

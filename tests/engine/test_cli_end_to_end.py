"""The commands end to end on a tiny synthetic set: synth -> train (a few iterations, final evaluation) ->
eval -> predict, checking every file the documentation promises."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("eyecool.modeling")
pytest.importorskip("eyecool.evaluation")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PQ_KEYS = {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"}
# The demo network made tiny: 64-pixel images, narrow layers, three iterations.
TINY = ["model.fpn.channels=32", "model.semantic_head.hidden_channels=32", "model.semantic_head.out_channels=16",
        "model.roi_heads.box_fc_dim=64", "model.roi_heads.mask_conv_dim=32", "model.roi_heads.batch_size_per_image=32",
        "model.rpn.batch_size_per_image=32", "data.min_size=64", "data.max_size=64", "data.num_workers=0",
        "solver.ims_per_batch=2", "solver.max_iter=3", "solver.steps=[2]", "solver.warmup_iters=1",
        "output.log_period=1", "output.checkpoint_period=2"]


def eyecool(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")] + sys.path))
    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "eyecool", *args], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_synth_train_eval_predict(tmp_path):
    data, out = tmp_path / "data", tmp_path / "train"
    eyecool("synth", "--out", str(data), "--num-train", "4", "--num-val", "2", "--size", "64")
    overrides = TINY + [f"data.root={data}"]
    config = "demo"

    # No --out: training writes to the configuration's output.dir.
    train_log = eyecool("train", "--config", config, *overrides, f"output.dir={out}")
    assert "iter: 2" in train_log and "max_mem" in train_log and "data_time" in train_log
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    for name in ("config.yaml", "model_0000001.pth", "model_final.pth", "metrics.json", "metrics_eval.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1, 2]
    assert {"eta_seconds", "lr", "time", "data_time", "max_mem", "loss_sem", "loss_mask"} <= set(rows[0])
    assert PQ_KEYS <= set(rows[-1])

    eval_out = tmp_path / "eval"
    eyecool("eval", "--config", config, "--weights", str(out / "model_final.pth"), "--out", str(eval_out),
            *overrides)
    metrics = json.loads((eval_out / "metrics_eval.json").read_text())
    assert set(metrics) == PQ_KEYS
    # The same weights give the same PQ as the evaluation at the end of training.
    assert metrics == pytest.approx(json.loads((out / "metrics_eval.json").read_text()))
    predictions = json.loads((eval_out / "predictions" / "predictions.json").read_text())
    assert len(predictions["annotations"]) == 2
    for annotation in predictions["annotations"]:
        assert (eval_out / "predictions" / annotation["file_name"]).is_file()

    image = sorted((data / "images" / "val").iterdir())[0]
    predict_out = tmp_path / "predict"
    eyecool("predict", "--config", config, "--weights", str(out / "model_final.pth"), "--out", str(predict_out),
            str(image), *overrides)
    stem = image.stem
    for suffix in ("_panoptic.png", "_segments.json", "_vis.png"):
        assert (predict_out / (stem + suffix)).is_file(), suffix
    # predict preprocesses an image file exactly as evaluation does: the same segment map.
    predicted = np.asarray(Image.open(predict_out / (stem + "_panoptic.png")))
    evaluated = np.asarray(Image.open(eval_out / "predictions" / (stem + ".png")))
    assert np.array_equal(predicted, evaluated)


def test_training_images_are_normalised(tmp_path):
    from eyecool.config import load_config
    from eyecool.engine.api import build_dataset

    eyecool("synth", "--out", str(tmp_path), "--num-train", "2", "--num-val", "1", "--size", "64")
    cfg = load_config("demo", TINY + [f"data.root={tmp_path}"])
    image = build_dataset(cfg, "train")[0]["image"]
    assert image.shape == (3, 64, 64) and image.dtype.is_floating_point
    assert image.min() < -0.5  # (x / 255 - mean) / std, not 0..1


@pytest.mark.slow
def test_train_and_eval_under_torchrun(tmp_path):
    """`eyecool train` and `eyecool eval` as torchrun launches them (two CPU processes, gloo): both exit 0, with
    no teardown abort from gloo, rank 0 writes the run's files, and the evaluation sees every val image once."""
    data, out = tmp_path / "data", tmp_path / "train"
    eyecool("synth", "--out", str(data), "--num-train", "4", "--num-val", "3", "--size", "64")
    overrides = TINY + [f"data.root={data}", "solver.max_iter=2", "output.checkpoint_period=0", "eval.period=0"]
    config = "demo"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")] + sys.path),
               OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "eyecool"]
    for command in (["train", "--config", config, "--out", str(out)],
                    ["eval", "--config", config, "--weights", str(out / "model_final.pth"), "--out",
                     str(tmp_path / "eval")]):
        result = subprocess.run(launcher + command + overrides, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "terminate called" not in result.stderr
    assert (out / "model_final.pth").is_file() and (out / "metrics_eval.json").is_file()
    predictions = json.loads((tmp_path / "eval" / "predictions" / "predictions.json").read_text())
    assert sorted(a["image_id"] for a in predictions["annotations"]) == sorted(
        image["id"] for image in json.loads((data / "annotations" / "panoptic_val.json").read_text())["images"])

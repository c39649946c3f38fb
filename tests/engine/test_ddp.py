"""Two processes under torchrun (gloo, CPU) follow the loss trajectory of one process with the same total
batch: the same images per step, gradients averaged by DDP, the same update on every rank."""
import os
import subprocess
import sys

import pytest
import torch

from eyecool.engine import load_checkpoint, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "ddp_toy_run.py")


def _train(launcher, out_dir, batch_per_process):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path), OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + [SCRIPT, str(out_dir), str(batch_per_process)], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_same_total_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    _train([sys.executable], single, 4)
    _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], double, 2)

    single_rows, double_rows = read_metrics(single / "metrics.json"), read_metrics(double / "metrics.json")
    assert [r["iteration"] for r in double_rows] == list(range(8))
    for a, b in zip(single_rows, double_rows):
        for name in ("total_loss", "loss_cls", "loss_reg", "lr"):
            # Equal up to float rounding: the sums run in a different order (per rank, then all-reduced).
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), (a["iteration"], name)
    single_state = load_checkpoint(str(single / "model_final.pth"))
    double_state = load_checkpoint(str(double / "model_final.pth"))
    for name, value in single_state["model"].items():
        torch.testing.assert_close(double_state["model"][name], value, rtol=1e-4, atol=1e-6)
    # Rank 0 wrote the checkpoint, with the generators of both ranks for an exact resume.
    assert len(double_state["rng"]) == 2 and len(single_state["rng"]) == 1

"""AMP (bfloat16 autocast on the CPU) and gradient clipping run through the same loop and keep training sane."""
import torch

from eyecool.engine import load_checkpoint, read_metrics
from toy import make_toy_trainer


def test_amp_and_clipping_train_and_checkpoint(tmp_path):
    trainer = make_toy_trainer(str(tmp_path), max_iter=4, batch_size=4, amp=True, clip_grad=0.5)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    final = load_checkpoint(str(tmp_path / "model_final.pth"))
    assert final["iteration"] == 3 and set(final) >= {"model", "optimizer", "scheduler", "iteration", "config"}
    assert any(not torch.equal(initial[k], v) for k, v in final["model"].items())
    assert all(torch.isfinite(v).all() for v in final["model"].values())
    rows = read_metrics(str(tmp_path / "metrics.json"))
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]


def test_clipping_bounds_the_update(tmp_path):
    # With lr 0.05 * warm-up factor 0.1 and momentum starting at zero, the first step moves the weights by
    # lr * clipped gradient: its global norm is at most lr * clip.
    trainer = make_toy_trainer(str(tmp_path), max_iter=1, batch_size=4, clip_grad=1e-3, dropout=0.0)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.train()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    # weight decay adds lr * 1e-4 * |w|, negligible next to the bound's slack
    assert (after - before).norm() <= 0.005 * 1e-3 * 1.05 + 0.005 * 1e-4 * before.norm()

"""--resume continues from last_checkpoint and reaches the weights of an uninterrupted run (same data order,
same augmentations, same dropout draws)."""
import os

import pytest
import torch

from eyecool.engine import last_checkpoint_path, read_metrics
from toy import make_toy_trainer

N = 6


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, num_workers):
    straight = make_toy_trainer(str(tmp_path / "straight"), max_iter=2 * N, batch_size=4, num_workers=num_workers)
    straight.train()

    interrupted_dir = str(tmp_path / "interrupted")
    first = make_toy_trainer(interrupted_dir, max_iter=2 * N, batch_size=4, num_workers=num_workers,
                             checkpoint_period=N, stop_after_batches=N + 1)
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert os.path.basename(last_checkpoint_path(interrupted_dir)) == f"model_{N - 1:07d}.pth"

    resumed = make_toy_trainer(interrupted_dir, max_iter=2 * N, batch_size=4, num_workers=num_workers)
    assert resumed.resume()
    assert resumed.start_iter == N
    resumed.train()

    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    # The resumed log holds each iteration once, with the losses of the uninterrupted run.
    straight_rows = read_metrics(str(tmp_path / "straight" / "metrics.json"))
    resumed_rows = read_metrics(os.path.join(interrupted_dir, "metrics.json"))
    assert [r["iteration"] for r in resumed_rows] == list(range(2 * N))
    assert [r["total_loss"] for r in resumed_rows] == [r["total_loss"] for r in straight_rows]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    trainer = make_toy_trainer(str(tmp_path), max_iter=2, batch_size=4)
    assert not trainer.resume()
    assert trainer.start_iter == 0

"""A non-finite loss stops training with a message naming the loss and the iteration (or skips the step), and
never leads to a checkpoint with NaN weights."""
import os

import pytest
import torch

from eyecool.engine import save_checkpoint
from toy import make_toy_trainer


def test_nan_loss_stops_training_naming_loss_and_iteration(tmp_path):
    trainer = make_toy_trainer(str(tmp_path), max_iter=10, batch_size=4, checkpoint_period=2, nan_at_call=3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at iteration 3: loss_reg = nan"):
        trainer.train()
    # The checkpoint of iteration 1 exists, nothing was written after the NaN, and the weights are finite.
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == ["model_0000001.pth"]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nan_loss_skip_policy_drops_the_step_and_continues(tmp_path):
    trainer = make_toy_trainer(str(tmp_path), max_iter=6, batch_size=4, nan_at_call=2, nonfinite="skip")
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert os.path.isfile(tmp_path / "model_final.pth")


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    weights = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ValueError, match="non-finite values in w"):
        save_checkpoint({"model": weights}, str(tmp_path), "model_final.pth")
    assert os.listdir(tmp_path) == []

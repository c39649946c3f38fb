"""Hostile and broken checkpoints: a file cut in half, a checkpoint of another configuration, a pickle that would
run code, a full disk while writing. Each is refused with a message naming the file; --resume falls back to the
previous good checkpoint; a failed write leaves the previous checkpoint and last_checkpoint as they were."""
import errno
import os

import pytest
import torch

from eyecool.engine import checkpoint as checkpoint_module
from eyecool.engine import last_checkpoint_path, load_checkpoint, save_checkpoint
from eyecool.engine.checkpoint import CheckpointError, load_model_weights
from toy import ToyModel, make_toy_trainer


def _state(value: float):
    return {"model": {"w": torch.full((64,), value)}, "iteration": int(value), "config": {"seed": 0}}


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    path = save_checkpoint(_state(1.0), str(tmp_path), "model_final.pth")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model_final.pth: not a readable checkpoint"):
        load_checkpoint(path)


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    other = ToyModel()
    other.classifier = torch.nn.Linear(8, 5)  # another number of classes
    path = save_checkpoint({"model": other.state_dict()}, str(tmp_path), "model_final.pth")
    with pytest.raises(CheckpointError, match=r"model_final.pth does not fit this ToyModel.*classifier.weight"):
        load_model_weights(ToyModel(), path)


@pytest.mark.parametrize("damage", ["truncate", "code", "other_config", "missing"])
def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path, damage):
    out = str(tmp_path)
    make_toy_trainer(out, max_iter=4, batch_size=4, checkpoint_period=2).train()
    newest = last_checkpoint_path(out)
    assert os.path.basename(newest) == "model_final.pth"
    if damage == "truncate":
        data = open(newest, "rb").read()
        open(newest, "wb").write(data[: len(data) // 3])
    elif damage == "code":
        torch.save({"model": {}, "payload": _RunsCode(tmp_path / "pwned")}, newest)
    elif damage == "other_config":
        torch.save({**load_checkpoint(newest), "model": {"features.0.weight": torch.zeros(3)}}, newest)
    else:
        os.remove(newest)

    resumed = make_toy_trainer(out, max_iter=6, batch_size=4)
    assert resumed.resume()
    assert resumed.start_iter == 2  # from model_0000001.pth, the previous good one
    resumed.train()
    assert not (tmp_path / "pwned").exists()


def test_resume_with_no_loadable_checkpoint_says_why(tmp_path):
    out = str(tmp_path)
    make_toy_trainer(out, max_iter=2, batch_size=4).train()
    for name in os.listdir(out):
        if name.endswith(".pth"):
            open(os.path.join(out, name), "wb").write(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from could be loaded"):
        make_toy_trainer(out, max_iter=4, batch_size=4).resume()


def test_disk_full_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1.0), str(tmp_path), "model_0000001.pth")
    before = sorted(os.listdir(tmp_path))

    def save_until_the_disk_is_full(obj, f):
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError, match="could not write checkpoint .*model_0000003.pth: No space left on device.*"
                                      "previous checkpoint and last_checkpoint are unchanged") as error:
        save_checkpoint(_state(3.0), str(tmp_path), "model_0000003.pth")
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left behind
    state = load_checkpoint(last_checkpoint_path(str(tmp_path)))
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.full((64,), 1.0))


def test_disk_full_while_writing_the_pointer(tmp_path, monkeypatch):
    """The checkpoint is complete but last_checkpoint cannot be rewritten: it still names the previous one."""
    save_checkpoint(_state(1.0), str(tmp_path), "model_0000001.pth")
    real_write = checkpoint_module._atomic_write

    def pointer_fails(path, write):
        if path.endswith("last_checkpoint"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, write)

    monkeypatch.setattr(checkpoint_module, "_atomic_write", pointer_fails)
    with pytest.raises(OSError, match="No space left on device"):
        save_checkpoint(_state(3.0), str(tmp_path), "model_0000003.pth")
    monkeypatch.undo()
    assert load_checkpoint(last_checkpoint_path(str(tmp_path)))["iteration"] == 1

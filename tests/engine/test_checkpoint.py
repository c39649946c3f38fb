"""Checkpoints are written atomically: an interrupted write leaves the previous checkpoint (and the
last_checkpoint pointer to it) loadable, and no partial file behind."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from eyecool.engine import checkpoint as checkpoint_module
from eyecool.engine import last_checkpoint_path, load_checkpoint, save_checkpoint


def _state(value: float, numel: int = 8):
    return {"model": {"w": torch.full((numel,), value)}, "iteration": int(value), "config": {"seed": 0}}


def test_exception_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(_state(1.0), str(tmp_path), "model_final.pth")

    def torch_save_interrupted(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.torch, "save", torch_save_interrupted)
    for name in ("model_final.pth", "model_0000002.pth"):
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(_state(2.0), str(tmp_path), name)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]
    state = load_checkpoint(last_checkpoint_path(str(tmp_path)))
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.full((8,), 1.0))


def test_process_killed_while_writing_leaves_a_loadable_checkpoint(tmp_path):
    # A child process rewrites a 32 MB checkpoint in a loop; it is killed (SIGKILL: no cleanup at all) at an
    # arbitrary moment, most likely in the middle of a write.
    script = textwrap.dedent(f"""
        import sys, torch
        from eyecool.engine import save_checkpoint
        out = {str(tmp_path)!r}
        for i in range(1000):
            save_checkpoint({{"model": {{"w": torch.full((8_000_000,), float(i))}}, "iteration": i}}, out,
                            "model_final.pth")
            if i == 0:
                print("ready", flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=os.environ.copy())
    assert child.stdout.readline().strip() == b"ready"
    time.sleep(0.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    state = load_checkpoint(last_checkpoint_path(str(tmp_path)))
    assert torch.equal(state["model"]["w"], torch.full((8_000_000,), float(state["iteration"])))


class ArbitraryObject:
    pass


def test_load_uses_weights_only(tmp_path):
    torch.save({"model": {}, "payload": ArbitraryObject()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(str(tmp_path / "evil.pth"))


def test_rng_state_round_trip():
    from eyecool.engine import capture_rng_state, restore_rng_state
    import random

    import numpy as np

    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]

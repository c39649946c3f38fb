"""Faults during training: SIGTERM (checkpoint, clean exit, --resume continues to the weights of an uninterrupted
run), a DataLoader worker killed mid-epoch (a clear error, not a hang), and a NaN loss on one rank of two (both
ranks stop together, at the same iteration, with the message)."""
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from eyecool.engine import last_checkpoint_path, load_checkpoint
from eyecool.engine.hooks import TrainingInterrupted
from eyecool.engine.sampling import build_training_stream
from toy import ToyDataset, make_toy_trainer, toy_collate

HERE = os.path.dirname(os.path.abspath(__file__))


def _sigterm_before_batch(trainer, batch_index):
    """The trainer's data stream sends this process SIGTERM just before it hands out batch ``batch_index``."""
    factory = trainer.stream_factory

    def stream_factory(start_batch):
        for i, batch in enumerate(factory(start_batch), start_batch):
            if i == batch_index:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    trainer.stream_factory = stream_factory
    return trainer


def test_sigterm_saves_a_checkpoint_exits_cleanly_and_resume_continues(tmp_path):
    straight = make_toy_trainer(str(tmp_path / "straight"), max_iter=8, batch_size=4)
    straight.train()

    out = str(tmp_path / "run")
    interrupted = _sigterm_before_batch(make_toy_trainer(out, max_iter=8, batch_size=4), 3)
    previous_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stopped:
        interrupted.train()
    assert stopped.value.code == 143 and isinstance(stopped.value, SystemExit)
    assert "SIGTERM: stopped after iteration 3" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) == previous_handler  # the trainer's handler is gone again
    # The iteration during which the signal came was completed and checkpointed.
    assert os.path.basename(last_checkpoint_path(out)) == "model_0000003.pth"
    assert not os.path.exists(os.path.join(out, "model_final.pth"))

    resumed = make_toy_trainer(out, max_iter=8, batch_size=4)
    assert resumed.resume() and resumed.start_iter == 4
    resumed.train()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_sigterm_exit_status_of_a_process(tmp_path):
    """Uncaught, TrainingInterrupted ends the process quietly with status 143 (128 + SIGTERM)."""
    script = (
        "import os, signal, sys\n"
        "from toy import make_toy_trainer\n"
        "trainer = make_toy_trainer(sys.argv[1], max_iter=50, batch_size=4)\n"
        "factory = trainer.stream_factory\n"
        "def stream(start):\n"
        "    for i, batch in enumerate(factory(start)):\n"
        "        if i == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
        "        yield batch\n"
        "trainer.stream_factory = stream\n"
        "trainer.train()\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 143, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert os.path.basename(last_checkpoint_path(str(tmp_path))) == "model_0000002.pth"


class _WorkerKillingDataset(ToyDataset):
    """Item ``victim`` kills the loader worker that reads it (SIGKILL: what the kernel's OOM killer does)."""

    def __init__(self, victim):
        super().__init__(32)
        self.victim = victim

    def __getitem__(self, index):
        if index == self.victim and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


def test_dataloader_worker_killed_mid_epoch_is_a_clear_error(tmp_path):
    trainer = make_toy_trainer(str(tmp_path), max_iter=20, batch_size=4)
    dataset = _WorkerKillingDataset(victim=int(torch.randperm(32, generator=torch.Generator().manual_seed(0))[9]))
    trainer.stream_factory = lambda start: build_training_stream(dataset, 4, toy_collate, seed=0, num_workers=2,
                                                                 start_batch=start)
    # A hang would be the failure: the alarm turns it into an error after 60 s.
    def timeout(signum, frame):
        raise TimeoutError("the trainer hung after a DataLoader worker was killed")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        with pytest.raises(RuntimeError, match=r"loading the batch of iteration \d+ failed: DataLoader worker") as caught:
            trainer.train()
        # The trainer shut the loader down: its SIGCHLD handler no longer watches the dead worker, so a later
        # SIGCHLD (here sent by hand; in a real process, any subprocess exiting) raises nothing, even while the
        # traceback (held in `caught`) keeps the loader's iterator alive.
        os.kill(os.getpid(), signal.SIGCHLD)
        for _ in range(100):  # the handler runs between bytecodes, on the way through this loop
            pass
        assert caught.value.__traceback__ is not None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _ClosableStream:
    """Batches from ``batches``, then the error a dying worker's fd sharer gives while a batch is received."""

    def __init__(self, batches, error):
        self.batches, self.error, self.closed = iter(batches), error, False

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.batches)
        except StopIteration:
            raise self.error from None

    def close(self):
        self.closed = True


@pytest.mark.parametrize("error", [EOFError(), ConnectionResetError(104, "Connection reset by peer")])
def test_lost_worker_connection_names_the_iteration_and_closes_the_stream(tmp_path, error):
    """A worker killed after queueing a batch, before this process fetched the batch's shared memory, shows up as
    EOFError or a connection error from next(stream) (seen in CI), usually before the SIGCHLD handler runs."""
    trainer = make_toy_trainer(str(tmp_path), max_iter=10, batch_size=4)
    batches = [batch for batch, _ in zip(trainer.stream_factory(0), range(3))]
    stream = _ClosableStream(batches, error)
    trainer.stream_factory = lambda start: stream
    with pytest.raises(RuntimeError, match=r"loading the batch of iteration 3 failed: DataLoader worker connection "
                                           rf"lost while receiving the batch \({type(error).__name__}"):
        trainer.train()
    assert stream.closed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(out_dir, fault):
    """Runs ddp_fault_run.py as ranks 0 and 1; returns their exit statuses and the messages they stopped with.
    A rendezvous port taken by another process between choosing it and binding it is retried with another."""
    for _ in range(3):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + sys.path), OMP_NUM_THREADS="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
        ranks = [subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_fault_run.py"), str(out_dir), fault],
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(2)]
        try:
            outputs = [p.communicate(timeout=180)[0] for p in ranks]
        finally:
            for p in ranks:
                p.kill()
        if not any("address already in use" in out.lower() for out in outputs):
            break
    messages = [(out_dir / f"rank{r}.txt").read_text() if (out_dir / f"rank{r}.txt").exists() else outputs[r]
                for r in range(2)]
    codes = [p.returncode for p in ranks]
    if codes[0] != codes[1]:  # the ranks' own output says why one of them ended differently
        messages += [f"rank {r} output (exit status {codes[r]}):\n{outputs[r][-3000:]}" for r in range(2)]
    return codes, messages


def test_nan_on_one_rank_stops_both_ranks_together(tmp_path):
    codes, messages = _two_ranks(tmp_path, "nan")
    assert codes == [3, 3], (codes, messages)
    assert all("non-finite loss at iteration 2" in m for m in messages), messages
    assert "rank 1: loss_reg = nan" in messages[1]
    assert "rank 0: (finite here, non-finite on another rank)" in messages[0]
    assert not (tmp_path / "model_final.pth").exists()


def test_sigterm_on_one_rank_stops_both_ranks_after_the_same_iteration(tmp_path):
    """Only rank 1 gets SIGTERM: both ranks agree to stop after iteration 3, take part in the checkpoint (rank 0
    writes it, with both ranks' generators) and exit with 143."""
    codes, messages = _two_ranks(tmp_path, "sigterm")
    assert codes == [143, 143], (codes, messages)
    assert all("SIGTERM: stopped after iteration 3" in m for m in messages), messages
    assert os.path.basename(last_checkpoint_path(str(tmp_path))) == "model_0000003.pth"
    assert len(load_checkpoint(last_checkpoint_path(str(tmp_path)))["rng"]) == 2

"""The trainer's hooks: periodic evaluation (and its final run) at the iterations its period names, without
moving the training generators; a user hook sees every iteration, and the loop's end even when training fails."""
import pytest
import torch

from eyecool.engine import HookBase, read_metrics
from eyecool.engine.hooks import PeriodicEvaluator
from toy import make_toy_trainer


def test_periodic_evaluation_runs_at_its_period_and_after_the_last_iteration(tmp_path):
    calls = []

    def evaluate(model, final):
        assert not model.training
        calls.append(final)
        return {"score": float(len(calls))}

    trainer = make_toy_trainer(str(tmp_path), max_iter=5, batch_size=4)
    trainer.hooks.insert(1, PeriodicEvaluator(evaluate, period=2))
    trainer.hooks[1].trainer = trainer
    assert trainer.train() == {"score": 3.0}
    assert calls == [False, False, True]
    rows = [r for r in read_metrics(str(tmp_path / "metrics.json")) if "score" in r]
    assert [(r["iteration"], r["score"]) for r in rows] == [(1, 1.0), (3, 2.0), (4, 3.0)]
    assert trainer.model.training


def test_evaluation_does_not_move_the_training_generators(tmp_path):
    def draws(evaluate_fn):
        trainer = make_toy_trainer(None, max_iter=4, batch_size=4)
        if evaluate_fn is not None:
            trainer.hooks.insert(1, PeriodicEvaluator(evaluate_fn, period=1))
            trainer.hooks[1].trainer = trainer
        trainer.train()
        return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])

    assert torch.equal(draws(None), draws(lambda model, final: {"drawn": float(torch.rand(()))}))


class _Recorder(HookBase):
    def __init__(self):
        self.events = []

    def before_train(self):
        self.events.append("before_train")

    def after_step(self):
        self.events.append(self.trainer.iter)

    def after_loop(self):
        self.events.append("after_loop")

    def after_train(self):
        self.events.append("after_train")


def test_a_hook_sees_every_iteration_and_the_end_of_the_loop_even_on_failure(tmp_path):
    trainer = make_toy_trainer(str(tmp_path), max_iter=3, batch_size=4)
    recorder = _Recorder()
    recorder.trainer = trainer
    trainer.hooks.append(recorder)
    trainer.train()
    assert recorder.events == ["before_train", 0, 1, 2, "after_loop", "after_train"]

    failing = make_toy_trainer(str(tmp_path / "nan"), max_iter=5, batch_size=4, nan_at_call=1)
    recorder = _Recorder()
    recorder.trainer = failing
    failing.hooks.append(recorder)
    with pytest.raises(FloatingPointError):
        failing.train()
    assert recorder.events == ["before_train", 0, "after_loop"]

import pytest
from torch import nn

from eyecool.engine import WarmupMultiStepLR, build_optimizer, linear_scaled_lr


def test_warmup_then_step_decay():
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, lr=0.02, momentum=0.9, weight_decay=1e-4)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[6, 8], gamma=0.1, warmup_iters=4, warmup_factor=0.001)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.02 * (0.001 * (1 - i / 4) + i / 4) for i in range(4)] + [0.02] * 2 + [0.002] * 2 + [0.0002] * 2
    assert lrs == pytest.approx(expected)


def test_scheduler_state_restores_the_same_lr():
    optimizer = build_optimizer(nn.Linear(2, 2), lr=0.1, momentum=0.9, weight_decay=0.0)
    scheduler = WarmupMultiStepLR(optimizer, milestones=[3], warmup_iters=2)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    fresh_optimizer = build_optimizer(nn.Linear(2, 2), lr=0.1, momentum=0.9, weight_decay=0.0)
    fresh = WarmupMultiStepLR(fresh_optimizer, milestones=[3], warmup_iters=2)
    fresh.load_state_dict(scheduler.state_dict())
    fresh_optimizer.step()
    fresh.step()
    optimizer.step()
    scheduler.step()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_norm_layers_get_no_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    optimizer = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-4 and len(decayed["params"]) == 2
    assert plain["weight_decay"] == 0.0 and {id(p) for p in plain["params"]} == {id(p) for p in model[1].parameters()}


def test_linear_scaling_rule():
    assert linear_scaled_lr(0.02, 16, 4) == pytest.approx(0.005)
    with pytest.raises(ValueError):
        linear_scaled_lr(0.02, 0, 4)

"""The whole network's training step under ``torch.autocast`` (bfloat16 on the CPU, float16 on CUDA if present):
forward, backward and an optimiser step, against the same step in float32."""
import copy

import pytest
import torch

from eyecool.modeling import LOSS_NAMES, build_model

from conftest import STUFF_IDS, THING_IDS, tiny_config

AMP = [("cpu", torch.bfloat16)] + ([("cuda", torch.float16)] if torch.cuda.is_available() else [])


def _step(model, images, sizes, targets, device, low):
    torch.manual_seed(3)  # the same anchor / ROI sampling in both runs
    with torch.autocast(device, dtype=low, enabled=low is not None):
        losses = model(images, sizes, targets)
    total = sum(losses.values())
    total.backward()
    return {k: float(v.detach()) for k, v in losses.items()}


@pytest.mark.parametrize("device,low", AMP)
@pytest.mark.parametrize("deformable", ["true", "false"])
def test_training_step_under_autocast(batch, device, low, deformable):
    images, sizes, targets = batch
    images = images.to(device)
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    model = build_model(tiny_config(f"model.semantic_head.deformable={deformable}"), STUFF_IDS, THING_IDS)
    model = model.to(device).train()
    with torch.no_grad():  # non-zero offsets: the deformable convolutions then sample between pixels
        for name, p in model.named_parameters():
            if "offset" in name and p.dim() == 4:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(model)

    amp_losses = _step(model, images, sizes, targets, device, low)
    fp32_losses = _step(reference, images, sizes, targets, device, None)
    assert set(amp_losses) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert amp_losses[name] == amp_losses[name] and abs(amp_losses[name]) < float("inf"), name
    # Low-precision convolutions move every loss a little; a wrong cast (or a dtype error caught and zeroed)
    # would move them by far more than this on a freshly initialised network.
    total_amp, total_fp32 = sum(amp_losses.values()), sum(fp32_losses.values())
    assert abs(total_amp - total_fp32) <= 0.05 * abs(total_fp32), (amp_losses, fp32_losses)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if not p.requires_grad:
            continue
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    # The semantic branch's gradients (deformable convolutions and their offset convolutions) follow float32's.
    for name in ("semantic_head.classifier.weight",):
        a = dict(model.named_parameters())[name].grad
        b = dict(reference.named_parameters())[name].grad
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.95, (name, float(cos))
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert all(torch.isfinite(p).all() for p in model.parameters())

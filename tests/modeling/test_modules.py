"""Each part of the network on its own: output shapes for a 2-image batch, and the DAM formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from eyecool.modeling import FPN, BalancedPyramid, NonLocalBlock, ResNetBackbone, SemanticHead
from eyecool.modeling.boxes import box_iou, decode_boxes, encode_boxes, match_boxes, sample_balanced
from eyecool.modeling.operators import op_backend
from eyecool.modeling.roi_heads import ROIHeads
from eyecool.modeling.rpn import RPN


@pytest.mark.parametrize("depth, channels", [(18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])])
def test_backbone_shapes(depth, channels):
    backbone = ResNetBackbone(depth=depth, norm="bn", freeze_at=0)
    outs = backbone(torch.randn(2, 3, 32, 64))
    assert [tuple(o.shape) for o in outs] == [(2, c, 32 // s, 64 // s) for c, s in zip(channels, (4, 8, 16, 32))]


def test_backbone_freezing_and_local_weights(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = ResNetBackbone(depth=18, norm="frozen_bn", freeze_at=2, weights=str(path))
    assert torch.equal(backbone.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert not any(p.requires_grad for p in backbone.conv1.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        ResNetBackbone(depth=34, norm="frozen_bn", weights=str(path))


def test_frozen_stages_keep_batchnorm_in_eval_mode():
    backbone = ResNetBackbone(depth=18, norm="bn", freeze_at=2).train()
    assert not backbone.bn1.training and not backbone.layer1[0].bn1.training
    assert backbone.layer2[0].bn1.training


def test_fpn_shapes():
    fpn = FPN(in_channels=[64, 128, 256, 512], channels=32)
    feats = [torch.randn(2, c, 128 // s, 96 // s) for c, s in zip([64, 128, 256, 512], (4, 8, 16, 32))]
    outs = fpn(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 128 // s, 96 // s) for s in (4, 8, 16, 32)] + [(2, 32, 2, 2)]
    assert torch.equal(outs[4], outs[3][:, :, ::2, ::2])


def _pyramid(channels=8, batch=2, size=(32, 48)):
    h, w = size
    return [torch.randn(batch, channels, h // 2 ** i, w // 2 ** i) for i in range(4)]


def test_non_local_block_matches_its_formula():
    torch.manual_seed(0)
    block = NonLocalBlock(channels=8)
    torch.nn.init.normal_(block.out.weight)  # non-zero output conv so the attention path shows
    x = torch.randn(2, 8, 5, 6)
    theta = torch.einsum("oc,bchw->bohw", block.theta.weight[:, :, 0, 0], x) + block.theta.bias.view(1, -1, 1, 1)
    phi = torch.einsum("oc,bchw->bohw", block.phi.weight[:, :, 0, 0], x) + block.phi.bias.view(1, -1, 1, 1)
    g = torch.einsum("oc,bchw->bohw", block.g.weight[:, :, 0, 0], x) + block.g.bias.view(1, -1, 1, 1)
    expected = torch.empty_like(x)
    for b in range(2):
        t, p, v = theta[b].flatten(1), phi[b].flatten(1), g[b].flatten(1)  # [C', N]
        attention = torch.softmax(t.T @ p / math.sqrt(8), dim=1)  # [N, N]: row i attends over positions j
        y = (v @ attention.T).view(8, 5, 6)
        expected[b] = x[b] + torch.einsum("oc,chw->ohw", block.out.weight[:, :, 0, 0], y) + block.out.bias.view(-1, 1, 1)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_non_local_block_starts_as_identity():
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(NonLocalBlock(channels=8)(x), x)


def test_balanced_pyramid_matches_its_formula():
    torch.manual_seed(0)
    pyramid = BalancedPyramid(channels=8, refine_level=2)
    torch.nn.init.normal_(pyramid.refine.out.weight)
    feats = _pyramid()
    h, w = feats[2].shape[-2:]
    # Gather: P2, P3 max-pooled down to P4 (windows of 4 and 2), P5 repeated up (nearest x2), then averaged.
    gathered = [F.max_pool2d(feats[0], 4), F.max_pool2d(feats[1], 2), feats[2],
                feats[3].repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)]
    refined = pyramid.refine(sum(gathered) / 4)
    expected = [feats[0] + refined.repeat_interleave(4, 2).repeat_interleave(4, 3),
                feats[1] + refined.repeat_interleave(2, 2).repeat_interleave(2, 3),
                feats[2] + refined,
                feats[3] + F.max_pool2d(refined, 2)]
    for out, exp in zip(pyramid(feats), expected):
        assert out.shape == exp.shape
        assert torch.allclose(out, exp, atol=1e-5)


def test_semantic_head_shapes():
    head = SemanticHead(in_channels=8, num_classes=5, backend=op_backend("eyecool"), hidden_channels=8,
                        out_channels=4)
    logits, feat = head(_pyramid(size=(32, 24)))
    assert logits.shape == (2, 5, 32, 24) and feat.shape == (2, 16, 32, 24)


def test_semantic_head_deformable_equals_plain_conv_at_init():
    backend = op_backend("eyecool")
    torch.manual_seed(0)
    deformable = SemanticHead(in_channels=8, num_classes=5, backend=backend, hidden_channels=8, out_channels=4)
    plain = SemanticHead(in_channels=8, num_classes=5, backend=backend, hidden_channels=8, out_channels=4,
                         deformable=False)
    for d, p in zip(deformable.convs, plain.convs):
        p.weight.data.copy_(d.weight.data)
        p.bias.data.copy_(d.bias.data)
    plain.classifier.load_state_dict(deformable.classifier.state_dict())
    feats = _pyramid(size=(16, 16))
    assert torch.allclose(deformable(feats)[0], plain(feats)[0], atol=1e-5)


def test_rpn_shapes_and_losses():
    rpn = RPN(in_channels=8, conv_channels=8, anchor_sizes=[8, 16, 32, 64, 128], aspect_ratios=[0.5, 1, 2],
              strides=[4, 8, 16, 32, 64], batch_size_per_image=32, pre_nms_topk=(50, 40), post_nms_topk=(30, 20))
    feats = [torch.randn(2, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    sizes = torch.tensor([[64, 64], [48, 60]])
    gt = [torch.tensor([[4.0, 4.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    out = rpn.train()(feats, sizes, gt)
    assert [tuple(o.shape) for o in out["objectness"]] == [(2, 3, 64 // s, 64 // s) for s in (4, 8, 16, 32, 64)]
    assert len(out["proposals"]) == 2 and all(p.shape[0] <= 30 and p.shape[1] == 4 for p in out["proposals"])
    assert out["proposals"][1][:, 2].max() <= 60 and out["proposals"][1][:, 3].max() <= 48
    assert set(out["losses"]) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    out = rpn.eval()(feats, sizes)
    assert "losses" not in out and all(p.shape[0] <= 20 for p in out["proposals"])


def test_roi_heads_shapes():
    heads = ROIHeads(in_channels=8, num_classes=3, scales=[1 / 4, 1 / 8, 1 / 16, 1 / 32], backend=op_backend("eyecool"),
                     box_fc_dim=16, mask_conv_dim=8, mask_num_conv=1, batch_size_per_image=16)
    feats = [torch.randn(2, 8, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    proposals = [torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 10.0, 50.0, 40.0]]), torch.tensor([[0.0, 0, 20, 20]])]
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 4:30, 4:30] = True
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "classes": torch.tensor([2]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "classes": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}]
    extra = [(torch.tensor([[4.0, 4.0, 30.0, 30.0]]), torch.tensor([2])), (torch.zeros(0, 4), torch.zeros(0).long())]
    losses, extra_logits = heads.train().forward_train(feats, feats, proposals, targets, extra)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask"} and all(torch.isfinite(v) for v in losses.values())
    assert extra_logits.shape == (1, 28, 28)
    dets = heads.eval().forward_test(feats, feats, proposals, torch.tensor([[64, 64], [64, 64]]))
    for d in dets:
        n = d["boxes"].shape[0]
        assert d["scores"].shape == (n,) and d["classes"].shape == (n,) and d["mask_logits"].shape == (n, 28, 28)


def test_box_coding_round_trip_and_matching():
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 9.0, 8.0]])
    target = torch.tensor([[1.0, 2.0, 12.0, 18.0], [4.0, 6.0, 10.0, 9.0]])
    deltas = encode_boxes(ref, target, (10, 10, 5, 5))
    assert torch.allclose(decode_boxes(deltas, ref, (10, 10, 5, 5)), target, atol=1e-5)
    iou = box_iou(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5],
                                                                         [20, 20, 30, 30]]))
    assert torch.allclose(iou, torch.tensor([[1.0, 0.5, 0.0]]))
    matched, label = match_boxes(iou, 0.7, 0.3, allow_low_quality=True)
    assert label.tolist() == [1, -1, 0] and matched.tolist() == [0, 0, 0]


def test_balanced_sampling_quota():
    label = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    index, is_positive, valid = sample_balanced(label, 32, 0.25)
    assert index.shape == (32,) and bool(valid.all())
    assert int(is_positive.sum()) == 8 and torch.all(label[index[is_positive]] == 1)
    assert torch.all(label[index[~is_positive]] == 0) and is_positive[:8].all()
    index, is_positive, valid = sample_balanced(torch.tensor([1, 0, -1, -1]), 32, 0.5)
    assert index.shape == (4,) and valid.tolist() == [True, True, False, False]

"""pq_pair_counts (and its batched form) against the torch.unique reference and hand-counted pairs."""
import numpy as np
import pytest
import torch

from eyecool_ext import ops, reference
from op_tester import DEVICES, needs_compiled

ID_DTYPES = [torch.int32, torch.int64, torch.uint8]


def random_id_maps(batch, height, width, num_ids, dtype=torch.int64, device="cpu", seed=0):
    """Blocky random id maps (runs of equal ids, as panoptic maps have) plus scattered single pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, num_ids, (batch, (height + 3) // 4, (width + 3) // 4), generator=g)
    ids = coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :height, :width].clone()
    noise = torch.rand(batch, height, width, generator=g) < 0.05
    ids[noise] = torch.randint(0, num_ids, (int(noise.sum()),), generator=g)
    return ids.to(dtype=dtype, device=device)


def test_hand_counted_pairs():
    gt = torch.tensor([[0, 0, 5, 5], [7, 7, 5, 5]])
    pred = torch.tensor([[3, 0, 3, 3], [3, 3, 3, 9]])
    gt_id, pred_id, count = ops.pq_pair_counts(gt, pred)
    assert gt_id.tolist() == [0, 0, 5, 5, 7]
    assert pred_id.tolist() == [0, 3, 3, 9, 3]
    assert count.tolist() == [1, 1, 3, 1, 2]
    assert gt_id.dtype == pred_id.dtype == count.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ID_DTYPES)
@pytest.mark.parametrize("shape", [(1, 13, 17), (3, 20, 9), (4, 1, 50)])
def test_batched_matches_reference(device, dtype, shape):
    gt = random_id_maps(*shape, num_ids=6, dtype=dtype, device=device, seed=1)
    pred = random_id_maps(*shape, num_ids=9, dtype=dtype, device=device, seed=2)
    out = ops.batched_pq_pair_counts(gt, pred)
    expected = reference.batched_pq_pair_counts(gt, pred)
    for a, b in zip(out, expected):
        assert a.device == gt.device
        assert torch.equal(a.cpu(), b.cpu())
    assert int(out[3].sum()) == gt.numel()


@pytest.mark.parametrize("device", DEVICES)
def test_large_ids_and_non_contiguous_maps(device):
    gt = random_id_maps(2, 12, 30, 5, device=device) * (2**31 - 1) // 4       # up to the largest id
    pred = random_id_maps(2, 12, 30, 5, device=device, seed=3).mul(2**24).add(7)
    gt_view, pred_view = gt.transpose(1, 2), pred.transpose(1, 2)
    assert not gt_view.is_contiguous()
    for a, b in zip(ops.batched_pq_pair_counts(gt_view, pred_view),
                    reference.batched_pq_pair_counts(gt_view, pred_view)):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_single_image_equals_numpy_unique_of_encoded_pairs(device):
    """The form panopticapi computes: np.unique(gt * 2^24 + pred, return_counts=True)."""
    gt = random_id_maps(1, 40, 60, 20, dtype=torch.int32, device=device, seed=4)[0] * 1000
    pred = random_id_maps(1, 40, 60, 25, dtype=torch.int32, device=device, seed=5)[0] * 300
    keys, counts = np.unique(gt.cpu().numpy().astype(np.int64) * 2**24 + pred.cpu().numpy(), return_counts=True)
    gt_id, pred_id, count = ops.pq_pair_counts(gt, pred)
    assert np.array_equal((gt_id * 2**24 + pred_id).cpu().numpy(), keys)
    assert np.array_equal(count.cpu().numpy(), counts)


def test_result_is_the_same_for_any_thread_count():
    # 2.1 M pixels: large enough for the CPU kernel to split one image into row bands.
    gt = random_id_maps(1, 1500, 1400, 30, dtype=torch.int32, seed=6)
    pred = random_id_maps(1, 1500, 1400, 40, dtype=torch.int32, seed=7)
    batch_gt = random_id_maps(5, 30, 20, 7, seed=8)
    batch_pred = random_id_maps(5, 30, 20, 7, seed=9)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((ops.batched_pq_pair_counts(gt, pred), ops.batched_pq_pair_counts(batch_gt, batch_pred)))
    finally:
        torch.set_num_threads(old)
    for first, second in zip(*results):
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    keys, counts = np.unique(gt.numpy().astype(np.int64) * 2**32 + pred.numpy(), return_counts=True)
    assert np.array_equal(results[0][0][1].numpy() * 2**32 + results[0][0][2].numpy(), keys)
    assert np.array_equal(results[0][0][3].numpy(), counts)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_maps(device):
    for shape in [(0, 4, 4), (2, 0, 5)]:
        out = ops.batched_pq_pair_counts(torch.zeros(shape, dtype=torch.int64, device=device),
                                         torch.zeros(shape, dtype=torch.int64, device=device))
        assert all(t.shape == (0,) and t.dtype == torch.int64 for t in out)


@pytest.mark.parametrize("device", DEVICES)
def test_ids_out_of_range_are_an_error(device):
    gt = torch.zeros(1, 3, 3, dtype=torch.int64, device=device)
    pred = torch.zeros(1, 3, 3, dtype=torch.int64, device=device)
    gt[0, 1, 2] = -4
    with pytest.raises((RuntimeError, ValueError), match="segment ids must be in \\[0, 2147483647\\]"):
        ops.batched_pq_pair_counts(gt, pred)
    gt[0, 1, 2] = 2**31
    with pytest.raises((RuntimeError, ValueError), match="segment ids must be in"):
        ops.batched_pq_pair_counts(gt, pred)


@needs_compiled
def test_out_of_range_message_names_the_pixel():
    gt = torch.zeros(2, 3, 4, dtype=torch.int32)
    gt[1, 2, 3] = -1
    with pytest.raises(RuntimeError, match=r"got gt_id -1 and pred_id 0 at image 1, pixel \(2, 3\)"):
        ops.batched_pq_pair_counts(gt, torch.zeros_like(gt))


def test_bad_input_messages():
    ids = torch.zeros(4, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"gt_ids must be a Tensor\[H, W\] id map, got shape \(1, 4, 5\)"):
        ops.pq_pair_counts(ids[None], ids[None])
    with pytest.raises(ValueError, match=r"pred_ids must have the shape of gt_ids \(4, 5\), got \(5, 4\)"):
        ops.pq_pair_counts(ids, ids.t())
    with pytest.raises(ValueError, match="gt_ids must be an integer tensor, got torch.float32"):
        ops.pq_pair_counts(ids.float(), ids.float())
    with pytest.raises(ValueError, match="same dtype, got torch.int64 and torch.int32"):
        ops.pq_pair_counts(ids, ids.int())
    with pytest.raises(ValueError, match="same device"):
        ops.pq_pair_counts(ids, ids.to("meta"))
    with pytest.raises(ValueError, match=r"gt_ids must be a Tensor\[B, H, W\]"):
        ops.batched_pq_pair_counts(ids, ids)


@needs_compiled
def test_schema_checks_in_cpp():
    ids = torch.zeros(1, 4, 5, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="pq_pair_counts: pred_ids must have the shape of gt_ids"):
        torch.ops.eyecool.pq_pair_counts(ids, ids[:, :3])
    with pytest.raises(RuntimeError, match="pq_pair_counts: gt_ids must be an integer tensor, got Float"):
        torch.ops.eyecool.pq_pair_counts(ids.float(), ids.float())


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    gt = random_id_maps(2, 6, 7, 4, device=device)
    pred = random_id_maps(2, 6, 7, 5, device=device, seed=1)
    torch.library.opcheck(torch.ops.eyecool.pq_pair_counts.default, (gt, pred))


@needs_compiled
def test_torch_compile_fullgraph():
    gt = random_id_maps(1, 10, 12, 4)[0]
    pred = random_id_maps(1, 10, 12, 6, seed=1)[0]

    def f(g, p):
        gt_id, pred_id, count = ops.pq_pair_counts(g, p)
        return gt_id * 100 + pred_id, count * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(gt, pred), f(gt, pred)):
        assert torch.equal(a, b)

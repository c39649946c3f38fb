"""Property-based tests: pq_pair_counts against the reference (torch.unique of the encoded pairs) on generated id
maps: empty batches and empty maps, one-pixel maps, every integer dtype, ids near 2^31, non-contiguous views,
and out-of-range (negative, >= 2^31) ids, which must be a ValueError or RuntimeError with a message.

The budget is small by default (CI); EYECOOL_FUZZ_EXAMPLES=2000 runs a long campaign on demand.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from eyecool_ext import ops, reference
from fuzz_tools import fuzz, ran

DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]
LIMITS = {torch.uint8: 255, torch.int16: 2**15 - 1, torch.int32: 2**31 - 1, torch.int64: 2**31 - 1}


@st.composite
def id_maps(draw):
    dtype = draw(st.sampled_from(DTYPES))
    b, h, w = draw(st.integers(0, 3)), draw(st.integers(0, 7)), draw(st.integers(0, 7))
    high = LIMITS[dtype]
    # A few distinct ids (so pairs repeat), drawn anywhere in the valid range including its ends.
    palette = draw(st.lists(st.one_of(st.integers(0, 5), st.integers(0, high), st.sampled_from([0, high])),
                            min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    table = torch.tensor(palette, dtype=torch.int64)
    gt = table[torch.randint(0, len(palette), (b, h, w), generator=g)]
    pred = table[torch.randint(0, len(palette), (b, h, w), generator=g)]
    view = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if view == "transposed":
        gt, pred = gt.transpose(1, 2).contiguous().transpose(1, 2), pred.transpose(1, 2).contiguous().transpose(1, 2)
    elif view == "strided":
        gt = torch.repeat_interleave(gt, 2, dim=2)[:, :, ::2]
        pred = torch.repeat_interleave(pred, 2, dim=2)[:, :, ::2]
    return gt.to(dtype), pred.to(dtype)


@fuzz
@given(id_maps())
def test_batched_pq_pair_counts_matches_reference(maps):
    ran("pq_pair_counts")
    gt, pred = maps
    got = ops.batched_pq_pair_counts(gt, pred)
    want = reference.batched_pq_pair_counts(gt, pred)
    for g, w in zip(got, want):
        assert g.dtype == torch.int64
        assert torch.equal(g, w)
    assert int(got[3].sum()) == gt.numel()
    if gt.shape[0]:
        single = ops.pq_pair_counts(gt[0], pred[0])
        expected = reference.pq_pair_counts(gt[0], pred[0])
        for g, w in zip(single, expected):
            assert torch.equal(g, w)


@fuzz
@given(st.sampled_from([-1, -(2**31), 2**31, 2**40, -(2**62)]), st.integers(1, 4), st.integers(1, 4),
       st.integers(0, 100), st.booleans())
def test_out_of_range_ids_are_refused_with_a_message(bad, h, w, position, in_pred):
    ran("pq_pair_counts")
    gt = torch.zeros(1, h, w, dtype=torch.int64)
    pred = torch.zeros(1, h, w, dtype=torch.int64)
    (pred if in_pred else gt).view(-1)[position % (h * w)] = bad
    with pytest.raises((ValueError, RuntimeError), match="2147483647|2\\^31|range"):
        ops.batched_pq_pair_counts(gt, pred)

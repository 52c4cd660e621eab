"""Masks and scores against plain, slow float64 reference implementations written from the papers."""

import numpy as np
import pytest
import torch

from podar.schemas.errors import StageError
from podar.stages.bitpack import pack_bits, unpack_bits
from podar.stages.masks import (
    block_mask,
    column_mask,
    global_unstructured_masks,
    n_pruned,
    nm_mask,
    row_mask,
    unstructured_mask,
)
from podar.stages.methods.magnitude import magnitude_score
from podar.stages.methods.wanda import wanda_score


def rand(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g, dtype=torch.float64)


def ref_per_row(score, s):
    score = score.double().numpy()
    keep = np.ones_like(score, dtype=bool)
    k = int(score.shape[1] * s)
    for i, row in enumerate(score):
        keep[i, np.argsort(row, kind="stable")[:k]] = False
    return torch.from_numpy(keep)


def ref_per_layer(score, s):
    flat = score.double().numpy().reshape(-1)
    keep = np.ones_like(flat, dtype=bool)
    keep[np.argsort(flat, kind="stable")[: int(flat.size * s)]] = False
    return torch.from_numpy(keep.reshape(score.shape))


def ref_nm(score, n, m):
    score = score.double().numpy()
    keep = np.zeros_like(score, dtype=bool)
    for i in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            top = np.argsort(-score[i, g:g + m], kind="stable")[:n]
            keep[i, g + top] = True
    return torch.from_numpy(keep)


@pytest.mark.parametrize("shape", [(16, 32), (7, 13), (1, 100)])
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_per_row_matches_reference_and_is_exact(shape, s):
    score = rand(*shape).abs()
    mask = unstructured_mask(score.float(), s, "per_row")
    assert torch.equal(mask, ref_per_row(score.float(), s))
    assert ((~mask).sum(dim=1) == int(shape[1] * s)).all()


@pytest.mark.parametrize("shape", [(16, 32), (7, 13)])
@pytest.mark.parametrize("s", [0.25, 0.5, 0.7])
def test_unstructured_per_layer_matches_reference_and_is_exact(shape, s):
    score = rand(*shape, seed=1).abs()
    mask = unstructured_mask(score.float(), s, "per_layer")
    assert torch.equal(mask, ref_per_layer(score.float(), s))
    assert int((~mask).sum()) == int(shape[0] * shape[1] * s)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 5)])
def test_nm_exact_in_every_group(n, m):
    score = rand(12, m * 6, seed=2).abs().float()
    mask = nm_mask(score, n, m)
    assert torch.equal(mask, ref_nm(score, n, m))
    groups = mask.view(12, 6, m).sum(dim=-1)
    assert (groups == n).all()


def test_nm_refuses_indivisible():
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_block_row_column_masks():
    score = rand(8, 12, seed=3).abs().float()
    mb = block_mask(score, 2, 3, 0.5)
    blocks = mb.view(4, 2, 4, 3).permute(0, 2, 1, 3).reshape(16, 6)
    assert ((blocks.all(dim=1)) | (~blocks.any(dim=1))).all()  # each block all kept or all pruned
    assert int((~blocks.any(dim=1)).sum()) == 8
    # the pruned blocks are the lowest by summed score
    bs = score.view(4, 2, 4, 3).sum(dim=(1, 3)).reshape(-1)
    pruned = ~blocks.any(dim=1)
    assert bs[pruned].max() <= bs[~pruned].min()
    mr = row_mask(score, 0.25)
    assert int((~mr.any(dim=1)).sum()) == 2 and (mr.all(dim=1) | ~mr.any(dim=1)).all()
    mc = column_mask(score, 0.5)
    assert int((~mc.any(dim=0)).sum()) == 6


def test_global_mask_compares_across_layers():
    a = torch.full((4, 4), 10.0)
    b = torch.rand(4, 4)
    masks = global_unstructured_masks({"a": a, "b": b}, 0.5)
    assert masks["a"].all() and not masks["b"].any()


def test_n_pruned_floors_and_validates():
    assert n_pruned(10, 0.55) == 5
    assert n_pruned(100, 0.29) == 29  # float noise does not lose one
    with pytest.raises(ValueError):
        n_pruned(10, 1.0)


def test_magnitude_and_wanda_scores_match_reference():
    w = rand(6, 10, seed=4)
    x = rand(50, 10, seed=5)  # 50 tokens from 5 "samples"
    assert torch.allclose(magnitude_score(w.float()).double(), w.abs(), atol=1e-6)
    sq = (x ** 2).sum(dim=0)
    score = wanda_score(w.float(), sq.float(), 5)
    ref = w.abs() * torch.sqrt(sq / 5)[None, :]
    assert torch.allclose(score.double(), ref, rtol=1e-5)
    # Wanda's mask (per row) from the reference score equals ours
    assert torch.equal(unstructured_mask(score, 0.5, "per_row"), ref_per_row(ref.float(), 0.5))


@pytest.mark.parametrize("shape", [(5, 13), (3, 8), (1, 1), (4, 17)])
def test_bitpack_round_trip_and_numpy_order(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(*shape, generator=g) > 0.5
    mask[0] = True
    packed = pack_bits(mask)
    assert packed.shape == (shape[0], (shape[1] + 7) // 8)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    assert torch.equal(unpack_bits(packed, shape[1]), mask)


def test_lowest_k_ties_by_position_like_a_stable_sort():
    from podar.stages.masks import _lowest_k

    score = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    keep = _lowest_k(score, 3)
    assert keep.tolist() == [[True, False, False, False, True, True], [False, False, False, True, True, True]]
    g = torch.Generator().manual_seed(9)
    ints = torch.randint(0, 4, (50, 33), generator=g).float()  # many ties
    for k in (0, 1, 16, 32, 33):
        ref = ref_per_row(ints, k / 33 + 1e-12) if k < 33 else torch.zeros_like(ints, dtype=torch.bool)
        assert torch.equal(_lowest_k(ints, k), ref), k


def test_finite_check_names_the_layer_and_passes_an_overflowing_sum():
    """The weight/statistic check: NaN or Inf anywhere fails naming the layer and the count; finite values whose
    sum overflows float32 pass."""
    from podar.stages.importance import check_finite as _check_finite

    big = torch.full((4, 4), 3e38)  # finite, but the sum is inf
    _check_finite(big, "layer.a", "the weight")
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(5, 7)
        t[2, 3] = bad
        t[4, 0] = bad
        with pytest.raises(StageError, match=r"layer 'layer.b': the weight has 2 non-finite"):
            _check_finite(t, "layer.b", "the weight")

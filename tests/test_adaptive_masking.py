"""DAMA's adaptive second mask, checked per sample (the public code's batch-wide indexing must not come back)."""

from __future__ import annotations

import pytest
import torch

from micromae.errors import MicromaeInputError
from micromae.models.adaptive_masking import adaptive_mask, random_ids_keep, random_overlap_mask, second_mask_sizes
from micromae.models.masking import mask_from_ids_keep

L = 64  # an 8x8 patch grid


def _mask1_and_loss(n: int, keep: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask1 = mask_from_ids_keep(random_ids_keep(n, L, keep, generator=g), L)
    loss = torch.rand(n, L, generator=g) + 0.1  # distinct, positive losses differing per sample
    return mask1, loss


def _check_per_sample(mask1, loss, ids_keep2, mask2, keep, overlap):
    """Every property the adaptive mask promises, sample by sample, from first principles."""
    for i in range(mask1.shape[0]):
        kept = ids_keep2[i].tolist()
        assert len(set(kept)) == keep == len(kept)
        assert int((mask2[i] == 0).sum()) == keep and int((mask2[i] == 1).sum()) == L - keep
        assert set(torch.nonzero(mask2[i] == 0).flatten().tolist()) == set(kept)  # mask2 from the kept ids
        visible1 = set(torch.nonzero(mask1[i] == 0).flatten().tolist())
        assert len(visible1 & set(kept)) == overlap
        masked1 = sorted(set(range(L)) - visible1, key=lambda j: float(loss[i, j]))
        assert set(kept) - visible1 == set(masked1[:keep - overlap])  # the best-reconstructed masked ones
        if keep - overlap < len(masked1):  # else (r = 0.5, no overlap) branch 2 is branch 1's complement
            assert mask2[i, masked1[-1]] == 1  # the worst-reconstructed patch is masked for branch 2


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.8, 0.9])
@pytest.mark.parametrize("overlap_ratio", [0.0, 0.5, 1.0])
def test_adaptive_mask_per_sample_on_a_batch_of_64(mask_ratio, overlap_ratio):
    keep, overlap = second_mask_sizes(L, mask_ratio, overlap_ratio)
    assert keep == int(L * (1 - mask_ratio)) and overlap == int(keep * overlap_ratio)
    mask1, loss = _mask1_and_loss(64, keep)
    ids_keep2, mask2 = adaptive_mask(mask1, loss, mask_ratio, overlap_ratio)
    assert ids_keep2.shape == (64, keep) and ids_keep2.dtype == torch.int64 and mask2.shape == (64, L)
    assert torch.equal(mask2, mask_from_ids_keep(ids_keep2, L))
    _check_per_sample(mask1, loss, ids_keep2, mask2, keep, overlap)


def test_public_code_emulation_breaks_the_per_sample_properties():
    keep, overlap = second_mask_sizes(L, 0.8, 0.5)
    mask1, loss = _mask1_and_loss(64, keep)
    ids_keep2, mask2 = adaptive_mask(mask1, loss, 0.8, 0.5, emulate_public_code=True)
    masked_counts = mask2.sum(dim=1)
    assert bool((masked_counts < L - keep).all())  # the union of overlaps un-masks far too many patches
    assert not torch.equal(mask2, mask_from_ids_keep(ids_keep2, L))  # loss mask != what the encoder saw
    with pytest.raises(AssertionError):
        _check_per_sample(mask1, loss, ids_keep2, mask2, keep, overlap)
    # on a single sample the released code is right about the counts
    one_ids, one_mask = adaptive_mask(mask1[:1], loss[:1], 0.8, 0.5, emulate_public_code=True)
    assert int(one_mask.sum()) == L - keep and torch.equal(one_mask, mask_from_ids_keep(one_ids, L))


def test_samples_are_independent():
    keep, overlap = second_mask_sizes(L, 0.75, 0.5)
    mask1, loss = _mask1_and_loss(16, keep, seed=1)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    # without overlap the mask is deterministic: permuting the batch permutes the result exactly
    ids_a, mask_a = adaptive_mask(mask1, loss, 0.75, 0.0)
    ids_b, mask_b = adaptive_mask(mask1[perm], loss[perm], 0.75, 0.0)
    assert torch.equal(ids_a[perm], ids_b) and torch.equal(mask_a[perm], mask_b)
    alone = torch.stack([adaptive_mask(mask1[i:i + 1], loss[i:i + 1], 0.75, 0.0)[1][0] for i in range(16)])
    assert torch.equal(alone, mask_a)
    # with overlap only the random overlap draw differs; the loss-chosen part permutes exactly
    _, m_a = adaptive_mask(mask1, loss, 0.75, 0.5, generator=torch.Generator().manual_seed(0))
    _, m_b = adaptive_mask(mask1[perm], loss[perm], 0.75, 0.5, generator=torch.Generator().manual_seed(0))
    chosen_a = (m_a == 0) & (mask1 == 1)
    chosen_b = (m_b == 0) & (mask1[perm] == 1)
    assert torch.equal(chosen_a[perm], chosen_b)


def test_generator_makes_the_overlap_reproducible_and_random():
    keep, _ = second_mask_sizes(L, 0.75, 0.5)
    mask1, loss = _mask1_and_loss(8, keep)
    a = adaptive_mask(mask1, loss, 0.75, 0.5, generator=torch.Generator().manual_seed(5))[0]
    b = adaptive_mask(mask1, loss, 0.75, 0.5, generator=torch.Generator().manual_seed(5))[0]
    c = adaptive_mask(mask1, loss, 0.75, 0.5, generator=torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_overlap_mask_shares_exactly_overlap():
    keep, overlap = second_mask_sizes(L, 0.8, 0.5)
    mask1, loss = _mask1_and_loss(64, keep)
    ids2, mask2 = random_overlap_mask(mask1, 0.8, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask2, mask_from_ids_keep(ids2, L))
    assert bool((mask2.sum(1) == L - keep).all())
    shared = ((mask1 == 0) & (mask2 == 0)).sum(1)
    assert bool((shared == overlap).all())
    # not the adaptive choice: some sample keeps a masked-in-1 patch outside the lowest-loss ones
    with pytest.raises(AssertionError):
        _check_per_sample(mask1, loss, ids2, mask2, keep, overlap)
    ids3, _ = random_overlap_mask(mask1, 0.8, 0.5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(ids2, ids3)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.49, 1.0, 1.2])
def test_bad_mask_ratio_is_rejected(ratio):
    mask1, loss = _mask1_and_loss(2, 32)
    with pytest.raises(MicromaeInputError, match="mask_ratio"):
        adaptive_mask(mask1, loss, ratio)


def test_ratio_below_half_explains_why():
    with pytest.raises(MicromaeInputError, match="among branch 1's masked patches"):
        second_mask_sizes(L, 0.4, 0.5)


@pytest.mark.parametrize("overlap_ratio", [-0.1, 1.5])
def test_bad_overlap_ratio_is_rejected(overlap_ratio):
    mask1, loss = _mask1_and_loss(2, 16)
    with pytest.raises(MicromaeInputError, match="overlap_ratio"):
        random_overlap_mask(mask1, 0.75, overlap_ratio)


def test_inconsistent_inputs_are_rejected():
    mask1, loss = _mask1_and_loss(2, 16)  # 16 kept = ratio 0.75
    with pytest.raises(MicromaeInputError, match="visible patches in every sample"):
        adaptive_mask(mask1, loss, 0.8)
    with pytest.raises(MicromaeInputError, match="loss_per_patch"):
        adaptive_mask(mask1, loss[:, :10], 0.75)
    with pytest.raises(MicromaeInputError, match="mask1"):
        adaptive_mask(mask1[0], loss[0], 0.75)

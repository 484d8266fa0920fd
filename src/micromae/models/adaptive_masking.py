"""DAMA's second mask: adaptive masking (paper Algorithm 1; docs/METHODS.md, DAMA pre-training) and its
random-overlap ablation.

Conventions as in :mod:`micromae.models.masking`: masks are ``(N, L)`` with **0 = kept (visible), 1 = masked**;
``ids_keep`` ``(N, L_keep)`` holds visible patch indices. With ``keep = int(L * (1 - mask_ratio))`` and
``overlap = int(keep * overlap_ratio)``, branch 2 keeps, **per sample**:

- ``overlap`` patches drawn at random among those branch 1 saw, and
- the ``keep - overlap`` patches masked in branch 1 that branch 1 reconstructed best (lowest loss);

everything else is masked for branch 2, in particular the patches branch 1 reconstructed worst. Both branches
keep ``keep`` patches, so ``keep - overlap <= L - keep`` must hold for every overlap, hence ``mask_ratio >= 0.5``.

Every selection is a per-row ``argsort`` / ``gather`` / ``scatter``; no index ever crosses samples (the public
code's ``m2[:, ids] = 0`` did, see :func:`adaptive_mask` with ``emulate_public_code=True``).
"""

from __future__ import annotations

import torch

from micromae.errors import input_error
from micromae.models.masking import mask_from_ids_keep, num_kept

__all__ = ["adaptive_mask", "random_overlap_mask", "second_mask_sizes", "random_ids_keep"]


def second_mask_sizes(num_patches: int, mask_ratio: float, overlap_ratio: float) -> tuple[int, int]:
    """``(keep, overlap)`` for branch 2 after checking ``0.5 <= mask_ratio < 1`` and ``0 <= overlap_ratio <= 1``.

    ``keep = int(L * (1 - mask_ratio))``, ``overlap = int(keep * overlap_ratio)``.
    """
    ratio, overlap_ratio_f = float(mask_ratio), float(overlap_ratio)
    if not 0.5 <= ratio <= 1.0:
        raise input_error("mask_ratio for adaptive masking", "a ratio in [0.5, 1)", repr(mask_ratio),
                          "Branch 2 keeps as many patches as branch 1 and must find the non-overlapping ones "
                          "among branch 1's masked patches, which needs at least half the patches masked; "
                          "use e.g. 0.8 (DAMA)")
    keep = num_kept(num_patches, ratio)  # rejects 1.0 (nothing kept)
    if not 0.0 <= overlap_ratio_f <= 1.0:
        raise input_error("overlap_ratio", "a fraction in [0, 1]", repr(overlap_ratio),
                          "Use 0.5 (DAMA), or 0 for adaptive masking without overlap")
    return keep, int(keep * overlap_ratio_f)


def random_ids_keep(n: int, num_patches: int, keep: int, device: torch.device | str | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random visible patches (MAE masking by sorted noise): ``(N, keep)`` int64."""
    noise = torch.rand(n, num_patches, device=device, generator=generator)
    return torch.argsort(noise, dim=1)[:, :keep]


def _check_inputs(mask1: torch.Tensor, scores: torch.Tensor | None, keep: int, check_counts: bool) -> None:
    """Shapes always; with ``check_counts`` also that every sample of ``mask1`` keeps exactly ``keep`` patches
    (one device sync)."""
    if mask1.dim() != 2:
        raise input_error("mask1", "a (N, L) mask, 0 keep 1 masked", str(tuple(mask1.shape)),
                          "Pass branch 1's mask as returned by forward_encoder")
    if scores is not None and scores.shape != mask1.shape:
        raise input_error("loss_per_patch", f"shape {tuple(mask1.shape)} like mask1", str(tuple(scores.shape)),
                          "Pass the per-patch loss (N, L) of branch 1, before averaging")
    if check_counts:
        visible = (mask1 < 0.5).sum(dim=1)
        if bool((visible != keep).any()):
            raise input_error("mask1", f"{keep} visible patches in every sample (same mask_ratio as branch 2)",
                              f"counts {sorted(set(visible.tolist()))}",
                              "Build mask 1 with the same mask_ratio as the adaptive mask")


def _keep_overlap_and_lowest(mask1: torch.Tensor, scores: torch.Tensor, keep: int, overlap: int,
                             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: ``overlap`` random visible-in-1 patches + the ``keep - overlap`` masked-in-1 patches of lowest
    ``scores``. Returns ``ids_keep2`` ``(N, keep)`` (ascending patch index) and ``mask2`` ``(N, L)``."""
    visible1 = mask1 < 0.5  # (N, L) bool
    noise = torch.rand(mask1.shape, device=mask1.device, generator=generator)
    noise = noise.masked_fill(~visible1, 2.0)  # masked-in-1 patches sort after every visible one
    ids_overlap = torch.argsort(noise, dim=1)[:, :overlap]
    scores = scores.detach().float().masked_fill(visible1, float("inf"))  # visible-in-1 sort last
    ids_lowest = torch.argsort(scores, dim=1, stable=True)[:, :keep - overlap]
    ids_keep2 = torch.sort(torch.cat([ids_overlap, ids_lowest], dim=1), dim=1).values
    return ids_keep2, mask_from_ids_keep(ids_keep2, mask1.shape[1], dtype=torch.float32)


def _public_code_mask(mask1: torch.Tensor, loss: torch.Tensor, keep: int, overlap: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' released adaptive masking, bugs included (for comparison only).

    Patches masked in 1 become visible, the ``L - 2 keep + overlap`` highest-loss ones are masked again, then
    ``m2[:, ids] = 0`` un-masks, **in every sample**, the union over the batch of each sample's first
    ``overlap`` visible-in-1 patches. The encoder takes the first ``keep`` zeros of ``m2``, but ``m2`` itself
    (not recomputed) is returned as the loss mask.
    """
    length = mask1.shape[1]
    loss_len = length - 2 * keep
    m1 = mask1.detach().float()
    ids_sorted = torch.argsort(loss.detach().float() * m1, dim=1, stable=True)
    loss_take = ids_sorted[:, -(loss_len + overlap):]
    m2 = torch.where(m1 == 1, 0.0, 1.0)
    m2.scatter_(1, loss_take, 1.0)
    ids_m1 = torch.argsort(m1, dim=1, stable=True)[:, :overlap]
    m2[:, ids_m1] = 0.0  # batch-wide: the bug
    ids_keep2 = torch.argsort(m2, dim=1, stable=True)[:, :keep]
    return ids_keep2, m2


def adaptive_mask(mask1: torch.Tensor, loss_per_patch: torch.Tensor, mask_ratio: float,
                  overlap_ratio: float = 0.5, generator: torch.Generator | None = None,
                  emulate_public_code: bool = False, check_counts: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """DAMA's adaptive mask for branch 2 (Algorithm 1, per sample).

    Args:
        mask1: ``(N, L)`` branch 1's mask, 0 keep 1 masked, with ``keep`` visible patches per sample.
        loss_per_patch: ``(N, L)`` branch 1's reconstruction loss per patch (detached here).
        mask_ratio: ``r`` in [0.5, 1); ``keep = int(L * (1 - r))``.
        overlap_ratio: fraction of ``keep`` shared with branch 1's visible patches (0: no overlap).
        generator: ``torch.Generator`` on ``mask1.device`` for the random choice of the overlap.
        emulate_public_code: reproduce the released code's batch-wide overlap and unrecomputed mask (wrong;
            only to measure what the bug did).
        check_counts: verify that every sample of ``mask1`` keeps ``keep`` patches (costs a device sync).
    Returns:
        ``ids_keep2`` ``(N, keep)`` int64 (ascending) and ``mask2`` ``(N, L)`` float32, 0 exactly at
        ``ids_keep2``: the ``L - keep`` masked patches include every masked-in-1 patch with a higher loss than
        any kept one, so the worst-reconstructed patch is masked unless ``keep - overlap = L - keep`` (r = 0.5
        without overlap: branch 2 is then exactly branch 1's complement).
    """
    keep, overlap = second_mask_sizes(mask1.shape[-1], mask_ratio, overlap_ratio)
    _check_inputs(mask1, loss_per_patch, keep, check_counts)
    if emulate_public_code:
        return _public_code_mask(mask1, loss_per_patch, keep, overlap)
    return _keep_overlap_and_lowest(mask1, loss_per_patch, keep, overlap, generator)


def random_overlap_mask(mask1: torch.Tensor, mask_ratio: float, overlap_ratio: float = 0.5,
                        generator: torch.Generator | None = None, check_counts: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """DAMA-rand: a random second mask sharing exactly ``overlap`` visible patches with ``mask1``.

    Same sizes as :func:`adaptive_mask`; the ``keep - overlap`` other visible patches are drawn at random among
    branch 1's masked ones. Returns ``ids_keep2`` ``(N, keep)`` and ``mask2`` ``(N, L)``.
    """
    keep, overlap = second_mask_sizes(mask1.shape[-1], mask_ratio, overlap_ratio)
    _check_inputs(mask1, None, keep, check_counts)
    scores = torch.rand(mask1.shape, device=mask1.device, generator=generator)
    return _keep_overlap_and_lowest(mask1, scores, keep, overlap, generator)

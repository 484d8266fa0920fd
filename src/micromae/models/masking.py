"""Token masking for masked image modelling: MAE's per-sample random masking and masks from given indices.

Conventions (MAE): ``mask`` is ``(N, L)`` float with **0 = kept (visible to the encoder), 1 = removed**;
``ids_keep`` ``(N, L_keep)`` holds the visible patch indices in the order the encoder sees them;
``ids_restore`` ``(N, L)`` is the inverse permutation, so that ``torch.gather(cat(visible, removed), 1,
ids_restore)`` puts every token back at its patch position.
"""

from __future__ import annotations

import torch

from micromae.errors import input_error

__all__ = ["num_kept", "random_masking", "mask_from_ids_keep", "restore_from_ids_keep", "gather_tokens"]


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """``L_keep = int(L * (1 - mask_ratio))`` after checking ``0 <= mask_ratio < 1`` and ``L_keep >= 1``."""
    ratio = float(mask_ratio)
    if not 0.0 <= ratio < 1.0:
        raise input_error("mask_ratio", "a number in [0, 1)", repr(mask_ratio),
                          "Use e.g. 0.5 (MAESTER) or 0.75 (MAE); 1.0 would hide every patch")
    keep = int(num_patches * (1.0 - ratio))
    if keep < 1:
        raise input_error("mask_ratio", f"a ratio leaving at least one of {num_patches} patches visible",
                          f"{ratio} (0 patches kept)", "Lower mask_ratio or use more patches per image")
    return keep


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Pick tokens per sample: ``x`` ``(N, L, D)``, ``ids`` ``(N, M)`` int64 -> ``(N, M, D)``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by sorting uniform noise (MAE).

    Args:
        x: ``(N, L, D)`` patch tokens.
        mask_ratio: fraction of patches removed, ``0 <= mask_ratio < 1``.
        generator: optional ``torch.Generator`` on ``x.device`` for reproducible masks.
    Returns:
        ``x_visible`` ``(N, L_keep, D)``, ``mask`` ``(N, L)`` float32 (0 keep, 1 remove),
        ``ids_restore`` ``(N, L)``, ``ids_keep`` ``(N, L_keep)``, with ``L_keep = int(L * (1 - mask_ratio))``.
    """
    if x.dim() != 3:
        raise input_error("tokens to mask", "shape (N, L, D)", str(tuple(x.shape)), "Patch-embed images first")
    n, length, _ = x.shape
    keep = num_kept(length, mask_ratio)
    noise = torch.rand(n, length, device=x.device, generator=generator)  # (N, L) in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the smallest noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(n, length, device=x.device)  # float32 even under autocast: counts stay exact
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return gather_tokens(x, ids_keep), mask, ids_restore, ids_keep


def _check_ids_keep(ids_keep: torch.Tensor, num_patches: int) -> None:
    """Shape and dtype checks on ``ids_keep`` (values are not read, so no device sync)."""
    if ids_keep.dim() != 2 or ids_keep.dtype != torch.int64 or not 1 <= ids_keep.shape[1] <= num_patches:
        raise input_error("ids_keep", f"an int64 tensor (N, L_keep) with 1 <= L_keep <= {num_patches}",
                          f"{ids_keep.dtype} {tuple(ids_keep.shape)}",
                          "Pass the indices of the visible patches of each sample, e.g. from random_masking")


def mask_from_ids_keep(ids_keep: torch.Tensor, num_patches: int, dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    """Binary mask of a given set of visible patches.

    Args:
        ids_keep: ``(N, L_keep)`` int64, distinct indices in ``[0, L)`` per sample.
        num_patches: ``L``.
    Returns:
        ``mask`` ``(N, L)`` with 0 at ``ids_keep`` (kept) and 1 elsewhere (removed).
    """
    _check_ids_keep(ids_keep, num_patches)
    mask = torch.ones(ids_keep.shape[0], num_patches, device=ids_keep.device, dtype=dtype)
    return mask.scatter_(1, ids_keep, 0.0)


def restore_from_ids_keep(ids_keep: torch.Tensor, num_patches: int, dtype: torch.dtype = torch.float32
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask and ``ids_restore`` for a given mask (e.g. DAMA's adaptive mask), matching :func:`random_masking`.

    The shuffle is ``cat(ids_keep, removed patches in ascending order)``, so the decoder's
    ``gather(cat(encoded visible tokens, mask tokens), ids_restore)`` puts each token at its patch.

    Args:
        ids_keep: ``(N, L_keep)`` int64, distinct indices per sample, in the order the encoder sees them.
        num_patches: ``L``.
    Returns:
        ``mask`` ``(N, L)`` (0 keep, 1 remove) and ``ids_restore`` ``(N, L)``.
    """
    mask = mask_from_ids_keep(ids_keep, num_patches, dtype=dtype)
    keep = ids_keep.shape[1]
    ids_removed = torch.argsort(mask, dim=1, stable=True)[:, keep:]  # kept (0) sort first, removed after
    ids_shuffle = torch.cat([ids_keep, ids_removed], dim=1)
    return mask, torch.argsort(ids_shuffle, dim=1)


def unpatchify(x: torch.Tensor, patch_size: int, grid_size: tuple[int, int], channels: int,
               what: str = "patches") -> torch.Tensor:
    """``(N, L, p*p*C)`` per-patch values (ordered row, col, channel) -> ``(N, C, gh*p, gw*p)`` images.

    Shared by the MAE decoder output and the ViT-decoder segmentation head (C = classes there).
    """
    p, (gh, gw), c = patch_size, grid_size, channels
    if x.dim() != 3 or x.shape[1:] != (gh * gw, p * p * c):
        raise input_error(what, f"shape (N, {gh * gw}, {p * p * c})", str(tuple(x.shape)),
                          "Pass per-patch values of this model's grid and patch size")
    x = x.reshape(x.shape[0], gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], c, gh * p, gw * p)

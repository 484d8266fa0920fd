"""SimMIM (Xie et al. 2022) on the ViT encoder: mask tokens inside the encoder, a linear head, L1 on pixels.

The encoder sees every one of the ``L`` tokens; a masked patch's token is a learned mask token plus the
patch's position embedding. A linear head maps each output token to the ``p*p*C`` raw pixels of its patch,
and the loss is the L1 distance on the **masked** patches only (mean over their pixels). The objective that
trains it is ``train.ssl_objectives.SimMIMObjective``; the encoder is stored under ``encoder.`` like MAE's,
so :func:`micromae.models.pretrained.load_encoder` reads it into the same :class:`ViTEncoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from micromae.models.adaptive_masking import random_ids_keep
from micromae.models.masking import mask_from_ids_keep, num_kept, unpatchify
from micromae.models.vit import ViTEncoder, init_mae_weights

__all__ = ["SimMIM", "SimMIMOutput", "patchify"]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``imgs`` ``(N, C, H, W)`` -> ``(N, L, p*p*C)``, patches row-major, values (row, col, channel) as MAE's."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


@dataclass
class SimMIMOutput:
    """loss: scalar L1 on masked patches; pred: ``(N, L, p*p*C)`` pixels; mask: ``(N, L)`` 1 = masked;
    loss_per_patch: ``(N, L)`` mean absolute error of every patch."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    loss_per_patch: torch.Tensor


class SimMIM(nn.Module):
    """SimMIM: ``encoder`` (a :class:`ViTEncoder`), ``mask_token`` ``(1, 1, D)``, ``head`` Linear D -> p*p*C.

    Args:
        encoder: the ViT encoder trained.
        mask_ratio: fraction of patches masked per image (random per sample).
    """

    def __init__(self, encoder: ViTEncoder, mask_ratio: float = 0.6) -> None:
        super().__init__()
        self.keep = num_kept(encoder.num_patches, mask_ratio)  # validates the ratio
        self.mask_ratio = float(mask_ratio)
        self.encoder = encoder
        self.patch_size, self.in_chans = encoder.patch_size, encoder.in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(encoder.embed_dim, encoder.patch_size ** 2 * encoder.in_chans)
        init_mae_weights(self.head)

    def random_mask(self, n: int, device: torch.device) -> torch.Tensor:
        """``(N, L)`` float mask with ``L - keep`` ones per row (1 = masked), from torch's global generator."""
        length = self.encoder.num_patches
        return mask_from_ids_keep(random_ids_keep(n, length, self.keep, device), length)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> SimMIMOutput:
        """``imgs`` ``(N, C, H, W)``; ``mask`` ``(N, L)`` (1 = masked; None: a random one)."""
        if mask is None:
            mask = self.random_mask(imgs.shape[0], imgs.device)
        x = self.encoder.embed_patches(imgs)  # (N, L, D), position embedding included
        masked_token = (self.mask_token + self.encoder.pos_embed[:, 1:]).to(x.dtype)
        x = torch.where(mask.bool().unsqueeze(-1), masked_token, x)
        pred = self.head(self.encoder.forward_tokens(x)[:, 1:])  # (N, L, p*p*C)
        target = patchify(imgs.float(), self.patch_size)
        loss_per_patch = (pred.float() - target).abs().mean(dim=-1)  # (N, L)
        loss = (loss_per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        return SimMIMOutput(loss, pred, mask, loss_per_patch)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, p*p*C)`` -> ``(N, C, H, W)``."""
        return unpatchify(x, self.patch_size, self.encoder.grid_size, self.in_chans)

    def settings(self) -> dict:
        return {"mask_ratio": self.mask_ratio}

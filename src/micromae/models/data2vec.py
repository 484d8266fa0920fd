"""data2vec-style baseline model on the MAE encoder: a student with mask embeddings and an EMA teacher.

The objective that trains it (EMA schedule, resume checks) is ``train.dama_objectives.Data2VecObjective``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from micromae.errors import input_error
from micromae.models.adaptive_masking import random_ids_keep
from micromae.models.dama import feature_loss, regression_target
from micromae.models.masking import mask_from_ids_keep, num_kept
from micromae.models.vit import ViTEncoder, init_mae_weights

__all__ = ["TARGET_NORMS", "Data2Vec", "target_spread"]

TARGET_NORMS = ("layer", "instance")


@torch.no_grad()
def target_spread(target: torch.Tensor) -> dict[str, float]:
    """How much a regression target ``(N, L, D)`` varies, the collapse check of data2vec.

    ``target_std_tokens``: the standard deviation over the ``L`` tokens of one image, averaged over features
    and images (0 when every token of an image has the same target); ``target_std_images``: over the ``N``
    images at one token position, averaged over features and positions (0 when every image has the same
    target; needs ``N >= 2``). A per-token layer-normalised target has unit spread over features, so values
    near 1 mean the target varies as much between tokens as within one, values near 0 a collapsed target.
    """
    t = target.detach().float()
    out = {"target_std_tokens": float(t.std(dim=1, unbiased=False).mean())}
    if t.shape[0] > 1:
        out["target_std_images"] = float(t.std(dim=0, unbiased=False).mean())
    return out


class Data2Vec(nn.Module):
    """data2vec-style baseline on the MAE encoder.

    The student encodes all ``L`` tokens with a learned mask embedding in place of the masked patches (position
    embedding kept); a linear head regresses, at the masked positions, the teacher's target: the per-token
    layer-normalised FFN outputs of its last ``K`` blocks on the **unmasked** image, averaged. The teacher is
    an EMA copy of the student (no gradient).
    """

    def __init__(self, encoder: ViTEncoder, mask_ratio: float = 0.6, K: int = 6, beta: float = 2.0,
                 target_norm: str = "layer") -> None:
        super().__init__()
        if target_norm not in TARGET_NORMS:
            raise input_error("data2vec target_norm", "one of " + ", ".join(TARGET_NORMS), repr(target_norm),
                              "Use layer (DAMA's target) or instance")
        self.target_norm = target_norm
        self.keep = num_kept(encoder.num_patches, mask_ratio)
        if not 1 <= K <= encoder.depth or isinstance(K, bool):
            raise input_error("K", f"an int in 1..depth={encoder.depth}", repr(K), "Average at most depth blocks")
        self.mask_ratio, self.K, self.beta = float(mask_ratio), int(K), float(beta)
        self.encoder = encoder
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.normal_(self.mask_embedding, std=0.02)
        self.head = nn.Linear(encoder.embed_dim, encoder.embed_dim)
        init_mae_weights(self.head)
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``imgs`` ``(N, C, H, W)`` -> ``loss``, ``pred`` ``(N, L, D)``, ``target`` ``(N, L, D)``, ``mask``
        ``(N, L)`` (1 = masked, where the loss is taken)."""
        n, length = imgs.shape[0], self.encoder.num_patches
        mask = mask_from_ids_keep(random_ids_keep(n, length, self.keep, imgs.device, generator), length)
        x = self.encoder.embed_patches(imgs)  # (N, L, D), position embedding included
        masked_token = (self.mask_embedding + self.encoder.pos_embed[:, 1:]).to(x.dtype)
        x = torch.where(mask.bool().unsqueeze(-1), masked_token, x)
        pred = self.head(self.encoder.forward_tokens(x)[:, 1:])
        with torch.no_grad():
            _, ffn = self.teacher.forward_features(imgs, return_block_ffn=self.K)
            if self.target_norm == "instance":  # each block's output normalised over the patch tokens
                ffn = [F.instance_norm(f[:, 1:].float().transpose(1, 2)).transpose(1, 2) for f in ffn]
                target = torch.stack(ffn).mean(dim=0)
            else:
                target = regression_target(ffn)[:, 1:]
        return feature_loss(pred, target, self.beta, weight=mask), pred, target, mask

    def settings(self) -> dict:
        return dict(mask_ratio=self.mask_ratio, K=self.K, beta=self.beta, target_norm=self.target_norm)

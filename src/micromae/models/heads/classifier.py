"""Cell-type classifier on a ViT encoder (the MAE / DAMA fine-tuning recipe).

``imgs (N, C, H, W)`` -> encoder blocks on all patches -> global average pool of the patch tokens (the CLS
token is run through the blocks but left out of the pool) -> a new LayerNorm (``fc_norm``) -> a linear head
whose weights start tiny (std 2e-5, so the first logits are ~0 and fine-tuning starts from the pre-trained
features, not from a random projection of them).

As in MAE's global-pool fine-tuning, the pool takes the tokens of the last block *before* the encoder's own
final LayerNorm, which ``fc_norm`` replaces; ``encoder.norm`` stays in the state dict (so encoder weights load
and export unchanged) but is frozen and unused.

:meth:`ViTClassifier.from_checkpoint` takes its encoder from anything micromae writes
(:func:`micromae.models.pretrained.load_encoder`). When the fine-tuning input side differs from the
pre-training one, the stored position embedding (the fixed sin-cos table times ``pos_embed_weight``) is
resampled to the new token grid (``pos_embed="interpolate"``: bicubic, the CLS row kept).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from micromae.errors import input_error
from micromae.models.pretrained import load_encoder
from micromae.models.vit import ViTEncoder

__all__ = ["ViTClassifier"]


class ViTClassifier(nn.Module):
    """ViT encoder + global average pool + LayerNorm + linear head: ``(N, C, H, W)`` -> logits ``(N, K)``.

    State-dict keys: ``encoder.*`` (as in a :class:`~micromae.models.MaskedAutoencoder`), ``fc_norm.*``,
    ``head.*``. ``head_init_std``: std of the head's truncated-normal init (2e-5, MAE / DAMA).
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int, head_init_std: float = 2e-5) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise input_error("num_classes", "an integer >= 2", repr(num_classes),
                              "A classifier needs at least two classes (two class folders)")
        self.encoder = encoder
        self.encoder.norm.requires_grad_(False)  # unused: fc_norm follows the pool instead (module docstring)
        self.num_classes = num_classes
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.encoder.img_size

    @property
    def in_chans(self) -> int:
        return self.encoder.in_chans

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features: ``(N, C, H, W)`` -> ``(N, D)``."""
        enc = self.encoder
        x = enc.embed_patches(imgs)  # (N, L, D), checks the shape
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, x], dim=1))  # (N, 1 + L, D), before the encoder's final norm
        return self.fc_norm(x[:, 1:].mean(dim=1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> class logits ``(N, num_classes)``."""
        return self.head(self.forward_features(imgs))

    @classmethod
    def from_checkpoint(cls, path: str | Path, num_classes: int, branch: int = 1, img_size: int | None = None,
                        drop_path_rate: float = 0.0, head_init_std: float = 2e-5) -> ViTClassifier:
        """A new classifier on the encoder of ``path`` (position embedding interpolated to ``img_size``,
        see :func:`~micromae.models.pretrained.load_encoder`); the head is new."""
        encoder, meta = load_encoder(path, branch=branch, img_size=img_size, pos_embed="interpolate",
                                     drop_path_rate=drop_path_rate)
        model = cls(encoder, num_classes, head_init_std=head_init_std)
        model.init_info = meta.provenance
        return model

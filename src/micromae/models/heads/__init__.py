"""Segmentation heads on the ViT encoder: MAESTER's supervised baselines (supplement A.2, Tables S2-S4).

- :class:`SegmenterHead`: Segmenter's Mask Transformer (class embeddings, cosine masks, mask norm);
- :class:`ViTDecoderHead`: the "vanilla ViT" decoder predicting the ``p x p`` pixel classes of each token;
- :class:`SupervisedSegmenter`: an encoder plus one of the heads, ``imgs -> logits``.
"""

from __future__ import annotations

import torch
from torch import nn

from micromae.errors import input_error
from micromae.models.heads.segmenter import SegmenterHead
from micromae.models.heads.vit_decoder import ViTDecoderHead
from micromae.models.vit import ViTEncoder

__all__ = ["HEADS", "SegmenterHead", "SupervisedSegmenter", "ViTDecoderHead", "build_head"]

HEADS = {"segmenter": SegmenterHead, "vit_decoder": ViTDecoderHead}


def build_head(name: str, encoder: ViTEncoder, num_classes: int, **kwargs) -> nn.Module:
    """Head ``name`` (``segmenter`` or ``vit_decoder``) sized for ``encoder``; kwargs go to the head."""
    if name not in HEADS:
        raise input_error("head", "one of " + ", ".join(HEADS), repr(name),
                          "Use head=segmenter (Mask Transformer) or head=vit_decoder (vanilla ViT)")
    return HEADS[name](num_classes, encoder.embed_dim, encoder.grid_size, encoder.patch_size, **kwargs)


class SupervisedSegmenter(nn.Module):
    """ViT encoder + segmentation head: ``imgs`` ``(N, C, H, W)`` -> logits ``(N, n_cls, H, W)``.

    The encoder runs on all patches (no masking); its CLS token is dropped and the ``(N, L, D)`` patch
    tokens after the final LayerNorm go to the head. State-dict keys are ``encoder.*`` (the same as in a
    :class:`~micromae.models.MaskedAutoencoder`, so MAESTER encoders load directly) and ``head.*``.
    """

    def __init__(self, encoder: ViTEncoder, head: nn.Module) -> None:
        super().__init__()
        same = (getattr(head, "embed_dim", None), tuple(getattr(head, "grid_size", ())),
                getattr(head, "patch_size", None)) == (encoder.embed_dim, encoder.grid_size, encoder.patch_size)
        if not same:
            raise input_error("segmentation head", f"a head for width {encoder.embed_dim}, grid "
                              f"{encoder.grid_size} and patch {encoder.patch_size}",
                              f"{type(head).__name__} for width {getattr(head, 'embed_dim', '?')}, grid "
                              f"{getattr(head, 'grid_size', '?')}, patch {getattr(head, 'patch_size', '?')}",
                              "Build the head with build_head(name, encoder, num_classes)")
        self.encoder = encoder
        self.head = head
        self.num_classes: int = head.num_classes
        self.img_size: tuple[int, int] = encoder.img_size
        self.in_chans: int = encoder.in_chans

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` images at the encoder's ``img_size`` -> ``(N, n_cls, H, W)`` class logits."""
        tokens = self.encoder(imgs)[:, 1:]  # (N, L, D), CLS dropped
        return self.head(tokens)

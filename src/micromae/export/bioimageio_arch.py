"""The architectures of micromae's bioimage.io model packages (copied into each package as its
``pytorch_state_dict`` architecture source; bioimage.io tools build the callable with the package's kwargs
and load the weights into it). They need micromae installed (the package's ``environment.yaml`` says so).

- :class:`MaesterSegmenter`: one-channel image ``(B, 1, Y, X)`` → cluster labels ``(B, 1, Y, X)`` and the
  exact pixel embeddings ``(B, D, Y, X)``: the encoder's cover-and-stride embedding of every pixel
  (:func:`micromae.segment.cover_stride.embed_pixels_batch`, as ``micromae segment`` computes them, intensity
  scaled by the recorded range) and the nearest of the k-means centres (a buffer, in the state dict).
- :class:`CellClassifier`: crops ``(B, C, H, W)`` in [0, 1] → class probabilities ``(B, K)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from micromae.models.heads.classifier import ViTClassifier
from micromae.models.vit import ViTEncoder
from micromae.segment.cover_stride import embed_pixels_batch


class MaesterSegmenter(nn.Module):
    """MAESTER's segmenter: exact pixel embeddings, then the nearest k-means centre.

    encoder: the encoder's fields (:data:`micromae.models.vit.ENCODER_FIELDS`); k: number of centres;
    intensity_range: ``(lo, hi)`` mapped to [0, 1] as in pre-training; central_tokens / mode / pad_mode: the
    embedding settings (:class:`micromae.segment.volume.SegmentSettings`).
    """

    def __init__(self, encoder: dict[str, Any], k: int, intensity_range: Sequence[float],
                 central_tokens: int | None = None, mode: str = "exact", pad_mode: str = "reflect",
                 batch_size: int = 256) -> None:
        super().__init__()
        self.encoder = ViTEncoder.from_config(encoder)
        self.register_buffer("centres", torch.zeros(int(k), int(encoder["embed_dim"])))
        self.intensity_range = (float(intensity_range[0]), float(intensity_range[1]))
        self.central_tokens, self.mode, self.pad_mode, self.batch_size = central_tokens, mode, pad_mode, batch_size

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, Y, X)`` raw intensities → ``(labels (B, 1, Y, X) int64, embeddings (B, D, Y, X))``."""
        feats = embed_pixels_batch(self.encoder, raw, self.central_tokens, self.pad_mode, self.batch_size,
                                   mode=self.mode, amp=False, intensity_range=self.intensity_range)
        b, d, h, w = feats.shape
        flat = feats.permute(0, 2, 3, 1).reshape(-1, d).float()
        c = self.centres.to(flat)
        dist = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ c.T + c.pow(2).sum(1)[None]
        labels = dist.argmin(1).reshape(b, 1, h, w)
        return labels, feats


class CellClassifier(nn.Module):
    """A fine-tuned cell classifier (:class:`micromae.models.heads.classifier.ViTClassifier`) with a softmax:
    crops ``(B, C, H, W)`` scaled to [0, 1] → class probabilities ``(B, K)``."""

    def __init__(self, encoder: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        self.classifier = ViTClassifier(ViTEncoder.from_config(encoder), int(num_classes))

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.classifier(crops).softmax(dim=1)

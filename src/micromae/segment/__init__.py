"""Pixel embeddings, clustering and label mapping for MAESTER segmentation."""

from __future__ import annotations

from micromae.segment.cover_stride import (block_size, context_margin, count_windows, embed_pixels,
                                           embed_pixels_batch, embed_pixels_naive, embed_pixels_region,
                                           encoder_geometry, pad_index)

__all__ = ["block_size", "context_margin", "count_windows", "embed_pixels", "embed_pixels_batch",
           "embed_pixels_naive", "embed_pixels_region", "encoder_geometry", "pad_index"]

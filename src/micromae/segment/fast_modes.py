"""The "fast" pixel-embedding mode: half-overlapping windows at token resolution, bilinear to pixels.

Geometry (one axis). Windows of ``F = g * p`` pixels step by ``c * p`` with ``c = g / 2`` central tokens
(``o = g / 4``), i.e. they overlap by half and their central tokens tile the image: one pass per
``(c * p)**2`` pixels instead of ``p**2`` of them (about ``p**2 = 25x`` fewer windows than exact mode for
the paper's model, more counting border blocks). Token ``k`` of the resulting token grid has the footprint
``(k - 1) * p .. k * p - 1`` of the region, i.e. it is the exact embedding (same convention as
:mod:`micromae.segment.cover_stride`) of pixel ``(k - 1) * p + h``, ``h = (p - 1) // 2`` for odd ``p`` (the
footprint centre) and ``p / 2`` for even ``p``. Token 0 lies one token before the region and the grid
reaches at least one token past it, so every pixel lies between two token centres (border tokens come from
the padded image).

Pixel ``y`` then gets the linear interpolation, along each axis, of the two tokens whose centres enclose it:
``u = (y + p - h) / p``, ``k0 = floor(u)``, weight ``u - k0`` on token ``k0 + 1``. At pixels
``y = (k - 1) * p + h`` the weight is zero and the fast mode returns the token itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from micromae.segment.cover_stride import AxisPlan, PixelGeometry, encode_lattice

__all__ = ["embed_tokens_fast", "interpolation_matrix", "upsample_tokens"]


def embed_tokens_fast(encoder: nn.Module, padded: torch.Tensor, geom: PixelGeometry, plans: tuple[AxisPlan, AxisPlan],
                      out_dtype: torch.dtype, out_device: torch.device, batch_size: int = 256, amp: bool = True,
                      progress: bool = False) -> torch.Tensor:
    """Token grid of a padded region: ``padded`` ``(S, C, Hp, Wp)`` (from ``plan_axis`` in fast mode) ->
    ``(S, D, Ky, Kx)``, token ``(ky, kx)`` centred on region pixel ``((ky - 1)*p + h, (kx - 1)*p + h)``."""
    tokens = torch.empty(padded.shape[0], geom.embed_dim, plans[0].lattice, plans[1].lattice, dtype=out_dtype,
                         device=out_device)
    encode_lattice(encoder, padded, geom, plans, tokens, batch_size, amp, progress)
    return tokens


def interpolation_matrix(n: int, n_tokens: int, geom: PixelGeometry, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(n, n_tokens)`` linear-interpolation weights from tokens (token ``k`` at pixel ``(k - 1)*p + h``) to
    ``n`` pixels: row ``y`` holds ``1 - w`` at ``k0`` and ``w`` at ``k0 + 1`` (``u = (y + p - h) / p``)."""
    p = geom.patch
    u = torch.arange(n, device=device) + (p - geom.half)
    k0 = torch.div(u, p, rounding_mode="floor")
    weight = (u - k0 * p).to(dtype) / p
    matrix = torch.zeros(n, n_tokens, dtype=dtype, device=device)
    rows = torch.arange(n, device=device)
    matrix[rows, k0] = 1 - weight
    matrix[rows, k0 + 1] += weight
    return matrix


def upsample_tokens(tokens: torch.Tensor, geom: PixelGeometry, height: int, width: int) -> torch.Tensor:
    """Bilinear upsampling of a fast-mode token grid ``(S, D, Ky, Kx)`` to pixels ``(S, D, height, width)``:
    ``My @ tokens @ Mx^T`` with the separable :func:`interpolation_matrix` of each axis (peak memory: the
    output plus ``(S, D, height, Kx)``)."""
    my = interpolation_matrix(height, tokens.shape[2], geom, tokens.device, tokens.dtype)
    mx = interpolation_matrix(width, tokens.shape[3], geom, tokens.device, tokens.dtype)
    return torch.matmul(torch.matmul(my, tokens), mx.T)

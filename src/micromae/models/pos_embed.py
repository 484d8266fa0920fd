"""Fixed 2-D sine-cosine position embeddings (MAE recipe) and their resampling to another token grid.

Token ``k`` of a ``gh x gw`` grid sits at row ``i = k // gw`` and column ``j = k % gw`` (row-major, the order
of ``PatchEmbed``'s flattening and of :meth:`MaskedAutoencoder.patchify`). Its ``D``-dim embedding is::

    [ sin(j * w_0) .. sin(j * w_{D/4-1}) | cos(j * w_0) .. cos(j * w_{D/4-1}) |   first half:  column j
      sin(i * w_0) .. sin(i * w_{D/4-1}) | cos(i * w_0) .. cos(i * w_{D/4-1}) ]   second half: row i

    with w_k = 1 / 10000 ** (2k / (D/2)),  k = 0 .. D/4 - 1.

The column-first order is the one MAE's reference implementation actually produces (its
``np.meshgrid(grid_w, grid_h)`` puts the column coordinate in the first half despite the variable names), so
position embeddings stay interchangeable with MAE-style checkpoints. A CLS token gets a zero row in front.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from micromae.errors import input_error

__all__ = ["get_1d_sincos_pos_embed", "get_2d_sincos_pos_embed", "interpolate_pos_embed"]


def _grid_hw(grid_size: int | tuple[int, int]) -> tuple[int, int]:
    """Return ``(gh, gw)`` from an int (square grid) or a pair, rejecting non-positive sizes."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if int(gh) < 1 or int(gw) < 1:
        raise input_error("position-embedding grid_size", "positive token counts", f"{grid_size!r}",
                          "Use img_size // patch_size along each side")
    return int(gh), int(gw)


def get_1d_sincos_pos_embed(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sine-cosine embedding of 1-D positions.

    Args:
        embed_dim: output width ``E`` (even).
        positions: ``(M,)`` positions (any float/int tensor).
    Returns:
        ``(M, E)`` float64: ``E/2`` sines then ``E/2`` cosines of ``pos * w_k``, ``w_k = 10000 ** (-2k / E)``.
    """
    if embed_dim % 2:
        raise input_error("1-D sin-cos embed_dim", "an even number", str(embed_dim), "Use an even width")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000.0**omega  # (E/2,)
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, E/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int],
                            cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of a token grid (see module docstring for the layout).

    Args:
        embed_dim: token width ``D``, divisible by 4.
        grid_size: ``g`` for a square ``g x g`` grid, or ``(gh, gw)``.
        cls_token: prepend a zero row for the CLS token.
    Returns:
        float32 tensor ``(1 + gh*gw, D)`` with ``cls_token`` (zero first row), else ``(gh*gw, D)``.
    """
    if embed_dim % 4:
        raise input_error("2-D sin-cos embed_dim", "a multiple of 4 (sin and cos of rows and columns)",
                          str(embed_dim), "Choose an embedding width divisible by 4, e.g. 192")
    gh, gw = _grid_hw(grid_size)
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)  # (gh*gw,) row i of token k
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)  # (gh*gw,) column j of token k
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols),
                     get_1d_sincos_pos_embed(embed_dim // 2, rows)], dim=1)  # (gh*gw, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.to(torch.float32)


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int],
                          old_grid: int | tuple[int, int] | None = None,
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample a position embedding to another token grid (bicubic), keeping the prefix (CLS) rows as they are.

    Used to fine-tune at an image size other than the pre-training one.

    Args:
        pos_embed: ``(1, P + gh*gw, D)`` or ``(P + gh*gw, D)`` with ``P = num_prefix_tokens``.
        new_grid: target grid ``g'`` or ``(gh', gw')``.
        old_grid: source grid; by default the square root of the token count (square grids only).
        num_prefix_tokens: leading rows not on the grid (1 for CLS).
    Returns:
        Same rank as the input, ``(1, P + gh'*gw', D)`` or ``(P + gh'*gw', D)``, same dtype and device.
    """
    squeeze = pos_embed.dim() == 2
    pe = pos_embed[None] if squeeze else pos_embed
    if pe.dim() != 3 or pe.shape[0] != 1:
        raise input_error("pos_embed", "shape (1, P + g*g, D) or (P + g*g, D)", str(tuple(pos_embed.shape)),
                          "Pass the position-embedding tensor of one model")
    n_grid = pe.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = round(n_grid**0.5)
        old_grid = side
    gh, gw = _grid_hw(old_grid)
    if gh * gw != n_grid:
        raise input_error("pos_embed", f"{gh}x{gw} = {gh * gw} grid tokens after {num_prefix_tokens} prefix rows",
                          f"{n_grid} grid tokens", "Pass old_grid=(rows, cols) for non-square grids")
    nh, nw = _grid_hw(new_grid)
    prefix, grid = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:]
    if (nh, nw) != (gh, gw):
        dim = grid.shape[-1]
        grid = grid.reshape(1, gh, gw, dim).permute(0, 3, 1, 2).to(torch.float32)  # (1, D, gh, gw)
        grid = F.interpolate(grid, size=(nh, nw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(pe.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out[0] if squeeze else out

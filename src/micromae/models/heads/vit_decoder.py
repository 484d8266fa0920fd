"""The "vanilla ViT" decoder head, MAESTER's second supervised baseline (supplement Table S4).

The encoder is MAESTER's ViT at position-embedding weight 1.0; the decoder mirrors the MAE decoder but
predicts classes instead of pixels:

    patch tokens (N, L, D) -> Linear D -> d -> + pos_embed_weight x fixed 2-D sin-cos (weight 1.0)
    -> blocks (7, 8 heads, MLP 2) -> LayerNorm -> Linear d -> p*p*n_cls  (N, L, p*p*n_cls)
    -> un-patchify -> (N, n_cls, gh*p, gw*p)

Each token predicts the class logits of the ``p x p`` pixels it covers. The vector of token ``k = i*gw + j``
is ordered (row ``r``, column ``c``, class) as MAE's ``patchify`` orders (row, column, channel), so its entry
``(r*p + c)*n_cls + cls`` lands at pixel ``(i*p + r, j*p + c)`` of class map ``cls``. MAE init (xavier-uniform
Linear weights, zero biases).
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block
from torch import nn

from micromae.models.heads.segmenter import check_head_args, check_tokens
from micromae.models.masking import unpatchify
from micromae.models.pos_embed import get_2d_sincos_pos_embed
from micromae.models.vit import init_mae_weights

__all__ = ["ViTDecoderHead"]


class ViTDecoderHead(nn.Module):
    """ViT decoder: patch tokens ``(N, L, D)`` -> class logits ``(N, n_cls, gh*p, gw*p)``.

    Args:
        num_classes: ``n_cls``.
        embed_dim: encoder width ``D``.
        grid_size: token grid ``(gh, gw)``; ``L = gh * gw``.
        patch_size: token side ``p``.
        decoder_embed_dim, depth, num_heads, mlp_ratio: the decoder (128, 7, 8, 2.0 in the paper).
        pos_embed_weight: weight of the decoder's fixed sin-cos table (1.0 in the paper).
    """

    def __init__(self, num_classes: int, embed_dim: int, grid_size: tuple[int, int], patch_size: int,
                 decoder_embed_dim: int = 128, depth: int = 7, num_heads: int = 8, mlp_ratio: float = 2.0,
                 pos_embed_weight: float = 1.0) -> None:
        super().__init__()
        grid_size = (int(grid_size[0]), int(grid_size[1]))
        check_head_args(num_classes, embed_dim, decoder_embed_dim, depth, num_heads, grid_size, patch_size)
        self.num_classes, self.embed_dim, self.patch_size = num_classes, embed_dim, patch_size
        self.grid_size = grid_size
        self.num_patches = grid_size[0] * grid_size[1]
        d = decoder_embed_dim
        self.decoder_embed = nn.Linear(embed_dim, d)
        sincos = get_2d_sincos_pos_embed(d, grid_size, cls_token=False)  # (L, d)
        self.register_buffer("pos_embed", (float(pos_embed_weight) * sincos)[None], persistent=False)
        self.blocks = nn.Sequential(*[Block(d, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                      for _ in range(depth)])
        self.decoder_norm = LayerNorm(d)
        self.decoder_pred = nn.Linear(d, patch_size * patch_size * num_classes)
        self.apply(init_mae_weights)

    def forward_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token pixel logits: ``(N, L, D)`` -> ``(N, L, p*p*n_cls)`` ordered (row, column, class)."""
        check_tokens(tokens, self.num_patches, self.embed_dim)
        x = self.decoder_embed(tokens) + self.pos_embed
        return self.decoder_pred(self.decoder_norm(self.blocks(x)))

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, L, p*p*n_cls)`` -> ``(N, n_cls, gh*p, gw*p)`` (see the module docstring for the order)."""
        return unpatchify(x, self.patch_size, self.grid_size, self.num_classes, what="per-patch logits")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, L, D)`` patch tokens -> ``(N, n_cls, gh*p, gw*p)`` logits."""
        return self.unpatchify(self.forward_patches(tokens))

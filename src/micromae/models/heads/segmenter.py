"""Segmenter's Mask Transformer head (Strudel et al., ICCV 2021), MAESTER's first supervised baseline.

MAESTER supplement Table S3: the encoder is MAESTER's ViT (192 wide, 14 blocks, 1 head, MLP 2) with its
sin-cos position embedding at weight 1.0; the Mask Transformer decoder is 128 wide, 7 blocks, 8 heads,
MLP 2. The head, for ``n_cls`` classes and a ``gh x gw`` token grid:

1. patch tokens ``(N, L, D)`` -> Linear ``D -> d`` (+ ``pos_embed_weight`` x fixed 2-D sin-cos, see below);
2. ``n_cls`` learnable class embeddings ``(n_cls, d)`` are appended: ``(N, L + n_cls, d)``;
3. the joint sequence goes through the transformer blocks and a LayerNorm;
4. patch and class tokens are projected linearly (no bias) and L2-normalised; the masks are their scalar
   products ``(N, L, n_cls)``, i.e. cosine similarities in ``[-1, 1]``;
5. a LayerNorm over the class axis (Segmenter's ``mask_norm``) turns them into logits, reshaped to
   ``(N, n_cls, gh, gw)`` and bilinearly upsampled to the image ``(N, n_cls, gh*p, gw*p)``.

Position embedding in the decoder: Strudel et al.'s Mask Transformer adds none (the tokens carry the
encoder's); Table S3 lists a decoder weight of 1.0, so the head adds ``pos_embed_weight`` x sin-cos to the
projected *patch* tokens (class embeddings have no position). ``pos_embed_weight=0`` gives Segmenter as
published. Weights: truncated normal (std 0.02) for Linear layers and class embeddings, as in Segmenter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from micromae.errors import input_error
from micromae.models.pos_embed import get_2d_sincos_pos_embed
from micromae.models.vit import check_positive

__all__ = ["SegmenterHead", "check_head_args", "check_tokens"]


def check_head_args(num_classes: int, embed_dim: int, decoder_embed_dim: int, depth: int, num_heads: int,
                    grid_size: tuple[int, int], patch_size: int) -> None:
    """Validate the sizes shared by both heads (MicromaeInputError on bad values)."""
    for name, value in [("num_classes", num_classes), ("embed_dim", embed_dim), ("depth", depth),
                        ("decoder_embed_dim", decoder_embed_dim), ("decoder_num_heads", num_heads),
                        ("patch_size", patch_size), ("grid rows", grid_size[0]), ("grid cols", grid_size[1])]:
        check_positive(name, value)
    if decoder_embed_dim % 4 or decoder_embed_dim % num_heads:
        raise input_error("decoder_embed_dim", f"a multiple of 4 and of decoder_num_heads={num_heads}",
                          str(decoder_embed_dim), "Choose e.g. 128 with 8 heads")


def check_tokens(tokens: torch.Tensor, num_patches: int, embed_dim: int) -> None:
    """Raise MicromaeInputError unless ``tokens`` is ``(N, L, D)`` patch tokens (CLS removed)."""
    if tokens.dim() != 3 or tokens.shape[1:] != (num_patches, embed_dim):
        raise input_error("patch tokens", f"shape (N, {num_patches}, {embed_dim}) without the CLS token",
                          str(tuple(tokens.shape)), "Pass encoder.forward_features(imgs)[:, 1:]")


def _init_segmenter_weights(module: nn.Module) -> None:
    """Segmenter init: truncated-normal (std 0.02) Linear weights, zero biases, LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SegmenterHead(nn.Module):
    """Mask Transformer: patch tokens ``(N, L, D)`` -> class logits ``(N, n_cls, gh*p, gw*p)``.

    Args:
        num_classes: ``n_cls``.
        embed_dim: encoder width ``D``.
        grid_size: token grid ``(gh, gw)``; ``L = gh * gw``.
        patch_size: token side ``p`` in pixels (output is upsampled to ``gh*p x gw*p``).
        decoder_embed_dim: decoder width ``d`` (128 in the paper).
        depth, num_heads, mlp_ratio: the decoder's timm blocks (7, 8, 2.0 in the paper).
        pos_embed_weight: weight of the fixed sin-cos added to the projected patch tokens (module docstring).
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
        self.proj_dec = nn.Linear(embed_dim, d)
        sincos = get_2d_sincos_pos_embed(d, grid_size, cls_token=False)  # (L, d)
        self.register_buffer("pos_embed", (float(pos_embed_weight) * sincos)[None], persistent=False)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, d))
        self.blocks = nn.Sequential(*[Block(d, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                                      for _ in range(depth)])
        self.decoder_norm = LayerNorm(d)
        self.proj_patch = nn.Linear(d, d, bias=False)
        self.proj_classes = nn.Linear(d, d, bias=False)
        self.mask_norm = LayerNorm(num_classes)
        self.apply(_init_segmenter_weights)
        trunc_normal_(self.cls_emb, std=0.02)

    def forward_masks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of patch and class embeddings: ``(N, L, D)`` -> ``(N, L, n_cls)`` in [-1, 1]."""
        check_tokens(tokens, self.num_patches, self.embed_dim)
        x = self.proj_dec(tokens) + self.pos_embed
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)  # (N, L + n_cls, d)
        x = self.decoder_norm(self.blocks(x))
        patches = F.normalize(self.proj_patch(x[:, :self.num_patches]), dim=-1)  # (N, L, d)
        classes = F.normalize(self.proj_classes(x[:, self.num_patches:]), dim=-1)  # (N, n_cls, d)
        return patches @ classes.transpose(1, 2)

    def forward_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mask-normalised logits at token resolution: ``(N, L, D)`` -> ``(N, n_cls, gh, gw)``."""
        masks = self.mask_norm(self.forward_masks(tokens))  # (N, L, n_cls)
        gh, gw = self.grid_size
        return masks.transpose(1, 2).reshape(masks.shape[0], self.num_classes, gh, gw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, L, D)`` patch tokens -> ``(N, n_cls, gh*p, gw*p)`` logits (bilinear, align_corners=False)."""
        grid = self.forward_grid(tokens)
        size = (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)

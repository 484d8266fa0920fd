"""ViT encoder with a fixed, weighted 2-D sin-cos position embedding (MAESTER's "weighted positional embedding").

Built from timm pieces (``PatchEmbed``, ``Block`` with fused ``scaled_dot_product_attention``, ``LayerNorm``
eps 1e-6) and named exactly like ``timm.models.vision_transformer.VisionTransformer``::

    patch_embed.proj.weight/bias, cls_token, pos_embed, blocks.{i}.*, norm.weight/bias

so ``VisionTransformer(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias=True,
num_classes=0, global_pool='')`` loads :meth:`ViTEncoder.to_timm_state_dict` with ``strict=True`` and its
``forward_features`` gives the same tokens.

``pos_embed`` is a **persistent buffer holding** ``pos_embed_weight * sincos`` (fixed, never trained). Storing
the product rather than the bare sin-cos table is what makes a timm model, which simply adds ``pos_embed``,
compute the same function. The CLS row of the table is zero.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn
from timm.layers import LayerNorm, PatchEmbed, to_2tuple
from timm.models.vision_transformer import Block

from micromae.architectures import ENCODER_FIELDS, MAESTER, TINY_TEST_ENCODER
from micromae.errors import input_error
from micromae.models.masking import gather_tokens
from micromae.models.pos_embed import get_2d_sincos_pos_embed
from micromae.models.registry import register_model

__all__ = ["ENCODER_FIELDS", "ViTEncoder", "vit_maester", "vit_tiny_test", "init_mae_weights", "check_positive"]



def check_positive(name: str, value: int) -> None:
    """Raise MicromaeInputError unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise input_error(name, "a positive integer", repr(value), f"Set {name} to a whole number >= 1")


def init_mae_weights(module: nn.Module) -> None:
    """MAE init for one module (use with ``model.apply``): xavier-uniform Linear weights, zero biases,
    LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """ViT encoder: patch embed -> + weighted sin-cos pos-embed -> [keep visible] -> CLS -> blocks -> norm.

    Args:
        img_size: input side (int) or ``(H, W)``; each divisible by ``patch_size``.
        patch_size: token side ``p`` in pixels (odd or even).
        in_chans: image channels ``C``.
        embed_dim: token width ``D`` (divisible by 4 and by ``num_heads``).
        depth, num_heads, mlp_ratio, qkv_bias: transformer blocks (timm ``Block``).
        pos_embed_weight: factor on the fixed sin-cos table (MAESTER: 0.08; MAE: 1.0).
        drop_path_rate: stochastic depth, linearly increasing over blocks from 0.
    """

    def __init__(self, img_size: int | tuple[int, int] = MAESTER["img_size"], patch_size: int = MAESTER["patch_size"],
                 in_chans: int = MAESTER["in_chans"], embed_dim: int = MAESTER["embed_dim"],
                 depth: int = MAESTER["depth"], num_heads: int = MAESTER["num_heads"],
                 mlp_ratio: float = MAESTER["mlp_ratio"], qkv_bias: bool = MAESTER["qkv_bias"],
                 pos_embed_weight: float = MAESTER["pos_embed_weight"], drop_path_rate: float = 0.0) -> None:
        super().__init__()
        img_hw = to_2tuple(img_size)
        for name, value in [("patch_size", patch_size), ("in_chans", in_chans), ("embed_dim", embed_dim),
                            ("depth", depth), ("num_heads", num_heads), ("img_size", img_hw[0]),
                            ("img_size", img_hw[1])]:
            check_positive(name, value)
        if img_hw[0] % patch_size or img_hw[1] % patch_size:
            raise input_error("img_size", f"a multiple of patch_size={patch_size}", f"{img_size}",
                              f"Use e.g. img_size={max(1, img_hw[0] // patch_size) * patch_size}")
        if embed_dim % 4 or embed_dim % num_heads:
            raise input_error("embed_dim", f"a multiple of 4 and of num_heads={num_heads}", str(embed_dim),
                              "Choose e.g. 192 with 1, 2, 3, 4 or 6 heads")
        self.img_size = img_hw
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.pos_embed_weight = float(pos_embed_weight)
        self.patch_embed = PatchEmbed(img_hw, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        sincos = get_2d_sincos_pos_embed(embed_dim, self.grid_size, cls_token=True)  # (1 + L, D)
        self.register_buffer("pos_embed", (self.pos_embed_weight * sincos)[None], persistent=True)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=LayerNorm)
            for i in range(depth)])
        self.norm = LayerNorm(embed_dim)
        self.timm_kwargs = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                num_classes=0, global_pool="")
        self.initialize_weights()

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> ViTEncoder:
        """An encoder from a config (a dataclass such as ``ModelConfig``, or a dict) holding
        :data:`ENCODER_FIELDS` and optionally ``drop_path_rate``; ``overrides`` win over the config."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        kw = {k: get(k) for k in ENCODER_FIELDS}
        if get("drop_path_rate") is not None:
            kw["drop_path_rate"] = get("drop_path_rate")
        return cls(**{**kw, **overrides})

    def initialize_weights(self) -> None:
        """MAE init: xavier on the flattened patch-embed weight, CLS ~ N(0, 0.02), then Linear / LayerNorm."""
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        self.apply(init_mae_weights)

    def check_imgs(self, imgs: torch.Tensor) -> None:
        """Raise MicromaeInputError unless ``imgs`` is ``(N, in_chans, H, W)`` with ``(H, W) == img_size``."""
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans or tuple(imgs.shape[2:]) != self.img_size:
            raise input_error("images", f"shape (N, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]})",
                              str(tuple(imgs.shape)),
                              "Crop or resize to the model's img_size, or build the model for this size "
                              "(interpolate_pos_embed for fine-tuning)")

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens with the weighted position embedding: ``imgs`` ``(N, C, H, W)`` -> ``(N, L, D)``."""
        self.check_imgs(imgs)
        return self.patch_embed(imgs) + self.pos_embed[:, 1:]

    def forward_tokens(self, x: torch.Tensor, return_block_ffn: int = 0
                       ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Prepend CLS (+ its position row), run the blocks and the final norm.

        Args:
            x: ``(N, L', D)`` embedded patch tokens (all or only the visible ones).
            return_block_ffn: K > 0 also returns, for the last K blocks, the feed-forward (MLP) sub-layer
                output before its residual add, each ``(N, 1 + L', D)`` (data2vec / DAMA targets).
        Returns:
            ``(N, 1 + L', D)`` tokens after the final norm; with K > 0 a pair ``(tokens, [K tensors])``.
        """
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        if not return_block_ffn:
            return self.norm(self.blocks(x))
        with self._record_block_ffn(return_block_ffn) as ffn:
            x = self.norm(self.blocks(x))
        return x, ffn

    @contextmanager
    def _record_block_ffn(self, k: int) -> Iterator[list[torch.Tensor]]:
        """Temporarily hook the MLP of the last ``k`` blocks; yields the list their outputs are appended to."""
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.depth:
            raise input_error("return_block_ffn", f"an int in 1..depth={self.depth}", repr(k),
                              "Ask for at most as many blocks as the encoder has")
        outputs: list[torch.Tensor] = []
        handles = [blk.mlp.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                   for blk in self.blocks[self.depth - k:]]
        try:
            yield outputs
        finally:
            for h in handles:
                h.remove()

    def forward_features(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None, return_block_ffn: int = 0
                         ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode images, optionally only some patches.

        Args:
            x: ``(N, C, H, W)`` images.
            ids_keep: ``(N, L')`` int64 indices of the visible patches (row-major), or None for all ``L``.
            return_block_ffn: see :meth:`forward_tokens`.
        Returns:
            ``(N, 1 + L', D)`` tokens after the final norm (CLS first), or ``(tokens, ffn list)``.
        """
        tokens = self.embed_patches(x)  # (N, L, D)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)  # (N, L', D)
        return self.forward_tokens(tokens, return_block_ffn=return_block_ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All patches: ``(N, C, H, W)`` -> ``(N, 1 + L, D)`` (same as timm's ``forward_features``)."""
        return self.forward_tokens(self.embed_patches(x))

    def to_timm_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict for ``timm.models.vision_transformer.VisionTransformer(**self.timm_kwargs)`` (strict).

        The key names already match; ``pos_embed`` (a buffer here, a Parameter in timm) carries the weight.
        """
        return {k: v.detach().clone() for k, v in self.state_dict().items()}


@register_model
def vit_maester(**overrides) -> ViTEncoder:
    """MAESTER encoder (``architectures.MAESTER``: 80x80x1 input, 5x5 tokens, 14 blocks of width 192, 1 head,
    MLP 2, pos-embed weight 0.08; about 4.16 M parameters). These are the class defaults."""
    return ViTEncoder(**overrides)


@register_model
def vit_tiny_test(**overrides) -> ViTEncoder:
    """Tiny encoder for CPU tests (``architectures.TINY_TEST``: 20x20x1 input, 4x4 grid, 2 blocks of 32, 2 heads)."""
    return ViTEncoder(**{**TINY_TEST_ENCODER, **overrides})

"""Masked autoencoder (MAE, He et al. 2022) as configured by MAESTER: the encoder sees visible tokens only, a
light decoder fills in mask tokens and predicts the pixels of every patch, the loss is the MSE on the masked
patches.

Hooks kept for DAMA: ``forward_encoder`` / ``forward`` accept a given ``ids_keep`` (adaptive mask) instead of a
random mask, ``forward_encoder`` can return the last K blocks' feed-forward outputs, and the loss per patch
``(N, L)`` is returned next to its masked mean.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block

from micromae.architectures import MAESTER, TINY_TEST
from micromae.errors import input_error
from micromae.models.masking import gather_tokens, num_kept, random_masking, restore_from_ids_keep, unpatchify
from micromae.models.pos_embed import get_2d_sincos_pos_embed
from micromae.models.registry import register_model
from micromae.models.vit import ViTEncoder, check_positive, init_mae_weights

__all__ = ["MAEOutput", "MaskedAutoencoder", "mae_maester", "mae_tiny_test", "build_mae"]


@dataclass
class MAEOutput:
    """Result of :meth:`MaskedAutoencoder.forward`.

    loss: scalar masked-patch MSE; pred: ``(N, L, p*p*C)``; mask: ``(N, L)`` 0 keep 1 remove;
    loss_per_patch: ``(N, L)`` MSE of every patch (masked or not); ids_restore: ``(N, L)``;
    latent: ``(N, 1 + L_keep, D)`` encoder tokens (CLS first).
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    loss_per_patch: torch.Tensor
    ids_restore: torch.Tensor
    latent: torch.Tensor


class MaskedAutoencoder(nn.Module):
    """MAE with a :class:`ViTEncoder` (``self.encoder``) and a small ViT decoder.

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, pos_embed_weight,
            drop_path_rate: the encoder (see :class:`ViTEncoder`).
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio: the decoder blocks.
        decoder_pos_embed_weight: factor on the decoder's fixed sin-cos table (MAESTER: 1.0).
        mask_ratio: default fraction of patches removed per sample.
        norm_pix_loss: normalise each target patch by its own mean and (unbiased) variance, eps 1e-6.
    """

    def __init__(self, img_size: int | tuple[int, int] = MAESTER["img_size"], patch_size: int = MAESTER["patch_size"],
                 in_chans: int = MAESTER["in_chans"], embed_dim: int = MAESTER["embed_dim"],
                 depth: int = MAESTER["depth"], num_heads: int = MAESTER["num_heads"],
                 mlp_ratio: float = MAESTER["mlp_ratio"], qkv_bias: bool = MAESTER["qkv_bias"],
                 pos_embed_weight: float = MAESTER["pos_embed_weight"], drop_path_rate: float = 0.0,
                 decoder_embed_dim: int = MAESTER["decoder_embed_dim"], decoder_depth: int = MAESTER["decoder_depth"],
                 decoder_num_heads: int = MAESTER["decoder_num_heads"],
                 decoder_mlp_ratio: float = MAESTER["decoder_mlp_ratio"],
                 decoder_pos_embed_weight: float = MAESTER["decoder_pos_embed_weight"],
                 mask_ratio: float = MAESTER["mask_ratio"], norm_pix_loss: bool = MAESTER["norm_pix_loss"]) -> None:
        super().__init__()
        self.encoder = ViTEncoder(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                  qkv_bias, pos_embed_weight, drop_path_rate)
        for name, value in [("decoder_embed_dim", decoder_embed_dim), ("decoder_depth", decoder_depth),
                            ("decoder_num_heads", decoder_num_heads)]:
            check_positive(name, value)
        if decoder_embed_dim % 4 or decoder_embed_dim % decoder_num_heads:
            raise input_error("decoder_embed_dim", f"a multiple of 4 and of decoder_num_heads={decoder_num_heads}",
                              str(decoder_embed_dim), "Choose e.g. 128 with 8 heads")
        if norm_pix_loss and patch_size * patch_size * in_chans < 2:
            raise input_error("norm_pix_loss", "patches of at least 2 values (a variance per patch)",
                              f"{patch_size}x{patch_size}x{in_chans}", "Turn norm_pix_loss off")
        num_kept(self.encoder.num_patches, mask_ratio)  # validates 0 <= mask_ratio < 1 up front
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        sincos = get_2d_sincos_pos_embed(decoder_embed_dim, self.encoder.grid_size, cls_token=True)
        self.register_buffer("decoder_pos_embed", (float(decoder_pos_embed_weight) * sincos)[None])
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_mae_weights)

    @property
    def num_patches(self) -> int:
        """``L``, tokens per image."""
        return self.encoder.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``imgs`` ``(N, C, H, W)`` -> ``(N, L, p*p*C)``, patches row-major, values ordered (row, col, channel)."""
        self.encoder.check_imgs(imgs)
        p, (gh, gw) = self.patch_size, self.encoder.grid_size
        n, c = imgs.shape[:2]
        x = imgs.reshape(n, c, gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, gh * gw, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, L, p*p*C)`` -> ``(N, C, H, W)``; the inverse of :meth:`patchify`."""
        return unpatchify(x, self.patch_size, self.encoder.grid_size, self.in_chans)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(N, L, D)`` -> ``x_visible, mask, ids_restore, ids_keep`` (see :func:`masking.random_masking`)."""
        return random_masking(x, mask_ratio, generator=generator)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                        ids_keep: torch.Tensor | None = None, return_block_ffn: int = 0):
        """Encode the visible patches only.

        Args:
            imgs: ``(N, C, H, W)``.
            mask_ratio: random-mask ratio (default ``self.mask_ratio``); ignored when ``ids_keep`` is given.
            ids_keep: ``(N, L_keep)`` int64 visible patches (a given mask, e.g. DAMA's adaptive one).
            return_block_ffn: K > 0 also returns the last K blocks' MLP outputs (see ``ViTEncoder``).
        Returns:
            ``latent`` ``(N, 1 + L_keep, D)``, ``mask`` ``(N, L)`` (0 keep, 1 remove), ``ids_restore`` ``(N, L)``;
            with K > 0 a fourth item, the list of K tensors ``(N, 1 + L_keep, D)``.
        """
        x = self.encoder.embed_patches(imgs)  # (N, L, D) with weighted pos-embed
        if ids_keep is None:
            ratio = self.mask_ratio if mask_ratio is None else mask_ratio
            x, mask, ids_restore, _ = random_masking(x, ratio)
        else:
            mask, ids_restore = restore_from_ids_keep(ids_keep, x.shape[1])
            x = gather_tokens(x, ids_keep)
        out = self.encoder.forward_tokens(x, return_block_ffn=return_block_ffn)
        if return_block_ffn:
            latent, ffn = out
            return latent, mask, ids_restore, ffn
        return out, mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent`` ``(N, 1 + L_keep, D)``, ``ids_restore`` ``(N, L)`` -> ``pred`` ``(N, L, p*p*C)``."""
        x = self.decoder_embed(latent)  # (N, 1 + L_keep, Dd)
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        x_ = gather_tokens(torch.cat([x[:, 1:], mask_tokens], dim=1), ids_restore)  # (N, L, Dd), patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]  # drop CLS

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """MSE of the masked patches.

        Args:
            imgs: ``(N, C, H, W)``; pred: ``(N, L, p*p*C)``; mask: ``(N, L)``, 1 = masked (counted).
        Returns:
            ``loss`` (scalar, mean over masked patches; 0 if none is masked) and ``loss_per_patch`` ``(N, L)``
            (mean over the ``p*p*C`` values of every patch, masked or not).
        """
        target = self.patchify(imgs).float()  # the loss is computed in float32, also under bf16 autocast
        pred = pred.float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as in MAE
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss_per_patch = ((pred - target) ** 2).mean(dim=-1)  # (N, L)
        loss = (loss_per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        return loss, loss_per_patch

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                ids_keep: torch.Tensor | None = None) -> MAEOutput:
        """Mask, encode, decode and score: ``imgs`` ``(N, C, H, W)`` -> :class:`MAEOutput`."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio=mask_ratio, ids_keep=ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        loss, loss_per_patch = self.forward_loss(imgs, pred, mask)
        return MAEOutput(loss=loss, pred=pred, mask=mask, loss_per_patch=loss_per_patch,
                         ids_restore=ids_restore, latent=latent)


@register_model
def mae_maester(**overrides) -> MaskedAutoencoder:
    """MAESTER's MAE (``architectures.MAESTER``): ``vit_maester`` encoder, decoder 128 wide, 7 blocks,
    8 heads, MLP 2, pixel loss without normalisation, mask ratio 0.5 (about 5.1 M parameters)."""
    return build_mae(**{**MAESTER, **overrides})


@register_model
def mae_tiny_test(**overrides) -> MaskedAutoencoder:
    """Tiny MAE for CPU tests (``architectures.TINY_TEST``): 20x20x1, 5x5 tokens, encoder 32x2 (2 heads),
    decoder 16x1 (2 heads)."""
    return build_mae(**{**TINY_TEST, **overrides})


def build_mae(**kwargs) -> MaskedAutoencoder:
    """``MaskedAutoencoder(**kwargs)``, rejecting unknown keyword names with a MicromaeInputError."""
    known = set(inspect.signature(MaskedAutoencoder.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise input_error("MAE model config", f"keys among {sorted(known)}", f"unknown {unknown}",
                          "Fix the spelling of the model fields in the config")
    return MaskedAutoencoder(**kwargs)

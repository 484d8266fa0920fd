"""The published architectures' numbers, once (plain data: no torch, so ``config`` may read them).

Each entry holds the constructor fields of :class:`micromae.models.MaskedAutoencoder` (the encoder fields
first, then the decoder and masking fields). ``ModelConfig``'s defaults, the ``ViTEncoder`` /
``MaskedAutoencoder`` constructor defaults and the registered factories (``micromae.models.registry``) read
them from here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ARCHITECTURES", "ENCODER_FIELDS", "MAESTER", "MAESTER_DECODER", "MAESTER_ENCODER", "TINY_TEST",
           "TINY_TEST_ENCODER", "encoder_part"]

# MAESTER (CVPR 2023, supplement Tables S1/S3): 80x80x1 input, 5x5 tokens (a 16x16 grid), 14 blocks of width
# 192 with one head and MLP ratio 2, the fixed sin-cos position embedding weighted by 0.08 (about 4.16 M
# encoder parameters); decoder 128 wide, 7 blocks, 8 heads; half the tokens masked, plain pixel loss.
MAESTER_ENCODER: dict[str, Any] = dict(img_size=80, patch_size=5, in_chans=1, embed_dim=192, depth=14, num_heads=1,
                                       mlp_ratio=2.0, qkv_bias=True, pos_embed_weight=0.08)
MAESTER_DECODER: dict[str, Any] = dict(decoder_embed_dim=128, decoder_depth=7, decoder_num_heads=8,
                                       decoder_mlp_ratio=2.0, decoder_pos_embed_weight=1.0, mask_ratio=0.5,
                                       norm_pix_loss=False)
MAESTER: dict[str, Any] = {**MAESTER_ENCODER, **MAESTER_DECODER}

# the constructor arguments that fix an encoder's shape and function (drop_path_rate is a training setting)
ENCODER_FIELDS: tuple[str, ...] = tuple(MAESTER_ENCODER)


def encoder_part(arch: dict[str, Any]) -> dict[str, Any]:
    """The :data:`ENCODER_FIELDS` of an architecture."""
    return {k: arch[k] for k in ENCODER_FIELDS}


# Tiny model for CPU tests: 20x20x1 input, 5x5 tokens (a 4x4 grid), encoder 2 blocks of width 32 with 2 heads,
# decoder 16 wide, 1 block, 2 heads; the rest as MAESTER.
TINY_TEST: dict[str, Any] = {**MAESTER, "img_size": 20, "embed_dim": 32, "depth": 2, "num_heads": 2,
                             "decoder_embed_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
TINY_TEST_ENCODER: dict[str, Any] = encoder_part(TINY_TEST)

ARCHITECTURES: dict[str, dict[str, Any]] = {"maester": MAESTER, "tiny_test": TINY_TEST}

"""Models: the ViT encoder with weighted sin-cos position embedding, masking, and the masked autoencoder."""

from __future__ import annotations

from micromae.models.mae import MAEOutput, MaskedAutoencoder, build_mae, mae_maester, mae_tiny_test
from micromae.models.masking import (
    gather_tokens,
    mask_from_ids_keep,
    num_kept,
    random_masking,
    restore_from_ids_keep,
)
from micromae.models.pos_embed import get_1d_sincos_pos_embed, get_2d_sincos_pos_embed, interpolate_pos_embed
from micromae.models.registry import create_model, list_models, register_model
from micromae.models.vit import ViTEncoder, init_mae_weights, vit_maester, vit_tiny_test

__all__ = [
    "MAEOutput", "MaskedAutoencoder", "build_mae", "mae_maester", "mae_tiny_test",
    "gather_tokens", "mask_from_ids_keep", "num_kept", "random_masking", "restore_from_ids_keep",
    "get_1d_sincos_pos_embed", "get_2d_sincos_pos_embed", "interpolate_pos_embed",
    "ViTEncoder", "init_mae_weights", "vit_maester", "vit_tiny_test",
    "create_model", "list_models", "register_model",
]

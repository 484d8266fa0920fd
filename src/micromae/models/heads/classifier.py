"""Cell-type classifier on a ViT encoder (MAE / DAMA fine-tuning recipe, DAMA.md §2).

``imgs (N, C, H, W)`` -> encoder blocks on all patches -> global average pool of the patch tokens (the CLS
token is run through the blocks but left out of the pool) -> a new LayerNorm (``fc_norm``) -> a linear head
whose weights start tiny (std 2e-5, so the first logits are ~0 and fine-tuning starts from the pre-trained
features, not from a random projection of them).

As in MAE's global-pool fine-tuning, the pool takes the tokens of the last block *before* the encoder's own
final LayerNorm, which ``fc_norm`` replaces; ``encoder.norm`` stays in the state dict (so encoder weights load
and export unchanged) but is frozen and unused.

:func:`load_encoder` rebuilds an encoder from anything micromae writes: a pre-training checkpoint (MAE,
MAESTER, data2vec, either DAMA branch), a fine-tuning checkpoint, or an exported ``.safetensors`` encoder.
When the fine-tuning input side differs from the pre-training one, the stored position embedding (the fixed
sin-cos table times ``pos_embed_weight``) is resampled to the new token grid with
:func:`micromae.models.pos_embed.interpolate_pos_embed` (bicubic; the CLS row is kept).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from micromae.errors import input_error
from micromae.models.pos_embed import interpolate_pos_embed
from micromae.models.vit import ViTEncoder

__all__ = ["ViTClassifier", "load_encoder", "encoder_fields"]

ENCODER_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                "pos_embed_weight")


def encoder_fields(encoder: ViTEncoder) -> dict[str, Any]:
    """The constructor arguments that rebuild ``encoder``'s shape (``img_size`` as its side)."""
    kw = encoder.timm_kwargs
    return {"img_size": int(encoder.img_size[0]), "patch_size": encoder.patch_size, "in_chans": encoder.in_chans,
            "embed_dim": encoder.embed_dim, "depth": encoder.depth, "num_heads": kw["num_heads"],
            "mlp_ratio": float(kw["mlp_ratio"]), "qkv_bias": bool(kw["qkv_bias"]),
            "pos_embed_weight": encoder.pos_embed_weight}


def _read_weights(path: Path, branch: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(encoder fields, encoder state dict, provenance) of a ``.pt`` checkpoint or an exported ``.safetensors``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise input_error(f"encoder '{path}'", f"its description '{meta_path.name}' beside it",
                              "no JSON file", "Export encoders with `micromae export-encoder`, which writes both")
        meta = json.loads(meta_path.read_text())
        fields = {k: meta["timm_kwargs"][k] for k in ENCODER_KEYS if k in meta["timm_kwargs"]}
        fields["pos_embed_weight"] = meta.get("pos_embed_weight") or 1.0
        origin = {"init": str(path), "format": "safetensors", "objective": meta.get("objective"),
                  "branch": meta.get("branch"), "checkpoint_sha256": meta.get("checkpoint_sha256")}
        return fields, load_file(str(path)), origin
    from micromae.models.dama import encoder_state_dict
    from micromae.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    config = state.get("config") or {}
    model = config.get("model") or {}
    missing = [k for k in ENCODER_KEYS if k not in model]
    if missing:
        raise input_error(f"checkpoint '{path}'", "a config with the encoder's shape (model.*)",
                          f"no model.{missing[0]}", "Pass a checkpoint written by micromae pretrain or finetune")
    fields = {k: model[k] for k in ENCODER_KEYS}
    origin = {"init": str(path), "format": "checkpoint", "objective": config.get("objective"),
              "branch": branch, "step": state.get("step")}
    return fields, encoder_state_dict(state["model"], branch), origin


def load_encoder(path: str | Path, branch: int = 1, img_size: int | None = None,
                 drop_path_rate: float = 0.0) -> tuple[ViTEncoder, dict[str, Any]]:
    """A pre-trained ViT encoder, ready to fine-tune.

    Args:
        path: a micromae checkpoint (``.pt``: pre-training or fine-tuning) or an exported ``.safetensors``.
        branch: DAMA's branch (1 or 2); MAE-style checkpoints have one encoder and ignore it.
        img_size: input side to fine-tune at (None: the pre-training side). Another side resamples the
            position embedding (module docstring); it must be a multiple of the patch size.
        drop_path_rate: stochastic depth of the new encoder (a training setting, not stored in checkpoints).
    Returns:
        ``(encoder, info)``; ``info`` holds the provenance and ``pretrain_img_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise input_error("init", "random, a checkpoint (.pt) or an exported encoder (.safetensors)",
                          f"'{path}' (no such file)", "Check the path, e.g. runs/dama/checkpoints/last.pt")
    fields, weights, info = _read_weights(path, branch)
    old_side, patch = int(fields["img_size"]), int(fields["patch_size"])
    side = old_side if img_size is None else int(img_size)
    if side % patch:
        raise input_error("fine-tuning image size", f"a multiple of the checkpoint's patch size {patch}",
                          str(side), f"Set data.size to e.g. {max(1, side // patch) * patch}")
    encoder = ViTEncoder(**{**fields, "img_size": side}, drop_path_rate=drop_path_rate)
    if side != old_side and "pos_embed" in weights:
        weights = {**weights, "pos_embed": interpolate_pos_embed(weights["pos_embed"], encoder.grid_size,
                                                                 old_grid=old_side // patch)}
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise input_error(f"encoder weights in '{path}'", f"an encoder of shape {fields}",
                          f"a mismatch ({str(exc).splitlines()[-1].strip()})",
                          "Pass a checkpoint written by micromae pretrain, finetune or export-encoder") from exc
    return encoder, {**info, "pretrain_img_size": old_side}


class ViTClassifier(nn.Module):
    """ViT encoder + global average pool + LayerNorm + linear head: ``(N, C, H, W)`` -> logits ``(N, K)``.

    State-dict keys: ``encoder.*`` (as in a :class:`~micromae.models.MaskedAutoencoder`), ``fc_norm.*``,
    ``head.*``. ``head_init_std``: std of the head's truncated-normal init (2e-5, MAE / DAMA).
    """

    def __init__(self, encoder: ViTEncoder, num_classes: int, head_init_std: float = 2e-5) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise input_error("num_classes", "an integer >= 2", repr(num_classes),
                              "A classifier needs at least two classes (two class folders)")
        self.encoder = encoder
        self.encoder.norm.requires_grad_(False)  # unused: fc_norm follows the pool instead (module docstring)
        self.num_classes = num_classes
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.encoder.img_size

    @property
    def in_chans(self) -> int:
        return self.encoder.in_chans

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised features: ``(N, C, H, W)`` -> ``(N, D)``."""
        enc = self.encoder
        x = enc.embed_patches(imgs)  # (N, L, D), checks the shape
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(torch.cat([cls, x], dim=1))  # (N, 1 + L, D), before the encoder's final norm
        return self.fc_norm(x[:, 1:].mean(dim=1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> class logits ``(N, num_classes)``."""
        return self.head(self.forward_features(imgs))

    @classmethod
    def from_checkpoint(cls, path: str | Path, num_classes: int, branch: int = 1, img_size: int | None = None,
                        drop_path_rate: float = 0.0, head_init_std: float = 2e-5) -> ViTClassifier:
        """A new classifier on the encoder of ``path`` (see :func:`load_encoder`); the head is new."""
        encoder, info = load_encoder(path, branch=branch, img_size=img_size, drop_path_rate=drop_path_rate)
        model = cls(encoder, num_classes, head_init_std=head_init_std)
        model.init_info = info
        return model

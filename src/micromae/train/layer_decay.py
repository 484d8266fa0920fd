"""Layer-wise learning-rate decay for fine-tuning a ViT encoder (BEiT / MAE / DAMA recipe).

The encoder's layers are numbered as in DAMA's fine-tuning recipe: the patch embedding, position embedding and
class token are layer 0, block ``i`` is layer ``i + 1``, and everything above the last block (the encoder's final
norm and every parameter outside the encoder: heads, necks, detectors) is the top layer ``depth + 1``. A parameter of
layer ``l`` trains with ``lr * layer_decay ** (depth + 1 - l)``: the head at the full rate, the patch embedding
at ``layer_decay ** (depth + 1)`` of it.

Groups carry their own ``lr`` (already scaled), so :func:`micromae.train.optim.build_scheduler`'s per-group
``LambdaLR`` keeps the ratios through warm-up and cosine decay.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from micromae.errors import input_error

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = ("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "reg_token", "mask_token")


def encoder_layer_id(name: str, depth: int) -> int:
    """Layer index of an encoder parameter named as in :class:`micromae.models.ViTEncoder` (timm names)."""
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(name == e or name.startswith(e + ".") for e in _EMBED):
        return 0
    return depth + 1


def layer_scales(model: nn.Module, encoder: nn.Module, layer_decay: float) -> dict[str, float]:
    """{parameter name in ``model``: lr scale}; ``encoder`` is the ViT inside ``model`` (``depth`` blocks)."""
    if not 0.0 < layer_decay <= 1.0:
        raise input_error("layer_decay", "a number in (0, 1] (1 = no decay; the papers use 0.65-0.75)",
                          layer_decay, "Set train.layer_decay to e.g. 0.65")
    depth = len(encoder.blocks)
    inner = {id(p): n for n, p in encoder.named_parameters()}
    scales = {}
    for name, p in model.named_parameters():
        layer = encoder_layer_id(inner[id(p)], depth) if id(p) in inner else depth + 1
        scales[name] = layer_decay ** (depth + 1 - layer)
    return scales


def skip_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm scales (every 1-D tensor) and position / class tokens are not decayed."""
    return p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in NO_WEIGHT_DECAY)


def layer_decay_groups(model: nn.Module, encoder: nn.Module, lr: float, weight_decay: float,
                       layer_decay: float, frozen: Iterable[str] = ()) -> list[dict]:
    """AdamW parameter groups: one per (lr scale, decay / no decay), each with ``lr``, ``lr_scale`` and
    ``weight_decay``; trainable parameters only (``requires_grad``), minus names starting with ``frozen``."""
    scales = layer_scales(model, encoder, layer_decay)
    frozen = tuple(frozen)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or (frozen and name.startswith(frozen)):
            continue
        no_decay = skip_weight_decay(name, p)
        key = (scales[name], no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr_scale": scales[name], "lr": lr * scales[name],
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))


def build_layer_decay_optimizer(model: nn.Module, encoder: nn.Module, lr: float, weight_decay: float,
                                layer_decay: float, betas: tuple[float, float] = (0.9, 0.999)
                                ) -> torch.optim.AdamW:
    """AdamW over :func:`layer_decay_groups` (the group ``names`` lists stay for logging and tests)."""
    groups = layer_decay_groups(model, encoder, lr, weight_decay, layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))

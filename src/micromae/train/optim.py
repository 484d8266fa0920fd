"""AdamW with optional no-decay groups, and a per-step warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from micromae.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, no_decay_bias_norm: bool) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups.

    With ``no_decay_bias_norm`` every 1-D parameter (biases, norm scales) and every token or position
    embedding is excluded from weight decay (MAE / DAMA recipe); otherwise all share ``weight_decay``
    (MAESTER's public code).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not no_decay_bias_norm:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    skip_names = ("cls_token", "mask_token", "pos_embed")
    decay, no_decay = [], []
    for name, p in params:
        if p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_bias_norm)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimiser step ``step`` (0-based).

    ``constant``: linear warm-up over ``warmup_steps`` then 1. ``cosine``: the same warm-up, then a cosine from
    1 down to ``min_lr / lr`` at ``steps``.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

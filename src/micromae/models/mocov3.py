"""MoCo v3 (Chen, Xie & He 2021) on the ViT encoder: two views, a momentum encoder, InfoNCE.

``encoder`` (a :class:`ViTEncoder`; its CLS token is the image feature) -> ``projector`` (3-layer MLP with
BatchNorm, the last BatchNorm without affine parameters) -> ``predictor`` (2-layer MLP). The momentum branch
(``momentum_encoder`` + ``momentum_projector``) is an EMA copy of encoder + projector and gets no gradient.
The loss is symmetric: ``ctr(q1, k2) + ctr(q2, k1)`` with ``ctr(q, k)`` the cross-entropy of the cosine
similarities ``q_i . k_j / T`` against the matching index, times ``2 T`` (the paper's scaling). Negatives
are the other images of the (per-process) batch. The objective that trains it (views, momentum schedule) is
``train.ssl_objectives.MoCoV3Objective``; the encoder is stored under ``encoder.`` like MAE's.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from micromae.errors import input_error
from micromae.models.dama import ema_update
from micromae.models.vit import ViTEncoder

__all__ = ["MoCoV3", "info_nce", "mlp"]


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU blocks, then a Linear to ``out_dim`` (with a BatchNorm without affine
    parameters after it when ``last_bn``), as MoCo v3's projector and predictor."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=False))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(N, d)`` queries and keys -> scalar InfoNCE (positives on the diagonal), times ``2 * temperature``."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = q @ k.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


class MoCoV3(nn.Module):
    """MoCo v3 on ``encoder`` (module docstring).

    Args:
        encoder: the ViT encoder trained (the image feature is its CLS token after the final norm).
        dim: output width of projector and predictor (256 in the paper).
        mlp_dim: hidden width of projector and predictor (4096 in the paper).
        temperature: InfoNCE temperature ``T`` (0.2 for ViT in the paper).
    """

    def __init__(self, encoder: ViTEncoder, dim: int = 256, mlp_dim: int = 4096, temperature: float = 0.2) -> None:
        super().__init__()
        if not float(temperature) > 0:
            raise input_error("mocov3.temperature", "a positive number", repr(temperature), "Use 0.2 (paper)")
        for name, value in (("mocov3.dim", dim), ("mocov3.mlp_dim", mlp_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise input_error(name, "a positive integer", repr(value), "Use e.g. 256 / 4096 (paper)")
        self.dim, self.mlp_dim, self.temperature = int(dim), int(mlp_dim), float(temperature)
        self.encoder = encoder
        self.projector = mlp(3, encoder.embed_dim, mlp_dim, dim)
        self.predictor = mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def query(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, dim)`` predictions of the trained branch."""
        return self.predictor(self.projector(self.encoder(imgs)[:, 0]))

    @torch.no_grad()
    def key(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, dim)`` momentum-branch projections (no gradient)."""
        return self.momentum_projector(self.momentum_encoder(imgs)[:, 0])

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """Two views ``(N, C, H, W)`` of the same images -> the symmetric InfoNCE loss."""
        if view1.shape[0] < 2:
            raise input_error("MoCo v3 batch", "at least 2 images (the others are the negatives)",
                              str(view1.shape[0]), "Raise train.batch_size")
        q1, q2 = self.query(view1), self.query(view2)
        k1, k2 = self.key(view1), self.key(view2)
        return info_nce(q1, k2, self.temperature) + info_nce(q2, k1, self.temperature)

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        """EMA of encoder and projector into the momentum branch."""
        ema_update(self.momentum_encoder, self.encoder, momentum)
        ema_update(self.momentum_projector, self.projector, momentum)

    def settings(self) -> dict:
        return {"dim": self.dim, "mlp_dim": self.mlp_dim, "temperature": self.temperature}

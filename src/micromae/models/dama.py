"""DAMA (dual-loss adaptive masked autoencoder): two MAE branches, an adaptive second mask, and a feature
regression from branch 1's tokens to branch 2's averaged block features (paper §4; docs/METHODS.md, DAMA pre-training).

Branch 1 sees a random mask and reconstructs pixels (``L_p1``); branch 2 sees the adaptive mask built from
branch 1's per-patch loss and reconstructs pixels (``L_p2``); a head ``F_Z`` on branch 1's final encoder
tokens regresses branch 2's target (data2vec recipe: the FFN outputs of its last K blocks, each
layer-normalised per token without parameters, averaged) with a smooth-L1 loss (``L_f``).
Total: ``L = L_p1 + L_p2 + alpha * L_f``.

Configurations (paper Table 5): ``student1-student2`` two independent MAEs, both trained; ``shared`` one MAE
run twice; ``ema`` branch 2 is an exponential moving average of branch 1 and receives no gradient.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from micromae.errors import input_error
from micromae.models.adaptive_masking import adaptive_mask, random_ids_keep, random_overlap_mask, second_mask_sizes
from micromae.models.mae import MaskedAutoencoder
from micromae.models.vit import init_mae_weights

__all__ = ["FeatureRegressionHead", "regression_target", "pair_tokens", "feature_loss", "ema_update",
           "ema_momentum", "fresh_copy", "DAMAOutput", "DAMA", "encoder_state_dict", "CONFIGS", "MASKINGS", "PAIRINGS"]

CONFIGS = ("student1-student2", "shared", "ema")
MASKINGS = ("adaptive", "random_overlap")
PAIRINGS = ("position", "index")


class FeatureRegressionHead(nn.Sequential):
    """``F_Z``: Linear D->2D, LayerNorm, ReLU, Linear 2D->D, LayerNorm. ``(N, T, D)`` -> ``(N, T, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU(),
                         nn.Linear(2 * dim, dim), nn.LayerNorm(dim))
        self.apply(init_mae_weights)


def regression_target(ffn_outputs: list[torch.Tensor]) -> torch.Tensor:
    """data2vec target: K tensors ``(N, T, D)`` -> ``(N, T, D)`` float32, the mean over blocks of each block's
    output layer-normalised per token without affine parameters."""
    if not ffn_outputs:
        raise input_error("ffn_outputs", "a list of at least one (N, T, D) tensor", "an empty list",
                          "Ask the encoder for return_block_ffn=K with K >= 1")
    normed = [F.layer_norm(f.float(), f.shape[-1:]) for f in ffn_outputs]
    return torch.stack(normed).mean(dim=0)


def pair_tokens(pred1: torch.Tensor, ids_keep1: torch.Tensor, target2: torch.Tensor, ids_keep2: torch.Tensor,
                num_patches: int, pairing: str = "position"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match branch 1's predictions with branch 2's targets.

    Args:
        pred1: ``(N, 1 + K1, D)`` CLS then branch 1's visible tokens, in ``ids_keep1`` ``(N, K1)`` order.
        target2: ``(N, 1 + K2, D)`` CLS then branch 2's visible tokens, in ``ids_keep2`` ``(N, K2)`` order.
        num_patches: ``L``.
        pairing: ``position``: CLS with CLS and every patch visible in both branches with itself (tokens
            scattered onto the ``L`` patch grid); ``index``: the i-th token with the i-th token, whatever their
            patches (the public code).
    Returns:
        ``pred`` ``(N, T, D)``, ``target`` ``(N, T, D)`` and ``weight`` ``(N, T)`` (1 for a pair, 0 for padding).
    """
    if pairing == "index":
        t = min(pred1.shape[1], target2.shape[1])
        return pred1[:, :t], target2[:, :t], pred1.new_ones(pred1.shape[0], t, dtype=torch.float32)
    if pairing != "position":
        raise input_error("pairing", "one of " + ", ".join(PAIRINGS), repr(pairing),
                          "Use position (default) or index (public code)")

    def to_grid(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # (N, 1 + K, D) -> (N, 1 + L, D)
        grid = tokens.new_zeros(tokens.shape[0], num_patches, tokens.shape[-1])
        grid = grid.scatter(1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens[:, 1:])
        return torch.cat([tokens[:, :1], grid], dim=1)

    n = pred1.shape[0]
    seen1 = torch.zeros(n, num_patches, device=pred1.device).scatter_(1, ids_keep1, 1.0)
    seen2 = torch.zeros(n, num_patches, device=pred1.device).scatter_(1, ids_keep2, 1.0)
    weight = torch.cat([seen1.new_ones(n, 1), seen1 * seen2], dim=1)
    return to_grid(pred1, ids_keep1), to_grid(target2, ids_keep2), weight


def feature_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0, weight: torch.Tensor | None = None,
                 softmax: bool = False) -> torch.Tensor:
    """Smooth-L1 (``beta``; 0 gives L1) summed over channels, averaged over the tokens of ``weight`` (N, T).

    ``pred``, ``target``: ``(N, T, D)``; ``softmax`` applies a softmax over channels to both (public code).
    """
    pred, target = pred.float(), target.float()
    if softmax:
        pred, target = pred.softmax(dim=-1), target.softmax(dim=-1)
    per_token = F.smooth_l1_loss(pred, target, reduction="none", beta=beta).sum(dim=-1)  # (N, T)
    if weight is None:
        return per_token.mean()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` for every parameter; buffers are copied."""
    for p_t, p_s in zip(teacher.parameters(), student.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_s.detach().to(p_t.dtype), alpha=1.0 - momentum)
    for b_t, b_s in zip(teacher.buffers(), student.buffers(), strict=True):
        b_t.copy_(b_s)


def ema_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine schedule of the EMA momentum: ``base`` at step 0, ``final`` at ``total_steps`` (and after)."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fresh_copy(mae: MaskedAutoencoder) -> MaskedAutoencoder:
    """A copy of ``mae`` with the same architecture and newly drawn weights (MAE initialisation)."""
    other = copy.deepcopy(mae)
    other.encoder.initialize_weights()
    for module in (other.decoder_embed, other.decoder_blocks, other.decoder_norm, other.decoder_pred):
        module.apply(init_mae_weights)
    nn.init.normal_(other.mask_token, std=0.02)
    return other


@dataclass
class DAMAOutput:
    """Result of :meth:`DAMA.forward`: the scalar losses, and per branch ``pred`` ``(N, L, p*p*C)``, ``mask``
    ``(N, L)`` (the loss mask), ``ids_keep`` ``(N, keep)``; ``target`` ``(N, T, D)`` of the feature loss."""

    loss: torch.Tensor
    loss_p1: torch.Tensor
    loss_p2: torch.Tensor
    loss_f: torch.Tensor
    pred1: torch.Tensor
    mask1: torch.Tensor
    ids_keep1: torch.Tensor
    pred2: torch.Tensor
    mask2: torch.Tensor
    ids_keep2: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class DAMA(nn.Module):
    """Two MAE branches, the adaptive second mask and the feature-regression head.

    Args:
        branch1: the MAE trained on random masks (its encoder is the one fine-tuned by default).
        config: ``student1-student2`` (branch 2 independent: ``branch2`` or a freshly initialised copy),
            ``shared`` (branch 2 is branch 1), ``ema`` (branch 2 a copy of branch 1, updated by
            :meth:`update_teacher`, no gradient).
        branch2: the second MAE for ``student1-student2`` (same architecture); None draws new weights.
        mask_ratio: both masks (default ``branch1.mask_ratio``), in [0.5, 1).
        overlap_ratio: fraction of branch 2's visible patches shared with branch 1 (0.5; 0: no overlap).
        masking: ``adaptive`` (DAMA) or ``random_overlap`` (DAMA-rand).
        K: blocks of branch 2 averaged into the target. beta: smooth-L1 beta. alpha: weight of ``L_f``.
        pairing: ``position`` (CLS + patches visible in both, by patch) or ``index`` (public code).
        target_softmax: softmax over channels on both sides of ``L_f`` (public code).
        stop_grad_target: detach the target (default: True for ``ema``, False otherwise).
        norm_pix_loss: set on both branches (DAMA: per-patch normalised pixel targets); None keeps theirs.
        emulate_public_code: use the released code's faulty second mask (comparison only).
    """

    def __init__(self, branch1: MaskedAutoencoder, config: str = "student1-student2",
                 branch2: MaskedAutoencoder | None = None, mask_ratio: float | None = None,
                 overlap_ratio: float = 0.5, masking: str = "adaptive", K: int = 6, beta: float = 2.0,
                 alpha: float = 1.0, pairing: str = "position", target_softmax: bool = False,
                 stop_grad_target: bool | None = None, norm_pix_loss: bool | None = True,
                 emulate_public_code: bool = False) -> None:
        super().__init__()
        for name, value, allowed in [("config", config, CONFIGS), ("masking", masking, MASKINGS),
                                     ("pairing", pairing, PAIRINGS)]:
            if value not in allowed:
                raise input_error(f"DAMA {name}", "one of " + ", ".join(allowed), repr(value),
                                  f"Set {name} to one of the listed values")
        if branch2 is not None and config != "student1-student2":
            raise input_error("branch2", "None unless config is student1-student2", f"a module with {config!r}",
                              "Drop branch2: shared and ema derive branch 2 from branch 1")
        if stop_grad_target is None:
            stop_grad_target = config == "ema"
        if config == "ema" and not stop_grad_target:
            raise input_error("stop_grad_target", "true with the EMA teacher", "false",
                              "The EMA teacher is never trained by gradients; leave stop_grad_target unset")
        self.mask_ratio = float(branch1.mask_ratio if mask_ratio is None else mask_ratio)
        self.keep, self.overlap = second_mask_sizes(branch1.num_patches, self.mask_ratio, overlap_ratio)
        if not 1 <= int(K) <= branch1.encoder.depth or isinstance(K, bool):
            raise input_error("K", f"an int in 1..depth={branch1.encoder.depth}", repr(K),
                              "Average at most as many blocks as the encoder has (DAMA: 6 of 12)")
        for name, value in [("beta", beta), ("alpha", alpha)]:
            if not float(value) >= 0.0:
                raise input_error(name, "a number >= 0", repr(value), "Use beta=2 and alpha=1 (paper)")
        self.config, self.masking, self.pairing = config, masking, pairing
        self.overlap_ratio, self.K, self.beta, self.alpha = float(overlap_ratio), int(K), float(beta), float(alpha)
        self.target_softmax, self.stop_grad_target = bool(target_softmax), bool(stop_grad_target)
        self.emulate_public_code = bool(emulate_public_code)
        self.branch1 = branch1
        self.branch2: MaskedAutoencoder | None = None  # None: shared (branch 2 is branch 1)
        if config == "student1-student2":
            self.branch2 = branch2 if branch2 is not None else fresh_copy(branch1)
            shape1 = (branch1.num_patches, branch1.encoder.embed_dim)
            shape2 = (self.branch2.num_patches, self.branch2.encoder.embed_dim)
            if shape2 != shape1 or self.branch2.encoder.depth < self.K:
                raise input_error("branch2", f"(patches, width) {shape1} like branch1 and depth >= K={self.K}",
                                  f"{shape2}, depth {self.branch2.encoder.depth}",
                                  "Build both branches from the same config")
        elif config == "ema":
            self.branch2 = copy.deepcopy(branch1).requires_grad_(False)
        if norm_pix_loss is not None:
            for branch in (self.branch1, self.branch2):
                if branch is not None:
                    branch.norm_pix_loss = bool(norm_pix_loss)
        self.head = FeatureRegressionHead(branch1.encoder.embed_dim)

    @property
    def second(self) -> MaskedAutoencoder:
        """The module run on the second mask (``branch1`` itself when shared)."""
        return self.branch1 if self.branch2 is None else self.branch2

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step of branch 2 towards branch 1 (``ema`` only)."""
        if self.config != "ema":
            raise input_error("update_teacher", "config ema", repr(self.config), "Only the EMA teacher is updated")
        ema_update(self.branch2, self.branch1, momentum)

    def second_mask(self, mask1: torch.Tensor, loss_per_patch: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids_keep2`` ``(N, keep)`` and the loss mask ``(N, L)`` of branch 2 (see adaptive_masking)."""
        if self.masking == "random_overlap":
            return random_overlap_mask(mask1, self.mask_ratio, self.overlap_ratio, generator, check_counts=False)
        return adaptive_mask(mask1, loss_per_patch, self.mask_ratio, self.overlap_ratio, generator,
                             emulate_public_code=self.emulate_public_code, check_counts=False)

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> DAMAOutput:
        """Both branches and the three losses on ``imgs`` ``(N, C, H, W)``; ``generator`` (on the images'
        device) draws mask 1 and the overlap."""
        b1, b2 = self.branch1, self.second
        ids_keep1 = random_ids_keep(imgs.shape[0], b1.num_patches, self.keep, imgs.device, generator)
        latent1, mask1, ids_restore1 = b1.forward_encoder(imgs, ids_keep=ids_keep1)
        pred1 = b1.forward_decoder(latent1, ids_restore1)
        loss_p1, loss_per_patch1 = b1.forward_loss(imgs, pred1, mask1)
        ids_keep2, mask2 = self.second_mask(mask1, loss_per_patch1.detach(), generator)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config != "ema"):
            latent2, kept_mask2, ids_restore2, ffn2 = b2.forward_encoder(imgs, ids_keep=ids_keep2,
                                                                         return_block_ffn=self.K)
            pred2 = b2.forward_decoder(latent2, ids_restore2)
            if not self.emulate_public_code:
                mask2 = kept_mask2  # the loss mask is what the encoder did not see
            loss_p2, _ = b2.forward_loss(imgs, pred2, mask2)
            target = regression_target(ffn2)  # (N, 1 + keep, D)
        if self.stop_grad_target:
            target = target.detach()
        pred_f, target, weight = pair_tokens(self.head(latent1), ids_keep1, target, ids_keep2, b1.num_patches,
                                             self.pairing)
        loss_f = feature_loss(pred_f, target, self.beta, weight, softmax=self.target_softmax)
        loss = loss_p1 + loss_p2 + self.alpha * loss_f
        return DAMAOutput(loss=loss, loss_p1=loss_p1, loss_p2=loss_p2, loss_f=loss_f, pred1=pred1, mask1=mask1,
                          ids_keep1=ids_keep1, pred2=pred2, mask2=mask2, ids_keep2=ids_keep2, target=target,
                          weight=weight)

    def settings(self) -> dict:
        """The options that define the objective (stored in checkpoints, checked on resume)."""
        return dict(config=self.config, mask_ratio=self.mask_ratio, overlap_ratio=self.overlap_ratio,
                    masking=self.masking, K=self.K, beta=self.beta, alpha=self.alpha, pairing=self.pairing,
                    target_softmax=self.target_softmax, stop_grad_target=self.stop_grad_target,
                    emulate_public_code=self.emulate_public_code)


def encoder_state_dict(model_state: dict[str, torch.Tensor], branch: int = 1) -> dict[str, torch.Tensor]:
    """The ViT encoder weights of a pre-training checkpoint's ``model`` state, whatever the objective.

    MAE and data2vec store them under ``encoder.``; DAMA under ``branch1.encoder.`` and ``branch2.encoder.``
    (``shared`` has only branch 1, which is then also branch 2). ``branch`` picks DAMA's branch (1 or 2).
    """
    if branch not in (1, 2):
        raise input_error("branch", "1 or 2", repr(branch), "Pick DAMA's branch 1 (default) or 2")
    prefixes = [f"branch{branch}.encoder.", "branch1.encoder.", "encoder."]
    for prefix in prefixes:
        found = {k[len(prefix):]: v for k, v in model_state.items() if k.startswith(prefix)}
        if found:
            return found
    raise input_error("checkpoint model state", "keys under encoder. or branch1.encoder.",
                      f"keys like {sorted(model_state)[:3]}", "Pass a checkpoint written by micromae pretrain")

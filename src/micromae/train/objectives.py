"""Training objectives: each turns a batch into a loss and a dict of logged values (see engine.Objective)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from micromae.figures import plot_reconstructions
from micromae.runtime import eval_mode, unwrap
from micromae.train.engine import Objective


class MAEObjective(Objective):
    """Masked-autoencoder reconstruction (MAESTER): MSE on the masked patches of a random mask."""

    name = "pretrain"
    figure_name = "reconstruction"

    def loss(self, module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = module(batch)
        mask = out.mask
        return out.loss, {"mask_ratio": float(mask.float().mean())}

    @torch.no_grad()
    def save_figure(self, batch: torch.Tensor, path: Path) -> None:
        with eval_mode(unwrap(self.model)) as model:
            imgs = batch[:6].float()
            out = model(imgs)
            pred = model.unpatchify(out.pred.float())
            if getattr(model, "norm_pix_loss", False):  # show predictions in pixel units
                target = model.patchify(imgs)
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                pred = model.unpatchify(out.pred.float() * (var + 1e-6).sqrt() + mean)
            n, num_patches = out.mask.shape
            grid = int(round(num_patches**0.5))
            ps = imgs.shape[-1] // grid
            mask_imgs = out.mask.float().reshape(n, 1, grid, grid)
            mask_imgs = mask_imgs.repeat_interleave(ps, 2).repeat_interleave(ps, 3)
            plot_reconstructions(imgs.cpu().numpy(), mask_imgs.cpu().numpy(), pred.clamp(0, 1).cpu().numpy(), path,
                                 title=f"loss {float(out.loss):.4f}")

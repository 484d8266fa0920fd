"""The DAMA paper's other pre-training columns as objectives of the one engine: SimMIM and MoCo v3.

- :class:`SimMIMObjective`: :class:`~micromae.models.simmim.SimMIM` (mask tokens in the encoder, linear
  pixel head, L1 on masked patches); logs ``mask_ratio``.
- :class:`MoCoV3Objective`: :class:`~micromae.models.mocov3.MoCoV3` on two
  :class:`~micromae.data.views.FluorescenceViews` of each batch; after every optimiser step the momentum
  branch follows by EMA (cosine ``ema_momentum`` -> 1); logs ``ema_momentum``.

Both keep the encoder under ``encoder.``, so checkpoints load through ``models.pretrained.load_encoder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from micromae.data.views import FluorescenceViews
from micromae.figures import plot_reconstructions
from micromae.models.mocov3 import MoCoV3
from micromae.models.simmim import SimMIM
from micromae.runtime import eval_mode, unwrap
from micromae.train.engine import MomentumObjective, Objective, check_resume

__all__ = ["MoCoV3Objective", "SimMIMObjective"]


class SimMIMObjective(Objective):
    """SimMIM: L1 on the raw pixels of the masked patches."""

    name = "simmim"
    figure_name = "simmim_reconstruction"

    def __init__(self, model: SimMIM) -> None:
        super().__init__(model)

    def loss(self, module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = module(batch)
        return out.loss, {"mask_ratio": float(out.mask.float().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"objective": "simmim", "settings": self.model.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume(state, "simmim", {"settings": self.model.settings()})

    @torch.no_grad()
    def save_figure(self, batch: torch.Tensor, path: Path) -> None:
        model: SimMIM
        with eval_mode(unwrap(self.model)) as model:
            imgs = batch[:6].float()
            out = model(imgs)
            p, (gh, gw) = model.patch_size, model.encoder.grid_size
            mask = out.mask.float().reshape(-1, 1, gh, gw).repeat_interleave(p, 2).repeat_interleave(p, 3)
            plot_reconstructions(imgs.cpu().numpy(), mask.cpu().numpy(),
                                 model.unpatchify(out.pred.float()).clamp(0, 1).cpu().numpy(), path,
                                 title=f"SimMIM L1 {float(out.loss):.4f}")


class MoCoV3Objective(MomentumObjective):
    """MoCo v3 with fluorescence views; ``total_steps`` sets the momentum schedule."""

    name = "mocov3"
    figure_name = "mocov3"

    def __init__(self, model: MoCoV3, total_steps: int = 1, ema_momentum: float = 0.99,
                 views: FluorescenceViews | None = None) -> None:
        super().__init__(model, total_steps, ema_momentum, option="mocov3.ema_momentum")
        self.views = views or FluorescenceViews()

    def loss(self, module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        view1, view2 = self.views(batch.float())
        return module(view1, view2), {"ema_momentum": self.last_momentum}

    def after_step(self, step: int) -> None:
        self.model.update_momentum(self.next_momentum(step))

"""Pre-training objectives of the DAMA comparison (paper Table 1 / Table 5) for the one training engine.

- :class:`DAMAObjective`: DAMA and its ablations (configuration, adaptive / random-overlap masking, overlap).
- :class:`Data2VecObjective`: data2vec-style baseline: an EMA teacher encodes the unmasked image, the student
  (mask tokens in place of the masked patches) regresses the teacher's averaged top-K block features at the
  masked positions.
- MAE: :class:`micromae.train.objectives.MAEObjective` (one branch, random mask).

:func:`build_dama_comparison_objective` switches between them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from micromae.errors import input_error
from micromae.figures import channels_to_rgb, display_scale, plt, save_figure
from micromae.models.dama import DAMA, ema_update
from micromae.models.data2vec import Data2Vec, target_spread
from micromae.models.mae import MaskedAutoencoder
from micromae.models.vit import ViTEncoder
from micromae.runtime import eval_mode, unwrap
from micromae.train.engine import MomentumObjective, Objective, check_resume
from micromae.train.objectives import MAEObjective

__all__ = ["DAMAObjective", "Data2VecObjective", "build_dama_comparison_objective",
           "channels_to_rgb", "check_resume", "display_scale", "OBJECTIVES"]

OBJECTIVES = ("mae", "dama", "data2vec")


def _pixels(model: MaskedAutoencoder, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Predicted patches ``(N, L, p*p*C)`` -> images ``(N, C, H, W)`` in pixel units (undoing norm_pix)."""
    pred = pred.float()
    if model.norm_pix_loss:
        target = model.patchify(imgs.float())
        pred = pred * (target.var(-1, keepdim=True) + 1.0e-6).sqrt() + target.mean(-1, keepdim=True)
    return model.unpatchify(pred)


def _mask_image(model: MaskedAutoencoder, mask: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` patch mask -> ``(N, 1, H, W)``."""
    p, (gh, gw) = model.patch_size, model.encoder.grid_size
    m = mask.float().reshape(-1, 1, gh, gw)
    return m.repeat_interleave(p, 2).repeat_interleave(p, 3)


class DAMAObjective(MomentumObjective):
    """``L = L_p1 + L_p2 + alpha * L_f`` (see :class:`micromae.models.dama.DAMA` for every option).

    Args:
        model: branch 1 (a :class:`MaskedAutoencoder`), or a built :class:`DAMA` (then the options are its own).
        total_steps: optimiser steps of the run (the EMA momentum goes from ``ema_momentum`` to 1 over them).
        ema_momentum: initial EMA momentum of the ``ema`` configuration (0.996).
        **options: ``DAMA`` keyword arguments (config, branch2, mask_ratio, overlap_ratio, masking, K, beta,
            alpha, pairing, target_softmax, stop_grad_target, norm_pix_loss, emulate_public_code).
    Logs ``loss_p1``, ``loss_p2``, ``loss_f`` (the engine adds the total as ``loss``) and ``ema_momentum``.
    """

    name = "dama"
    figure_name = "dama_reconstruction"

    def __init__(self, model: MaskedAutoencoder | DAMA, total_steps: int = 1, ema_momentum: float = 0.996,
                 **options: Any) -> None:
        if isinstance(model, DAMA):
            if options:
                raise input_error("DAMAObjective options", "none with a built DAMA model", str(sorted(options)),
                                  "Pass the options to DAMA(...) or pass a MaskedAutoencoder")
            dama = model
        else:
            dama = DAMA(model, **options)
        super().__init__(dama, total_steps, ema_momentum)

    def loss(self, module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        out = module(batch)
        logs = {"loss_p1": float(out.loss_p1.detach()), "loss_p2": float(out.loss_p2.detach()),
                "loss_f": float(out.loss_f.detach())}
        if self.model.config == "ema":
            logs["ema_momentum"] = self.last_momentum
        return out.loss, logs

    def after_step(self, step: int) -> None:
        """EMA update of branch 2 after optimiser step ``step`` (0-based), momentum cosine-scheduled."""
        if self.model.config == "ema":
            self.model.update_teacher(self.next_momentum(step))

    @torch.no_grad()
    def save_figure(self, batch: torch.Tensor, path: Path) -> None:
        """Rows of: input, branch 1 masked input and reconstruction, branch 2 masked input and reconstruction."""
        dama: DAMA
        with eval_mode(unwrap(self.model)) as dama:
            imgs = batch[:4].float()
            out = dama(imgs)
            panels = [(imgs, None)]
            for branch, pred, mask in [(dama.branch1, out.pred1, out.mask1), (dama.second, out.pred2, out.mask2)]:
                m = _mask_image(branch, mask)
                recon = _pixels(branch, imgs, pred).clamp(0, 1)
                panels += [(imgs, m), (imgs * (1 - m) + recon * m, None)]
            titles = ["input", "mask 1 (random)", "reconstruction 1", f"mask 2 ({dama.masking})", "reconstruction 2"]
            fig, axes = plt.subplots(imgs.shape[0], 5, figsize=(10, 2.1 * imgs.shape[0]), squeeze=False)
            for i in range(imgs.shape[0]):
                scale = display_scale(imgs[i].cpu().numpy())
                for j, (panel, m) in enumerate(panels):
                    rgb = channels_to_rgb(panel[i].cpu().numpy(), scale)
                    if m is not None:  # masked patches in mid-grey
                        m_i = m[i, 0].cpu().numpy()[..., None]
                        rgb = rgb * (1 - m_i) + 0.5 * m_i
                    axes[i, j].imshow(rgb, interpolation="nearest")
                    axes[i, j].set_axis_off()
                    if i == 0:
                        axes[i, j].set_title(titles[j], fontsize=8)
            fig.suptitle(f"{dama.config}: L_p1 {float(out.loss_p1):.4f}  L_p2 {float(out.loss_p2):.4f}  "
                         f"L_f {float(out.loss_f):.4f}", fontsize=9)
            save_figure(fig, path)


class Data2VecObjective(MomentumObjective):
    """data2vec baseline; the teacher follows the student by EMA (cosine ``ema_momentum`` -> 1). Logs
    ``loss_f``, ``ema_momentum`` and the target's spread (:func:`~micromae.models.data2vec.target_spread`:
    ``target_std_tokens``, ``target_std_images``), which fall to 0 if the target collapses."""

    name = "data2vec"
    figure_name = "data2vec_mask"

    def __init__(self, model: MaskedAutoencoder | ViTEncoder | Data2Vec, total_steps: int = 1,
                 ema_momentum: float = 0.996, mask_ratio: float | None = None, K: int = 6,
                 beta: float = 2.0, target_norm: str = "layer") -> None:
        if not isinstance(model, Data2Vec):
            encoder = model.encoder if isinstance(model, MaskedAutoencoder) else model
            ratio = mask_ratio if mask_ratio is not None else getattr(model, "mask_ratio", 0.6)
            model = Data2Vec(encoder, mask_ratio=ratio, K=K, beta=beta, target_norm=target_norm)
        super().__init__(model, total_steps, ema_momentum)

    def loss(self, module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _, target, _ = module(batch)
        return loss, {"loss_f": float(loss.detach()), "ema_momentum": self.last_momentum, **target_spread(target)}

    def after_step(self, step: int) -> None:
        ema_update(self.model.teacher, self.model.encoder, self.next_momentum(step))


def build_dama_comparison_objective(kind: str, model: MaskedAutoencoder, total_steps: int,
                                    **options: Any) -> Objective:
    """``mae`` (MAEObjective), ``dama`` (DAMAObjective, ``options`` as DAMA's plus ``ema_momentum``) or
    ``data2vec`` (Data2VecObjective: ``mask_ratio``, ``K``, ``beta``, ``ema_momentum``)."""
    if kind == "mae":
        if options:
            raise input_error("MAE objective options", "none", str(sorted(options)), "Set model.* fields instead")
        return MAEObjective(model)
    if kind == "dama":
        return DAMAObjective(model, total_steps=total_steps, **options)
    if kind == "data2vec":
        return Data2VecObjective(model, total_steps=total_steps, **options)
    raise input_error("objective", "one of " + ", ".join(OBJECTIVES), repr(kind), "Pick one of the listed names")

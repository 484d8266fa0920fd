"""DAMA's multi-channel augmentation applied to a whole batch on a torch device: :class:`TorchDamaAugment`.

The random draws are :class:`~micromae.data.augment.DamaAugment`'s, item by item (``draw_params`` from the
same per-item generator as :class:`~micromae.data.seeded.SeededItems` uses), so a run's batches are the same
function of (seed, rank, step) whichever side augments. Only the arithmetic moves: the data loader cuts each
item's square crop (plain slicing, all crops have one side) and the training process then runs, on the
whole batch, one resize (``F.interpolate``, antialiased when shrinking, as ``DamaAugment``), the exact
``rot90`` of ``rotation="right_angles"``, the rotation and shift as one ``affine_grid`` + ``grid_sample``
with a per-item matrix (torchvision's ``TF.affine`` convention: its inverse matrix about the centre,
normalised by half the side, ``align_corners=False``, zeros outside; ``fill`` by the same offset as
``DamaAugment``), and the flips by ``torch.where``. Items that are neither rotated nor shifted skip the
resampling, as ``DamaAugment`` skips it. The result equals ``DamaAugment`` item by item up to float
rounding of the grid (``tests/test_torch_augment.py``: max abs difference below 1e-4 on [0, 1] data).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from micromae.data.augment import AugmentParams, DamaAugment
from micromae.errors import input_error

PARAM_FIELDS = ("top", "left", "angle", "shift_y", "shift_x", "hflip", "vflip")


def params_tensor(params: AugmentParams | list[AugmentParams]) -> torch.Tensor:
    """``params`` as float64 ``(7,)`` (one item) or ``(B, 7)``, in :data:`PARAM_FIELDS` order (exact: the
    integers are small and the angle is numpy's float64)."""
    rows = [params] if isinstance(params, AugmentParams) else list(params)
    table = torch.tensor([[float(getattr(p, f)) for f in PARAM_FIELDS] for p in rows], dtype=torch.float64)
    return table[0] if isinstance(params, AugmentParams) else table


class TorchDamaAugment:
    """Batched :class:`DamaAugment`: ``augment(images, params)`` with ``images`` ``(B, C, H, W)`` (or the
    crops already cut, ``(B, C, crop, crop)``, via :meth:`augment_crops`) and ``params`` a list of
    :class:`AugmentParams` or their :func:`params_tensor` ``(B, 7)``; returns ``(B, C, size, size)``."""

    def __init__(self, augment: DamaAugment) -> None:
        if not isinstance(augment, DamaAugment):
            raise input_error("TorchDamaAugment augment", "a DamaAugment (its settings and draws are reused)",
                              type(augment).__name__, "Pass the dataset's DamaAugment transform")
        if augment.interpolation not in ("bilinear", "nearest"):  # TF.affine on tensors has no bicubic either
            raise input_error("TorchDamaAugment interpolation", "'bilinear' or 'nearest'",
                              repr(augment.interpolation), "Use interpolation='bilinear' (DAMA's)")
        self.base = augment
        self.size, self.crop, self.fill = augment.size, augment.crop, augment.fill

    def __repr__(self) -> str:
        return f"TorchDamaAugment({self.base!r})"

    def draw_params(self, height: int, width: int, rng: np.random.Generator) -> AugmentParams:
        """The per-item draws: exactly :meth:`DamaAugment.draw_params`."""
        return self.base.draw_params(height, width, rng)

    def cut(self, image: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """The square crop of one ``(C, H, W)`` image (done where the image is, e.g. in a loader worker)."""
        return image[..., p.top:p.top + self.crop, p.left:p.left + self.crop]

    def _table(self, params: Any, batch: int, device: torch.device) -> torch.Tensor:
        table = params if isinstance(params, torch.Tensor) else params_tensor(list(params))
        if table.ndim != 2 or tuple(table.shape) != (batch, len(PARAM_FIELDS)):
            raise input_error("TorchDamaAugment params", f"{batch} rows of {len(PARAM_FIELDS)} ({PARAM_FIELDS})",
                              f"shape {tuple(table.shape)}", "Pass one AugmentParams per image")
        return table.to(device=device, dtype=torch.float64)

    def __call__(self, images: torch.Tensor, params: Any) -> torch.Tensor:
        """Crop (per-item slicing, stacked), then :meth:`augment_crops`."""
        if images.ndim != 4:
            raise input_error("TorchDamaAugment images", "a (B, C, H, W) batch", f"shape {tuple(images.shape)}",
                              "Stack images of one size, or cut the crops first and call augment_crops")
        table = self._table(params, images.shape[0], images.device)
        corners = table[:, :2].to(torch.int64).tolist()
        if any(top < 0 or left < 0 or top + self.crop > images.shape[-2] or left + self.crop > images.shape[-1]
               for top, left in corners):
            raise input_error("TorchDamaAugment params", f"crops of {self.crop} inside the {images.shape[-2]}"
                              f"×{images.shape[-1]} images", f"corners {corners}", "Draw params for these images")
        crops = torch.stack([images[b, :, top:top + self.crop, left:left + self.crop]
                             for b, (top, left) in enumerate(corners)])
        return self.augment_crops(crops, table)

    def augment_crops(self, crops: torch.Tensor, params: Any) -> torch.Tensor:
        """Resize, rotate + shift, flip a batch of crops ``(B, C, crop, crop)`` -> ``(B, C, size, size)``."""
        if crops.ndim != 4 or tuple(crops.shape[-2:]) != (self.crop, self.crop):
            raise input_error("TorchDamaAugment crops", f"a (B, C, {self.crop}, {self.crop}) batch",
                              f"shape {tuple(crops.shape)}", "Cut the crops with TorchDamaAugment.cut")
        table = self._table(params, crops.shape[0], crops.device)
        mode = self.base.interpolation
        out = crops if crops.is_floating_point() else crops.to(torch.float32)
        if self.crop != self.size:
            out = F.interpolate(out, size=(self.size, self.size), mode=mode,
                                **({"align_corners": False, "antialias": self.crop > self.size}
                                   if mode == "bilinear" else {}))
        angle = table[:, 2]
        if self.base.rotation == "right_angles":
            exact = torch.remainder(angle, 90.0) == 0
            turns = torch.where(exact, -torch.floor(angle / 90.0), torch.zeros_like(angle)).to(torch.int64)
            for k in sorted(set(turns.tolist()) - {0}):  # torch.rot90 per distinct turn, picked per item
                out = torch.where((turns == k).view(-1, 1, 1, 1), torch.rot90(out, k=k, dims=(-2, -1)), out)
            angle = torch.where(exact, torch.zeros_like(angle), angle)
        shift_y, shift_x = table[:, 3], table[:, 4]
        moved = ((angle != 0) | (shift_x != 0) | (shift_y != 0)).nonzero().flatten()
        if moved.numel():
            out = out.clone() if out is crops else out
            out[moved] = self._affine(out[moved], angle[moved], shift_x[moved], shift_y[moved], mode)
        hflip = table[:, 5].view(-1, 1, 1, 1) != 0
        vflip = table[:, 6].view(-1, 1, 1, 1) != 0
        out = torch.where(hflip, out.flip(-1), out)
        out = torch.where(vflip, out.flip(-2), out)
        return out.contiguous()

    def _affine(self, x: torch.Tensor, angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                mode: str) -> torch.Tensor:
        """``TF.affine(x, angle, translate=[tx, ty])`` per item, in one ``grid_sample``: torchvision's inverse
        matrix ``[[cos, sin, -cos tx - sin ty], [-sin, cos, sin tx - cos ty]]`` (pixels, centred) with the
        translations over half the side, which is ``affine_grid``'s normalised frame."""
        rot = angle * (math.pi / 180.0)
        cos, sin = torch.cos(rot), torch.sin(rot)
        half = 0.5 * self.size
        theta = torch.stack([torch.stack([cos, sin, (-cos * tx - sin * ty) / half], -1),
                             torch.stack([-sin, cos, (sin * tx - cos * ty) / half], -1)], -2)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        if self.fill:  # torchvision's fill= weights edge pixels twice: offset as DamaAugment does
            return F.grid_sample(x - self.fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + self.fill
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


class SeededCrops(Dataset):
    """The loader side of :class:`TorchDamaAugment`: key ``(index, epoch)`` -> ``(crop (C, crop, crop),
    params (7,))``, the draws from ``np.random.default_rng([seed, rank, epoch, index])`` exactly as
    :class:`~micromae.data.seeded.SeededItems` passes that generator to the dataset's ``DamaAugment``."""

    def __init__(self, dataset: Any, augment: TorchDamaAugment, seed: int, rank: int) -> None:
        if not callable(getattr(dataset, "read", None)):
            raise input_error("dataset", "a dataset with read(index) such as MultiChannelImageFolder",
                              type(dataset).__name__, "Wrap the images in MultiChannelImageFolder")
        self.dataset, self.augment, self.seed, self.rank = dataset, augment, int(seed), int(rank)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch = key
        image = self.dataset.read(index)
        p = self.augment.draw_params(image.shape[-2], image.shape[-1],
                                     np.random.default_rng([self.seed, self.rank, epoch, index]))
        return self.augment.cut(image, p).contiguous(), params_tensor(p)


__all__ = ["TorchDamaAugment", "SeededCrops", "params_tensor", "PARAM_FIELDS"]

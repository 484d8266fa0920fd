"""DAMA's pre-training augmentation of multi-channel images (the public DAMA code's pipeline for 7-channel
data), with every random draw taken from a generator the caller passes, so an item's augmentation replays.

:class:`DamaAugment`: a square crop of side ``round(scale * size)`` ("half size" = half the *output* side, as
``RandomResizedCrop(img_size // 2, img_size)`` there) at a uniformly random position, resized to
``size × size``; a rotation by a free angle drawn uniformly in [-90°, 90°] (the public code's
``RandomRotation(90)``, about the centre, bilinear, ``fill`` outside; ``rotation="right_angles"`` draws
from {-90°, 0°, 90°} instead, without resampling); an integer shift of up to ``int(shift * size)`` pixels
along each axis (``RandomShift(0.3)``, ``fill`` outside), done in the same resampling as the rotation;
horizontal and vertical flips with probability 0.5 each. No intensity transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from micromae.errors import input_error

ROTATIONS = ("free", "right_angles")
_INTERPOLATION = {"bilinear": TF.InterpolationMode.BILINEAR, "nearest": TF.InterpolationMode.NEAREST,
                  "bicubic": TF.InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class AugmentParams:
    """The random draws of one :class:`DamaAugment` call (pixels and degrees)."""

    top: int
    left: int
    angle: float
    shift_y: int
    shift_x: int
    hflip: bool
    vflip: bool


class DamaAugment:
    """DAMA's geometric augmentation of a ``(C, H, W)`` float tensor to ``(C, size, size)`` (module docstring).

    ``scale``: crop side over output side (0.5 = DAMA). ``degrees``: the largest rotation; ``rotation``:
    ``"free"`` (uniform angle) or ``"right_angles"`` (-degrees, 0 or +degrees, exact for 90). ``shift``:
    largest shift as a fraction of ``size``. ``interpolation``: ``"bilinear"`` (default), ``"bicubic"`` or
    ``"nearest"``, used by the resize and the rotation (bicubic can overshoot [0, 1] slightly). ``fill``: the
    value given to pixels rotated or shifted in from outside (0 = DAMA).
    """

    accepts_rng = True

    def __init__(self, size: int, scale: float = 0.5, degrees: float = 90.0, rotation: str = "free",
                 shift: float = 0.3, hflip_p: float = 0.5, vflip_p: float = 0.5, interpolation: str = "bilinear",
                 fill: float = 0.0) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise input_error("DamaAugment size", "an integer >= 1", repr(size), "Pass the model input side, e.g. 128")
        if not (isinstance(scale, (int, float)) and 0 < scale <= 4):
            raise input_error("DamaAugment scale", "a crop/output side ratio in (0, 4]", repr(scale), "DAMA uses 0.5")
        if rotation not in ROTATIONS or interpolation not in _INTERPOLATION:
            raise input_error("DamaAugment rotation/interpolation", f"one of {ROTATIONS} / {tuple(_INTERPOLATION)}",
                              f"{rotation!r} / {interpolation!r}", "DAMA uses 'free' and 'bilinear'")
        if not 0.0 <= degrees <= 180.0:
            raise input_error("DamaAugment degrees", "an angle in [0, 180]", repr(degrees), "DAMA uses 90")
        for name, value in (("shift", shift), ("hflip_p", hflip_p), ("vflip_p", vflip_p)):
            if not 0.0 <= value <= 1.0:
                raise input_error(f"DamaAugment {name}", "a number in [0, 1]", repr(value), "DAMA uses 0.3 and 0.5")
        self.size, self.scale, self.degrees, self.rotation = int(size), float(scale), float(degrees), rotation
        self.crop = max(1, round(self.scale * self.size))
        self.shift, self.hflip_p, self.vflip_p, self.fill = float(shift), float(hflip_p), float(vflip_p), float(fill)
        self.interpolation = interpolation

    @property
    def min_input_size(self) -> int:
        """The smallest image side this augmentation can crop from."""
        return self.crop

    def __repr__(self) -> str:
        return (f"DamaAugment(size={self.size}, crop={self.crop}, degrees={self.degrees}, rotation={self.rotation!r}, "
                f"shift={self.shift}, hflip_p={self.hflip_p}, vflip_p={self.vflip_p}, fill={self.fill})")

    def draw_params(self, height: int, width: int, rng: np.random.Generator) -> AugmentParams:
        """All random draws for an image of ``height × width``, from ``rng`` only."""
        if min(height, width) < self.crop:
            raise input_error("image for DamaAugment", f"at least {self.crop}×{self.crop} pixels (the crop side, "
                              f"{self.scale} × size {self.size})", f"{height}×{width}",
                              "Use larger images, a smaller size, or a smaller scale")
        top, left = int(rng.integers(0, height - self.crop + 1)), int(rng.integers(0, width - self.crop + 1))
        if self.rotation == "free":
            angle = float(rng.uniform(-self.degrees, self.degrees))
        else:
            angle = float(rng.choice([-self.degrees, 0.0, self.degrees]))
        reach = int(self.shift * self.size)
        shift_y, shift_x = (int(v) for v in rng.integers(-reach, reach + 1, 2))
        return AugmentParams(top, left, angle, shift_y, shift_x, bool(rng.random() < self.hflip_p),
                             bool(rng.random() < self.vflip_p))

    def apply(self, img: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Crop, resize, rotate + shift (one resampling), flip: ``(C, H, W)`` -> ``(C, size, size)``."""
        mode = _INTERPOLATION[self.interpolation]
        out = img[..., p.top:p.top + self.crop, p.left:p.left + self.crop]
        if self.crop != self.size:
            out = TF.resize(out, [self.size, self.size], interpolation=mode, antialias=self.crop > self.size)
        angle = p.angle
        if self.rotation == "right_angles" and angle % 90 == 0:
            out, angle = torch.rot90(out, k=-int(angle // 90), dims=(-2, -1)), 0.0  # as TF.affine's sense
        if angle or p.shift_x or p.shift_y:  # torchvision's fill= weights edge pixels twice: offset instead
            out = TF.affine(out - self.fill if self.fill else out, angle=angle, translate=[p.shift_x, p.shift_y],
                            scale=1.0, shear=[0.0, 0.0], interpolation=mode, fill=None)
            out = out + self.fill if self.fill else out
        if p.hflip:
            out = TF.horizontal_flip(out)
        if p.vflip:
            out = TF.vertical_flip(out)
        return out.contiguous()

    def __call__(self, img: torch.Tensor, rng: np.random.Generator | int | None = None) -> torch.Tensor:
        """Augment ``img`` (C, H, W). ``rng``: a generator or seed; None draws a seed from torch's global RNG."""
        if rng is None:
            rng = int(torch.randint(0, 2**62, (1,)).item())
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return self.apply(img, self.draw_params(img.shape[-2], img.shape[-1], rng))

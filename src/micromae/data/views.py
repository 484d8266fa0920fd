"""Two augmented views of a batch of multi-channel fluorescence images, for contrastive pre-training (MoCo v3).

Every transform acts on all channels alike, so no marker's intensity leaks into another's (no colour jitter,
no grey-scale conversion): a random resized crop (area ``crop_scale`` of the input, aspect ratio 3/4 to 4/3,
resized back to the input side, bilinear), horizontal and vertical flips, a rotation by a multiple of 90°
(exact), an intensity gain drawn per image (``gain``, the same for its channels), a Gaussian blur (``blur_p``,
sigma up to ``blur_sigma`` pixels) and additive Gaussian noise (std up to ``noise``), clipped to [0, 1].

The draws come from torch's global CPU generator (seeded per process and saved in checkpoints by the trainer,
so a resumed run draws the same views); the pixels are computed on the batch's device.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF

from micromae.errors import input_error

__all__ = ["FluorescenceViews"]


class FluorescenceViews:
    """``views(batch)`` -> two independently augmented ``(N, C, H, W)`` views of ``batch`` (module docstring).

    Args:
        crop_scale: ``(min, max)`` fraction of the image area each crop covers.
        gain: ``(min, max)`` intensity factor per image.
        blur_p, blur_sigma: probability of a Gaussian blur and its largest sigma (pixels).
        noise: largest standard deviation of the additive Gaussian noise (intensity units).
    """

    def __init__(self, crop_scale: tuple[float, float] = (0.3, 1.0), gain: tuple[float, float] = (0.7, 1.3),
                 blur_p: float = 0.5, blur_sigma: float = 1.0, noise: float = 0.03) -> None:
        if len(crop_scale) != 2 or len(gain) != 2:
            raise input_error("crop_scale / gain", "two numbers each (min, max)", repr((crop_scale, gain)),
                              "Use e.g. crop_scale (0.3, 1.0) and gain [0.7, 1.3]")
        lo, hi = (float(v) for v in crop_scale)
        if not 0 < lo <= hi <= 1:
            raise input_error("crop_scale", "0 < min <= max <= 1", repr(crop_scale), "Use e.g. (0.3, 1.0)")
        if not 0 < gain[0] <= gain[1]:
            raise input_error("gain", "0 < min <= max", repr(gain), "Use e.g. (0.7, 1.3)")
        if not 0 <= blur_p <= 1 or blur_sigma < 0 or noise < 0:
            raise input_error("blur_p / blur_sigma / noise", "a probability and two non-negative numbers",
                              repr((blur_p, blur_sigma, noise)), "Use e.g. 0.5, 1.0, 0.03")
        self.crop_scale, self.gain = (lo, hi), (float(gain[0]), float(gain[1]))
        self.blur_p, self.blur_sigma, self.noise = float(blur_p), float(blur_sigma), float(noise)

    def _crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * float(torch.rand(())))
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(torch.rand(()))
        ratio = math.exp(log_ratio)
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return top, left, ch, cw

    def view(self, img: torch.Tensor) -> torch.Tensor:
        """One augmented view of ``img`` ``(C, H, W)``."""
        h, w = img.shape[-2:]
        top, left, ch, cw = self._crop_box(h, w)
        out = TF.resized_crop(img, top, left, ch, cw, [h, w], interpolation=TF.InterpolationMode.BILINEAR,
                              antialias=True)
        if bool(torch.rand(()) < 0.5):
            out = out.flip(-1)
        if bool(torch.rand(()) < 0.5):
            out = out.flip(-2)
        k = int(torch.randint(0, 4, ()))
        if k and h == w:
            out = torch.rot90(out, k, dims=(-2, -1))
        out = out * (self.gain[0] + (self.gain[1] - self.gain[0]) * float(torch.rand(())))
        blur, sigma = bool(torch.rand(()) < self.blur_p), float(torch.rand(())) * self.blur_sigma
        if blur and sigma > 0.05:
            size = 2 * math.ceil(2 * sigma) + 1
            out = TF.gaussian_blur(out, [size, size], [sigma, sigma])
        std = float(torch.rand(())) * self.noise
        noise = torch.randn(out.shape, generator=None) * std  # drawn on CPU: the same on every device
        return (out + noise.to(out.device, out.dtype)).clamp(0.0, 1.0)

    def __call__(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.dim() != 4:
            raise input_error("batch for two views", "shape (N, C, H, W)", str(tuple(batch.shape)),
                              "Pass a batch of images")
        first = torch.stack([self.view(img) for img in batch])
        second = torch.stack([self.view(img) for img in batch])
        return first, second

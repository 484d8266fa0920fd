"""Sliding-window inference of a supervised segmentation baseline: blended window logits of a slice, and
semantic labels of a whole volume slice by slice.

Windows of the model's ``img_size`` overlap; each window's logits are weighted by :func:`window_weight`
(highest in the window's centre, where the model sees the most context) and averaged, so seams between
windows do not show. The slice is padded so that every pixel lies inside a window with some margin.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from micromae.data.normalize import intensity_range, scale_intensity
from micromae.errors import input_error
from micromae.models.heads import SupervisedSegmenter
from micromae.runtime import eval_mode

WINDOW_WEIGHTS = ("gaussian", "linear", "uniform")


def window_weight(size: tuple[int, int], kind: str = "gaussian") -> torch.Tensor:
    """Blending weight of one window ``(Fh, Fw)``, positive everywhere, peak 1 in the centre.

    ``gaussian``: sigma = side/8 (nnU-Net's choice), floored at 1e-3; ``linear``: a tent falling to
    ``1/(side/2)`` at the edges; ``uniform``: ones.
    """
    if kind not in WINDOW_WEIGHTS:
        raise input_error("window weight", "one of " + ", ".join(WINDOW_WEIGHTS), repr(kind), "Use gaussian")
    profiles = []
    for n in size:
        centre = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        if kind == "gaussian":
            p = torch.exp(-0.5 * (centre / (n / 8)) ** 2)
        elif kind == "linear":
            p = 1 - centre.abs() / (n / 2)
        else:
            p = torch.ones(n)
        profiles.append(p)
    return (profiles[0][:, None] * profiles[1][None, :]).clamp(min=1e-3)


def _window_starts(n: int, f: int, stride: int) -> tuple[np.ndarray, int, int]:
    """Window starts along one padded axis, and the padding ``(before, after)`` of an axis of ``n`` pixels."""
    before = (f - stride) // 2
    count = max(1, -(-(before + n - f) // stride) + 1)
    after = (count - 1) * stride + f - before - n
    return np.arange(count) * stride, before, max(after, 0)


@torch.no_grad()
def predict_logits_slice(model: SupervisedSegmenter, image: Any, overlap: float = 0.5, batch_size: int = 64,
                         weight: str = "gaussian", pad_mode: str = "reflect", amp: bool = False) -> torch.Tensor:
    """Blended sliding-window logits of one 2-D slice.

    image: (H, W) intensities already scaled like the training crops (``[0, 1]``), numpy or tensor.
    Windows of the model's ``img_size`` step by ``round(F * (1 - overlap))``; the slice is padded
    (``reflect`` or ``constant`` 0) so every pixel lies inside a window with margin. Window logits are
    averaged with :func:`window_weight`. Returns float32 ``(n_cls, H, W)`` on the model's device.
    """
    if not 0.0 <= overlap < 1.0 or pad_mode not in ("reflect", "constant"):
        raise input_error("overlap / pad_mode", "a number in [0, 1) / reflect or constant",
                          f"{overlap} / {pad_mode!r}", "Use overlap=0.5, pad_mode=reflect")
    image = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if image.ndim != 2:
        raise input_error("slice", "a 2-D (H, W) image", f"shape {image.shape}", "Pass one slice of the volume")
    device = next(model.parameters()).device
    (fh, fw), (h, w) = model.img_size, image.shape
    strides = [max(1, round(f * (1 - overlap))) for f in (fh, fw)]
    (rows, top, bottom), (cols, left, right) = (_window_starts(n, f, s) for n, f, s in
                                                 zip((h, w), (fh, fw), strides))
    padded = np.pad(image.astype(np.float32), ((top, bottom), (left, right)), mode=pad_mode)
    ph, pw = padded.shape
    flat = torch.from_numpy(padded).to(device).reshape(-1)
    offsets = (torch.arange(fh, device=device)[:, None] * pw + torch.arange(fw, device=device)).reshape(-1)
    starts = torch.from_numpy((rows[:, None] * pw + cols[None, :]).reshape(-1)).to(device)  # (n_windows,)
    wmap = window_weight((fh, fw), weight).to(device).reshape(-1)  # (Fh*Fw,)
    acc = torch.zeros(model.num_classes, ph * pw, device=device)
    norm = torch.zeros(ph * pw, device=device)
    for chunk in torch.split(starts, batch_size):
        idx = (chunk[:, None] + offsets[None, :]).reshape(-1)  # (b*Fh*Fw,) flat pixel of each window pixel
        windows = flat[idx].reshape(len(chunk), 1, fh, fw)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            logits = model(windows).float()  # (b, n_cls, Fh, Fw)
        acc.index_add_(1, idx, (logits.reshape(len(chunk), model.num_classes, -1) * wmap)
                       .transpose(0, 1).reshape(model.num_classes, -1))
        norm.index_add_(0, idx, wmap.repeat(len(chunk)))
    out = (acc / norm.clamp(min=1e-12)).reshape(model.num_classes, ph, pw)
    return out[:, top:top + h, left:left + w]


def predict_proba_slice(model: SupervisedSegmenter, image: Any, **kwargs: Any) -> torch.Tensor:
    """Class probabilities ``(n_cls, H, W)``: softmax of :func:`predict_logits_slice` (same arguments)."""
    return predict_logits_slice(model, image, **kwargs).softmax(0)


def predict_volume(model: SupervisedSegmenter, volume: Any, axis: int = 0, fov: int | None = None,
                   overlap: float = 0.5, batch_size: int = 64, device: str | torch.device | None = None,
                   normalize: str = "dtype", percentiles: tuple[float, float] = (0.5, 99.5),
                   weight: str = "gaussian", pad_mode: str = "reflect", out: Any = None,
                   amp: bool = False) -> Any:
    """Semantic labels of a (Z, Y, X) volume, slice by slice along ``axis``, as uint8 (Z, Y, X).

    Intensities are scaled as in training (``normalize``, ``percentiles``: one range for the volume).
    fov: must equal the model's ``img_size`` when given. out: optional (Z, Y, X) array-like to write into
    (e.g. a Zarr array; returned); by default a new numpy array. device: default the model's.
    """
    if len(getattr(volume, "shape", ())) != 3 or axis not in (0, 1, 2):
        raise input_error("volume / axis", "a 3-D (Z, Y, X) volume / 0, 1 or 2",
                          f"shape {tuple(getattr(volume, 'shape', ()))} / {axis}", "Pass a 3-D stack")
    if fov is not None and (fov, fov) != tuple(model.img_size):
        raise input_error("fov", f"the model's img_size {model.img_size}", str(fov), "Leave fov=None")
    if model.num_classes > 256:
        raise input_error("model", "at most 256 classes for uint8 labels", str(model.num_classes), "Use fewer")
    if device is not None:
        model = model.to(device)
    lo, hi = intensity_range(volume, normalize, percentiles, name="volume to segment")
    out = np.empty(volume.shape, dtype=np.uint8) if out is None else out
    with eval_mode(model):
        for i in range(volume.shape[axis]):
            index = tuple(i if a == axis else slice(None) for a in range(3))
            image = scale_intensity(np.asarray(volume[index], dtype=np.float32), lo, hi)
            logits = predict_logits_slice(model, image, overlap=overlap, batch_size=batch_size, weight=weight,
                                          pad_mode=pad_mode, amp=amp)
            out[index] = logits.argmax(0).to(torch.uint8).cpu().numpy()
    return out


def pixel_accuracy(pred: np.ndarray, labels: np.ndarray, ignore_index: int = 255) -> float:
    """Share of labelled pixels (``labels != ignore_index``) where ``pred == labels``."""
    valid = labels != ignore_index
    return float((pred[valid] == labels[valid]).mean()) if valid.any() else float("nan")

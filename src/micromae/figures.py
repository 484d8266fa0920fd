"""Figures as PNG, one place for matplotlib: the Agg backend (works without a screen) is selected here once,
before ``pyplot`` is imported. Training, segmentation and evaluation take ``plt``, :func:`save_figure` and the
plot helpers from this module, and :func:`channels_to_rgb` to show multi-channel images in colour."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from micromae.io import atomic_path

matplotlib.use("Agg")  # pyplot picks its backend lazily, at the first figure: this switch comes in time

__all__ = ["plt", "save_figure", "plot_reconstructions", "plot_loss_curves", "channels_to_rgb", "display_scale"]

# display colour of channel i (R, G, B): blue, green, red, yellow, magenta, cyan, orange, then grey
_PALETTE = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0.5, 0]], np.float32)


def _composite(img: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> unclipped ``(H, W, 3)``: each channel times its display colour, summed."""
    img = np.asarray(img, np.float32)
    c = img.shape[0]
    if c == 1:
        colours = np.ones((1, 3), np.float32)
    elif c <= 3:
        colours = np.eye(3, dtype=np.float32)[:c]
    else:
        colours = np.concatenate([_PALETTE, np.full((max(0, c - len(_PALETTE)), 3), 0.5, np.float32)])[:c]
    return np.einsum("chw,ck->hwk", img, colours)


def channels_to_rgb(img: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``(C, H, W)`` -> ``(H, W, 3)`` in [0, 1]: grey for one channel, R, G, B for up to three, else a fixed
    colour per channel (DAPI blue, then green, red, yellow, magenta, cyan, orange, grey), summed; the composite
    is divided by ``scale`` and clipped."""
    return np.clip(_composite(img) / scale, 0, 1)


def display_scale(img: np.ndarray) -> float:
    """``scale`` for :func:`channels_to_rgb` so that a composite of many channels does not saturate: its
    99.5th percentile; 1 for up to three channels (shown as they are)."""
    if np.asarray(img).shape[0] <= 3:
        return 1.0
    return max(float(np.quantile(_composite(img), 0.995)), 1e-6)


def _to_display(img: np.ndarray) -> np.ndarray:
    """(C, H, W) → (H, W) grey or (H, W, 3) RGB in [0, 1] (first three channels mapped to R, G, B)."""
    img = np.asarray(img, dtype=np.float32)
    if img.shape[0] == 1:
        return np.clip(img[0], 0, 1)
    rgb = np.zeros((3, *img.shape[1:]), np.float32)
    rgb[: min(3, img.shape[0])] = img[:3]
    return np.clip(np.moveaxis(rgb, 0, -1), 0, 1)


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` atomically as PNG and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_reconstructions(imgs: np.ndarray, mask_imgs: np.ndarray, recon: np.ndarray, path: str | Path,
                         title: str = "", max_rows: int = 6) -> Path:
    """Rows of (input, masked input, reconstruction with the visible patches pasted back, error on masked patches).

    imgs, recon: (N, C, H, W) in [0, 1]; mask_imgs: (N, 1, H, W), 1 where a patch was masked.
    """
    n = min(max_rows, imgs.shape[0])
    fig, axes = plt.subplots(n, 4, figsize=(8, 2.1 * n), squeeze=False)
    cols = ("input", "masked (encoder sees)", "reconstruction + visible", "|error| on masked")
    for i in range(n):
        m = mask_imgs[i]
        masked = imgs[i] * (1 - m) + 0.5 * m
        pasted = imgs[i] * (1 - m) + recon[i] * m
        error = np.abs(recon[i] - imgs[i]) * m
        for j, im in enumerate((imgs[i], masked, pasted, error)):
            ax = axes[i, j]
            ax.imshow(_to_display(im), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def plot_loss_curves(records: list[dict], path: str | Path, keys: tuple[str, ...] = ("loss",)) -> Path:
    """Loss (and other logged terms) against step from ``log.jsonl`` records."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)

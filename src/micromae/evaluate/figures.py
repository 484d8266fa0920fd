"""Figures people look at, as PNG (matplotlib, Agg backend: works without a screen)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from micromae.io import atomic_path  # noqa: E402


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

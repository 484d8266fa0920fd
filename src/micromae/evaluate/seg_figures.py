"""Figures of an unsupervised segmentation (MAESTER supplement Figs. S1–S2, slice overlays, k sweep), as PNG.

Every figure colours class ``i`` with ``class_colors(n)[i]`` so a class looks the same in all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Patch

from micromae.errors import input_error
from micromae.figures import plt, save_figure

UNASSIGNED_COLOR = (0.6, 0.6, 0.6, 1.0)


def class_colors(n: int) -> np.ndarray:
    """(n, 4) RGBA colours, one per class index: tab10 up to 10 classes, tab20 up to 20, then a hue circle."""
    if n <= 20:
        rgb = np.asarray(plt.get_cmap("tab10" if n <= 10 else "tab20").colors[:n], np.float64).reshape(n, 3)
        return np.column_stack([rgb, np.ones(n)])
    return plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    names = [f"class {i}" for i in range(n)] if class_names is None else [str(c) for c in class_names]
    if len(names) < n:
        raise input_error("class_names", f"at least {n} names (labels go up to {n - 1})", f"{len(names)}",
                          "Give one name per class label")
    return names


def _legend_handles(labels: Sequence[int], names: list[str], colors: np.ndarray) -> list[Patch]:
    return [Patch(color=colors[i] if i >= 0 else UNASSIGNED_COLOR, label=names[i] if i >= 0 else "unassigned")
            for i in labels]


def plot_confusion(matrix: Any, class_names_rows: Sequence[str], class_names_cols: Sequence[str],
                   path: str | Path, title: str = "", normalise: str | None = "row") -> Path:
    """Annotated heatmap of a (rows = reference, cols = predicted) confusion matrix.

    normalise: "row" (each reference class sums to 1: recall), "col" (each predicted class sums to 1:
    precision) or None (values as given). Normalising an already normalised matrix changes nothing.
    """
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.shape != (len(class_names_rows), len(class_names_cols)):
        raise input_error("confusion matrix", f"shape ({len(class_names_rows)}, {len(class_names_cols)}) "
                          "matching the row and column names", f"shape {m.shape}", "Pass matching names")
    if normalise not in ("row", "col", None):
        raise input_error("normalise", '"row", "col" or None', repr(normalise), "Pick one of them")
    if normalise is not None:
        s = m.sum(1 if normalise == "row" else 0, keepdims=True)
        m = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
    size = 1.0 + 0.6 * max(m.shape)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    vmax = 1.0 if normalise else max(m.max(), 1e-12)
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=vmax)
    for (i, j), v in np.ndenumerate(m):
        txt = f"{v:.2f}" if normalise or v != int(v) else f"{int(v)}"
        ax.text(j, i, txt, ha="center", va="center", fontsize=7, color="white" if v > 0.6 * vmax else "black")
    ax.set_xticks(range(m.shape[1]), list(class_names_cols), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(m.shape[0]), list(class_names_rows), fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("reference class")
    label = {"row": "normalised by row (recall)", "col": "normalised by column (precision)", None: "counts"}
    ax.set_title(f"{title}\n{label[normalise]}" if title else label[normalise], fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path)


def _embed_2d(x: np.ndarray, n_neighbors: int, seed: int) -> tuple[np.ndarray, str]:
    """(N, D) → (N, 2) with UMAP, or PCA when umap-learn cannot be imported."""
    try:
        import umap
    except ImportError:
        from sklearn.decomposition import PCA
        return PCA(n_components=2, random_state=seed).fit_transform(x), "PCA (umap-learn not available)"
    reducer = umap.UMAP(n_neighbors=min(n_neighbors, len(x) - 1), n_components=2, random_state=seed,
                        n_jobs=1)
    return reducer.fit_transform(x), "UMAP"


def plot_umap(embeddings: Any, ref_labels: Any, pred_labels: Any, class_names: Sequence[str] | None,
              path: str | Path, n_neighbors: int = 15, seed: int = 0, max_points: int = 50_000,
              title: str = "") -> Path:
    """Two scatter panels of a 2-D UMAP of token embeddings: coloured by reference class and by predicted class.

    embeddings: (N, D); ref_labels, pred_labels: (N,) class indices (pred after mapping; -1 = unassigned).
    More than ``max_points`` points are subsampled at random (seeded).
    """
    x = np.asarray(embeddings, np.float32)
    ref, pred = np.asarray(ref_labels).ravel(), np.asarray(pred_labels).ravel()
    if x.ndim != 2 or len(x) < 4 or ref.shape != (len(x),) or pred.shape != (len(x),):
        raise input_error("UMAP inputs", "embeddings (N, D) with N >= 4 and two label vectors of length N",
                          f"embeddings {x.shape}, labels {ref.shape} and {pred.shape}",
                          "Pass one reference and one predicted label per embedding")
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
        x, ref, pred = x[keep], ref[keep], pred[keep]
    xy, method = _embed_2d(x, n_neighbors, seed)
    names = _names(class_names, int(max(ref.max(), pred.max())) + 1)
    colors = class_colors(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, labels, what in zip(axes, (ref, pred), ("reference class", "predicted class")):
        present = np.unique(labels)
        for c in present:
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, lw=0, alpha=0.7,
                       color=colors[c] if c >= 0 else UNASSIGNED_COLOR)
        ax.legend(handles=_legend_handles(present.tolist(), names, colors), fontsize=7, markerscale=2,
                  loc="best", frameon=False)
        ax.set_title(f"coloured by {what}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title + ': ' if title else ''}{method} of {len(x)} embeddings", fontsize=10)
    return save_figure(fig, path)


def _to_unit(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, (1, 99))
    return np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)


def _overlay(grey: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float,
             skip: Sequence[int]) -> np.ndarray:
    """(Y, X) grey in [0, 1] and (Y, X) labels → (Y, X, 3) RGB with classes tinted (skipped/-1 left grey)."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    lut = np.vstack([colors[:, :3], np.zeros((1, 3))])  # index -1 → last row
    shown = (labels >= 0) & ~np.isin(labels, list(skip))
    tint = lut[np.where(labels >= 0, labels, len(colors))]
    rgb[shown] = (1 - alpha) * rgb[shown] + alpha * tint[shown]
    return rgb


def plot_overlays(image: Any, ref: Any, pred: Any, path: str | Path, slices: Sequence[int] | None = None,
                  class_names: Sequence[str] | None = None, alpha: float = 0.45,
                  skip_classes: Sequence[int] = (), title: str = "", slice_names: Sequence[Any] | None = None) -> Path:
    """Grid of z-slices: image, reference overlay, prediction overlay, with one fixed colour per class.

    image, ref, pred: (Z, Y, X) (pred: class indices after mapping, -1 = unassigned); slices: z indices
    (default three spread through the volume); skip_classes: labels left untinted (e.g. 0 = outside);
    slice_names: what to call each shown slice (default its index; e.g. the z of a slab cut from a volume).
    """
    image, ref, pred = np.asarray(image), np.asarray(ref), np.asarray(pred)
    if image.ndim != 3 or ref.shape != image.shape or pred.shape != image.shape:
        raise input_error("overlay inputs", "image, reference and prediction (Z, Y, X) of one shape",
                          f"{image.shape}, {ref.shape}, {pred.shape}", "Pass the same volume's arrays")
    z = image.shape[0]
    slices = list(slices) if slices is not None else sorted({int(round(f * (z - 1))) for f in (0.2, 0.5, 0.8)})
    if not slices or min(slices) < 0 or max(slices) >= z:
        raise input_error("slices", f"z indices in [0, {z})", f"{slices}", "Pick slices inside the volume")
    names = _names(class_names, int(max(ref.max(), pred.max())) + 1)
    colors = class_colors(len(names))
    fig, axes = plt.subplots(len(slices), 3, figsize=(9, 3.1 * len(slices)), squeeze=False)
    for row, s in enumerate(slices):
        grey = _to_unit(image[s])
        panels = (np.repeat(grey[..., None], 3, -1), _overlay(grey, ref[s], colors, alpha, skip_classes),
                  _overlay(grey, pred[s], colors, alpha, skip_classes))
        for col, (panel, name) in enumerate(zip(panels, ("image", "reference", "prediction"))):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}, z={s if slice_names is None else slice_names[row]}", fontsize=8)
    present = sorted((set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())) - set(skip_classes))
    fig.legend(handles=_legend_handles(present, names, colors), loc="lower center", ncol=min(6, len(present)),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_k_sweep(rows: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Mean Dice (solid) and mean IoU (dashed) against k for both mappings; rows from ``sweep_k_table``."""
    if not rows:
        raise input_error("k sweep", "at least one row", "none", "Evaluate at least one k first")
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, color in (("hungarian", "tab:blue"), ("majority", "tab:orange")):
        for metric, style in (("mean_dice", "-o"), ("mean_iou", "--s")):
            vals = [np.nan if r.get(f"{key}_{metric}") is None else r[f"{key}_{metric}"] for r in rows]
            ax.plot(ks, vals, style, color=color, ms=4, label=f"{key}: {metric.replace('_', ' ')}")
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("score")
    ax.set_xticks(ks)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "k sweep", fontsize=9)
    return save_figure(fig, path)

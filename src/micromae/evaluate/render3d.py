"""3-D rendering of a segmented volume (MAESTER supplement Figs. S3–S4), offscreen with matplotlib.

Each class becomes a surface from scikit-image's marching cubes on its binary mask (block-averaged first when
the volume is large), drawn with mplot3d's ``Poly3DCollection`` in the class's colour from
:func:`micromae.evaluate.seg_figures.class_colors`, seen from two directions side by side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.patches import Patch
from mpl_toolkits.mplot3d.art3d import Poly3DCollection
from skimage.measure import block_reduce, marching_cubes

from micromae.errors import input_error
from micromae.evaluate.seg_figures import class_colors
from micromae.figures import plt, save_figure


def class_fraction(labels: Any, cls: int, factor: int, slab: int = 64) -> np.ndarray:
    """(ceil(Z/f), ceil(Y/f), ceil(X/f)) fraction of each f×f×f block that is ``cls``, computed slab by slab.

    labels: (Z, Y, X) array or lazy array-like (zarr, h5py); only ``slab``·f slices are in memory at once.
    """
    z = labels.shape[0]
    rows = max(1, slab) * factor
    parts = []
    for z0 in range(0, z, rows):
        block = np.asarray(labels[z0:z0 + rows]) == cls
        parts.append(block_reduce(block, (factor,) * 3, np.mean, cval=0) if factor > 1 else block.astype(np.float32))
    return np.concatenate(parts, axis=0).astype(np.float32)


def class_surface(labels: Any, cls: int, spacing: Sequence[float] = (1.0, 1.0, 1.0), step_size: int = 2,
                  max_size: int = 128) -> tuple[np.ndarray, np.ndarray] | None:
    """Marching-cubes surface of class ``cls``: verts (V, 3) in (z, y, x) physical units, faces (F, 3); None if absent.

    Volumes larger than ``max_size`` along an axis are block-averaged by an integer factor first; the mask is
    padded by one block so surfaces close at the volume border.
    """
    factor = max(1, math.ceil(max(labels.shape) / max_size))
    frac = np.pad(class_fraction(labels, cls, factor), 1)
    peak = float(frac.max())
    if peak <= 0:
        return None
    scale = np.asarray(spacing, np.float64) * factor
    try:
        verts, faces, _, _ = marching_cubes(frac, level=min(0.5, peak / 2), spacing=tuple(scale),
                                            step_size=step_size, allow_degenerate=False)
    except (RuntimeError, ValueError):  # nothing left at this step size
        return None
    # padded block index → centre of the block in the original voxel grid, in physical units
    verts = verts - scale + np.asarray(spacing) * (factor - 1) / 2
    return verts, faces


def _surface_within(labels: Any, cls: int, spacing: Sequence[float], step_size: int, max_size: int,
                    max_faces: int, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A class surface of at most ``max_faces`` triangles: coarser marching-cubes steps first (up to 8), then a
    seeded random subset of faces."""
    surf = class_surface(labels, cls, spacing, step_size, max_size)
    step = step_size
    while surf is not None and len(surf[1]) > max_faces and step < 8:
        step += 1
        coarser = class_surface(labels, cls, spacing, step, max_size)
        if coarser is None:  # the class vanishes at this step: keep the finer surface
            break
        surf = coarser
    if surf is not None and len(surf[1]) > max_faces:
        keep = np.sort(np.random.default_rng(seed).choice(len(surf[1]), max_faces, replace=False))
        surf = (surf[0], surf[1][keep])
    return surf


def _draw(ax: Any, surfaces: dict[int, tuple[np.ndarray, np.ndarray]], colors: np.ndarray, alpha: float,
          extent: np.ndarray, view: tuple[float, float]) -> None:
    for cls, (verts, faces) in surfaces.items():
        tris = verts[faces][..., ::-1]  # (F, 3 vertices, (x, y, z))
        ax.add_collection3d(Poly3DCollection(tris, facecolors=colors[cls], alpha=alpha, linewidths=0,
                                             shade=True))
    ax.set_xlim(0, extent[2])
    ax.set_ylim(0, extent[1])
    ax.set_zlim(0, extent[0])
    ax.set_box_aspect(tuple(extent[::-1]))
    ax.view_init(elev=view[0], azim=view[1])
    ax.set_xlabel("x", fontsize=8)
    ax.set_ylabel("y", fontsize=8)
    ax.set_zlabel("z", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.set_title(f"elevation {view[0]:g}°, azimuth {view[1]:g}°", fontsize=8)


def render_volume_surfaces(labels: Any, path: str | Path, class_names: Sequence[str] | None = None,
                           classes: Sequence[int] | None = None, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                           step_size: int = 2, max_faces: int = 40_000, max_size: int = 128,
                           views: Sequence[tuple[float, float]] = ((25.0, -60.0), (25.0, 120.0)),
                           alpha: float = 0.55, title: str = "", seed: int = 0) -> Path:
    """Per-class surfaces of a (Z, Y, X) label volume, two views side by side, one colour per class, a legend.

    classes: label values to draw (default: every label present except 0, the background/outside); absent
    classes are skipped. max_faces: triangles drawn in all, shared between the classes (a class over its share
    is remeshed with a coarser marching-cubes step, then thinned at random, seeded).
    """
    if len(getattr(labels, "shape", ())) != 3:
        raise input_error("labels to render", "a (Z, Y, X) label volume", f"shape {getattr(labels, 'shape', None)}",
                          "Pass a 3-D segmentation")
    if len(spacing) != 3 or min(spacing) <= 0 or step_size < 1:
        raise input_error("spacing/step_size", "3 positive voxel sizes and step_size >= 1",
                          f"{tuple(spacing)}, {step_size}", "Fix the rendering options")
    if classes is None:
        classes = [int(c) for c in np.unique(np.asarray(labels)) if c != 0]
    n = max([len(class_names or ()), 1] + [int(c) + 1 for c in classes])
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(n)]
    names += [f"class {i}" for i in range(len(names), n)]
    colors = class_colors(len(names))
    per_class = max(1, max_faces // max(1, len(classes)))
    surfaces = {}
    for c in classes:
        surf = _surface_within(labels, int(c), spacing, step_size, max_size, per_class, seed)
        if surf is not None:
            surfaces[int(c)] = surf
    extent = np.asarray(labels.shape, np.float64) * np.asarray(spacing, np.float64)
    fig = plt.figure(figsize=(5.2 * len(views), 5.2))
    for i, view in enumerate(views):
        ax = fig.add_subplot(1, len(views), i + 1, projection="3d")
        _draw(ax, surfaces, colors, alpha, extent, view)
        if not surfaces:
            ax.text2D(0.5, 0.5, "no class to draw", transform=ax.transAxes, ha="center")
    handles = [Patch(color=colors[c], label=names[c]) for c in surfaces]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(title or "3-D rendering of the segmentation", fontsize=10)
    return save_figure(fig, path)

"""``micromae measure``: split each named class into 3-D connected instances and measure them, slab by slab.

Instances are the 26-connected components of each class of ``labels/classes`` (written by ``micromae
label-clusters``). The volume is read in Z slabs: each slab is labelled with ``scipy.ndimage.label``, and its
components are joined to those of the previous slab's last plane that they touch (a disjoint set), so an
object crossing a slab border is one instance, and memory is bounded by one slab. Per instance: voxel count,
volume, bounding box, centroid, surface area (``skimage.measure.marching_cubes`` +
``mesh_surface_area``) and, with a cell mask or instance volume, the cell holding most of its voxels.

The surface is computed exactly as on the whole volume: the mesh is a sum over cubes of 2x2x2 voxels, and
each slab meshes the cubes between its planes and the plane before it (the previous slab's last, or an
empty plane), the last slab also those after its last plane; the pieces of one object inside a slab are
meshed together (they share cubes), pieces joined only by a later slab share none.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.cluster.hierarchy import DisjointSet
from skimage.measure import marching_cubes, mesh_surface_area

from micromae.errors import at_least, input_error
from micromae.evaluate.classes import class_names_of, classes_volume, open_ome_segmentation
from micromae.io import check_output, open_volume, write_files_atomically
from micromae.io.omezarr import slab_planes, store_voxel_size
from micromae.runtime import say

CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: faces, edges and corners
COLUMNS = ("class", "id", "voxels", "volume", "surface_area", "bbox_z0", "bbox_y0", "bbox_x0", "bbox_z1",
           "bbox_y1", "bbox_x1", "centroid_z", "centroid_y", "centroid_x", "cell", "unit")
SUMMARY_COLUMNS = ("class", "count", "total_volume", "mean_volume", "volume_fraction", "fraction_of", "unit")


class _Stats:
    """Per component id (1-based, global) accumulators, grown slab by slab."""

    def __init__(self) -> None:
        self.cls: list[np.ndarray] = []
        self.voxels: list[np.ndarray] = []
        self.sums: list[np.ndarray] = []
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.area: dict[int, float] = {}
        self.cells: dict[tuple[int, int], int] = {}

    def add(self, start: int, cls: np.ndarray, local: np.ndarray, n: int, z0: int, cells: np.ndarray | None
            ) -> None:
        flat = local.ravel()
        counts = np.bincount(flat, minlength=n + 1)[1:]
        grids = np.indices(local.shape)
        grids[0] += z0
        sums = np.stack([np.bincount(flat, weights=g.ravel(), minlength=n + 1)[1:] for g in grids], 1)
        lo = np.zeros((n, 3), np.int64)
        hi = np.zeros((n, 3), np.int64)
        for i, sl in enumerate(ndimage.find_objects(local, max_label=n)):
            lo[i] = [s.start for s in sl]
            hi[i] = [s.stop for s in sl]
        lo[:, 0] += z0
        hi[:, 0] += z0
        cls_of = np.zeros(n + 1, np.int64)
        cls_of[flat] = cls.ravel()  # every voxel of a component has its class
        self.cls.append(cls_of[1:])
        self.voxels.append(counts)
        self.sums.append(sums)
        self.lo.append(lo)
        self.hi.append(hi)
        if cells is not None and n:
            inside = flat > 0
            base = int(cells.max()) + 1
            values, freq = np.unique(flat[inside].astype(np.int64) * base + cells.ravel()[inside],
                                     return_counts=True)
            for v, f in zip(values.tolist(), freq.tolist()):
                pair = (start + v // base - 1, v % base)
                self.cells[pair] = self.cells.get(pair, 0) + f


def _join_planes(prev: np.ndarray, prev_cls: np.ndarray, cur: np.ndarray, cur_cls: np.ndarray,
                 sets: DisjointSet) -> None:
    """Union the ids of 26-neighbours of the same class across two consecutive planes."""
    h, w = cur.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a = prev[max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)]
            ac = prev_cls[max(0, dy): h + min(0, dy), max(0, dx): w + min(0, dx)]
            b = cur[max(0, -dy): h + min(0, -dy), max(0, -dx): w + min(0, -dx)]
            bc = cur_cls[max(0, -dy): h + min(0, -dy), max(0, -dx): w + min(0, -dx)]
            touch = (a > 0) & (b > 0) & (ac == bc)
            if touch.any():
                for x, y in np.unique(np.stack([a[touch], b[touch]], 1), axis=0).tolist():
                    sets.merge(x, y)


def _surface(crop: np.ndarray, sets: DisjointSet, spacing: tuple[float, float, float], area: dict[int, float]
             ) -> None:
    """Add the mesh area of every object in ``crop`` (planes, ids; its cubes belong to this slab) to ``area``
    (keyed by the object's current root)."""
    ids = np.unique(crop)
    ids = ids[ids > 0]
    if not len(ids):
        return
    roots = np.asarray([sets[int(i)] for i in ids], np.int64)
    lut_roots, compact = np.unique(roots, return_inverse=True)
    lookup = np.zeros(int(ids.max()) + 1, np.int64)
    lookup[ids] = compact + 1
    merged = lookup[crop]
    depth, height, width = merged.shape
    for index, sl in enumerate(ndimage.find_objects(merged)):
        if sl is None:
            continue
        z = slice(max(sl[0].start - 1, 0), min(sl[0].stop + 1, depth))
        y = slice(max(sl[1].start - 1, 0), min(sl[1].stop + 1, height))
        x = slice(max(sl[2].start - 1, 0), min(sl[2].stop + 1, width))
        mask = (merged[z, y, x] == index + 1).astype(np.float32)
        mask = np.pad(mask, ((0, 0), (int(y.start == 0), int(y.stop == height)), (int(x.start == 0),
                                                                                   int(x.stop == width))))
        if mask.shape[0] < 2:
            continue
        verts, faces, _, _ = marching_cubes(mask, level=0.5, spacing=spacing)
        root = int(lut_roots[index])
        area[root] = area.get(root, 0.0) + float(mesh_surface_area(verts, faces))


def _open_cells(cells: str | Path | None, shape: tuple[int, ...]) -> Any:
    if cells is None:
        return None
    vol = open_volume(cells, check=False)
    if tuple(vol.shape) != shape:
        raise input_error(f"--cells '{cells}'", f"a volume of the segmentation's shape {shape}",
                          f"shape {tuple(vol.shape)}", "Pass the cell mask or cell instances of this volume")
    if np.dtype(vol.dtype).kind not in "biu":
        raise input_error(f"--cells '{cells}'", "integer cell ids (a mask: nonzero inside; or instances)",
                          f"{vol.dtype} values", "Pass a label volume, not an image")
    return vol


def measure_instances(classes: Any, names: dict[int, str], voxel_size: tuple[float, float, float] | None = None,
                      cells: Any = None, slab: int | None = None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Instances of each named class of ``classes`` (Z, Y, X; ``0`` = unnamed) and the per-class summary.

    ``cells``: a cell mask or instance volume of the same shape (each instance gets the cell id holding most
    of its voxels, ``0`` outside; the summary's volume fraction is of the cells), else the fraction is of
    the whole volume. Lengths are in micrometres with ``voxel_size``, in voxels without. ``slab``: Z planes
    read at a time (default: up to 16, fewer for large planes; about 60 bytes of memory per slab voxel).
    """
    shape = tuple(int(s) for s in classes.shape)
    slab = slab_planes(shape, 64) if slab is None else slab
    at_least("--slab", slab, 1)
    spacing = tuple(float(v) for v in voxel_size) if voxel_size is not None else (1.0, 1.0, 1.0)
    sets = DisjointSet()
    stats = _Stats()
    next_id = 1
    prev = np.zeros(shape[1:], np.int64)
    prev_cls = np.zeros(shape[1:], np.int64)
    class_voxels: dict[int, int] = {}
    inside_total = 0
    for z0 in range(0, shape[0], slab):
        z1 = min(shape[0], z0 + slab)
        cls = np.asarray(classes[z0:z1]).astype(np.int64)
        cell = None if cells is None else np.asarray(cells[z0:z1]).astype(np.int64)
        ids = np.zeros(cls.shape, np.int64)
        start = next_id
        for c in np.unique(cls):
            if c == 0 or int(c) not in names:
                continue
            lab, n = ndimage.label(cls == c, structure=CONNECTIVITY)
            ids[lab > 0] = lab[lab > 0] + next_id - 1
            next_id += n
        for i in range(start, next_id):
            sets.add(i)
        local = np.where(ids > 0, ids - start + 1, 0)
        stats.add(start, cls, local, next_id - start, z0, cell)
        _join_planes(prev, prev_cls, ids[0], cls[0], sets)
        planes = [prev[None], ids]
        if z1 == shape[0]:
            planes.append(np.zeros((1, *shape[1:]), np.int64))
        _surface(np.concatenate(planes), sets, spacing, stats.area)
        weights = cell != 0 if cell is not None else None
        for c, count in zip(*np.unique(cls if weights is None else cls[weights], return_counts=True)):
            class_voxels[int(c)] = class_voxels.get(int(c), 0) + int(count)
        inside_total += int(cls.size if weights is None else weights.sum())
        prev, prev_cls = ids[-1], cls[-1]
    return _tables(stats, sets, next_id, names, spacing, voxel_size is not None, class_voxels, inside_total,
                   cells is not None)


def _tables(stats, sets, next_id, names, spacing, physical, class_voxels, inside_total, with_cells):
    unit = "micrometer" if physical else "voxel"
    n = next_id - 1
    rows: list[dict[str, Any]] = []
    if n:
        cls = np.concatenate(stats.cls)
        voxels = np.concatenate(stats.voxels)
        sums = np.concatenate(stats.sums)
        lo = np.concatenate(stats.lo)
        hi = np.concatenate(stats.hi)
        roots = np.asarray([sets[i] for i in range(1, n + 1)], np.int64)
        order, inverse = np.unique(roots, return_inverse=True)
        m = len(order)
        first = np.full(m, n + 1)
        np.minimum.at(first, inverse, np.arange(1, n + 1))  # numbered in scan order (Z, then Y, then X)
        obj_vox = np.bincount(inverse, weights=voxels, minlength=m)
        obj_sums = np.stack([np.bincount(inverse, weights=sums[:, a], minlength=m) for a in range(3)], 1)
        obj_lo = np.full((m, 3), np.iinfo(np.int64).max)
        obj_hi = np.zeros((m, 3), np.int64)
        np.minimum.at(obj_lo, inverse, lo)
        np.maximum.at(obj_hi, inverse, hi)
        obj_cls = np.zeros(m, np.int64)
        obj_cls[inverse] = cls
        area = np.zeros(m)
        for root, a in stats.area.items():
            area[np.searchsorted(order, sets[root])] += a
        cell_votes: dict[int, dict[int, int]] = {}
        for (gid, cell), count in stats.cells.items():
            obj = int(inverse[gid - 1])
            votes = cell_votes.setdefault(obj, {})
            votes[cell] = votes.get(cell, 0) + count
        voxel_volume = float(np.prod(spacing))
        per_class: dict[int, int] = {}
        for obj in sorted(range(m), key=lambda o: (obj_cls[o], first[o])):
            c = int(obj_cls[obj])
            per_class[c] = per_class.get(c, 0) + 1
            centroid = obj_sums[obj] / obj_vox[obj] * np.asarray(spacing)
            votes = cell_votes.get(obj, {})
            cell = min(votes, key=lambda k: (-votes[k], k)) if votes else 0
            rows.append({"class": names[c], "id": per_class[c], "voxels": int(obj_vox[obj]),
                         "volume": float(obj_vox[obj]) * voxel_volume, "surface_area": float(area[obj]),
                         **{f"bbox_{a}0": int(obj_lo[obj][i]) for i, a in enumerate("zyx")},
                         **{f"bbox_{a}1": int(obj_hi[obj][i]) for i, a in enumerate("zyx")},
                         **{f"centroid_{a}": float(centroid[i]) for i, a in enumerate("zyx")},
                         "cell": int(cell) if with_cells else "", "unit": unit})
    summary = []
    for c, name in sorted(names.items()):
        mine = [r for r in rows if r["class"] == name]
        total = sum(r["volume"] for r in mine)
        summary.append({"class": name, "count": len(mine), "total_volume": total,
                        "mean_volume": total / len(mine) if mine else 0.0,
                        "volume_fraction": class_voxels.get(c, 0) / inside_total if inside_total else 0.0,
                        "fraction_of": "cells" if with_cells else "volume", "unit": unit})
    return rows, summary


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def summary_path(out: str | Path) -> Path:
    """``organelles_summary.csv`` beside ``organelles.csv``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_summary{out.suffix or '.csv'}")


def run_measure(seg: str | Path, out: str | Path, cells: str | Path | None = None, slab: int | None = None,
                overwrite: bool = False) -> dict[str, Path]:
    """``micromae measure``: one CSV row per instance of each named class of the OME-Zarr segmentation
    ``seg`` (``out``), and the per-class summary beside it (``<stem>_summary.csv``); both appear together
    or not at all. Returns ``{"instances": path, "summary": path}``."""
    out = check_output(out, overwrite=overwrite, what="--out", suffixes=(".csv",), folder=False)
    summary = check_output(summary_path(out), overwrite=overwrite, what="--out (its summary)", folder=False)
    root = open_ome_segmentation(seg)
    names = class_names_of(root)
    classes = classes_volume(root)
    cell_vol = _open_cells(cells, tuple(int(s) for s in classes.shape))
    rows, table = measure_instances(classes, names, store_voxel_size(root), cell_vol, slab)
    written = write_files_atomically(out.parent, {}, texts={out.name: _csv(rows, COLUMNS),
                                                            summary.name: _csv(table, SUMMARY_COLUMNS)})
    say(f"measured {len(rows)} instances of {len(names)} classes: {written[out.name]}, {written[summary.name]}")
    return {"instances": written[out.name], "summary": written[summary.name]}

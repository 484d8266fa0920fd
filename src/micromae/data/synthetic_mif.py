"""Synthetic multiplex immunofluorescence images with exact ground truth, for testing DAMA (docs/METHODS.md, Data).

An image has the seven channels of the DAMA rat-brain panel (``CHANNELS``) and cells of five types
(``CELL_TYPES``). It is built in three steps (:mod:`micromae.data.synthetic_mif_render`):

1. **Layout.** Cell bodies are warped ellipses, sized and shaped per type (neurons large, oligodendrocytes
   small and round, microglia elongated, endothelial cells long and thin), placed by dart throwing so that
   neighbours may overlap by up to ``overlap`` of their radii. A random z-order decides which cell is on
   top where two overlap; each cell keeps its largest visible piece, and cells less than ``min_visible``
   visible are dropped. So the instance map has one id per pixel, each id one 4-connected region, and many
   cells touch: instance segmentation is not trivial.
2. **Marker patterns.** Every nucleus (off-centre in its soma) has DAPI and Histones, with a chromatin
   texture per type scaled to the same mean, so the nuclear channels do not tell the type by intensity.
   Each type expresses its marker with its own spatial pattern: NeuN nuclear and perinuclear with a
   proximal dendrite (neuron); S100 cytoplasmic with thick branching processes (astrocyte); Olig2 nuclear
   only (oligodendrocyte); Iba1 in the soma and thin, long, ramified processes (microglia); RECA1 as a
   membrane ring plus the two walls of a capillary running through the cell (endothelial). Expression is
   lognormal per cell (``expression_sigma``); every cell also carries the other markers at an off-target
   level (``off_target``). Signals of overlapping cells add up.
3. **Image formation.** Smooth off-target tissue background per channel, spectral bleed-through between
   neighbouring channels, Gaussian blur (wider for later channels), Poisson (shot) plus Gaussian (read)
   noise, and a different dynamic range and offset per channel (plus a per-image gain), to uint16.

Classes therefore differ by marker *and* by shape and context (processes, vessels, nuclear texture). A
512×512×7 image with ~100 cells takes well under a second on 2 cores.

**Realism presets** (``realism=``, :data:`REALISM`; ``micromae data synth-mif --realism``). ``default`` is
the fields' defaults, kept bit for bit (tests and earlier benchmarks use it): sparse cells with tight, separate
marker levels, so a cell's channel means alone tell its type (logistic regression on 32-px crop means 0.94).
``paper`` makes crops like the DAMA paper's, where "only the central cell is what we are interested in":
dense tissue (``density`` 12 per 100×100: neighbours' somata cover about a third of a 64-px crop, most of
another type, their processes and blur bleeding in), wide and overlapping marker levels (``expression_sigma``
0.6; 30 % of the cells dim positives, ``dim_fraction`` 0.3, at 0.1–0.4 of their level; off-target markers
at 0.15 with ``off_target_sigma`` 0.8, so some are bright), stronger bleed-through (0.1) and per-image gain
(``gain_sigma`` 0.3). The type then lies in the spatial pattern of the central cell's marker (nuclear,
cytoplasmic, ring, processes) and in its morphology more than in its intensity: the channel means of a crop
fall far below 0.70 (``benchmarks/mif_calibration.py``, BENCHMARKS.md "A multiplex benchmark with room above
random init"). :func:`extract_cell_crops` cuts the
classification set (crops centred on cells, type as label), :func:`mif_to_coco` writes COCO instance
segmentation, and :func:`write_mif_dataset` writes a whole data set.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from pycocotools import mask as mask_utils
from scipy import ndimage as ndi

from micromae.data.synthetic_mif_render import draw_cells, form_image, paint_cells, resolve_instances
from micromae.config import options_from_kwargs
from micromae.errors import input_error
from micromae.io import atomic_path, write_tiff

__all__ = [
    "CELL_TYPES",
    "CHANNELS",
    "MIFOptions",
    "SyntheticMIF",
    "extract_cell_crops",
    "REALISM",
    "make_mif_image",
    "mif_to_coco",
    "realism_options",
    "write_mif_dataset",
    "write_mif_pools",
]

CHANNELS = ("DAPI", "Histones", "NeuN", "S100", "Olig2", "Iba1", "RECA1")
CELL_TYPES = ("neuron", "astrocyte", "oligodendrocyte", "microglia", "endothelial")
MIN_SHAPE = (32, 32)
_FIX = "See the MIFOptions docstring for the meaning and range of each option"


@dataclass(frozen=True)
class MIFOptions:
    """Options of :func:`make_mif_image`. Lengths in pixels, signal levels relative to a cell's marker (1).

    ``density``: cells per 100×100 pixels when ``n_cells`` is None. ``soma_radius``: range of the soma's
    equal-area radius before the per-type factor (0.8 oligodendrocyte ... 1.2 neuron).
    ``nucleus_fraction``: nucleus radius over soma radius (same range for every type). ``overlap``: how far
    two somata may overlap, as a fraction of the sum of their radii. ``min_visible``: cells less visible
    than this (after occlusion) are dropped. ``expression_sigma``: lognormal sigma of per-cell levels;
    ``off_target``: mean level of the markers a cell does not express; ``background``: tissue background
    level; ``bleed``: mean fraction of each neighbouring channel bleeding through; ``blur_sigma``: optical
    blur of the first channel; ``photons``: photons per unit level; ``read_noise``: Gaussian std in level
    units; ``noise`` scales both (0: noise-free). ``dynamic_range`` / ``offset``: grey values of level 1
    above the offset, and the offset, per channel.
    """

    n_cells: int | None = None
    density: float = 5.0
    soma_radius: tuple[float, float] = (10.0, 13.0)
    nucleus_fraction: tuple[float, float] = (0.5, 0.65)
    overlap: float = 0.3
    min_visible: float = 0.5
    expression_sigma: float = 0.35
    off_target: float = 0.05
    off_target_sigma: float | None = None
    dim_fraction: float = 0.0
    dim_level: tuple[float, float] = (0.1, 0.4)
    gain_sigma: float = 0.15
    background: float = 0.05
    bleed: float = 0.04
    blur_sigma: float = 1.0
    photons: float = 150.0
    read_noise: float = 0.004
    noise: float = 1.0
    dynamic_range: tuple[int, ...] = (15000, 10000, 8000, 6000, 10000, 4000, 7000)
    offset: tuple[int, ...] = (400, 300, 350, 250, 300, 350, 280)

    def validate(self) -> None:
        """Raise MicromaeInputError on out-of-range options."""
        for name in ("overlap", "min_visible", "off_target", "bleed", "dim_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise input_error(f"option {name}", "a number in [0, 1)", repr(getattr(self, name)), _FIX)
        for name in ("density", "photons"):
            if not getattr(self, name) > 0:
                raise input_error(f"option {name}", "a positive number", repr(getattr(self, name)), _FIX)
        for name in ("expression_sigma", "background", "blur_sigma", "read_noise", "noise", "gain_sigma"):
            if not getattr(self, name) >= 0:
                raise input_error(f"option {name}", "a number >= 0", repr(getattr(self, name)), _FIX)
        if self.off_target_sigma is not None and not self.off_target_sigma >= 0:
            raise input_error("option off_target_sigma", "None or a number >= 0", repr(self.off_target_sigma), _FIX)
        for name in ("soma_radius", "nucleus_fraction", "dim_level"):
            lo, hi = getattr(self, name)
            bounded = name in ("nucleus_fraction", "dim_level")
            if not 0 < lo <= hi or (bounded and hi >= 1):
                raise input_error(f"option {name}", "a range (low, high) with 0 < low <= high"
                                  + (" < 1" if bounded else ""), repr(getattr(self, name)), _FIX)
        if self.n_cells is not None and (int(self.n_cells) != self.n_cells or self.n_cells < 1):
            raise input_error("option n_cells", "None or an integer >= 1", repr(self.n_cells), _FIX)
        for name in ("dynamic_range", "offset"):
            if len(getattr(self, name)) != len(CHANNELS):
                raise input_error(f"option {name}", f"{len(CHANNELS)} numbers, one per channel {CHANNELS}",
                                  repr(getattr(self, name)), _FIX)


@dataclass
class SyntheticMIF:
    """A synthetic multiplex image and its ground truth.

    Attributes:
        image: (C, H, W) uint16, channels named by ``channel_names``.
        instances: (H, W) uint32 cell ids 1..n, 0 = background; one 4-connected region per id.
        cell_types: (n + 1,) int64, ``cell_types[id]`` indexes ``cell_type_names``; entry 0 (background) is -1.
        centroids: (n + 1, 2) float64 (y, x) centroid of each cell's instance mask; row 0 is NaN.
        channel_names: names of the channels.
        cell_type_names: names of the cell types.
    """

    image: np.ndarray
    instances: np.ndarray
    cell_types: np.ndarray
    centroids: np.ndarray
    channel_names: tuple[str, ...] = CHANNELS
    cell_type_names: tuple[str, ...] = CELL_TYPES

    @property
    def n_cells(self) -> int:
        return len(self.cell_types) - 1

    def cell_means(self) -> np.ndarray:
        """(n, C) float64 mean of each channel over each cell's instance mask (row i is cell id i + 1)."""
        ids = self.instances.ravel().astype(np.int64)
        counts = np.bincount(ids, minlength=self.n_cells + 1)[1:]
        sums = np.stack([np.bincount(ids, weights=ch.ravel().astype(np.float64), minlength=self.n_cells + 1)[1:]
                         for ch in self.image], axis=1)
        return sums / np.maximum(counts, 1)[:, None]


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2 or any(int(s) != s for s in shape):
        raise input_error("synthetic multiplex shape", "2 integers (H, W)", repr(shape), "Pass e.g. shape=(512, 512)")
    if any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise input_error("synthetic multiplex shape", f"at least {MIN_SHAPE}", repr(shape), "Use a larger image")
    return int(shape[0]), int(shape[1])


REALISM: dict[str, dict] = {
    "default": {},
    "paper": {"density": 12.0, "expression_sigma": 0.6, "off_target": 0.15, "off_target_sigma": 0.8,
              "dim_fraction": 0.3, "bleed": 0.1, "gain_sigma": 0.3},
}
"""Named option sets of :func:`make_mif_image` (``realism=``): ``default`` (the fields' defaults: sparse
cells, tight and separate marker levels) and ``paper`` (crops like the DAMA paper's, see the module
docstring). Options passed by name override the preset's."""


def realism_options(realism: str) -> dict:
    """The :class:`MIFOptions` values of the preset ``realism`` (a key of :data:`REALISM`)."""
    if realism not in REALISM:
        raise input_error("realism", f"one of {sorted(REALISM)}", repr(realism),
                          "Pass realism='default' or realism='paper' (--realism on the command line)")
    return dict(REALISM[realism])


def _options(options: dict) -> MIFOptions:
    return options_from_kwargs(MIFOptions, options, "make_mif_image")


def make_mif_image(shape: Sequence[int] = (512, 512), seed: int | Sequence[int] = 0, n_cells: int | None = None,
                   realism: str = "default", **options) -> SyntheticMIF:
    """Generate a seeded synthetic multiplex image (see the module docstring for what it contains).

    Args:
        shape: (H, W), at least (32, 32).
        seed: seed (or sequence of ints) of ``np.random.default_rng``; same seed and options, same image.
        n_cells: cells to place (None: ``density`` per 100×100 pixels). Cells that find no room or end up
            mostly hidden are dropped, so the image may hold a few less. Types are balanced.
        realism: a preset of :data:`REALISM` (``default`` or ``paper``) that ``options`` start from.
        **options: fields of :class:`MIFOptions` (override the preset's).
    """
    shape = _check_shape(shape)
    opts = _options({**realism_options(realism), **options, "n_cells": n_cells})
    rng = np.random.default_rng(seed)
    count = opts.n_cells if opts.n_cells is not None else max(1, round(opts.density * shape[0] * shape[1] / 1e4))
    cells, instances = resolve_instances(rng, draw_cells(rng, shape, int(count), opts), shape, opts.min_visible)
    image = form_image(rng, paint_cells(rng, cells, shape, opts), opts)
    cell_types = np.array([-1] + [c.kind for c in cells], dtype=np.int64)
    centroids = np.full((len(cells) + 1, 2), np.nan)
    if cells:
        centroids[1:] = ndi.center_of_mass(np.ones(shape), instances, np.arange(1, len(cells) + 1))
    return SyntheticMIF(image, instances, cell_types, centroids)


def extract_cell_crops(mif: SyntheticMIF, size: int = 100,
                       pad_mode: str = "constant") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Square crops centred on every cell: the classification set.

    Crop ``i`` covers rows ``round(cy) - size // 2`` to ``round(cy) - size // 2 + size`` (same for x), so
    the cell's centroid falls on pixel ``(size // 2, size // 2)``; parts outside the image are padded by
    ``np.pad(mode=pad_mode)`` (``"constant"``: zeros). Other cells in the crop stay: they are context.

    Returns:
        crops (N, C, size, size) uint16, labels (N,) int64 indexes of ``CELL_TYPES``, ids (N,) int64 cell ids.
    """
    if int(size) != size or size < 1:
        raise input_error("crop size", "an integer >= 1", repr(size), "Pass e.g. size=100")
    size = int(size)
    ids = np.arange(1, mif.n_cells + 1)
    padded = np.pad(mif.image, ((0, 0), (size, size), (size, size)), mode=pad_mode)
    crops = np.empty((len(ids), mif.image.shape[0], size, size), dtype=mif.image.dtype)
    for n, cell in enumerate(ids):
        top, left = (np.round(mif.centroids[cell]).astype(int) - size // 2 + size)
        crops[n] = padded[:, top:top + size, left:left + size]
    return crops, mif.cell_types[ids].copy(), ids


def mif_to_coco(instances_list: Sequence[np.ndarray], file_names: Sequence[str], category_name: str = "cell",
                cell_types_list: Sequence[np.ndarray] | None = None) -> dict:
    """COCO instance-segmentation dict for instance maps ``(H, W)`` (one per image; 0 = background).

    Every instance id becomes an annotation with an RLE ``segmentation`` (pycocotools, counts as str),
    ``bbox`` [x, y, w, h], ``area`` (pixels), ``iscrowd`` 0, category 1 (``category_name``), and
    ``instance_id``; with ``cell_types_list`` (arrays indexed by id, as ``SyntheticMIF.cell_types``) also
    ``cell_type`` (its name). Image and annotation ids start at 1.
    """
    if len(instances_list) != len(file_names):
        raise input_error("mif_to_coco", "one file name per instance map",
                          f"{len(instances_list)} maps and {len(file_names)} names", "Pass matching lists")
    images, annotations = [], []
    for image_id, (instances, name) in enumerate(zip(instances_list, file_names), start=1):
        instances = np.asarray(instances)
        if instances.ndim != 2 or instances.dtype.kind not in "iu":
            raise input_error(f"instance map of '{name}'", "a 2-D integer array (H, W)",
                              f"shape {instances.shape}, dtype {instances.dtype}", "Pass the instance ids per pixel")
        images.append({"id": image_id, "file_name": str(name), "height": int(instances.shape[0]),
                       "width": int(instances.shape[1])})
        for cell in np.unique(instances[instances > 0]):
            mask = np.asfortranarray((instances == cell).astype(np.uint8))
            rle = mask_utils.encode(mask)
            area = int(mask_utils.area(rle))
            if area != int(mask.sum()):
                raise RuntimeError(f"RLE of instance {cell} in '{name}' does not decode to its mask")
            segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
            annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                          "segmentation": segmentation,
                          "area": float(area), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                          "iscrowd": 0, "instance_id": int(cell)}
            if cell_types_list is not None:
                annotation["cell_type"] = CELL_TYPES[int(cell_types_list[image_id - 1][cell])]
            annotations.append(annotation)
    return {"info": {"description": "micromae synthetic multiplex immunofluorescence"},
            "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": category_name, "supercategory": category_name}]}


def _write_cyx(path: Path, image: np.ndarray, compress: bool) -> None:
    """A (C, H, W) OME-TIFF with the channel names in its metadata."""
    tifffile.imwrite(path, image, ome=True, photometric="minisblack", compression="zlib" if compress else None,
                     metadata={"axes": "CYX", "Channel": {"Name": list(CHANNELS)}})


def write_mif_dataset(out_dir: str | Path, n_images: int = 8, shape: Sequence[int] = (512, 512), seed: int = 0,
                      crop_size: int = 100, overwrite: bool = False, realism: str = "default", first_image: int = 0,
                      **options) -> dict[str, Path]:
    """Write a synthetic multiplex data set; return {role: path}.

    Layout of ``out_dir``: ``images/img_000.tif`` (CYX uint16 OME-TIFF, channel names in the metadata),
    ``instances/img_000.tif`` (YX uint32), ``cells/<type>/cell_<image>_<id>.tif`` (CYX crops centred on
    each cell, :func:`extract_cell_crops`; class sub-folders = the classification set), ``annotations.json``
    (COCO, :func:`mif_to_coco`; ``file_name`` relative to ``out_dir``, e.g. ``images/img_000.tif``),
    ``channels.json`` (channel names, axes, cell types, generator settings) and ``cells.csv`` (one row per
    crop). Image ``i`` (``first_image`` .. ``first_image + n_images - 1``, also in its file name) uses seed
    ``[seed, i]``; ``realism`` and ``options`` go to :func:`make_mif_image`.

    All or nothing: everything is written into a temporary sibling folder that is renamed onto ``out_dir``
    at the end. An existing ``out_dir`` is refused unless it is empty or ``overwrite=True``.
    """
    out = Path(out_dir)
    if int(n_images) != n_images or n_images < 1:
        raise input_error("n_images", "an integer >= 1", repr(n_images), "Pass e.g. n_images=8")
    if int(first_image) != first_image or first_image < 0:
        raise input_error("first_image", "an integer >= 0", repr(first_image), "Pass e.g. first_image=0")
    realism_options(realism)  # a bad name fails before anything is written
    replace = overwrite or (out.is_dir() and not any(out.iterdir()))
    numbers = range(int(first_image), int(first_image) + int(n_images))
    names = [f"img_{i:03d}.tif" for i in numbers]
    table = [("file", "image", "cell_id", "cell_type", "label", "centroid_y", "centroid_x")]
    instances_list, types_list = [], []
    with atomic_path(out, overwrite=replace) as tmp:
        for folder in ["images", "instances"] + [f"cells/{t}" for t in CELL_TYPES]:
            (tmp / folder).mkdir(parents=True)
        for i, name in zip(numbers, names):
            mif = make_mif_image(shape, seed=[int(seed), i], realism=realism, **options)
            _write_cyx(tmp / "images" / name, mif.image, compress=False)
            write_tiff(tmp / "instances" / name, mif.instances, "YX", compression="zlib")
            crops, labels, ids = extract_cell_crops(mif, crop_size)
            for crop, label, cell in zip(crops, labels, ids):
                file = f"cells/{CELL_TYPES[label]}/cell_{i:03d}_{cell:04d}.tif"
                _write_cyx(tmp / file, crop, compress=True)
                table.append((file, name, int(cell), CELL_TYPES[label], int(label),
                              *(round(float(v), 2) for v in mif.centroids[cell])))
            instances_list.append(mif.instances)
            types_list.append(mif.cell_types)
        coco = mif_to_coco(instances_list, [f"images/{n}" for n in names], cell_types_list=types_list)
        (tmp / "annotations.json").write_text(json.dumps(coco))
        meta = {"channels": list(CHANNELS), "axes": "CYX", "cell_types": list(CELL_TYPES), "dtype": "uint16",
                "n_images": int(n_images), "shape": [int(s) for s in shape], "seed": int(seed),
                "crop_size": int(crop_size), "first_image": int(first_image), "realism": realism,
                "options": {k: v for k, v in options.items()}}
        (tmp / "channels.json").write_text(json.dumps(meta, indent=2))
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(table)
        (tmp / "cells.csv").write_text(buffer.getvalue())
    return _dataset_paths(out)


def _dataset_paths(out: Path) -> dict[str, Path]:
    """{role: path} of a data set written by :func:`write_mif_dataset` into ``out``."""
    return {"root": out, "images": out / "images", "instances": out / "instances", "cells": out / "cells",
            "annotations": out / "annotations.json", "channels": out / "channels.json",
            "cells_table": out / "cells.csv"}


def write_mif_pools(out_dir: str | Path, n_pretrain: int, n_labelled: int, shape: Sequence[int] = (512, 512),
                    seed: int = 0, crop_size: int = 100, overwrite: bool = False, realism: str = "default",
                    **options) -> dict[str, dict[str, Path]]:
    """Two data sets of disjoint images, as the DAMA paper keeps its pre-training crops apart from the
    labelled ones: ``out_dir/pretrain`` (images ``0 .. n_pretrain - 1``) and ``out_dir/labelled`` (images
    ``n_pretrain .. n_pretrain + n_labelled - 1``), each laid out by :func:`write_mif_dataset` with the same
    ``seed``, generator settings and ``crop_size``. A whole image goes to one pool, so no cell, and no
    neighbour seen in a crop's context, is in both. Returns ``{"pretrain": paths, "labelled": paths}``.

    All or nothing, like :func:`write_mif_dataset`: an existing ``out_dir`` is refused unless it is empty or
    ``overwrite=True``.
    """
    for name, n in (("n_pretrain", n_pretrain), ("n_labelled", n_labelled)):
        if int(n) != n or n < 1:
            raise input_error(name, "an integer >= 1", repr(n), "Pass the number of images of each pool")
    out = Path(out_dir)
    replace = overwrite or (out.is_dir() and not any(out.iterdir()))
    common = dict(shape=shape, seed=seed, crop_size=crop_size, realism=realism, **options)
    with atomic_path(out, overwrite=replace) as tmp:
        write_mif_dataset(tmp / "pretrain", n_images=n_pretrain, first_image=0, **common)
        write_mif_dataset(tmp / "labelled", n_images=n_labelled, first_image=int(n_pretrain), **common)
    return {pool: _dataset_paths(out / pool) for pool in ("pretrain", "labelled")}

"""Partially labelled volumes: labels the loss sees only in some slices or blocks, the rest ignored.

betaSeg cells are only partly annotated, so the supervised baselines' loss ignores unlabelled pixels
(``ignore_index``). The labels section of a run can also hide labels on purpose (keep a random share of
slices or blocks) to study how a baseline copes with sparse labels: :func:`make_partial_labels` wraps a
(Z, Y, X) label volume in a lazy :class:`PartialLabels` view, and :func:`load_labelled_volumes` reads the
images and labels of ``data.source`` (through :func:`~micromae.data.volumes.read_source`) and applies it.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from micromae.config import DataConfig
from micromae.data.normalize import sample_voxels
from micromae.data.volumes import as_zyx, read_source
from micromae.errors import input_error
from micromae.io import open_volume

LABELLED_SOURCES = ("synthetic", "betaseg", "files")


class LabelSpec(Protocol):
    """Where the labels come from and which of them the loss sees (the fine-tuning ``labels`` section)."""

    paths: list[str]
    axes: str | None
    key: str | None
    partial: str  # none | slices | blocks
    fraction: float
    slice_axis: str  # Z | Y | X
    block_size: int
    seed: int
    ignore_outside_cell: bool


class PartialLabels:
    """Lazy (Z, Y, X) label view in which only the kept blocks show their labels; others read ``ignore_index``.

    labels: (Z, Y, X) integer array-like; block: ``(bz, by, bx)`` block sides; keep: bool array of the
    block grid, shape ``ceil(shape / block)``. Indexing takes ints, slices and one Ellipsis (what the
    sampler and ``sample_voxels`` read).
    """

    def __init__(self, labels: Any, block: tuple[int, int, int], keep: np.ndarray, ignore_index: int) -> None:
        self.labels, self.block, self.keep, self.ignore_index = labels, block, keep, ignore_index
        self.shape = tuple(int(s) for s in labels.shape)
        self.dtype = np.result_type(labels.dtype, np.min_scalar_type(ignore_index))

    def __getitem__(self, index: Any) -> np.ndarray:
        index = (index,) if not isinstance(index, tuple) else index
        if any(i is Ellipsis for i in index):
            at = [i is Ellipsis for i in index].index(True)
            index = index[:at] + (slice(None),) * (4 - len(index)) + index[at + 1:]
        index = index + (slice(None),) * (3 - len(index))
        if len(index) != 3 or not all(isinstance(i, (int, np.integer, slice)) for i in index):
            raise TypeError("PartialLabels takes up to three ints or slices (and one Ellipsis)")
        region = np.asarray(self.labels[index]).astype(self.dtype)
        coords = [np.array([i]) if not isinstance(i, slice) else np.arange(*i.indices(n))
                  for i, n in zip(index, self.shape)]
        kept = self.keep[np.ix_(*(c // b for c, b in zip(coords, self.block)))]
        kept = kept.reshape(region.shape)  # int indices drop their length-1 axis
        return np.where(kept, region, self.dtype.type(self.ignore_index))


def make_partial_labels(labels: Any, cfg: LabelSpec, ignore_index: int, salt: int = 0) -> Any:
    """``labels`` unchanged (``partial=none``) or a :class:`PartialLabels` keeping ``cfg.fraction`` of it."""
    if cfg.partial == "none":
        return labels
    shape = tuple(int(s) for s in labels.shape)
    if cfg.partial == "slices":
        axis = "ZYX".index(cfg.slice_axis)
        block = tuple(1 if a == axis else n for a, n in enumerate(shape))
    else:
        block = (cfg.block_size,) * 3
    grid = tuple(-(-n // b) for n, b in zip(shape, block))
    rng = np.random.default_rng([cfg.seed, salt])
    count = max(1, round(cfg.fraction * int(np.prod(grid))))
    keep = np.zeros(int(np.prod(grid)), dtype=bool)
    keep[rng.permutation(keep.size)[:count]] = True
    return PartialLabels(labels, block, keep.reshape(grid), ignore_index)


def check_label_values(labels: Any, num_classes: int, ignore_index: int, name: str) -> None:
    """Refuse label values other than ``0..num_classes-1`` and ``ignore_index`` (read on a sample of voxels)."""
    values, _ = sample_voxels(labels, max_samples=4_000_000)
    bad = np.unique(values[(values != ignore_index) & ((values < 0) | (values >= num_classes))])
    if bad.size:
        raise input_error(name, f"class labels 0..{num_classes - 1} or ignore_index={ignore_index}",
                          f"values {bad[:8].tolist()}", "Set num_classes to the number of classes, or remap")


def load_labelled_volumes(data: DataConfig, labels_cfg: LabelSpec, num_classes: int, ignore_index: int
                          ) -> tuple[list[Any], list[Any]]:
    """Images and their labels (Z, Y, X) for ``data.source``, after ``ignore_outside_cell`` / ``partial``."""
    d, lab = data, labels_cfg
    if d.source not in LABELLED_SOURCES:
        raise input_error("data.source", "synthetic, betaseg or files (sources with labels)", repr(d.source),
                          "Sample data has no labels: use data.source=files with labels.paths")
    if d.source == "files" and len(lab.paths) != len(d.paths):
        raise input_error("labels.paths", f"one label volume per data.paths entry ({len(d.paths)})",
                          f"{len(lab.paths)} paths", "List the label files in the order of data.paths")
    volumes = read_source(d)
    images, labels, masks = volumes.images, volumes.labels, volumes.masks
    if d.source == "files":
        opened = [open_volume(p, axes=lab.axes, key=lab.key, check=False) for p in lab.paths]
        labels = [as_zyx(v, repr(p), v.axes) for p, v in zip(lab.paths, opened)]
    if lab.ignore_outside_cell:
        if masks is None:
            raise input_error("labels.ignore_outside_cell", "a source with cell masks (synthetic, betaseg)",
                              d.source, "Set labels.ignore_outside_cell=false, or mark outside as ignore_index")
        labels = [np.where(m, y, np.asarray(ignore_index, np.result_type(y.dtype, np.min_scalar_type(
            ignore_index)))) for y, m in zip(labels, masks)]
    for i, y in enumerate(labels):
        check_label_values(y, num_classes, ignore_index, f"label volume {i}")
    return images, [make_partial_labels(y, lab, ignore_index, salt=i) for i, y in enumerate(labels)]

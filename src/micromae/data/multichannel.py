"""Folders of multi-channel images for DAMA: finding the files, their channel names, reading, scaling to [0, 1].

:class:`MultiChannelImageFolder` reads ``root/*.tif`` (unlabelled, label -1) or ``root/<class>/**/*.tif``
(labels = class index) as float32 ``(C, H, W)`` tensors scaled to [0, 1] by
:func:`micromae.data.channel_norm.normalize_channels` (``normalize``: ``dtype`` (default), ``percentile``,
``minmax``, ``channel_stats``); the whole file is normalised before any crop or augmentation.

DAMA's augmentation is :mod:`micromae.data.augment`, the seeded loader :mod:`micromae.data.seeded`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import tifffile
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from micromae.data.channel_norm import (DEFAULT_PERCENTILES, channel_ranges, check_normalize,
                                        dataset_channel_ranges, normalize_channels)
from micromae.errors import input_error
from micromae.io import open_volume

IMAGE_SUFFIXES = (".tif", ".tiff")  # also matches .ome.tif / .ome.tiff


def read_channel_names(path: str | Path, count: int) -> list[str] | None:
    """Channel names from a TIFF's OME-XML (``Channel/@Name``) or ImageJ ``Labels``; None if absent."""
    names: list = []
    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
            image = image[0] if isinstance(image, list) else image
            channels = image.get("Pixels", {}).get("Channel", [])
            channels = channels if isinstance(channels, list) else [channels]
            names = [c.get("Name") for c in channels if isinstance(c, dict)]
        elif tif.is_imagej:
            names = list((tif.imagej_metadata or {}).get("Labels") or [])
    ok = len(names) == count and all(isinstance(n, str) and n for n in names)
    return [str(n) for n in names] if ok else None


def _channels_json(root: Path, count: int) -> list[str] | None:
    """Names from ``channels.json`` in ``root`` or its parent: a list, or a dict with a ``channels`` list."""
    for folder in (root, root.parent):
        file = folder / "channels.json"
        if file.is_file():
            data = json.loads(file.read_text())
            names = data.get("channels") if isinstance(data, dict) else data
            if isinstance(names, list) and len(names) == count:
                return [str(n) for n in names]
    return None



def _tiffs(folder: Path, recursive: bool) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
                  and not p.name.startswith("."))


def _find_files(root: Path, classes: Sequence[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names): ``root/*.tif`` unlabelled (-1), or ``root/<class>/**/*.tif``."""
    if not root.is_dir():
        raise input_error(f"image folder '{root}'", "an existing folder of TIFF images",
                          "a file" if root.exists() else "nothing at that path", "Check the path")
    top = _tiffs(root, recursive=False)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None:
        missing = [c for c in classes if not (root / c).is_dir()]
        if missing:
            raise input_error(f"image folder '{root}'", f"a sub-folder per class {list(classes)}",
                              f"no folder for {missing}", "Create them or pass classes=None")
        folders = [root / c for c in classes]
    per_class = [_tiffs(f, recursive=True) for f in folders]
    if top and any(per_class):
        raise input_error(f"image folder '{root}'", "either images (unlabelled) or class sub-folders of images",
                          f"{len(top)} images at the top and images in sub-folders",
                          "Move the top-level images into a class folder, or point at one level of the tree")
    if top:
        return top, [-1] * len(top), []
    if not any(per_class):
        raise input_error(f"image folder '{root}'", f"TIFF images ({', '.join(IMAGE_SUFFIXES)}) in it or in "
                          "class sub-folders", "none", "Point at a folder of .tif files or of class folders")
    files = [f for group in per_class for f in group]
    labels = [k for k, group in enumerate(per_class) for _ in group]
    return files, labels, [f.name for f in folders]


def file_axes(path: Path, axes: str | None) -> tuple[str | None, tuple[int, ...], np.dtype]:
    """Axes to open ``path`` with, and its (C, H, W) shape and dtype (the header only is read).

    A 3-D file whose metadata names no channel axis (tifffile's plain stacks read as ZYX) takes the smaller
    of its first and last dimensions as channels.
    """
    with open_volume(path, axes=axes, check=False) as volume:
        canon, shape, file_axes = volume.axes, volume.shape, volume.file_axes
        dtype = volume.dtype
    if axes is None and canon == "ZYX":
        sizes = [dict(zip(canon, shape))[a] for a in file_axes if a != "."]
        axes = "CYX" if sizes[0] <= sizes[-1] else "YXC"
        by_axis = dict(zip(axes, sizes))
        return axes, (by_axis["C"], by_axis["Y"], by_axis["X"]), dtype
    if canon == "YX":
        return axes, (1,) + tuple(shape), dtype
    if canon != "CYX":
        raise input_error(f"image '{path}'", "a 2-D multi-channel image (axes CYX or YXC, or a single-channel YX)",
                          f"axes '{canon}' with shape {tuple(shape)}",
                          "Pass axes= naming the file's dimensions, e.g. axes='YXC', or convert the file")
    return axes, tuple(shape), dtype


class MultiChannelImageFolder(Dataset):
    """Multi-channel TIFFs of a folder as ``(image (C, H, W) float32 in [0, 1], label)`` (module docstring).

    ``normalize`` (``"dtype"``, ``"percentile"``, ``"minmax"``, ``"channel_stats"``) and ``percentiles``:
    how each file is scaled to [0, 1] (:func:`normalize_channels`, on the whole file, before the transform).

    ``axes``: the files' dimensions in file order (``"CYX"``, ``"YXC"``); None reads them from the
    metadata. ``size``: with no ``transform``, images are resized (bilinear) to ``size × size``.
    ``transform``: applied to the scaled tensor; one with ``accepts_rng`` (e.g.
    :class:`~micromae.data.augment.DamaAugment`) gets the item's generator from :meth:`get`, and its
    ``min_input_size`` is checked for every file here.
    ``ranges``: with ``channel_stats``, the ``(2, C)`` per-channel ranges to use (e.g. the pre-training's,
    stored with the encoder) instead of the folder's own; checked against the channel count.
    ``channels``: names or indices of the channels to keep (None: all). ``classes``: class folder names in
    label order (None: sorted sub-folders; empty ones count). Channel names come from the first file's
    OME / ImageJ metadata, else ``channels.json`` in ``root`` or its parent, else ``channel_<i>``.
    """

    def __init__(self, root: str | Path, axes: str | None = None, size: int | None = None,
                 transform: Callable | None = None, channels: Sequence[str | int] | None = None,
                 classes: Sequence[str] | None = None, normalize: str = "dtype",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, ranges: Any = None) -> None:
        self.normalize, self.percentiles = normalize, check_normalize(normalize, percentiles)
        self._ranges: dict[int, np.ndarray] = {}  # per-file (lo, hi) of the selected channels, computed once
        # channel_stats: one (lo, hi) for the folder; ``ranges`` (2, C) given (a pre-training's) or computed
        self.dataset_ranges: np.ndarray | None = None if ranges is None else np.asarray(ranges, dtype=np.float32)
        self.root = Path(root)
        self.files, self.labels, self.classes = _find_files(self.root, classes)
        info = [file_axes(f, axes) for f in self.files]
        self._axes = [a for a, _, _ in info]
        self.shapes = [s for _, s, _ in info]
        counts = [s[0] for s in self.shapes]
        if len(set(counts)) > 1:
            other = next(i for i, c in enumerate(counts) if c != counts[0])
            raise input_error(f"image folder '{self.root}'", "the same number of channels in every image",
                              f"{counts[0]} channels in '{self.files[0]}' but {counts[other]} in '{self.files[other]}'",
                              "Keep images of one panel per folder (or check the axes= of the files)")
        names = read_channel_names(self.files[0], counts[0]) or _channels_json(self.root, counts[0])
        self.all_channel_names = names or [f"channel_{i}" for i in range(counts[0])]
        self.channel_index = self._select(channels)
        if self.dataset_ranges is not None and self.dataset_ranges.shape != (2, len(self.channel_index)):
            raise input_error("channel_stats ranges", f"(2, {len(self.channel_index)}): a (lo, hi) per channel read",
                              str(self.dataset_ranges.shape),
                              "Use an encoder pre-trained on this panel, or data.normalize=percentile")
        self.size, self.transform = size, transform
        need = getattr(transform, "min_input_size", None) if transform is not None else None
        if need is not None:
            small = [(f, s) for f, s in zip(self.files, self.shapes) if min(s[1:]) < need]
            if small:
                raise input_error(f"image '{small[0][0]}'", f"at least {need}×{need} pixels (the crop of {transform})",
                                  f"{small[0][1][1]}×{small[0][1][2]} ({len(small)} image(s) too small)",
                                  "Use larger images or a smaller crop (size or scale of the augmentation)")

    def _select(self, channels: Sequence[str | int] | None) -> list[int]:
        if channels is None:
            return list(range(len(self.all_channel_names)))
        index = []
        for c in channels:
            if isinstance(c, str) and c in self.all_channel_names:
                index.append(self.all_channel_names.index(c))
            elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < len(self.all_channel_names):
                index.append(int(c))
            else:
                raise input_error("channels", f"names in {self.all_channel_names} or indices below "
                                  f"{len(self.all_channel_names)}", repr(c), "Pick channels the images have")
        return index

    @property
    def channel_names(self) -> list[str]:
        return [self.all_channel_names[i] for i in self.channel_index]

    @property
    def num_channels(self) -> int:
        return len(self.channel_index)

    def __len__(self) -> int:
        return len(self.files)

    def read_raw(self, index: int) -> np.ndarray:
        """Image ``index`` as stored, ``(C, H, W)`` of the selected channels (NaN / inf rejected)."""
        path = self.files[index]
        with open_volume(path, axes=self._axes[index], check=False) as volume:
            array = volume.read()
        array = array[None] if array.ndim == 2 else array
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise input_error(f"image '{path}'", "finite pixel values", "NaN or inf", "Replace or drop them")
        return array[self.channel_index]

    def ranges(self, index: int, array: np.ndarray) -> np.ndarray | None:
        """The ``(2, C)`` range image ``index`` is scaled with (None for ``dtype``), computed once."""
        if self.normalize == "channel_stats":
            if self.dataset_ranges is None:
                files = np.random.default_rng(0).permutation(len(self))[:256]
                self.dataset_ranges = dataset_channel_ranges((self.read_raw(int(i)) for i in files), self.percentiles)
            return self.dataset_ranges
        if self.normalize != "dtype" and index not in self._ranges:
            self._ranges[index] = channel_ranges(array, self.normalize, self.percentiles)
        return self._ranges.get(index)

    def read(self, index: int) -> torch.Tensor:
        """Image ``index`` as float32 ``(C, H, W)`` in [0, 1] (selected channels), before any transform."""
        array = self.read_raw(index)
        return torch.from_numpy(normalize_channels(array, self.normalize, self.percentiles, self.ranges(index, array)))

    def get(self, index: int, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``(image, label)``; ``rng`` drives a transform with ``accepts_rng`` (None: torch's global RNG)."""
        image = self.read(index)
        if self.transform is not None:
            takes_rng = getattr(self.transform, "accepts_rng", False)
            image = self.transform(image, rng) if takes_rng else self.transform(image)
        elif self.size is not None and tuple(image.shape[-2:]) != (self.size, self.size):
            image = TF.resize(image, [self.size, self.size], antialias=True)
        return image, self.labels[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.get(index)

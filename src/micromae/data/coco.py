"""COCO instance segmentation over multi-channel TIFFs: validation, random crops, large-scale jitter, batches.

A COCO file (``images``, ``annotations``, ``categories``) names one image file per entry (``file_name``,
relative to ``image_root``, by default the JSON's folder). Images are read as in
:mod:`micromae.data.multichannel` (``axes`` CYX / YXC, or from the metadata) and scaled to [0, 1] by their
dtype's maximum. Segmentations may be polygons, uncompressed RLE (counts as a list) or compressed RLE (counts
as a string, what :func:`micromae.data.synthetic_mif.mif_to_coco` writes); pycocotools decodes all three.
Crowd annotations (``iscrowd: 1``) are left out of training. Categories map to labels ``1..K`` in the
order of their ids (0 is background), see :attr:`CocoInstanceDataset.category_ids`.

Training samples (:meth:`CocoInstanceDataset.sample`): a random ``crop_size`` window at the native
resolution (images smaller than the crop are padded with 0), then large-scale jitter (LSJ, ViTDet): the crop
is resized by a factor drawn uniformly from ``scale_range`` (0.1-2.0), then randomly cropped back to
``crop_size`` when larger or padded (bottom/right, zeros) when smaller; then random horizontal and vertical
flips. Masks follow the same geometry (nearest-neighbour resampling); instances cut to nothing are dropped and
boxes are recomputed from the masks (``x2 = last column + 1``, as COCO's ``[x, y, w, h]``).

:func:`instance_batches` streams ``(step, (images (B, C, S, S), targets))`` for the training engine; item
``b`` of step ``t`` draws an image and its augmentation from ``np.random.default_rng([seed, rank, t, b])``,
so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader, Dataset

from micromae.data.channel_norm import (DEFAULT_PERCENTILES, channel_ranges, check_normalize,
                                        dataset_channel_ranges, normalize_channels)
from micromae.data.multichannel import file_axes
from micromae.errors import input_error
from micromae.io import open_volume

__all__ = ["CocoInstanceDataset", "check_coco", "collate_instances", "decode_segmentation", "instance_batches",
           "read_coco_json", "segmentation_rle", "target_from_masks"]


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Parse a COCO instances file and check it with :func:`check_coco`. Raises MicromaeInputError."""
    path = Path(path)
    if not path.is_file():
        raise input_error("COCO annotations", "an existing JSON file", f"'{path}' does not exist",
                          "Pass the annotations.json of the data set")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise input_error(f"COCO annotations '{path}'", "valid JSON", f"a parse error ({exc})", "Fix the file") from exc
    return check_coco(data, path)


def check_coco(data: Any, path: str | Path = "<dict>") -> dict[str, Any]:
    """Check a COCO instances dict: non-empty ``images`` and ``annotations``, known ``categories``, every
    annotation on a listed image with a segmentation. Returns ``data``; raises MicromaeInputError."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise input_error(f"COCO annotations '{path}'", "a JSON object with lists 'images' and 'annotations'",
                          f"keys {sorted(data)[:6] if isinstance(data, dict) else type(data).__name__}",
                          "Write the file in COCO instance-segmentation format")
    if not data["images"]:
        raise input_error(f"COCO annotations '{path}'", "at least one image", "an empty 'images' list",
                          "List the images with id, file_name, height and width")
    if not data["annotations"]:
        raise input_error(f"COCO annotations '{path}'", "at least one annotation (instance mask)",
                          "an empty 'annotations' list", "Annotate the images first, or pass the right file")
    ids = {im.get("id") for im in data["images"]}
    cats = {c.get("id") for c in data.get("categories") or []}
    for ann in data["annotations"]:
        problem = None
        if ann.get("image_id") not in ids:
            problem = f"image_id {ann.get('image_id')!r}, not among the images"
        elif ann.get("category_id") not in cats:
            problem = f"category_id {ann.get('category_id')!r}, not among the categories {sorted(cats)}"
        elif not ann.get("segmentation"):
            problem = "no segmentation"
        if problem:
            raise input_error(f"annotation {ann.get('id')!r} in '{path}'", "an instance mask of a listed image "
                              "and category", problem, "Fix or remove that annotation")
    return data


def segmentation_rle(segmentation: Any, height: int, width: int) -> dict:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE (counts bytes)."""
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        counts = segmentation["counts"]
        return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    raise input_error("segmentation", "polygons or an RLE dict", type(segmentation).__name__,
                      "Write COCO segmentations")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as a ``(height, width)`` uint8 mask."""
    rle = segmentation_rle(segmentation, height, width)
    with warnings.catch_warnings():  # pycocotools' __array__ predates numpy 2's copy keyword
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def target_from_masks(masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detector target from ``masks (n, H, W)`` uint8 and ``labels (n,)``: empty masks dropped, boxes
    ``(n', 4)`` float32 ``x1, y1, x2, y2`` with ``x2``/``y2`` one past the last pixel."""
    binary = masks.bool()
    keep = binary.flatten(1).any(1) if masks.numel() else torch.zeros(len(masks), dtype=torch.bool)
    masks, binary, labels = masks[keep], binary[keep], labels[keep]
    boxes = torch.zeros(len(masks), 4)
    if len(masks):
        rows, cols = binary.any(2), binary.any(1)  # (n, H), (n, W)
        ar_h, ar_w = torch.arange(masks.shape[1]), torch.arange(masks.shape[2])
        y1 = torch.where(rows, ar_h, masks.shape[1]).amin(1)
        y2 = torch.where(rows, ar_h, -1).amax(1) + 1
        x1 = torch.where(cols, ar_w, masks.shape[2]).amin(1)
        x2 = torch.where(cols, ar_w, -1).amax(1) + 1
        boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return {"boxes": boxes, "labels": labels.long(), "masks": masks.to(torch.uint8)}


class CocoInstanceDataset(Dataset):
    """Images and instance masks of a COCO file (module docstring for the augmentation).

    Args:
        annotation_file: COCO JSON.
        image_root: folder the ``file_name`` entries are relative to (default: the JSON's folder).
        axes: the image files' dimension order (``CYX``, ``YXC``); None: from the metadata.
        in_chans: expected channel count (the model's), checked on every file; None: not checked.
        crop_size: side of the training samples.
        scale_range: LSJ scale range ``(low, high)``; None: no jitter.
        flip: random horizontal and vertical flips.
        normalize, percentiles: how each whole image is scaled to [0, 1] before any crop (``dtype``,
            ``percentile``, ``minmax`` or ``channel_stats``: one range per channel for all the images;
            :func:`~micromae.data.multichannel.normalize_channels`).
    ``dataset[i]`` is image ``i`` whole: ``(image (C, H, W) float32, target)`` with ``image_id`` in the target.
    """

    def __init__(self, annotation_file: str | Path, image_root: str | Path | None = None, axes: str | None = None,
                 in_chans: int | None = None, crop_size: int = 128,
                 scale_range: Sequence[float] | None = (0.1, 2.0), flip: bool = True, normalize: str = "dtype",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        self.normalize, self.percentiles = normalize, check_normalize(normalize, percentiles)
        self._ranges: dict[Any, np.ndarray] = {}  # per-image (lo, hi), or "all" for channel_stats; computed once
        self.annotation_file = Path(annotation_file)
        data = read_coco_json(self.annotation_file)
        self.root = Path(image_root) if image_root is not None else self.annotation_file.parent
        self.images = list(data["images"])
        self.category_ids = sorted({int(c["id"]) for c in data.get("categories") or []})
        self.category_names = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories") or []}
        self.annotations: dict[Any, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in data["annotations"]:
            if not ann.get("iscrowd", 0):
                self.annotations[ann["image_id"]].append(ann)
        if crop_size < 1 or (scale_range is not None and not 0 < scale_range[0] <= scale_range[1]):
            raise input_error("crop_size / scale_range", "a positive size / 0 < low <= high",
                              f"{crop_size} / {scale_range}", "Use e.g. crop_size=128, scale_range=[0.1, 2.0]")
        self.crop_size, self.flip = int(crop_size), bool(flip)
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.files = [self.root / im.get("file_name", "") for im in self.images]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise input_error(f"images of '{self.annotation_file}'", f"{len(self.files)} image files under "
                              f"'{self.root}'", f"{len(missing)} missing, e.g. {missing[:3]}",
                              "Pass image_root (--image-root / data.image_root) pointing at the folder the "
                              "file_name entries are relative to")
        info = [file_axes(f, axes) for f in self.files]
        self._axes = [a for a, _, _ in info]
        self.shapes = [s for _, s, _ in info]  # (C, H, W)
        self._check_shapes(in_chans)

    def _check_shapes(self, in_chans: int | None) -> None:
        counts = sorted({s[0] for s in self.shapes})
        if in_chans is not None and counts != [in_chans]:
            raise input_error(f"images of '{self.annotation_file}'", f"{in_chans} channels (the model's in_chans)",
                              f"{'/'.join(map(str, counts))} channels",
                              "Use a checkpoint pre-trained on this panel, or set model.in_chans to the images' "
                              "channel count (and data.axes if the channel axis is misread)")
        for im, shape, f in zip(self.images, self.shapes, self.files):
            if (im.get("height"), im.get("width")) not in ((None, None), tuple(shape[1:])):
                raise input_error(f"image '{f}'", f"{im.get('height')}×{im.get('width')} pixels as in the COCO "
                                  "file", f"{shape[1]}×{shape[2]}", "Fix height/width in the JSON or the axes")

    @property
    def num_channels(self) -> int:
        return self.shapes[0][0]

    def __len__(self) -> int:
        return len(self.images)

    def read_raw(self, index: int) -> np.ndarray:
        """Image ``index`` as stored, ``(C, H, W)``."""
        with open_volume(self.files[index], axes=self._axes[index], check=False) as volume:
            array = volume.read()
        return np.ascontiguousarray(array[None] if array.ndim == 2 else array)

    def read_image(self, index: int) -> torch.Tensor:
        """Image ``index`` whole as float32 ``(C, H, W)`` in [0, 1] (``normalize``; ranges computed once)."""
        array = self.read_raw(index)
        if self.normalize == "channel_stats":
            if "all" not in self._ranges:
                files = np.random.default_rng(0).permutation(len(self))[:256]
                self._ranges["all"] = dataset_channel_ranges((self.read_raw(int(i)) for i in files), self.percentiles)
            index = "all"
        elif self.normalize != "dtype" and index not in self._ranges:
            self._ranges[index] = channel_ranges(array, self.normalize, self.percentiles)
        return torch.from_numpy(normalize_channels(array, self.normalize, self.percentiles, self._ranges.get(index)))

    def read_masks(self, index: int, window: tuple[int, int, int, int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance masks ``(n, h, w)`` uint8 of image ``index`` inside ``window = (top, left, h, w)`` (None:
        whole image; parts outside the image are 0) and their labels ``(n,)`` int64; only annotations whose
        box meets the window are decoded."""
        _, height, width = self.shapes[index]
        top, left, h, w = window if window is not None else (0, 0, height, width)
        masks, labels = [], []
        for ann in self.annotations[self.images[index]["id"]]:
            x, y, bw, bh = ann.get("bbox") or (0, 0, width, height)
            if x >= left + w or y >= top + h or x + bw <= left or y + bh <= top:
                continue
            full = decode_segmentation(ann["segmentation"], height, width)
            out = np.zeros((h, w), np.uint8)
            y0, x0 = max(top, 0), max(left, 0)
            y1, x1 = min(top + h, height), min(left + w, width)
            if y1 > y0 and x1 > x0:
                out[y0 - top:y1 - top, x0 - left:x1 - left] = full[y0:y1, x0:x1]
            masks.append(out)
            labels.append(self.category_ids.index(int(ann["category_id"])) + 1)
        stacked = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        return stacked, torch.tensor(labels, dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        masks, labels = self.read_masks(index)
        target = target_from_masks(masks, labels)
        target["image_id"] = self.images[index]["id"]
        return self.read_image(index), target

    def sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training sample of image ``index``: ``(image (C, S, S), target)``, ``S = crop_size``."""
        s = self.crop_size
        _, height, width = self.shapes[index]
        top, left = int(rng.integers(0, max(height - s, 0) + 1)), int(rng.integers(0, max(width - s, 0) + 1))
        image = self.read_image(index)[:, top:top + s, left:left + s]
        image = F.pad(image, (0, s - image.shape[2], 0, s - image.shape[1]))
        masks, labels = self.read_masks(index, (top, left, s, s))
        if self.scale_range is not None:
            image, masks = _large_scale_jitter(image, masks, s, float(rng.uniform(*self.scale_range)), rng)
        if self.flip:
            dims = [d for d, p in ((-1, rng.random()), (-2, rng.random())) if p < 0.5]
            if dims:
                image, masks = image.flip(dims), masks.flip(dims)
        return image.contiguous(), target_from_masks(masks.contiguous(), labels)


def _large_scale_jitter(image: torch.Tensor, masks: torch.Tensor, size: int, scale: float,
                        rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image (C, S, S)`` and ``masks (n, S, S)`` by ``scale``, then crop or pad back to ``size``."""
    new = max(1, round(size * scale))
    if new != size:
        image = F.interpolate(image[None], size=(new, new), mode="bilinear", align_corners=False,
                              antialias=new < size)[0]
        if len(masks):
            masks = F.interpolate(masks[None].float(), size=(new, new), mode="nearest-exact")[0].to(torch.uint8)
        else:
            masks = masks.new_zeros((0, new, new))
    if new > size:
        top, left = (int(v) for v in rng.integers(0, new - size + 1, 2))
        return image[:, top:top + size, left:left + size], masks[:, top:top + size, left:left + size]
    pad = (0, size - new, 0, size - new)
    return F.pad(image, pad), F.pad(masks, pad)


def collate_instances(items: Sequence[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """``[(image (C, S, S), target), ...]`` -> ``(images (B, C, S, S), [target, ...])``."""
    return torch.stack([img for img, _ in items]), [t for _, t in items]


class _StepBatches(Dataset):
    """Batch of step ``t`` (a map-style dataset indexed by step, so workers keep the order)."""

    def __init__(self, dataset: CocoInstanceDataset, batch_size: int, seed: int, rank: int) -> None:
        self.dataset, self.batch_size, self.seed, self.rank = dataset, batch_size, seed, rank

    def __len__(self) -> int:  # never consulted for the order (the sampler is an endless count)
        return 2**62

    def __getitem__(self, step: int) -> tuple[int, tuple[torch.Tensor, list[dict]]]:
        items = []
        for b in range(self.batch_size):
            rng = np.random.default_rng([self.seed, self.rank, step, b])
            items.append(self.dataset.sample(int(rng.integers(len(self.dataset))), rng))
        return step, collate_instances(items)


def instance_batches(dataset: CocoInstanceDataset, batch_size: int, start_step: int = 0, seed: int = 0,
                     rank: int = 0, num_workers: int = 0, pin_memory: bool = False
                     ) -> Iterator[tuple[int, tuple[torch.Tensor, list[dict]]]]:
    """Endless ``(step, (images (B, C, S, S), targets))`` from ``start_step`` on (module docstring)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise input_error("batch_size", "a positive integer", repr(batch_size), "Set train.batch_size=4")
    # its own generator: starting a DataLoader iterator otherwise draws from the global torch RNG, which would
    # shift every later draw (RPN / RoI sampling) and break bit-exact resume
    loader = DataLoader(_StepBatches(dataset, batch_size, seed, rank), batch_size=None,
                        sampler=itertools.count(start_step), num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed))
    return iter(loader)

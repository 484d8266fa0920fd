"""MAESTER's training data: 2-D crops cut from the three orthogonal planes of 3-D volumes (docs/METHODS.md,
MAESTER training data).

Each sample picks a volume, a plane, a slice and a window of ``fov x fov`` pixels in that plane padded by
``pad`` voxels per in-plane side; a random crop of sides drawn independently in ``[min_crop_frac*fov, fov]``
is resized back to ``fov x fov`` (a 1x-2x anisotropic zoom), flipped, and scaled to ``[0, 1]``.

Planes are named by their two in-plane axes of a (Z, Y, X) volume: ``"YX"`` is a Z slice, ``"ZX"`` a Y
slice, ``"ZY"`` an X slice. Letter order does not matter (``"XY"``, ``"XZ"``, ``"YZ"`` are aliases); crops
always have the earlier axis of (Z, Y, X) as rows, which is harmless since crops are also flipped.

With ``label_volumes`` (one integer (Z, Y, X) volume per image volume, e.g. semantic labels), every crop
also gets its label crop, cut with the same geometry (same plane, slice, window, crop and flips) but resized
with nearest-neighbour (``"nearest-exact"``, which samples the same pixel centres as the bilinear image
resize) and never scaled; constant padding gets ``ignore_index``. ``sample_batch`` then returns
``(imgs, labels)``.

Randomness comes only from ``np.random.default_rng([seed, rank, step])``. The public MAESTER code re-seeded
every data-loader worker to 42 each epoch and so replayed the same crops for the whole run; here every step
of every rank draws fresh crops, a run is reproducible from one seed, and resuming at step ``s`` replays
exactly the stream from ``s`` on, whatever the number of data-loader workers.

Why this module is over 400 lines: the crop geometry, its label twin, the step-indexed stream and the
checks of the sampler's arguments are one concept (one crop's draws from one generator); apart, the
stream's replay guarantee would span modules.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from micromae.data.normalize import MODES, intensity_range, is_constant, resolve_mode, scale_intensity
from micromae.errors import input_error

PLANES = {"YX": (0, 1, 2), "ZX": (1, 0, 2), "ZY": (2, 0, 1)}  # plane -> (slice axis, row axis, column axis)
PLANE_ALIASES = {"XY": "YX", "XZ": "ZX", "YZ": "ZY"}
PAD_MODES = ("constant", "reflect")


@dataclass(frozen=True)
class CropParams:
    """The random draws behind one batch; every field is an integer or bool array of shape (B,).

    volume: index into the sampler's volumes; plane: index into ``sampler.planes``; slice_index: position
    along the plane's normal axis; window_row, window_col: top-left of the ``fov x fov`` window in the
    padded plane (padded coordinates, so volume row = window_row - pad); crop_h, crop_w: crop sides;
    crop_row, crop_col: top-left of the crop inside the window; hflip, vflip: flips of the final crop.
    """

    volume: np.ndarray
    plane: np.ndarray
    slice_index: np.ndarray
    window_row: np.ndarray
    window_col: np.ndarray
    crop_h: np.ndarray
    crop_w: np.ndarray
    crop_row: np.ndarray
    crop_col: np.ndarray
    hflip: np.ndarray
    vflip: np.ndarray


class PlaneCropSampler:
    """Random 2-D crops ``(B, 1, fov, fov)`` float32 in ``[0, 1]`` from the orthogonal planes of 3-D volumes.

    volumes: list of (Z, Y, X) array-likes (numpy, np.memmap, zarr, lazy volumes; a single one is wrapped
    in a list); only the voxels of each crop are read. planes: which planes to sample, uniformly.
    pad, pad_mode: in-plane padding per side; ``"constant"`` pads with 0 after scaling (the intensity
    ``lo``), ``"reflect"`` mirrors without repeating the edge (``np.pad(mode="reflect")``).
    min_crop_frac: crop sides are integers in ``[ceil(min_crop_frac*fov), fov]``. flip_p / vflip_p:
    probability of a horizontal (MAESTER's) / vertical flip. normalize, percentiles: see
    :func:`micromae.data.normalize.intensity_range`; ranges are computed once per volume here.
    seed, rank: the run seed and the distributed rank. volume_weights: sampling weights (None: uniform).
    label_volumes: None, or one integer (Z, Y, X) array-like per volume, same shape (read lazily too);
    ignore_index: the label given to constant padding (and meaning "unlabelled" to the loss).
    Resizing is ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``: crops are never
    larger than the FOV, so resizing only enlarges (1x-2x for min_crop_frac=0.5) and antialiasing, which
    only matters when shrinking, is off.
    """

    def __init__(self, volumes: Sequence[Any] | Any, fov: int = 80, planes: Sequence[str] = ("YX", "ZX", "ZY"),
                 pad: int = 4, pad_mode: str = "constant", min_crop_frac: float = 0.5, flip_p: float = 0.5,
                 vflip_p: float = 0.0, normalize: str = "auto", percentiles: tuple[float, float] = (0.5, 99.5),
                 seed: int = 0, rank: int = 0, volume_weights: Sequence[float] | None = None,
                 label_volumes: Sequence[Any] | Any | None = None, ignore_index: int = 255) -> None:
        self.volumes = _check_volumes(volumes)
        self.label_volumes = _check_label_volumes(label_volumes, self.volumes)
        self.ignore_index = _check_int("ignore_index", ignore_index, 0)
        self.fov = _check_int("fov", fov, 1)
        self.pad = _check_int("pad", pad, 0)
        self.seed, self.rank = _check_int("seed", seed, 0), _check_int("rank", rank, 0)
        if pad_mode not in PAD_MODES:
            raise input_error("pad_mode", f"one of {PAD_MODES}", repr(pad_mode), "MAESTER pads with zeros")
        if normalize not in MODES:
            raise input_error("normalize", f"one of {MODES}", repr(normalize),
                              "Use 'auto' (8-bit: dtype, else percentile)")
        self.pad_mode, self.normalize, self.percentiles = pad_mode, normalize, tuple(percentiles)
        self.min_crop_frac = _check_prob("min_crop_frac", min_crop_frac, open_low=True)
        self.flip_p, self.vflip_p = _check_prob("flip_p", flip_p), _check_prob("vflip_p", vflip_p)
        self.min_crop = max(1, math.ceil(self.min_crop_frac * self.fov - 1e-9))
        self.planes = _check_planes(planes)
        self._check_fov()
        self.weights = _check_weights(volume_weights, len(self.volumes))
        self.ranges = [self._intensity_range(i, v) for i, v in enumerate(self.volumes)]
        self._range_table = np.array(self.ranges, dtype=np.float64)  # (V, 2): lo, hi per volume
        # (V, P) tables of slice counts and plane sizes, for vectorised draws
        shapes = np.array([v.shape for v in self.volumes], dtype=np.int64)
        axes = np.array([PLANES[p] for p in self.planes], dtype=np.int64)  # (P, 3)
        self._slices, self._rows, self._cols = (shapes[:, axes[:, j]] for j in range(3))

    def _check_fov(self) -> None:
        for i, volume in enumerate(self.volumes):
            for plane in self.planes:
                _, row_axis, col_axis = PLANES[plane]
                rows, cols = volume.shape[row_axis] + 2 * self.pad, volume.shape[col_axis] + 2 * self.pad
                if self.fov > min(rows, cols):
                    others = tuple(p for p in self.planes if p != plane)
                    raise input_error(
                        f"volume {i} (shape {tuple(volume.shape)}), plane {plane}",
                        f"fov <= the padded plane size {rows}x{cols} ({self.pad} px padding per side)",
                        f"fov={self.fov}",
                        f"Use fov <= {min(rows, cols)}, or drop plane {plane} (e.g. planes={others}), "
                        "as for thin or anisotropic volumes")

    def _intensity_range(self, i: int, volume: Any) -> tuple[float, float]:
        name = f"volume {i} (shape {tuple(volume.shape)})"
        lo, hi = intensity_range(volume, self.normalize, self.percentiles, seed=self.seed, name=name)
        if (resolve_mode(self.normalize, volume.dtype) == "dtype" and np.dtype(volume.dtype).kind in "biu"
                and is_constant(volume, seed=self.seed)):
            raise input_error(name, "varying intensities", "a constant volume (every voxel the same)",
                              "Drop this volume (it holds no image) or check that it was read correctly")
        return lo, hi

    def draw_params(self, step: int, batch_size: int) -> CropParams:
        """All random draws of batch ``step``, from ``np.random.default_rng([seed, rank, step])`` only."""
        step, batch = _check_int("step", step, 0), _check_int("batch_size", batch_size, 1)
        rng = np.random.default_rng([self.seed, self.rank, step])
        fov, pad = self.fov, self.pad
        volume = rng.choice(len(self.volumes), size=batch, p=self.weights)
        plane = rng.integers(0, len(self.planes), size=batch)
        slice_index = rng.integers(0, self._slices[volume, plane])
        window_row = rng.integers(0, self._rows[volume, plane] + 2 * pad - fov + 1)
        window_col = rng.integers(0, self._cols[volume, plane] + 2 * pad - fov + 1)
        crop_h = rng.integers(self.min_crop, fov + 1, size=batch)
        crop_w = rng.integers(self.min_crop, fov + 1, size=batch)
        crop_row, crop_col = rng.integers(0, fov - crop_h + 1), rng.integers(0, fov - crop_w + 1)
        hflip, vflip = rng.random(batch) < self.flip_p, rng.random(batch) < self.vflip_p
        return CropParams(volume, plane, slice_index, window_row, window_col, crop_h, crop_w, crop_row, crop_col,
                          hflip, vflip)

    def sample_batch(self, step: int, batch_size: int, return_params: bool = False) -> Any:
        """Batch ``step``: float32 ``(batch_size, 1, fov, fov)`` in [0, 1] (and its CropParams if asked).

        With label volumes the batch is the pair ``(imgs, labels)``, labels int64 ``(batch_size, fov, fov)``.
        """
        params = self.draw_params(step, batch_size)
        batch = self.crops(params)
        if self.label_volumes is not None:
            batch = (batch, self.label_crops(params))
        return (batch, params) if return_params else batch

    def crops(self, params: CropParams) -> torch.Tensor:
        """Cut, scale, resize and flip the crops described by ``params``: float32 ``(B, 1, fov, fov)``."""
        fov, batch = self.fov, len(params.volume)
        raw = np.zeros((batch, fov, fov), dtype=np.float32)  # crop b in raw[b, :crop_h, :crop_w]
        for b in range(batch):
            self._read_crop(params, b, raw[b, :params.crop_h[b], :params.crop_w[b]])
        lo, hi = (self._range_table[params.volume, j, None, None] for j in (0, 1))
        scaled = torch.from_numpy(scale_intensity(raw, lo, hi))
        out = torch.empty(batch, 1, fov, fov, dtype=torch.float32)
        for b in range(batch):
            crop = scaled[b, :params.crop_h[b], :params.crop_w[b]]
            if crop.shape != (fov, fov):
                crop = F.interpolate(crop[None, None], size=(fov, fov), mode="bilinear", align_corners=False,
                                     antialias=False)[0, 0]
            out[b, 0] = crop
        for flags, dim in ((params.hflip, -1), (params.vflip, -2)):
            idx = torch.from_numpy(np.flatnonzero(flags))
            if len(idx):
                out[idx] = out[idx].flip(dim)
        return out

    def label_crops(self, params: CropParams) -> torch.Tensor:
        """The label crops of ``params``: int64 ``(B, fov, fov)``, aligned with :meth:`crops` pixel for pixel."""
        if self.label_volumes is None:
            raise input_error("label crops", "a sampler built with label_volumes", "none",
                              "Pass label_volumes=[labels, ...] to PlaneCropSampler")
        fov, batch = self.fov, len(params.volume)
        out = torch.empty(batch, fov, fov, dtype=torch.int64)
        for b in range(batch):
            raw = np.empty((params.crop_h[b], params.crop_w[b]), dtype=np.int64)
            self._read_crop(params, b, raw, self.label_volumes, float(self.ignore_index))
            crop = torch.from_numpy(raw)
            if crop.shape != (fov, fov):  # nearest-exact samples the pixel centres the bilinear resize uses
                crop = F.interpolate(crop[None, None].double(), size=(fov, fov), mode="nearest-exact")[0, 0].long()
            out[b] = crop
        for flags, dim in ((params.hflip, -1), (params.vflip, -2)):
            idx = torch.from_numpy(np.flatnonzero(flags))
            if len(idx):
                out[idx] = out[idx].flip(dim)
        return out

    def _read_crop(self, params: CropParams, b: int, dest: np.ndarray, volumes: Sequence[Any] | None = None,
                   fill: float | None = None) -> None:
        """Write crop ``b`` of ``volumes`` (default: the images) into ``dest`` ``(crop_h, crop_w)``.

        Constant padding is ``fill`` (default: the volume's ``lo``, which scales to 0).
        """
        volume = (self.volumes if volumes is None else volumes)[params.volume[b]]
        if fill is None:
            fill = self._range_table[params.volume[b], 0]
        slice_axis, row_axis, col_axis = PLANES[self.planes[params.plane[b]]]
        h, w = dest.shape
        row0 = int(params.window_row[b] + params.crop_row[b]) - self.pad  # in volume coordinates
        col0 = int(params.window_col[b] + params.crop_col[b]) - self.pad
        rows = _source_span(row0, h, volume.shape[row_axis], self.pad_mode)
        cols = _source_span(col0, w, volume.shape[col_axis], self.pad_mode)
        if rows is None or cols is None or (rows[1], cols[1]) != (slice(0, h), slice(0, w)):
            dest.fill(fill)
        if rows is None or cols is None:  # the crop lies entirely in the constant padding
            return
        index: list[Any] = [None] * 3
        index[slice_axis], index[row_axis], index[col_axis] = int(params.slice_index[b]), rows[0], cols[0]
        region = np.asarray(volume[tuple(index)])  # (rows, cols): row axis < column axis in every plane
        if rows[2] is not None or cols[2] is not None:  # reflected indices
            take_r = np.arange(region.shape[0]) if rows[2] is None else rows[2]
            take_c = np.arange(region.shape[1]) if cols[2] is None else cols[2]
            region = region[np.ix_(take_r, take_c)]
        dest[rows[1], cols[1]] = region

    def describe(self) -> dict[str, Any]:
        """The sampler's settings, for logs and run directories (JSON-serialisable)."""
        labels = None if self.label_volumes is None else {
            "ignore_index": self.ignore_index, "resize": "nearest-exact",
            "dtypes": [str(np.dtype(v.dtype)) for v in self.label_volumes]}
        return {"labels": labels,
            "sampler": type(self).__name__, "fov": self.fov, "planes": list(self.planes), "pad": self.pad,
            "pad_mode": self.pad_mode, "min_crop_frac": self.min_crop_frac, "crop_sides": [self.min_crop, self.fov],
            "resize": "bilinear, align_corners=False, antialias=False", "flip_p": self.flip_p,
            "vflip_p": self.vflip_p, "normalize": self.normalize, "percentiles": list(self.percentiles),
            "seed": self.seed, "rank": self.rank, "rng": "np.random.default_rng([seed, rank, step])",
            "volumes": [{"shape": list(v.shape), "dtype": str(np.dtype(v.dtype)), "intensity_range": list(r),
                         "weight": float(w)} for v, r, w in zip(self.volumes, self.ranges, self.weights)],
        }

    def __getstate__(self) -> dict[str, Any]:
        """Pickle memory-mapped volumes as (file, offset, dtype, shape) so spawned workers do not copy them."""
        state = self.__dict__.copy()
        state["volumes"] = [_MemmapRef.of(v) or v for v in self.volumes]
        if self.label_volumes is not None:
            state["label_volumes"] = [_MemmapRef.of(v) or v for v in self.label_volumes]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["volumes"] = [v.open() if isinstance(v, _MemmapRef) else v for v in state["volumes"]]
        if state.get("label_volumes") is not None:
            state["label_volumes"] = [v.open() if isinstance(v, _MemmapRef) else v for v in state["label_volumes"]]
        self.__dict__.update(state)


def _source_span(start: int, length: int, size: int,
                 mode: str) -> tuple[slice, slice, np.ndarray | None] | None:
    """Where ``[start, start+length)`` of a padded axis comes from in an axis of ``size`` voxels.

    Returns ``(read, write, take)``: read ``read`` from the volume and write it to ``write`` of the crop,
    after indexing with ``take`` (reflect mode across a border); None if nothing is inside the volume.
    """
    if 0 <= start and start + length <= size:
        return slice(start, start + length), slice(0, length), None
    if mode == "constant":
        lo, hi = max(start, 0), min(start + length, size)
        return (slice(lo, hi), slice(lo - start, hi - start), None) if hi > lo else None
    idx = np.arange(start, start + length)
    period = 2 * (size - 1)
    if period == 0:
        idx = np.zeros_like(idx)
    else:  # mirror about 0 and size-1 without repeating the edge, as np.pad(mode="reflect")
        idx = np.mod(idx, period)
        idx = np.where(idx >= size, period - idx, idx)
    return slice(int(idx.min()), int(idx.max()) + 1), slice(0, length), idx - idx.min()


class CropStream(IterableDataset):
    """Yields ``(step, batch)`` for steps ``start_step, start_step + 1, ...`` (``num_steps`` of them, or forever).

    With ``n`` DataLoader workers, worker ``w`` computes the steps ``s`` with ``(s - start_step) % n == w``;
    the DataLoader's round-robin over workers then yields every step once, in order, with batches
    identical to ``num_workers=0`` (use ``batch_size=None``, as :func:`make_loader` does).
    batch: float32 ``(batch_size, 1, fov, fov)``.
    """

    def __init__(self, sampler: PlaneCropSampler, batch_size: int, start_step: int = 0,
                 num_steps: int | None = None) -> None:
        super().__init__()
        self.sampler = sampler
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.start_step = _check_int("start_step", start_step, 0)
        self.num_steps = None if num_steps is None else _check_int("num_steps", num_steps, 0)

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless CropStream has no length; pass num_steps")
        return self.num_steps

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        stop = None if self.num_steps is None else self.start_step + self.num_steps
        step = self.start_step + worker
        while stop is None or step < stop:
            yield step, self.sampler.sample_batch(step, self.batch_size)
            step += workers


def _as_is(item: Any) -> Any:
    """DataLoader collate for ready-made batches: keep ``(step, batch)`` a tuple."""
    return item


def make_loader(sampler: PlaneCropSampler, batch_size: int, start_step: int = 0, num_workers: int = 0,
                pin_memory: bool = False, num_steps: int | None = None) -> DataLoader:
    """A DataLoader over :class:`CropStream` yielding ``(step, batch)`` in step order; persistent workers.

    The loader gets a generator of its own: otherwise starting an iterator draws from torch's global RNG,
    which would shift the masking noise of a resumed run away from an uninterrupted one.
    """
    stream = CropStream(sampler, batch_size, start_step, num_steps)
    workers = _check_int("num_workers", num_workers, 0)
    generator = torch.Generator().manual_seed(sampler.seed * 1_000_003 + sampler.rank)
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, collate_fn=_as_is, generator=generator)


@dataclass(frozen=True)
class _MemmapRef:
    """How to reopen a file-backed np.memmap read-only (pickled instead of the mapped data)."""

    filename: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    order: str

    @staticmethod
    def of(volume: Any) -> _MemmapRef | None:
        if not (isinstance(volume, np.memmap) and isinstance(volume.base, mmap.mmap) and volume.filename):
            return None  # not a memmap, or a view into one (its offset would be wrong)
        order = "F" if volume.flags.f_contiguous and not volume.flags.c_contiguous else "C"
        return _MemmapRef(volume.filename, int(volume.offset), volume.dtype, tuple(volume.shape), order)

    def open(self) -> np.memmap:
        return np.memmap(self.filename, self.dtype, "r", self.offset, self.shape, self.order)


def _check_volumes(volumes: Any) -> list[Any]:
    volumes = [volumes] if hasattr(volumes, "shape") else list(volumes)
    if not volumes:
        raise input_error("volumes", "at least one 3-D (Z, Y, X) volume", "an empty list",
                          "Pass e.g. PlaneCropSampler([volume])")
    for i, volume in enumerate(volumes):
        if not all(hasattr(volume, a) for a in ("shape", "dtype", "__getitem__")):
            raise input_error(f"volume {i}", "an array-like with .shape, .dtype and slicing (numpy, zarr)",
                              type(volume).__name__, "Open the file with micromae.io or pass a numpy array")
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) != 3:
            raise input_error(f"volume {i}", "3 dimensions (Z, Y, X)", f"{len(shape)} dimensions {shape}",
                              "Pass 3-D stacks; add an axis to a single 2-D image (image[None]) and sample "
                              "planes=('YX',) only; pick one channel of multichannel data")
        if min(shape) < 1:
            raise input_error(f"volume {i}", "a non-empty volume", f"shape {shape}", "Drop the empty volume")
    return volumes


def _check_label_volumes(labels: Any, volumes: list[Any]) -> list[Any] | None:
    """None, or one integer array-like per image volume with the same shape."""
    if labels is None:
        return None
    labels = [labels] if hasattr(labels, "shape") else list(labels)
    if len(labels) != len(volumes):
        raise input_error("label_volumes", f"one label volume per image volume ({len(volumes)})",
                          f"{len(labels)} label volumes", "Pass the labels in the order of the images")
    for i, (lab, vol) in enumerate(zip(labels, volumes)):
        if not all(hasattr(lab, a) for a in ("shape", "dtype", "__getitem__")):
            raise input_error(f"label volume {i}", "an array-like with .shape, .dtype and slicing",
                              type(lab).__name__, "Pass a numpy, zarr or micromae.io volume")
        if tuple(lab.shape) != tuple(vol.shape):
            raise input_error(f"label volume {i}", f"the shape of its image volume {tuple(vol.shape)}",
                              f"shape {tuple(lab.shape)}", "Pass the labels that belong to this image")
        if np.dtype(lab.dtype).kind not in "biu":
            raise input_error(f"label volume {i}", "integer class labels", f"dtype {np.dtype(lab.dtype)}",
                              "Convert the labels to uint8/uint16 class indices")
    return labels


def _check_planes(planes: Sequence[str]) -> tuple[str, ...]:
    names: list[str] = []
    for plane in ([planes] if isinstance(planes, str) else list(planes)):
        key = str(plane).upper()
        key = PLANE_ALIASES.get(key, key)
        if key not in PLANES:
            raise input_error("plane", "one of YX, ZX, ZY (or the aliases XY, XZ, YZ)", repr(plane),
                              "Name a plane by its two in-plane axes: 'YX' is a Z slice, 'ZX' a Y slice, "
                              "'ZY' an X slice")
        if key in names:
            raise input_error("planes", "each plane once", f"{plane!r} twice in {tuple(planes)}",
                              "List each plane once (XY is the same plane as YX)")
        names.append(key)
    if not names:
        raise input_error("planes", "at least one plane", "none", "Use planes=('YX', 'ZX', 'ZY')")
    return tuple(names)


def _check_weights(weights: Sequence[float] | None, count: int) -> np.ndarray:
    if weights is None:
        return np.full(count, 1.0 / count)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != (count,) or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise input_error("volume_weights", f"{count} non-negative finite numbers, not all zero",
                          repr(weights), "Give one weight per volume, or None for uniform sampling")
    return w / w.sum()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise input_error(name, f"an integer >= {minimum}", repr(value), f"Set {name} to an integer >= {minimum}")
    return int(value)


def _check_prob(name: str, value: Any, open_low: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and (
        0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise input_error(name, f"a number in {interval}", repr(value), f"Set {name} within {interval}")
    return float(value)

"""The plane-crop sampler with the crops cut on a torch device: :class:`TorchPlaneCropSampler`.

Same draws as :class:`~micromae.data.sampler.PlaneCropSampler` (it inherits ``draw_params``, so batch
``step`` of ``(seed, rank)`` has exactly the same volume, plane, slice, window, crop and flips), but the batch
is built in a few batched tensor operations instead of a Python loop over crops: per output pixel the source
coordinates of the bilinear resize (``align_corners=False``, as ``F.interpolate``) are computed by index
arithmetic, the four neighbours are gathered from the flattened volume (``pad_mode`` applied to the
indices: constant padding masked, reflect mirrored), scaled to [0, 1] as the numpy sampler scales them, and
blended; flips are a reversed output index. Labels use the nearest-exact source index.

Where the volumes live (``storage``): on ``device`` when they fit in ``device_fraction`` of its free memory
(CUDA) or always (CPU; a file-backed ``np.memmap`` is used without a copy); otherwise in pinned host memory,
where the gather runs on the CPU and only the finished batch is copied to the device (non-blocking). Volumes
are kept in their integer type (uint8 as uint8, uint16 as its 16 bits), so a 1 GB uint8 volume takes 1 GB.
Lazy volumes (Zarr, TIFF views) are read into memory once; one that does not fit is a clear error pointing to
``data.sampler=numpy``.

The result equals the numpy sampler's up to float rounding of the blend (≲1e-6; labels exactly), which
``tests/test_torch_sampler.py`` checks crop by crop along with the frequencies of the draws.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from micromae.data.sampler import PLANES, CropParams, PlaneCropSampler
from micromae.errors import input_error

SAMPLERS = ("auto", "numpy", "torch")


def _host_bytes_available() -> int:
    """Physical memory that is free or reclaimable (Linux ``MemAvailable``; elsewhere: a large number)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _storage_dtype(dtype: np.dtype) -> tuple[np.dtype, bool]:
    """How a volume of ``dtype`` is stored: (numpy dtype of the stored tensor, whether it holds uint16 bits)."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8 or dtype == np.int8 or dtype == np.int16 or dtype == np.int32 or dtype == np.int64:
        return dtype, False
    if dtype == np.uint16:
        return np.dtype(np.int16), True  # torch indexes int16 everywhere; the bits are read back as uint16
    if dtype == np.uint32:
        return np.dtype(np.int64), False
    return np.dtype(np.float32), False  # float and other types: the numpy sampler casts to float32 too


def _flat_tensor(volume: Any, name: str) -> tuple[torch.Tensor, bool]:
    """A volume as a 1-D tensor (C order) and its uint16 flag; memmaps and C-contiguous arrays are not copied."""
    store, is_u16 = _storage_dtype(volume.dtype)
    nbytes = int(np.prod(volume.shape)) * store.itemsize
    in_memory = isinstance(volume, np.ndarray) and volume.flags.c_contiguous
    if not in_memory and nbytes > _host_bytes_available() // 2:
        raise input_error(name, f"a volume that fits in memory for data.sampler=torch ({nbytes / 1e9:.1f} GB)",
                          f"{_host_bytes_available() / 1e9:.1f} GB available",
                          "Use data.sampler=numpy (reads only the crops' voxels from disk)")
    array = np.asarray(volume if in_memory else volume[...])
    if array.dtype != store and not (is_u16 and array.dtype == np.uint16):
        array = array.astype(store)
    array = np.ascontiguousarray(array).reshape(-1)
    if is_u16:
        array = array.view(np.int16)
    with warnings.catch_warnings():  # a read-only memmap: torch warns that it is not writable; it is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array), is_u16


@contextlib.contextmanager
def _full_precision(device: torch.device):
    """fp32 products on CUDA even where TF32 was allowed (the resize weights must not be rounded)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _as_values(flat: torch.Tensor, is_u16: bool, index: torch.Tensor) -> torch.Tensor:
    values = flat.index_select(0, index.reshape(-1)).reshape(index.shape)  # much faster than flat[index] on CPU
    return values.to(torch.int32) & 0xFFFF if is_u16 else values


class TorchPlaneCropSampler(PlaneCropSampler):
    """:class:`PlaneCropSampler` whose batches are built on ``device`` (module docstring).

    device: where batches are returned (and, if they fit, where the volumes are kept). device_fraction: the
    share of the device's free memory the volumes may take (CUDA); above it they stay in pinned host memory.
    Other arguments: as :class:`PlaneCropSampler`. Not for DataLoader workers: batches are built in the
    calling process (use :meth:`stream`).
    """

    def __init__(self, volumes: Sequence[Any] | Any, *args: Any, device: torch.device | str = "cpu",
                 device_fraction: float = 0.5, **kwargs: Any) -> None:
        super().__init__(volumes, *args, **kwargs)
        self.device = torch.device(device)
        sizes = sum(int(np.prod(v.shape)) * _storage_dtype(v.dtype)[0].itemsize for v in self.volumes)
        if self.label_volumes is not None:
            sizes += sum(int(np.prod(v.shape)) * _storage_dtype(v.dtype)[0].itemsize for v in self.label_volumes)
        fits = True
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            fits = sizes <= device_fraction * free
        self.storage = self.device if fits else torch.device("cpu")
        self.storage_bytes = sizes
        self._flat = [self._store(v, f"volume {i}") for i, v in enumerate(self.volumes)]
        self._label_flat = None if self.label_volumes is None else [
            self._store(v, f"label volume {i}") for i, v in enumerate(self.label_volumes)]
        shapes = torch.tensor([list(v.shape) for v in self.volumes], dtype=torch.int64)
        strides = torch.stack([shapes[:, 1] * shapes[:, 2], shapes[:, 2], torch.ones(len(shapes), dtype=torch.int64)],
                              1)
        axes = torch.tensor([PLANES[p] for p in self.planes], dtype=torch.int64)  # (P, 3)
        # (V, P) tables: stride of the slice / row / column axis and the row / column sizes
        table = torch.stack([strides[:, axes[:, 0]], strides[:, axes[:, 1]], strides[:, axes[:, 2]],
                             shapes[:, axes[:, 1]], shapes[:, axes[:, 2]]])  # (5, V, P)
        self._geometry = table.to(self.storage)
        self._ranges32 = torch.tensor(self._range_table, dtype=torch.float32).to(self.storage)  # (V, 2)
        self._dst = torch.arange(self.fov, device=self.storage)

    def _store(self, volume: Any, name: str) -> tuple[torch.Tensor, bool]:
        flat, is_u16 = _flat_tensor(volume, name)
        if self.storage.type == "cuda":
            flat = flat.to(self.storage)
        elif self.device.type == "cuda":
            try:
                flat = flat.pin_memory()
            except RuntimeError:  # pinning can fail for very large buffers: pageable memory still works
                pass
        return flat, is_u16

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sampler": type(self).__name__, "device": str(self.device),
                "storage": str(self.storage), "storage_bytes": self.storage_bytes}

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("TorchPlaneCropSampler builds batches in the calling process; do not send it to "
                        "DataLoader workers (use data.num_workers=0, or data.sampler=numpy with workers)")

    def _params_tensor(self, params: CropParams) -> torch.Tensor:
        fields = (params.volume, params.plane, params.slice_index, params.window_row, params.window_col,
                  params.crop_h, params.crop_w, params.crop_row, params.crop_col, params.hflip, params.vflip)
        host = torch.from_numpy(np.stack([np.asarray(f, dtype=np.int64) for f in fields]))
        return host.to(self.storage, non_blocking=False)

    def _axis_index(self, start: torch.Tensor, size: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Volume coordinates ``start + pos`` along one in-plane axis of ``size`` voxels, padded: (index, inside)."""
        coord = start[:, None] + pos
        inside = (coord >= 0) & (coord < size[:, None])
        if self.pad_mode == "reflect":
            period = (2 * (size - 1)).clamp_min(1)[:, None]
            mirrored = torch.remainder(coord, period)
            mirrored = torch.where(mirrored >= size[:, None], period - mirrored, mirrored)
            coord = torch.where(size[:, None] == 1, torch.zeros_like(coord), mirrored)
            inside = torch.ones_like(inside)
        return torch.minimum(coord.clamp(min=0), size[:, None] - 1), inside

    def _layout(self, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per crop: base offset of its slice, row / column strides and sizes, crop origin in the volume."""
        vol, plane = p[0], p[1]
        s_stride, r_stride, c_stride, n_rows, n_cols = (t[vol, plane] for t in self._geometry)
        base = p[2] * s_stride
        row0 = p[3] + p[7] - self.pad
        col0 = p[4] + p[8] - self.pad
        return base, r_stride, c_stride, n_rows, n_cols, row0, col0

    def _dst_index(self, flip: torch.Tensor) -> torch.Tensor:
        """(B, fov) output index before the flip: reversed where ``flip``."""
        return torch.where(flip[:, None].bool(), self.fov - 1 - self._dst[None], self._dst[None])

    def _linear(self, size: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Bilinear source positions as ``F.interpolate(align_corners=False)``: (i0, i1, w0, w1), each (B, fov)."""
        scale = size.to(torch.float32) / self.fov
        src = (scale[:, None] * (self._dst_index(flip).to(torch.float32) + 0.5) - 0.5).clamp_min(0.0)
        i0 = src.to(torch.int64)
        i1 = i0 + (i0 < size[:, None] - 1).to(torch.int64)
        w1 = src - i0.to(torch.float32)
        return i0, i1, 1.0 - w1, w1

    def _gather(self, flats: list[tuple[torch.Tensor, bool]], vol: torch.Tensor, index: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        """``flats[vol[b]][index[b]]`` for every crop b, as ``dtype``; one gather per volume present."""
        if len(flats) == 1:
            return _as_values(*flats[0], index).to(dtype)
        out = torch.empty(index.shape, dtype=dtype, device=index.device)
        for v, (flat, is_u16) in enumerate(flats):
            sel = (vol == v).nonzero().flatten()
            if len(sel):
                out[sel] = _as_values(flat, is_u16, index[sel]).to(dtype)
        return out

    def crops(self, params: CropParams) -> torch.Tensor:
        """The crops of ``params`` (float32 ``(B, 1, fov, fov)`` on ``device``), built in batched operations:
        one gather of each crop's ``fov x fov`` window from its crop origin, the scaling to [0, 1], and the
        separable bilinear resize as two batched products with 2-tap weight matrices (flips included)."""
        p = self._params_tensor(params)
        base, r_stride, c_stride, n_rows, n_cols, row0, col0 = self._layout(p)
        ri, r_in = self._axis_index(row0, n_rows, self._dst[None])
        ci, c_in = self._axis_index(col0, n_cols, self._dst[None])
        index = (base[:, None] + ri * r_stride[:, None])[:, :, None] + (ci * c_stride[:, None])[:, None, :]
        raw = self._gather(self._flat, p[0], index, torch.float32)  # (B, fov, fov) from the crop's origin
        lo, hi = self._ranges32[p[0], 0][:, None, None], self._ranges32[p[0], 1][:, None, None]
        scaled = ((raw - lo) / (hi - lo)).clamp_(0.0, 1.0)
        if self.pad_mode == "constant":  # constant padding is the intensity lo, which scales to 0
            scaled = scaled.masked_fill_(~(r_in[:, :, None] & c_in[:, None, :]), 0.0)
        rows = self._weights(p[5], p[10])  # (B, fov_out, fov_in)
        cols = self._weights(p[6], p[9])
        with _full_precision(scaled.device):
            out = torch.bmm(torch.bmm(rows, scaled), cols.transpose(1, 2))
        return out[:, None].to(self.device, non_blocking=True)

    def _weights(self, size: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The 1-D bilinear resize of ``size`` pixels to ``fov`` (flipped where ``flip``) as (B, fov, fov)
        matrices with two taps per row."""
        i0, i1, w0, w1 = self._linear(size, flip)
        matrix = torch.zeros(len(size), self.fov, self.fov, dtype=torch.float32, device=size.device)
        matrix.scatter_add_(2, i0[:, :, None], w0[:, :, None])
        return matrix.scatter_add_(2, i1[:, :, None], w1[:, :, None])

    def label_crops(self, params: CropParams) -> torch.Tensor:
        """Label crops of ``params``: int64 ``(B, fov, fov)`` on ``device``, nearest-exact as the numpy sampler."""
        if self._label_flat is None:
            return super().label_crops(params)  # raises the clear error
        p = self._params_tensor(params)
        base, r_stride, c_stride, n_rows, n_cols, row0, col0 = self._layout(p)
        rows, cols = self._nearest(p[5], p[10]), self._nearest(p[6], p[9])
        ri, r_in = self._axis_index(row0, n_rows, rows)
        ci, c_in = self._axis_index(col0, n_cols, cols)
        index = (base[:, None] + ri * r_stride[:, None])[:, :, None] + (ci * c_stride[:, None])[:, None, :]
        labels = self._gather(self._label_flat, p[0], index, torch.int64)
        if self.pad_mode == "constant":
            labels = labels.masked_fill_(~(r_in[:, :, None] & c_in[:, None, :]), self.ignore_index)
        return labels.to(self.device, non_blocking=True)

    def _nearest(self, size: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Nearest-exact source index ``min(floor((i + 0.5) * size / fov), size - 1)``, (B, fov)."""
        scale = (size.to(torch.float32) / self.fov).to(torch.float64)
        src = ((self._dst_index(flip).to(torch.float64) + 0.5) * scale[:, None]).to(torch.float32).floor()
        return torch.minimum(src.to(torch.int64), size[:, None] - 1)

    def stream(self, batch_size: int, start_step: int = 0, num_steps: int | None = None):
        """Yield ``(step, batch)`` for steps ``start_step, start_step + 1, ...`` (``num_steps`` of them, or forever)."""
        step, stop = start_step, None if num_steps is None else start_step + num_steps
        while stop is None or step < stop:
            yield step, self.sample_batch(step, batch_size)
            step += 1


def choose_sampler(name: str, device: torch.device) -> str:
    """``numpy`` or ``torch`` for ``data.sampler``: ``auto`` is torch on CUDA and numpy elsewhere (on this
    project's CPUs the numpy sampler with data-loader workers is the better use of the cores, see
    benchmarks/BENCHMARKS.md)."""
    if name not in SAMPLERS:
        raise input_error("data.sampler", f"one of {SAMPLERS}", repr(name), "Use auto, numpy or torch")
    if name == "auto":
        return "torch" if torch.device(device).type == "cuda" else "numpy"
    return name


__all__ = ["TorchPlaneCropSampler", "choose_sampler", "SAMPLERS"]

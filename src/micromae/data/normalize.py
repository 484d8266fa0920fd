"""Intensity normalisation: find a volume's intensity range, then scale voxels to [0, 1].

MAESTER feeds the encoder intensities in [0, 1] (uint8 EM divided by 255). micromae generalises this to
four ways of choosing the range ``(lo, hi)`` that maps to ``[0, 1]``:

- ``"auto"`` (the default): ``"dtype"`` for 8-bit and bool data, ``"percentile"`` for everything else. Many
  16-bit EM and light-microscopy files use a few hundred of their 65 536 values; divided by 65535 they would
  become an almost constant image.
- ``"dtype"``: the full range of the integer type (uint8 -> (0, 255), uint16 -> (0, 65535), other integer
  types by ``np.iinfo``, bool -> (0, 1)); float data has no such range and falls back to ``"minmax"``.
- ``"minmax"``: the smallest and largest voxel.
- ``"percentile"``: the given low/high percentiles (robust to hot pixels and dark borders).

``"minmax"`` and ``"percentile"`` are estimated from a random subsample of small blocks (at most
``max_samples`` voxels), so they work on lazy volumes far larger than memory: a volume no larger than
``max_samples`` is read whole and the result is exact; a larger one gives an estimate (a subsample can miss
the single darkest or brightest voxel, which only means a few voxels are clipped by :func:`scale_intensity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from micromae.errors import input_error

MODES = ("auto", "dtype", "minmax", "percentile")
MIN_CONTRAST = 0.03  # scaled data whose central 99 % span less of [0, 1] than this are refused as too faint
BLOCK_EDGE = 32  # edge of the sampled blocks: 32**3 voxels, one cheap read each
MAX_BLOCKS = 1024  # bound on the number of reads for very thin or very large volumes


def _check_dtype(volume: Any, name: str) -> np.dtype:
    dtype = np.dtype(volume.dtype)
    if dtype.kind not in "biuf":
        raise input_error(name, "integer, bool or float voxels", f"dtype {dtype}",
                          "Convert the image to a real-valued numeric type first")
    return dtype


def sample_voxels(volume: Any, max_samples: int = 1_000_000, seed: int = 0) -> tuple[np.ndarray, bool]:
    """Read a random subsample of voxels from an array-like of any dimensionality.

    volume: array-like with ``.shape`` and numpy-style slicing (numpy, memmap, zarr, lazy volume).
    Returns ``(values, complete)``: ``values`` is 1-D (about ``max_samples`` voxels or fewer) and
    ``complete`` is True when the whole volume was read (it holds at most ``max_samples`` voxels).
    Larger volumes are sampled as random blocks of edge ``BLOCK_EDGE`` (less when ``max_samples`` is
    small; clipped to the shape), so each read is small and suits chunked storage, and at most
    ``max_samples`` voxels are read in all.
    """
    shape = tuple(int(s) for s in volume.shape)
    if math.prod(shape) <= max_samples:
        return np.asarray(volume[...]).ravel(), True
    edge = min(BLOCK_EDGE, max(1, int(max_samples ** (1.0 / len(shape)))))  # so one block <= max_samples
    block = tuple(min(s, edge) for s in shape)
    n_blocks = min(MAX_BLOCKS, max(1, max_samples // math.prod(block)))
    rng = np.random.default_rng(seed)
    starts = [rng.integers(0, s - b + 1, size=n_blocks) for s, b in zip(shape, block)]
    parts = []
    for i in range(n_blocks):
        index = tuple(slice(int(st[i]), int(st[i]) + b) for st, b in zip(starts, block))
        parts.append(np.asarray(volume[index]).ravel())
    return np.concatenate(parts), False


def _stream_minmax(volume: Any, slab_voxels: int, stop_if_varying: bool = False) -> tuple[float, float]:
    """Exact (min, max) by reading slabs along the first axis; optionally stop once min < max."""
    shape = tuple(int(s) for s in volume.shape)
    step = max(1, slab_voxels // max(1, math.prod(shape[1:])))
    lo, hi = math.inf, -math.inf
    for start in range(0, shape[0], step):
        slab = np.asarray(volume[start:start + step])
        lo, hi = min(lo, float(slab.min())), max(hi, float(slab.max()))
        if stop_if_varying and hi > lo:
            break
    return lo, hi


def _check_finite(values: np.ndarray, name: str) -> None:
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise input_error(name, "finite intensities", f"{bad} NaN or infinite voxels among those sampled",
                          "Replace NaN/inf (e.g. np.nan_to_num) before training")


def is_constant(volume: Any, max_samples: int = 1_000_000, seed: int = 0) -> bool:
    """True when every voxel has the same value (exact, reads a subsample first and streams only if needed).

    A varying subsample answers at once; a constant subsample of a large volume is confirmed by
    streaming slabs until two different values are seen, so a volume that is mostly background is not
    mistaken for a constant one.
    """
    values, complete = sample_voxels(volume, max_samples, seed)
    if values.size and values.min() != values.max():
        return False
    if complete:
        return True
    lo, hi = _stream_minmax(volume, max_samples, stop_if_varying=True)
    return lo == hi


def intensity_range(volume: Any, mode: str = "auto", percentiles: tuple[float, float] = (0.5, 99.5),
                    max_samples: int = 1_000_000, seed: int = 0, name: str = "volume",
                    min_contrast: float = MIN_CONTRAST) -> tuple[float, float]:
    """The intensity range ``(lo, hi)`` that :func:`scale_intensity` maps to ``[0, 1]``.

    volume: array-like of any shape (numpy, memmap, zarr, lazy volume); only a subsample is read.
    mode: ``"auto"`` | ``"dtype"`` | ``"minmax"`` | ``"percentile"`` (see the module docstring); float data
    with ``"dtype"`` uses ``"minmax"``. percentiles: ``(low, high)`` in [0, 100], for ``"percentile"``.
    name: how error messages call the volume. min_contrast: refuse data whose central 99 % of voxels span
    less than this fraction of [0, 1] after scaling (:func:`check_contrast`; 0 disables). Raises
    MicromaeInputError for an unknown mode, non-numeric or non-finite data, a constant range (``hi == lo``)
    or too faint a result.
    """
    if mode not in MODES:
        raise input_error(f"{name}: normalize mode", f"one of {MODES}", repr(mode),
                          "Use 'auto' (8-bit: dtype, else percentile), 'dtype' for full-range 8-bit EM, "
                          "'percentile' for 16-bit or data with outliers")
    dtype = _check_dtype(volume, name)
    mode = resolve_mode(mode, dtype)
    lo, hi, values = _range(volume, mode, dtype, percentiles, max_samples, seed, name)
    if min_contrast > 0:
        check_contrast(volume, lo, hi, mode, min_contrast, max_samples, seed, name, values=values)
    return lo, hi


def resolve_mode(mode: str, dtype: Any) -> str:
    """``"auto"`` -> ``"dtype"`` for 8-bit integers and bool, else ``"percentile"``; other modes unchanged."""
    if mode != "auto":
        return mode
    dtype = np.dtype(dtype)
    return "dtype" if dtype.kind == "b" or (dtype.kind in "iu" and dtype.itemsize == 1) else "percentile"


def check_contrast(volume: Any, lo: float, hi: float, mode: str, min_contrast: float = MIN_CONTRAST,
                   max_samples: int = 1_000_000, seed: int = 0, name: str = "volume",
                   values: np.ndarray | None = None) -> float:
    """The fraction of [0, 1] that the central 99 % of ``volume``'s voxels span once ``(lo, hi)`` maps to [0, 1];
    MicromaeInputError below ``min_contrast`` (a faint image that scaling would flatten), naming the fix.
    ``values``: a subsample already read (else one is drawn)."""
    if values is None:
        values, _ = sample_voxels(volume, max_samples, seed)
    if values.size == 0 or values.min() == values.max():
        return 0.0  # constant: the callers' constant-volume checks say so more plainly
    q_lo, q_hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if q_hi == q_lo:  # sparse objects on a flat background: judge by the objects
        q_lo, q_hi = float(values.min()), float(values.max())
    span = (q_hi - q_lo) / (hi - lo)
    if span < min_contrast:
        raise input_error(
            f"{name}: intensities after scaling (normalize={mode}, range {lo:g}..{hi:g})",
            f"at least {min_contrast:.0%} of [0, 1] spanned by the central 99 % of voxels",
            f"{span:.2%} (those voxels lie between {q_lo:g} and {q_hi:g}, dtype {np.dtype(volume.dtype)})",
            "Scale by the data's own range: data.normalize=percentile (or auto, the default) for pre-training, "
            "then segment with that checkpoint",
        )
    return span


def _range(volume: Any, mode: str, dtype: np.dtype, percentiles: tuple[float, float], max_samples: int, seed: int,
           name: str) -> tuple[float, float, np.ndarray | None]:
    """(lo, hi, the subsample read or None)."""
    if mode == "dtype" and dtype.kind == "b":
        return 0.0, 1.0, None
    if mode == "dtype" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max), None
    low, high = check_percentiles(percentiles)
    values, complete = sample_voxels(volume, max_samples, seed)
    _check_finite(values, name)
    if mode == "percentile":
        lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    else:
        lo, hi = float(values.min()), float(values.max())
        if lo == hi and not complete:  # mostly-background volume: make sure before calling it constant
            lo, hi = _stream_minmax(volume, max_samples)
    if not hi > lo:
        fix = ("Drop this volume (it holds no image) or check that it was read correctly" if mode == "minmax"
               else "Most sampled voxels share one value: use normalize='minmax' or wider percentiles")
        raise input_error(f"{name}: intensity range ({mode})", "hi > lo", f"lo = hi = {lo:g}", fix)
    return lo, hi, values


def check_percentiles(percentiles: Sequence[float], example: Sequence[float] = (0.5, 99.5)) -> tuple[float, float]:
    """``(low, high)`` as floats; MicromaeInputError unless ``0 <= low < high <= 100``."""
    try:
        low, high = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        low, high = math.nan, math.nan
    if not 0.0 <= low < high <= 100.0:
        raise input_error("percentiles", "(low, high) with 0 <= low < high <= 100", repr(percentiles),
                          f"For example percentiles=({example[0]}, {example[1]})")
    return low, high


def scale_intensity(x: Any, lo: Any, hi: Any) -> Any:
    """Map ``lo -> 0`` and ``hi -> 1`` linearly, clip to ``[0, 1]``, return float32.

    x: numpy array or torch tensor of any shape; lo, hi: scalars or arrays/tensors broadcasting against x
    (e.g. shape (B, 1, 1, 1) for one range per sample). Returns the same kind as ``x`` (float32).
    Raises MicromaeInputError where ``hi <= lo``.
    """
    lo_np, hi_np = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in (lo, hi))
    if not np.all(hi_np.astype(np.float64) > lo_np.astype(np.float64)):
        raise input_error("intensity range", "hi > lo", f"lo={lo!r}, hi={hi!r}",
                          "A constant image cannot be normalised: drop it or pass a wider range")
    if isinstance(x, torch.Tensor):  # keep the tensor's device
        lo_t = torch.as_tensor(lo, dtype=torch.float32, device=x.device)
        hi_t = torch.as_tensor(hi, dtype=torch.float32, device=x.device)
        return ((x.to(torch.float32) - lo_t) / (hi_t - lo_t)).clamp_(0.0, 1.0)
    lo32, hi32 = np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32)
    return np.clip((np.asarray(x, dtype=np.float32) - lo32) / (hi32 - lo32), 0.0, 1.0)

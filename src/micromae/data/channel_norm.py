"""Scaling multi-channel images ``(C, H, W)`` to [0, 1] (``normalize`` of the multi-channel loaders).

- ``normalize="dtype"`` (default, DAMA's): integer images divided by their dtype's maximum (uint8 by 255,
  uint16 by 65535); float images by their own maximum over all channels and pixels (so the brightest pixel
  is 1; an image with no positive value is left as is).
- ``"percentile"``: per image and per channel, the ``percentiles`` ``(low, high)`` (default 0.5 and 99.8)
  map to 0 and 1, values outside are clipped. 16-bit multiplex images use a small part of their type's
  range (12-bit cameras, dim markers: the synthetic images average 0.018 under ``"dtype"``); this gives
  every channel the full range. 99.8 rather than 99.5: a marker expressed by few cells covers ~1 % of the
  pixels, and a lower top percentile would saturate most of them. A constant channel becomes 0.
- ``"minmax"``: the same with the smallest and largest value (percentiles 0 and 100).
- ``"channel_stats"``: one range per channel for the whole folder, the ``percentiles`` of a seeded pixel
  sample of (up to 256 of) its files (:func:`dataset_channel_ranges`). For folders of cell crops: a
  per-file percentile would stretch a marker-negative crop's background to [0, 1]; this keeps the intensity
  differences between crops. The ranges come from the folder being read (training and test folders of one
  acquisition give close ranges).

The whole file is normalised before any crop or augmentation (crops of one image share one contrast).
There is no mean/std normalisation, as in DAMA.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from micromae.data.normalize import check_percentiles
from micromae.errors import input_error

NORMALIZE_MODES = ("auto", "dtype", "minmax", "percentile", "channel_stats")
DEFAULT_PERCENTILES = (0.5, 99.8)


def scale_to_unit(array: np.ndarray) -> np.ndarray:
    """(C, H, W) array -> float32: integers divided by the dtype maximum, floats by the array's maximum."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype.kind in "iu":
        return array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    out = array.astype(np.float32)
    peak = float(out.max()) if out.size else 0.0
    return out / np.float32(peak) if peak > 0 else out


def check_normalize(normalize: str, percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> tuple[float, float]:
    """Raise MicromaeInputError for an unknown mode or bad percentiles; return them as ``(low, high)``."""
    if normalize not in NORMALIZE_MODES:
        raise input_error("normalize", f"one of {NORMALIZE_MODES}", repr(normalize),
                          "Use 'dtype' (divide by the type's maximum) or 'percentile' (per image and channel)")
    return check_percentiles(percentiles, example=DEFAULT_PERCENTILES)


def channel_ranges(array: np.ndarray, normalize: str = "percentile",
                   percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> np.ndarray:
    """Per-channel ``(lo, hi)`` of a ``(C, H, W)`` array as float32 ``(2, C)``: its ``percentiles`` (linear
    interpolation, ``np.percentile``'s default) for ``"percentile"``, its min and max for ``"minmax"``."""
    low, high = check_normalize(normalize, percentiles)
    if normalize == "dtype":
        raise input_error("channel_ranges normalize", "percentile or minmax", "dtype", "dtype needs no ranges")
    q = (0.0, 100.0) if normalize == "minmax" else (low, high)
    return np.percentile(array.reshape(array.shape[0], -1), q, axis=1).astype(np.float32)


def dataset_channel_ranges(arrays: Iterable[np.ndarray], percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                           samples: int = 4096, seed: int = 0) -> np.ndarray:
    """Per-channel ``(lo, hi)`` (float32 ``(2, C)``) of several ``(C, H, W)`` arrays: the ``percentiles`` of
    up to ``samples`` pixels drawn from each array (``np.random.default_rng([seed, i])``), pooled."""
    low, high = check_normalize("percentile", percentiles)
    pooled = []
    for i, array in enumerate(arrays):
        flat = array.reshape(array.shape[0], -1)
        if flat.shape[1] > samples:
            flat = flat[:, np.random.default_rng([seed, i]).choice(flat.shape[1], samples, replace=False)]
        pooled.append(flat.astype(np.float64))
    return np.percentile(np.concatenate(pooled, axis=1), (low, high), axis=1).astype(np.float32)


def normalize_channels(array: np.ndarray, normalize: str = "dtype",
                       percentiles: Sequence[float] = DEFAULT_PERCENTILES, ranges: np.ndarray | None = None
                       ) -> np.ndarray:
    """``(C, H, W)`` array -> float32 ``(C, H, W)`` in [0, 1] (module docstring).

    ``"dtype"``: :func:`scale_to_unit`. ``"percentile"`` / ``"minmax"`` / ``"channel_stats"`` (which needs
    ``ranges``, from :func:`dataset_channel_ranges`): for each channel ``c``,
    ``clip((x - lo_c) / (hi_c - lo_c), 0, 1)`` with ``(lo, hi)`` = ``ranges`` if given (``(2, C)``, e.g.
    cached from :func:`channel_ranges`), else :func:`channel_ranges` of ``array``; a channel with
    ``hi_c == lo_c`` gives 0.
    """
    check_normalize(normalize, percentiles)
    if normalize == "auto":  # 8-bit: divide by 255; 16-bit and float: each channel's own percentiles
        normalize = "dtype" if array.dtype == np.bool_ or array.dtype.itemsize == 1 else "percentile"
    if normalize == "dtype":
        return scale_to_unit(array)
    if normalize == "channel_stats" and ranges is None:
        raise input_error("normalize='channel_stats'", "the folder's ranges", "none",
                          "Pass ranges=dataset_channel_ranges(...) (MultiChannelImageFolder does)")
    x = array.astype(np.float32)
    if x.size == 0:
        return x
    lo, hi = (v[:, None, None] for v in (channel_ranges(array, normalize, percentiles) if ranges is None else ranges))
    span = hi - lo
    out = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1.0), 0.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)

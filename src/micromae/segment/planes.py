"""2-D views of a 3-D volume along one axis, read lazily, for slice-by-slice inference.

The plane convention is the sampler's: axis 0 gives YX planes (a Z slice), axis 1 gives ZX planes, axis 2
gives ZY planes; rows run along the earlier of the two in-plane axes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from micromae.errors import input_error

AXIS_NAMES = {0: "Z", 1: "Y", 2: "X"}


def check_axis(axis: Any) -> int:
    if isinstance(axis, str) and axis.upper() in ("Z", "Y", "X"):
        return "ZYX".index(axis.upper())
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= int(axis) <= 2:
        return int(axis)
    raise input_error("slicing axis", "0/1/2 or Z/Y/X", repr(axis), "Use axis Z (XY planes) for most data")


class PlaneView:
    """Slice ``index`` of ``volume`` (Z, Y, X) along ``axis`` as a lazy (H, W) array.

    Supports ``view[..., rows, cols]`` with slices (what the cover-and-stride reader uses); only that region
    of the volume is read.
    """

    def __init__(self, volume: Any, axis: int, index: int):
        self.volume, self.axis, self.index = volume, check_axis(axis), int(index)
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) != 3:
            raise input_error("volume", "3 dimensions (Z, Y, X)", f"shape {shape}", "Pass a single-channel volume")
        if not 0 <= self.index < shape[self.axis]:
            raise input_error("slice index", f"0..{shape[self.axis] - 1}", str(index), "Pick a slice in the volume")
        self.shape = tuple(s for i, s in enumerate(shape) if i != self.axis)
        self.dtype = volume.dtype
        self.ndim = 2

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        if key and key[0] is Ellipsis:
            key = key[1:]
        key = tuple(key) + (slice(None),) * (2 - len(key))
        rows, cols = key
        index: list[Any] = [rows, cols]
        index.insert(self.axis, self.index)
        return np.asarray(self.volume[tuple(index)])

    def __array__(self, dtype=None, copy=None):
        out = self[:, :]
        return out.astype(dtype) if dtype is not None else out


def plane_shape(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """(H, W) of the planes of a (Z, Y, X) volume along ``axis``."""
    return tuple(int(s) for i, s in enumerate(shape) if i != axis)  # type: ignore[return-value]


def plane_index(axis: int, index: int, rows: slice | np.ndarray, cols: slice | np.ndarray) -> tuple:
    """The volume index of region ``rows x cols`` of plane ``index`` along ``axis``."""
    key: list[Any] = [rows, cols]
    key.insert(axis, index)
    return tuple(key)

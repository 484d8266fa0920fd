"""Checks that reject unusable images early, with messages that say what to do.

* :func:`check_shape_and_dtype` - zero-size dimensions, non-numeric dtypes;
* :func:`check_values` - NaN / inf and constant data, by a blockwise scan that never loads the whole volume;
* :func:`require_axes` - a consumer (a 3-D sampler, a multichannel loader) states which axes it needs;
* :func:`check_crop_fits` - a crop or field of view larger than the image.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from micromae.errors import input_error
from micromae.io.axes import SQUEEZED

SCAN_BLOCK_BYTES = 64 * 2**20


def check_shape_and_dtype(shape: Sequence[int], dtype: Any, source: str) -> None:
    """Refuse arrays with a zero-size dimension, and dtypes that are not bool, integer or float."""
    shape = tuple(int(n) for n in shape)
    if any(n == 0 for n in shape):
        raise input_error(source, "an image with at least one pixel along every dimension",
                          f"an empty array of shape {shape}",
                          "Check the file (or dataset key): it holds no image data")
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise input_error(source, "numeric pixel values (bool, integer or float)", f"dtype {dtype}",
                          "Convert the image to an integer or float type before use")


def _scan_block_shape(volume: Any, target_bytes: int) -> tuple[int | None, ...]:
    """Blocks that are whole along every dim but the file's outermost one, ~``target_bytes`` each."""
    outer = next(a for a in volume.file_axes if a != SQUEEZED)
    at = volume.axes.index(outer)
    slab = volume.nbytes // max(volume.shape[at], 1)
    n = max(1, target_bytes // max(slab, 1))
    chunks = volume.chunks
    if chunks is not None and n > chunks[at]:
        n -= n % chunks[at]
    return tuple(n if i == at else None for i in range(volume.ndim))


def _where(slices: Sequence[slice], axes: str) -> str:
    return ", ".join(f"{a} {s.start}:{s.stop}" for a, s in zip(axes, slices))


def check_values(volume: Any, target_bytes: int = SCAN_BLOCK_BYTES) -> None:
    """Scan ``volume`` block by block; refuse NaN/inf values and constant data (all voxels equal).

    Integer data stop at the first block that shows two different values; float data are scanned to the
    end because a NaN may hide anywhere.
    """
    is_float = volume.dtype.kind == "f"
    low = high = None
    for slices, block in volume.iter_blocks(_scan_block_shape(volume, target_bytes)):
        if is_float:
            bad = ~np.isfinite(block)
            if bad.any():
                at = tuple(int(i) + s.start for i, s in zip(np.argwhere(bad)[0], slices))
                raise input_error(volume.source, "finite pixel values",
                                  f"{int(bad.sum())} non-finite value(s) in region {_where(slices, volume.axes)}, "
                                  f"the first {block[bad].flat[0]} at {volume.axes} = {at}",
                                  "Replace NaN/inf (e.g. numpy.nan_to_num) or crop them away before use")
        block_low, block_high = block.min(), block.max()
        low = block_low if low is None else min(low, block_low)
        high = block_high if high is None else max(high, block_high)
        if low != high and not is_float:
            return
    if low == high:
        raise input_error(volume.source, "an image whose pixels are not all equal",
                          f"constant data: every voxel equals {low.item()!r} (shape {volume.shape})",
                          "Check the file, dataset key or channel: a constant image holds nothing to learn")


def require_axes(volume: Any, allowed: str | Iterable[str], what: str) -> None:
    """Refuse ``volume`` unless its canonical axes are ``allowed`` (one axes string or several).

    ``what`` names the consumer in the message, e.g. ``"MAESTER plane sampler"``.
    """
    options = [allowed] if isinstance(allowed, str) else sorted(allowed)
    if volume.axes in options:
        return
    wanted = " or ".join(f"'{a}'" for a in options)
    found = f"axes '{volume.axes}' with shape {tuple(volume.shape)}"
    if getattr(volume, "path", None) is not None:
        found += f" in {volume.source}"
    singles = "".join(a for a, n in zip(volume.axes, volume.shape) if n != 1)
    if singles in options:
        fix = (f"Drop the size-1 dimensions: open the file with axes='{singles}' (one letter per dimension "
               "of size > 1)")
    else:
        fix = (f"Open the data with axes= naming its dimensions in file order with C, Z, Y, X so that they "
               f"read as {wanted}, or use data with those dimensions")
    raise input_error(what, f"data with axes {wanted}", found, fix)


def check_crop_fits(shape: Sequence[int], crop: int | Sequence[int], what: str) -> None:
    """Refuse a crop / field of view larger than the image.

    ``crop`` applies to the trailing dims of ``shape`` (an int means a square over the last two), so a
    plane crop ``(F, F)`` is checked against ``(Y, X)`` of a ``(Z, Y, X)`` volume.
    """
    shape = tuple(int(n) for n in shape)
    if isinstance(crop, (int, np.integer)):
        crop = (int(crop),) * min(2, len(shape))
    crop = tuple(int(c) for c in crop)
    if len(crop) > len(shape):
        raise input_error(what, f"a crop with at most {len(shape)} sizes for an image of shape {shape}",
                          f"crop {crop}", "Give one crop size per image dimension (or fewer, for the last dims)")
    if any(c < 1 for c in crop):
        raise input_error(what, "crop sizes of at least 1 pixel", f"crop {crop}", "Use positive crop sizes")
    sizes = shape[len(shape) - len(crop):]
    if any(c > n for c, n in zip(crop, sizes)):
        raise input_error(what, f"a crop (field of view) no larger than the image, at most {sizes}",
                          f"crop {crop} for an image of shape {shape}",
                          "Choose a smaller FOV / crop size, or pad the image (e.g. numpy.pad) to at least the crop")

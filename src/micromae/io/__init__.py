"""Readers and writers for images and volumes: TIFF / OME-TIFF, Zarr / OME-Zarr, HDF5, NumPy.

``open_volume`` gives a lazy :class:`Volume` in canonical axis order (CZYX subsequence); the writers are
atomic (temporary sibling + rename) and refuse to overwrite unless asked.
"""

from __future__ import annotations

from micromae.io.axes import CANONICAL_AXES, canonical_axes, parse_axes, to_canonical
from micromae.io.preflight import check_free_space, check_output, format_bytes
from micromae.io.readers import SUPPORTED, detect_format, file_sha256, open_volume, split_key
from micromae.io.validate import check_crop_fits, check_shape_and_dtype, check_values, require_axes
from micromae.io.volume import Volume
from micromae.io.writers import (
    ZarrWriter,
    atomic_path,
    write_array,
    write_files_atomically,
    write_hdf5,
    write_npy,
    write_tiff,
    write_zarr,
)

__all__ = [
    "CANONICAL_AXES",
    "SUPPORTED",
    "Volume",
    "ZarrWriter",
    "atomic_path",
    "canonical_axes",
    "check_crop_fits",
    "check_free_space",
    "check_output",
    "check_shape_and_dtype",
    "check_values",
    "detect_format",
    "file_sha256",
    "format_bytes",
    "open_volume",
    "parse_axes",
    "require_axes",
    "split_key",
    "to_canonical",
    "write_array",
    "write_files_atomically",
    "write_hdf5",
    "write_npy",
    "write_tiff",
    "write_zarr",
]

"""Open TIFF / OME-TIFF, Zarr / OME-Zarr, HDF5 and .npy files as lazy :class:`Volume` views.

Nothing is read whole: TIFF files are memory-mapped when their pixels are contiguous and otherwise read
through tifffile's Zarr store; Zarr and HDF5 read only the chunks a region touches; .npy is memory-mapped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import imageio.v3
import numpy as np
import tifffile
import zarr

from micromae.errors import MicromaeInputError, input_error
from micromae.io.axes import ome_zarr_axes, resolve_axes
from micromae.io.validate import check_shape_and_dtype, check_values
from micromae.io.volume import Volume

TIFF_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SUPPORTED = (".tif, .tiff, .ome.tif, .ome.tiff, .zarr / .ome.zarr (directory), .h5, .hdf5, .hdf, .npy, "
             ".png, .jpg, .bmp (2-D, read whole)")
_KEYED_PATH = re.compile(r"^(?P<file>.+?\.(?:h5|hdf5|hdf|he5|zarr))[/\\]?:(?P<key>.+)$", re.IGNORECASE)
_ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")
Opened = tuple[Any, str | None, list[Callable[[], Any]]]  # (array, metadata axes, closers)


def _corrupt(path: Path, kind: str, error: BaseException) -> Exception:
    return input_error(f"file '{path}'", f"a readable {kind} file",
                       f"an error while opening it ({type(error).__name__}: {error})",
                       "The file looks corrupt or truncated (an interrupted copy or export?); copy or write it again")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks (ties outputs to the checkpoint they came from; pins sample files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def split_key(path: str | os.PathLike, key: str | None) -> tuple[Path, str | None]:
    """Split ``file.h5:group/dataset`` (or ``dir.zarr:array``) into the file and the key."""
    text = os.fspath(path)
    match = None if os.path.exists(text) else _KEYED_PATH.match(text)
    if match is None:
        return Path(text), key
    path_key = match["key"].strip("/")
    if key is not None and key.strip("/") != path_key:
        raise input_error(f"volume '{text}'", "one dataset key", f"key '{path_key}' in the path and key='{key}'",
                          "Give the key either in the path (file.h5:key) or as key=, not both")
    return Path(match["file"]), path_key


def detect_format(path: Path) -> str:
    """``"tiff"``, ``"zarr"``, ``"hdf5"`` or ``"npy"`` for ``path``; raise when missing or unsupported."""
    if not path.exists():
        raise input_error(f"path '{path}'", "an existing file or directory", "nothing at that path",
                          f"Check the spelling (relative paths start from {Path.cwd()})")
    name = path.name.lower()
    if path.is_dir():
        if any((path / marker).exists() for marker in _ZARR_MARKERS):
            return "zarr"
        if name.endswith(".zarr"):
            raise input_error(f"directory '{path}'", "a Zarr store (holding zarr.json, .zarray or .zgroup)",
                              "a directory without Zarr metadata",
                              "The store looks incomplete or corrupt; write or copy it again")
        raise input_error(f"directory '{path}'", f"an image file or Zarr store; supported: {SUPPORTED}",
                          "a directory that is not a Zarr store", "Point at one image file or a .zarr store")
    if name.rstrip("/\\").endswith(".zarr"):
        raise input_error(f"path '{path}'", "a Zarr store, which is a folder (holding zarr.json, .zarray or .zgroup)",
                          "a file", "Point at the .zarr folder itself; a file of that name is not a Zarr store "
                          "(was it zipped or copied without its contents?)")
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(PLAIN_IMAGE_SUFFIXES):
        return "image"
    raise input_error(f"file '{path}'", f"one of the supported formats: {SUPPORTED}",
                      f"extension '{path.suffix or '(none)'}'",
                      "Convert the image to TIFF, Zarr, HDF5 or .npy (or rename it if the extension is wrong)")


@contextmanager
def _tifffile_errors() -> Iterator[list[str]]:
    """Collect what tifffile logs at ERROR level (it logs, rather than raises, on broken page chains)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Collect(level=logging.ERROR)
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _check_tiff_extent(path: Path, series: Any) -> None:
    """Raise when the pixel data of ``series`` would run past the end of the file (a truncated copy)."""
    size = path.stat().st_size
    if series.dataoffset is not None:
        end = series.dataoffset + series.nbytes
    else:
        last = series.pages[-1]
        if last is None or Path(last.parent.filehandle.path).resolve() != path.resolve():
            return  # a page missing from the series, or kept in another file of a multi-file OME-TIFF
        end = max((o + n for o, n in zip(last.dataoffsets, last.databytecounts)), default=0)
    if end > size:
        raise input_error(f"file '{path}'", f"a TIFF file of at least {end} bytes (from its own header)",
                          f"{size} bytes", "The file looks truncated (an interrupted copy?); copy or write it again")


def _open_tiff(path: Path, key: str | None) -> Opened:
    """Memory-map contiguous TIFF pixels; otherwise read them through tifffile's Zarr store."""
    if key is not None:
        raise input_error(f"file '{path}'", "no dataset key for a TIFF file", f"key '{key}'",
                          "Drop the key (keys select datasets in HDF5 files and arrays in Zarr groups)")
    tif = None
    try:
        with _tifffile_errors() as logged:
            tif = tifffile.TiffFile(path)
            if not tif.series:
                raise tifffile.TiffFileError("no image series in the file")
            series = tif.series[0]
            meta_axes = series.axes
            _check_tiff_extent(path, series)
        if logged:
            raise tifffile.TiffFileError("; ".join(logged))
        if series.dataoffset is not None:
            tif.close()
            return tifffile.memmap(path, series=0, mode="r"), meta_axes, []
        store = series.aszarr(level=0)
        return zarr.open_array(store, mode="r"), meta_axes, [store.close, tif.close]
    except MicromaeInputError:
        if tif is not None:
            tif.close()
        raise
    except Exception as error:  # tifffile raises many kinds (struct.error, IndexError...) on broken files
        if tif is not None:
            tif.close()
        raise _corrupt(path, "TIFF", error) from error


def _ome_multiscales(attrs: Any) -> list | None:
    """``multiscales`` of an OME-Zarr group (v0.4 at the top of the attributes, v0.5 under ``ome``)."""
    attrs = dict(attrs)
    return attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")


def _array_names(group: Any) -> list[str]:
    return sorted(name for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array))


def _zarr_group_array(group: Any, path: Path, key: str | None) -> tuple[Any, str | None, str | None]:
    """Pick the array of a group: ``key``, else OME-Zarr level 0, else the only array."""
    if key is not None:
        try:
            node = group[key]
        except KeyError:
            node = None
        if not isinstance(node, zarr.Array):
            raise input_error(f"Zarr store '{path}'", "a key naming an array in the store",
                              f"key '{key}'; the arrays are: {', '.join(_array_names(group)) or '(none)'}",
                              "Pass one of those names as key= (or dir.zarr:name)")
        return node, None, key
    multiscales = _ome_multiscales(group.attrs)
    if multiscales:
        level0 = multiscales[0]["datasets"][0]["path"]
        axes_meta = multiscales[0].get("axes")
        return group[level0], ome_zarr_axes(axes_meta) if axes_meta else None, level0
    names = _array_names(group)
    if len(names) != 1:
        raise input_error(f"Zarr group '{path}'", "one array, OME-Zarr multiscales metadata, or a key",
                          f"{len(names)} arrays: {', '.join(names) or '(none)'}",
                          "Pass key= naming the array to read (or dir.zarr:name)")
    return group[names[0]], None, names[0]


def _open_zarr(path: Path, key: str | None) -> Opened:
    """A Zarr array, or an array chosen from a Zarr group (formats 2 and 3)."""
    try:
        node = zarr.open(store=str(path), mode="r")
    except Exception as error:  # zarr raises many kinds for a broken store (json, metadata, node type)
        raise _corrupt(path, "Zarr", error) from error
    meta_axes = None
    if isinstance(node, zarr.Array):
        if key is not None:
            raise input_error(f"Zarr array '{path}'", "no key for a plain Zarr array", f"key '{key}'",
                              "Drop the key (it selects an array inside a Zarr group)")
        array = node
    else:
        array, meta_axes, _ = _zarr_group_array(node, path, key)
    stored = dict(array.attrs).get("axes")
    return array, meta_axes or (stored if isinstance(stored, str) else None), []


def _hdf5_datasets(file: Any) -> list[str]:
    names: list[str] = []
    file.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
    return names


def _open_hdf5(path: Path, key: str | None) -> Opened:
    """One dataset of an HDF5 file, chosen by key (or the only dataset when the file holds one)."""
    try:
        file = h5py.File(path, "r")
    except (OSError, ValueError) as error:
        raise _corrupt(path, "HDF5", error) from error
    names = _hdf5_datasets(file)
    listing = ", ".join(names) or "(none)"
    if key is None and len(names) != 1:
        file.close()
        raise input_error(f"HDF5 file '{path}'", "a dataset key (file.h5:key or key=)",
                          f"no key, and the file holds {len(names)} datasets: {listing}",
                          "Name the dataset to read, e.g. key='" + (names[0] if names else "raw") + "'")
    key = names[0] if key is None else key.strip("/")
    if not isinstance(file.get(key), h5py.Dataset):
        file.close()
        raise input_error(f"HDF5 file '{path}'", "a key naming one of its datasets",
                          f"key '{key}'; the datasets are: {listing}", "Pass one of those names as the key")
    dataset = file[key]
    stored = dataset.attrs.get("axes")
    stored = stored.decode() if isinstance(stored, bytes) else stored
    return dataset, stored if isinstance(stored, str) else None, [file.close]


def _open_npy(path: Path, key: str | None) -> Opened:
    if key is not None:
        raise input_error(f"file '{path}'", "no dataset key for a .npy file", f"key '{key}'", "Drop the key")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False), None, []
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise _corrupt(path, ".npy", error) from error


def _open_plain_image(path: Path, key: str | None) -> Opened:
    """A small 2-D PNG / JPEG / BMP, read whole with imageio (RGB(A) samples become channels)."""
    if key is not None:
        raise input_error(f"file '{path}'", "no dataset key for a plain image", f"key '{key}'", "Drop the key")
    try:
        image = np.asarray(imageio.v3.imread(path))
    except Exception as error:  # imageio's plugins raise many kinds on a broken file
        raise _corrupt(path, path.suffix.lstrip(".").upper(), error) from error
    return image, "YXS" if image.ndim == 3 else None, []


_OPENERS = {"tiff": _open_tiff, "zarr": _open_zarr, "hdf5": _open_hdf5, "npy": _open_npy,
            "image": _open_plain_image}


def open_volume(path: str | os.PathLike, axes: str | None = None, key: str | None = None,
                check: bool = True) -> Volume:
    """Open an image or volume lazily; indexing the result reads only the region asked for.

    Args:
        path: a TIFF / OME-TIFF file, a Zarr or OME-Zarr directory, an HDF5 file (``file.h5:key``
            selects a dataset), or a ``.npy`` file.
        axes: the file's dimensions in file order, letters C, Z, Y, X (``"ZYX"``, ``"YXC"``...). Default:
            the file's metadata (OME / ImageJ axes), else 2 dims -> YX, 3 -> ZYX, 4 -> CZYX.
        key: HDF5 dataset or Zarr array inside a group.
        check: scan the data block by block and refuse NaN/inf and constant images.

    Returns:
        a :class:`Volume` in canonical order (CZYX subsequence).
    """
    file_path, key = split_key(path, key)
    kind = detect_format(file_path)
    array, meta_axes, closers = _OPENERS[kind](file_path, key)
    volume = None
    try:
        source = f"volume '{file_path}{':' + key if key else ''}'"
        check_shape_and_dtype(array.shape, array.dtype, source)
        file_axes = resolve_axes(array.shape, axes, meta_axes, source)
        volume = Volume(array, file_axes, path=file_path, closers=closers, key=key)
        if check:
            check_values(volume)
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    return volume


def reopen_volume(path: str, key: str | None, file_axes: str) -> Volume:
    """Open ``path`` again with already resolved file-order axes and no value scan (used by unpickling)."""
    file_path = Path(path)
    array, _, closers = _OPENERS[detect_format(file_path)](file_path, key)
    return Volume(array, file_axes, path=file_path, closers=closers, key=key)

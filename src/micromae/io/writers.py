"""Atomic writers: TIFF / OME-TIFF, Zarr (whole or streamed block by block), HDF5 and .npy.

Every writer writes to a hidden temporary sibling of the target and renames it onto the target only when
the write has finished, so an interrupted or failing write never leaves a half-written output behind.
Existing outputs are kept unless ``overwrite=True``. Arrays given with ``axes`` are stored in canonical
order (CZYX subsequence) with the axes recorded in the file's metadata.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import tifffile
import zarr

from micromae.errors import input_error
from micromae.io.axes import to_canonical
from micromae.io.readers import HDF5_SUFFIXES, TIFF_SUFFIXES, split_key
from micromae.io.volume import Volume

_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)
_BIGTIFF_BYTES = 2**32 - 2**25


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        kind = "directory" if target.is_dir() else "file"
        raise input_error(f"output '{target}'", "a path with nothing there yet", f"an existing {kind}",
                          "Choose another output path, delete the old output, or pass overwrite=True")


def _commit(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target``; an existing directory target is moved aside first, then deleted."""
    if not (tmp.exists() or tmp.is_symlink()):
        raise FileNotFoundError(f"nothing was written to the temporary path {tmp} for {target}")
    if not (target.exists() and (target.is_dir() or tmp.is_dir())):
        os.replace(tmp, target)
        return
    old = target.with_name(f".{uuid.uuid4().hex[:8]}.old.{target.name}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write to; rename it onto ``path`` when the block succeeds.

    The temporary name ends with the target's name, so extension-sensitive writers (``np.save``,
    tifffile's OME detection) behave as for the target. On any exception the temporary file or directory
    is removed and ``path`` is left untouched.
    """
    target = Path(path)
    _refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{uuid.uuid4().hex[:8]}.partial.{target.name}")
    try:
        yield tmp
        _refuse_existing(target, overwrite)
        _commit(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _prepare(array: Any, axes: str | None) -> tuple[np.ndarray, str | None]:
    """``array`` as numpy in canonical order and its canonical axes (``None`` when axes were not given)."""
    array = np.asarray(array)
    if axes is None:
        return array, None
    return to_canonical(array, axes, "array to write")


def _imwrite_tiff(path: Path, data: np.ndarray, canon: str, compression: str | None) -> None:
    """Write canonical-order ``data`` (axes ``canon``) to ``path`` itself, not atomically.

    Every plane is a grey page (``photometric="minisblack"``): without it tifffile would store a
    (3 or 4, Y, X) stack as one RGB(A) image. ``*.ome.tif(f)`` names get OME-XML; other names get an
    ImageJ hyperstack when the dtype allows (uint8, uint16, float32) and OME-XML otherwise.
    """
    ome_name = path.name.lower().endswith((".ome.tif", ".ome.tiff"))
    if not ome_name and data.dtype in _IMAGEJ_DTYPES and data.nbytes < _BIGTIFF_BYTES:
        ij_axes = "".join(a for a in "ZCYX" if a in canon)  # ImageJ wants its own order TZCYXS: C after Z
        data = np.transpose(data, [canon.index(a) for a in ij_axes])
        tifffile.imwrite(path, data, imagej=True, photometric="minisblack", metadata={"axes": ij_axes},
                         compression=compression)
    else:
        tifffile.imwrite(path, data, ome=True, photometric="minisblack", metadata={"axes": canon},
                         bigtiff=data.nbytes >= _BIGTIFF_BYTES, compression=compression)


def write_tiff(path: str | os.PathLike, array: Any, axes: str | None = None, *,
               overwrite: bool = False, compression: str | None = None) -> Path:
    """Write ``array`` (dims named by ``axes``, default by rank) to a TIFF file, atomically.

    ``*.ome.tif(f)`` gets OME-XML metadata; other names get an ImageJ hyperstack when the dtype allows
    (uint8, uint16, float32) and OME-XML otherwise. Data are stored in canonical order, one grey page per
    plane. ``compression`` is passed to tifffile (e.g. ``"zlib"``; default none).
    """
    data, canon = to_canonical(np.asarray(array), axes, "array to write")
    target = Path(path)
    with atomic_path(target, overwrite) as tmp:  # tmp ends with target's name: same format choice
        _imwrite_tiff(tmp, data, canon, compression)
    return target


def write_files_atomically(out_dir: str | os.PathLike, arrays: dict[str, Any],
                           texts: dict[str, str] | None = None, *,
                           compress: Collection[str] = ()) -> dict[str, Path]:
    """Write {file name: array} as TIFFs (see :func:`write_tiff`) and {file name: text} into ``out_dir``.

    All or nothing: every file goes to its own temporary sibling (:func:`atomic_path`), and the files are
    renamed into place only after all of them were written, so a failure leaves none behind and a reader
    never sees a half-written file. Existing files of the same names are replaced. Arrays of rank 2, 3
    and 4 are stored as YX, ZYX and CZYX; names in ``compress`` are zlib-compressed. Returns
    {file name: final path}.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise input_error(f"output folder '{out_dir}'", "a folder", "a file", "Choose another output path")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with ExitStack() as pending:  # on exit, renames every finished file, or removes all on an error
        for name, array in arrays.items():
            data, canon = to_canonical(np.asarray(array), None, f"array '{name}'")
            tmp = pending.enter_context(atomic_path(out_dir / name, overwrite=True))
            _imwrite_tiff(tmp, data, canon, "zlib" if name in compress else None)
            written[name] = out_dir / name
        for name, text in (texts or {}).items():
            pending.enter_context(atomic_path(out_dir / name, overwrite=True)).write_text(text)
            written[name] = out_dir / name
    return written


def write_npy(path: str | os.PathLike, array: Any, axes: str | None = None, *, overwrite: bool = False) -> Path:
    """Write ``array`` to a ``.npy`` file atomically (canonical order when ``axes`` is given)."""
    data, _ = _prepare(array, axes)
    with atomic_path(path, overwrite) as tmp:
        np.save(tmp, data, allow_pickle=False)
    return Path(path)


def write_hdf5(path: str | os.PathLike, array: Any, axes: str | None = None, *, key: str | None = None,
               chunks: Sequence[int] | bool | None = True, overwrite: bool = False) -> Path:
    """Write ``array`` as dataset ``key`` (default ``"data"``, or ``file.h5:key``) of a new HDF5 file."""
    file_path, key = split_key(path, key)
    data, canon = _prepare(array, axes)
    chunks = tuple(chunks) if isinstance(chunks, Sequence) else chunks
    with atomic_path(file_path, overwrite) as tmp, h5py.File(tmp, "w") as file:
        dataset = file.create_dataset(key or "data", data=data, chunks=chunks)
        if canon is not None:
            dataset.attrs["axes"] = canon
    return file_path


class ZarrWriter:
    """Stream blocks into a new Zarr array; it appears at ``path`` only when the block exits cleanly.

    >>> with ZarrWriter("labels.zarr", shape=(64, 512, 512), dtype="uint8", chunks=(16, 256, 256)) as w:
    ...     for z in range(0, 64, 16):
    ...         w.array[z:z + 16] = predict(z)   # (16, 512, 512)

    On an exception inside the block the temporary store is deleted and nothing appears at ``path``.
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype: Any,
                 chunks: Sequence[int] | str = "auto", attrs: dict | None = None, *,
                 overwrite: bool = False, zarr_format: int = 3) -> None:
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.chunks = "auto" if chunks is None else chunks
        self.attrs = dict(attrs or {})
        self.overwrite = overwrite
        self.zarr_format = zarr_format
        self.array: Any = None
        self._context: Any = None

    def __enter__(self) -> ZarrWriter:
        self._context = atomic_path(self.path, self.overwrite)
        tmp = self._context.__enter__()
        try:
            self.array = zarr.create_array(store=str(tmp), shape=self.shape, dtype=self.dtype,
                                           chunks=self.chunks, zarr_format=self.zarr_format)
            if self.attrs:
                self.array.attrs.update(self.attrs)
        except BaseException:
            self._context.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.array = None
        return bool(self._context.__exit__(exc_type, exc, tb))


def _zarr_chunks(chunks: Sequence[int] | None) -> Sequence[int] | str:
    return "auto" if chunks is None else tuple(int(c) for c in chunks)


def write_zarr(path: str | os.PathLike, array: Any, chunks: Sequence[int] | None = None,
               attrs: dict | None = None, axes: str | None = None, *, overwrite: bool = False,
               zarr_format: int = 3) -> Path:
    """Write ``array`` to a new Zarr array directory atomically; a :class:`Volume` is copied block by block.

    With ``axes`` the data are stored in canonical order and ``attrs["axes"]`` records it (a Volume's own
    axes are used and recorded when ``axes`` is None).
    """
    attrs = dict(attrs or {})
    if isinstance(array, Volume):
        if axes is not None and axes.upper() != array.axes:
            raise input_error("write_zarr", f"axes matching the volume ('{array.axes}')", f"axes '{axes}'",
                              "Leave axes=None for a Volume: it is written in its own canonical order")
        attrs.setdefault("axes", array.axes)
        chunks = _zarr_chunks(chunks or array.chunks)
        with ZarrWriter(path, array.shape, array.dtype, chunks, attrs, overwrite=overwrite,
                        zarr_format=zarr_format) as writer:
            block = writer.array.chunks
            step = tuple(None if i else max(block[0], 1) for i in range(array.ndim))
            for slices, values in array.iter_blocks(step):
                writer.array[slices] = values
        return Path(path)
    data, canon = _prepare(array, axes)
    if canon is not None:
        attrs["axes"] = canon
    with ZarrWriter(path, data.shape, data.dtype, _zarr_chunks(chunks), attrs,
                    overwrite=overwrite, zarr_format=zarr_format) as writer:
        writer.array[...] = data
    return Path(path)


def write_array(path: str | os.PathLike, array: Any, axes: str | None = None, *,
                overwrite: bool = False, **options: Any) -> Path:
    """Write ``array`` in the format its path names: .tif/.tiff/.ome.tif, .zarr, .h5/.hdf5 (``:key``), .npy."""
    name = os.fspath(path).lower()
    if name.endswith(TIFF_SUFFIXES):
        return write_tiff(path, array, axes, overwrite=overwrite, **options)
    if name.rstrip("/\\").endswith(".zarr"):
        return write_zarr(path, array, axes=axes, overwrite=overwrite, **options)
    if name.endswith(".npy"):
        return write_npy(path, array, axes, overwrite=overwrite, **options)
    if split_key(path, None)[0].name.lower().endswith(HDF5_SUFFIXES):
        return write_hdf5(path, array, axes, overwrite=overwrite, **options)
    raise input_error(f"output '{path}'", "a name ending in .tif, .tiff, .ome.tif, .zarr, .h5, .hdf5 or .npy",
                      f"'{Path(path).name}'", "Choose an output name with one of those extensions")

"""A lazy view of an image or volume in canonical axis order, read region by region.

The data stay in the file (a memory map, a Zarr array, an HDF5 dataset): indexing a :class:`Volume`
reads only the requested region, in file order, and transposes it to canonical order (CZYX subsequence).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from micromae.errors import input_error
from micromae.io.axes import SQUEEZED, canonical_axes, resolve_axes

Index = int | slice
# What a backing array may raise while reading a region of a damaged file.
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, EOFError, KeyError)


class Volume:
    """An array on disk (or in memory) seen in canonical axis order.

    Attributes:
        shape: sizes in canonical order, e.g. ``(C, Z, Y, X)`` for axes ``"CZYX"``.
        dtype: numpy dtype of the stored values.
        axes: canonical axes string, a subsequence of ``"CZYX"``.
        file_axes: axes in file order (``"."`` marks a dropped size-1 dimension).
        path: the file the data come from (``None`` for an in-memory array).

    Indexing (ints and slices with positive steps, ``...``) is in canonical order and returns a numpy
    array holding only that region; ``read()`` returns everything; ``iter_blocks`` walks the volume.
    """

    def __init__(self, source: Any, file_axes: str, path: str | Path | None = None,
                 closers: Sequence[Callable[[], Any]] = (), key: str | None = None) -> None:
        if len(file_axes) != len(source.shape):
            raise ValueError(f"file_axes {file_axes!r} do not match source shape {tuple(source.shape)}")
        self._source = source
        self.file_axes = file_axes
        self.path = Path(path) if path is not None else None
        self.key = key
        self._closers = list(closers)
        named = file_axes.replace(SQUEEZED, "")
        self.axes = canonical_axes(named)
        size = dict(zip(file_axes, source.shape))
        self.shape = tuple(int(size[a]) for a in self.axes)
        self.dtype = np.dtype(source.dtype)

    @classmethod
    def from_array(cls, array: np.ndarray, axes: str | None = None) -> Volume:
        """Wrap an in-memory array (dims named by ``axes`` in its own order; default by rank)."""
        array = np.asarray(array)
        return cls(array, resolve_axes(array.shape, axes, None, "array"))

    # -- basic properties -------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """Chunk sizes of the backing store in canonical order, or ``None`` when it has none."""
        chunks = getattr(self._source, "chunks", None)
        if not chunks:
            return None
        size = dict(zip(self.file_axes, chunks))
        return tuple(int(size[a]) for a in self.axes)

    @property
    def source(self) -> str:
        """How to name this volume in messages: ``volume 'file.h5:raw'``."""
        if self.path is None:
            return "in-memory volume"
        return f"volume '{self.path}{':' + self.key if self.key else ''}'"

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Volume(shape={self.shape}, dtype={self.dtype}, axes={self.axes!r}, path={self.path})"

    # -- reading ----------------------------------------------------------------------------------
    def _normalize(self, index: Any) -> list[Index]:
        """One int or positive-step slice per canonical dim, with bounds applied."""
        index = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in index) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if Ellipsis in index:
            at = index.index(Ellipsis)
            fill = (slice(None),) * (self.ndim - len(index) + 1)
            index = index[:at] + fill + index[at + 1:]
        if len(index) > self.ndim:
            raise IndexError(f"too many indices for a volume of {self.ndim} dims ({self.axes})")
        index = index + (slice(None),) * (self.ndim - len(index))
        out: list[Index] = []
        for i, n in zip(index, self.shape):
            if isinstance(i, slice):
                start, stop, step = i.indices(n)
                if step < 1:
                    raise IndexError("Volume indexing supports only positive slice steps")
                out.append(slice(start, max(start, stop), step))
            elif isinstance(i, (int, np.integer)):
                j = int(i) + n if i < 0 else int(i)
                if not 0 <= j < n:
                    raise IndexError(f"index {int(i)} is out of bounds for an axis of size {n}")
                out.append(j)
            else:
                raise IndexError(f"Volume indexing takes ints, slices and '...', not {type(i).__name__}")
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        """Read one region. ``index`` is in canonical order; returns a C-contiguous numpy array."""
        key = self._normalize(index)
        by_axis = dict(zip(self.axes, key))
        file_key = tuple(0 if a == SQUEEZED else by_axis[a] for a in self.file_axes)
        kept = [a for a in self.file_axes if a != SQUEEZED and isinstance(by_axis[a], slice)]
        if any(isinstance(k, slice) and k.start == k.stop for k in key):
            region = np.empty([len(range(s.start, s.stop, s.step)) for s in
                               (by_axis[a] for a in kept)], dtype=self.dtype)
        else:
            try:
                region = np.asarray(self._source[file_key])
            except _READ_ERRORS as error:
                raise input_error(f"file '{self.path}'", "a readable file",
                                  f"an error reading region {key} ({type(error).__name__}: {error})",
                                  "The file looks corrupt or truncated; copy or export it again") from error
        target = [a for a in self.axes if a in kept]
        region = np.transpose(region, [kept.index(a) for a in target])
        return np.array(region, order="C", copy=True)

    def read(self) -> np.ndarray:
        """The whole volume as a numpy array of ``shape`` (canonical order)."""
        return self[...]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.read()
        return array if dtype is None else array.astype(dtype)

    def iter_blocks(self, block_shape: int | Sequence[int | None]) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
        """Yield ``(slices, block)`` covering the volume once, C-order over blocks.

        ``block_shape`` is one size per canonical dim (``None`` = the whole dim) or one int for all.
        Blocks at the far edges are smaller. ``block`` equals ``volume[slices]``.
        """
        if isinstance(block_shape, (int, np.integer)):
            block_shape = (int(block_shape),) * self.ndim
        block_shape = tuple(block_shape)
        if len(block_shape) != self.ndim:
            raise ValueError(f"block_shape {block_shape} needs {self.ndim} entries for axes {self.axes}")
        sizes = [n if b is None else int(b) for b, n in zip(block_shape, self.shape)]
        if any(b < 1 for b in sizes):
            raise ValueError(f"block sizes must be >= 1, got {block_shape}")
        starts = [range(0, n, b) for n, b in zip(self.shape, sizes)]
        for corner in itertools.product(*starts):
            slices = tuple(slice(s, min(s + b, n)) for s, b, n in zip(corner, sizes, self.shape))
            yield slices, self[slices]

    def __reduce__(self) -> tuple:
        """Pickle file-backed volumes as (path, key, axes) and reopen them (e.g. in DataLoader workers)."""
        if self.path is None:
            return (Volume, (self._source, self.file_axes))
        from micromae.io.readers import reopen_volume  # local: readers imports Volume from here (a cycle)

        return (reopen_volume, (str(self.path), self.key, self.file_axes))

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Release open file handles (HDF5 file, TIFF file); the volume cannot be read afterwards."""
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

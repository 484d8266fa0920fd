"""Axes strings: what each dimension of an array is, and the canonical order micromae works in.

A file's dimensions are named with the letters C (channel), Z, Y, X in file order, for example
``"XYZ"``, ``"YXC"`` or ``"CZYX"``. Every :class:`~micromae.io.volume.Volume` presents its data in the
canonical order, the subsequence of ``"CZYX"`` (channels first, then Z, Y, X).

Inside a volume the file-order axes may also hold ``"."`` for a size-1 dimension that is dropped (a
singleton time axis of an OME file, for instance).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from micromae.errors import input_error

CANONICAL_AXES = "CZYX"
SQUEEZED = "."
DEFAULT_AXES_BY_RANK = {2: "YX", 3: "ZYX", 4: "CZYX"}
# Metadata letters outside CZYX that still mean one of ours: S (RGB samples) is a channel axis;
# I (image sequence) and Q (unknown, tifffile's word for it) are taken as a stack, i.e. Z.
_METADATA_ALIASES = {"S": "C", "I": "Z", "Q": "Z"}
_OME_ZARR_TYPES = {"channel": "C", "time": "T"}


def canonical_axes(axes: str) -> str:
    """Return the canonical order of the letters in ``axes``: ``"YXC"`` -> ``"CYX"``."""
    return "".join(a for a in CANONICAL_AXES if a in axes)


def default_axes(rank: int, source: str) -> str:
    """Axes assumed for an array of ``rank`` dimensions without metadata: 2 -> YX, 3 -> ZYX, 4 -> CZYX."""
    if rank not in DEFAULT_AXES_BY_RANK:
        raise input_error(source, "2, 3 or 4 dimensions (YX, ZYX or CZYX)",
                          f"{rank} dimension{'s' if rank != 1 else ''}",
                          "Pass axes= naming each dimension with C, Z, Y, X, or convert the data")
    return DEFAULT_AXES_BY_RANK[rank]


def _check_letters(axes: str, source: str, origin: str) -> None:
    """Reject letters outside CZYX, repeated letters, and axes without both Y and X."""
    unknown = sorted({a for a in axes if a not in CANONICAL_AXES})
    if unknown:
        raise input_error(source, f"{origin} made of the letters C, Z, Y, X",
                          f"'{axes}' with unknown letter(s) {', '.join(unknown)}",
                          "Name each dimension of the file in file order, e.g. 'ZYX', 'YXC' or 'CZYX'")
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
        raise input_error(source, f"{origin} with each letter at most once",
                          f"'{axes}' repeating {', '.join(repeated)}",
                          "Name each dimension of the file exactly once, e.g. 'ZYX' or 'CYX'")
    if "Y" not in axes or "X" not in axes:
        raise input_error(source, f"{origin} containing both Y and X", f"'{axes}'",
                          "Every image needs its two in-plane axes; e.g. 'ZYX' for a stack of planes")


def parse_axes(axes: str, shape: Sequence[int], source: str) -> str:
    """Validate a user's axes string for data of ``shape`` (file order); return file-order axes.

    ``axes`` names the dimensions in file order with C, Z, Y, X (case-insensitive). Its length must equal
    the rank of the data, or the number of dimensions of size > 1 (the size-1 ones are then dropped).
    """
    if not isinstance(axes, str):
        raise input_error(source, "axes as a string such as 'ZYX'", f"{axes!r}", "Pass axes='ZYX', 'CYX', ...")
    axes = axes.strip().upper()
    _check_letters(axes, source, "axes")
    shape = tuple(int(n) for n in shape)
    if len(axes) == len(shape):
        return axes
    if len(axes) == sum(n != 1 for n in shape):
        letters = iter(axes)
        return "".join(next(letters) if n != 1 else SQUEEZED for n in shape)
    raise input_error(source, f"axes with one letter per dimension ({len(shape)} letters for shape {shape})",
                      f"axes '{axes}' ({len(axes)} letters)",
                      "Give exactly one of C, Z, Y, X per dimension of the file, in file order")


def axes_from_metadata(meta_axes: str, shape: Sequence[int], source: str) -> str:
    """Turn axes found in file metadata (tifffile's series.axes, OME-Zarr) into file-order axes.

    Size-1 dimensions named by a letter outside CZYX (a single time point, say) are dropped; S becomes C
    and I/Q become Z when that letter is free. Anything else (a time axis with several points) is refused
    with advice to pass ``axes=`` explicitly.
    """
    shape = tuple(int(n) for n in shape)
    letters = [a.upper() for a in meta_axes]
    out = []
    for letter, n in zip(letters, shape):
        if letter not in CANONICAL_AXES and n == 1:
            out.append(SQUEEZED)
            continue
        if letter not in CANONICAL_AXES:
            alias = _METADATA_ALIASES.get(letter)
            if alias is None or alias in letters or alias in out:
                raise input_error(source, "metadata axes that map onto C, Z, Y, X",
                                  f"axis '{letter}' of size {n} in the file's axes '{meta_axes}' (shape {shape})",
                                  f"Pass axes= with {len(shape)} letters from C, Z, Y, X naming the file's "
                                  f"dimensions in order (e.g. to read a time axis as Z)")
            letter = alias
        out.append(letter)
    file_axes = "".join(out)
    _check_letters(file_axes.replace(SQUEEZED, ""), source, f"metadata axes (from '{meta_axes}')")
    return file_axes


def ome_zarr_axes(axes_meta: Sequence) -> str:
    """Letters for OME-Zarr ``multiscales[0]['axes']`` (v0.4+: dicts with name/type; v0.3: strings)."""
    letters = []
    for entry in axes_meta:
        name = entry.get("name", "") if isinstance(entry, dict) else str(entry)
        kind = entry.get("type", "") if isinstance(entry, dict) else ""
        name = name.upper()
        if len(name) == 1 and name in "TCZYX":
            letters.append(name)
        else:
            letters.append(_OME_ZARR_TYPES.get(kind, "Q"))
    return "".join(letters)


def resolve_axes(shape: Sequence[int], axes: str | None, meta_axes: str | None, source: str) -> str:
    """File-order axes for data of ``shape``: the user's ``axes``, else metadata, else by rank."""
    if axes is not None:
        return parse_axes(axes, shape, source)
    if meta_axes:
        if len(meta_axes) != len(shape):
            raise input_error(source, f"metadata axes with {len(shape)} letters for shape {tuple(shape)}",
                              f"'{meta_axes}'", "Pass axes= to name the dimensions yourself")
        return axes_from_metadata(meta_axes, shape, source)
    return default_axes(len(shape), source)


def to_canonical(array: np.ndarray, axes: str | None, source: str = "array") -> tuple[np.ndarray, str]:
    """Transpose ``array`` (dims named by ``axes`` in its own order) to canonical order.

    Returns ``(array in CZYX-subsequence order, canonical axes)``; ``axes=None`` assumes the default for
    the rank. Size-1 dims left unnamed (see :func:`parse_axes`) are dropped.
    """
    file_axes = resolve_axes(array.shape, axes, None, source)
    kept = [i for i, a in enumerate(file_axes) if a != SQUEEZED]
    named = "".join(file_axes[i] for i in kept)
    array = array.reshape([array.shape[i] for i in kept])
    canon = canonical_axes(named)
    return np.transpose(array, [named.index(a) for a in canon]), canon

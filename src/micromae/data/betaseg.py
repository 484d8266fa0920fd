"""The betaSeg FIB-SEM data set (Müller et al., J. Cell Biol. 2021): its file layout and a loader.

betaSeg ships one multi-page TIFF per pancreatic β cell, ``<cell>_source.tif``, and one binary mask per
class next to it::

    <cell>_nucleus_mask.tif   <cell>_mitochondria_mask.tif   <cell>_granules.tif
    <cell>_golgi_corrected.tif   <cell>_centrioles.tif   <cell>_microtubules.tif
    <cell>_membrane_full_mask.tif   (the whole cell, not only its plasma membrane)

Both a flat folder (``root/<cell>_source.tif``) and one sub-folder per cell
(``root/<cell>/<cell>_source.tif``) are accepted, with ``.tif`` or ``.tiff``. Masks may hold 0/1 or 0/255
(any value > 0 is foreground), and any mask may be missing.

Semantic labels are built as: 0 "outside" (not in the cell mask), 1 "cytoplasm" (in the cell mask), then
one class per organelle of ``ORGANELLES``, always at the same index whether or not the cell has that mask
(so the same label means the same class in every cell; a missing mask is a class with no voxels, which the
evaluation leaves out). Unannotated organelle voxels inside the cell count as cytoplasm, as in betaSeg. Where
masks overlap, the later mask in ``PAINT_ORDER`` wins: nucleus < golgi < mitochondria < granules < centrioles <
microtubules, i.e. small or thin structures are drawn over the larger ones that contain or border them. Organelle voxels
keep their class even outside the cell mask. A missing ``membrane_full_mask`` makes the whole volume the
cell (with a warning). The paper's split is ``BETASEG_SPLIT``: train on high_c1–high_c3, test on high_c4.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from micromae.errors import input_error
from micromae.io import write_files_atomically

__all__ = [
    "BETASEG_SPLIT",
    "MASK_SUFFIXES",
    "ORGANELLES",
    "BetaSegCell",
    "list_betaseg_cells",
    "load_betaseg_cell",
    "write_betaseg_cell",
]

BETASEG_SPLIT = {"train": ["high_c1", "high_c2", "high_c3"], "test": ["high_c4"]}
SOURCE_SUFFIX = "_source"
CELL_MASK_SUFFIX = "_membrane_full_mask"
MASK_SUFFIXES = {
    "nucleus": "_nucleus_mask",
    "mitochondria": "_mitochondria_mask",
    "granules": "_granules",
    "golgi": "_golgi_corrected",
    "centrioles": "_centrioles",
    "microtubules": "_microtubules",
}
ORGANELLES = tuple(MASK_SUFFIXES)  # class order after "outside", "cytoplasm"
PAINT_ORDER = ("nucleus", "golgi", "mitochondria", "granules", "centrioles", "microtubules")  # later wins
TIFF_EXTENSIONS = (".tif", ".tiff")


@dataclass
class BetaSegCell:
    """One betaSeg cell.

    Attributes:
        name: cell name, e.g. "high_c1".
        image: (Z, Y, X) FIB-SEM volume as stored (uint8 in betaSeg).
        labels: (Z, Y, X) uint8 semantic labels indexing ``class_names``.
        cell_mask: (Z, Y, X) bool, the ``membrane_full_mask``.
        class_names: ("outside", "cytoplasm", *ORGANELLES), the same for every cell.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    cell_mask: np.ndarray
    class_names: tuple[str, ...]


def _find_tiff(folder: Path, stem: str) -> Path | None:
    for ext in TIFF_EXTENSIONS:
        path = folder / f"{stem}{ext}"
        if path.is_file():
            return path
    return None


def _source_files(root: Path) -> dict[str, Path]:
    """{cell: source path} for the flat layout and then one sub-folder level (the flat file wins)."""
    found: dict[str, Path] = {}
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        for path in sorted(folder.iterdir()):
            stem, ext = os.path.splitext(path.name)
            if ext.lower() in TIFF_EXTENSIONS and stem.endswith(SOURCE_SUFFIX) and path.is_file():
                found.setdefault(stem[: -len(SOURCE_SUFFIX)], path)
    return found


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise input_error(f"betaSeg root '{root}'", "an existing folder", "no such folder",
                          "Pass the folder that holds <cell>_source.tif files or one folder per cell")
    return root


def list_betaseg_cells(root: str | Path) -> list[str]:
    """Sorted names of the cells under ``root`` (flat or one folder per cell); [] if there are none."""
    return sorted(_source_files(_check_root(root)))


def _read_volume(path: Path, what: str) -> np.ndarray:
    try:
        volume = tifffile.imread(path)
    except Exception as err:  # tifffile raises several types for corrupt or truncated files
        raise input_error(what, "a readable TIFF", f"{type(err).__name__}: {err}",
                          "Check the file is complete, or download it again") from err
    if volume.size == 0:
        raise input_error(what, "a readable TIFF with image data", "no image data",
                          "Check the file is complete, or download it again")
    volume = np.squeeze(volume)
    if volume.ndim != 3:
        raise input_error(what, "a 3-D (Z, Y, X) stack", f"shape {volume.shape}", "Pass the multi-page TIFF")
    return volume


def load_betaseg_cell(root: str | Path, cell: str) -> BetaSegCell:
    """Load ``cell`` from ``root``: its volume, cell mask and semantic labels (see the module docstring)."""
    sources = _source_files(_check_root(root))
    if cell not in sources:
        raise input_error(f"betaSeg cell '{cell}' under '{root}'", f"one of the cells found: {sorted(sources)}",
                          f"no {cell}{SOURCE_SUFFIX}.tif", "Check the cell name and the root folder")
    source = sources[cell]
    image = _read_volume(source, f"betaSeg source '{source}'")

    def read_mask(suffix: str) -> np.ndarray | None:
        path = _find_tiff(source.parent, f"{cell}{suffix}")
        if path is None:
            return None
        mask = _read_volume(path, f"betaSeg mask '{path}'")
        if mask.shape != image.shape:
            raise input_error(f"betaSeg mask '{path}'", f"the shape of {source.name}, {image.shape}",
                              f"shape {mask.shape}", "Use the masks that belong to this source volume")
        return mask > 0

    cell_mask = read_mask(CELL_MASK_SUFFIX)
    if cell_mask is None:
        warnings.warn(f"betaSeg cell '{cell}' has no {CELL_MASK_SUFFIX} file: treating the whole volume as cell",
                      stacklevel=2)
        cell_mask = np.ones(image.shape, dtype=bool)
    class_names = ["outside", "cytoplasm", *ORGANELLES]
    labels = cell_mask.astype(np.uint8)
    for organelle in PAINT_ORDER:  # one mask in memory at a time: real cells are large
        mask = read_mask(MASK_SUFFIXES[organelle])
        if mask is not None:
            labels[mask] = class_names.index(organelle)
    return BetaSegCell(name=cell, image=image, labels=labels, cell_mask=cell_mask, class_names=tuple(class_names))


def write_betaseg_cell(out_dir: str | Path, cell: str, image: np.ndarray, masks: dict[str, np.ndarray],
                       cell_mask: np.ndarray) -> dict[str, Path]:
    """Write one cell in the betaSeg layout, flat into ``out_dir``; return {role: path}.

    ``masks`` maps organelle names of ``ORGANELLES`` to (Z, Y, X) bool arrays, written as uint8 0/255
    ``<cell><suffix>.tif``; ``cell_mask`` becomes ``<cell>_membrane_full_mask.tif``. Organelles absent from
    ``masks`` are not written (the loader then leaves their class out). The masks are zlib-compressed, the
    source is not; the files appear all together or, on a failure, not at all.
    """
    if not cell or Path(cell).name != cell:
        raise input_error("betaSeg cell name", "a plain name such as 'high_c1'", repr(cell), "Drop any folder part")
    unknown = sorted(set(masks) - set(ORGANELLES))
    if unknown:
        raise input_error("betaSeg masks", f"names among {list(ORGANELLES)}", repr(unknown), "Rename the masks")
    arrays = {f"{cell}{SOURCE_SUFFIX}.tif": np.asarray(image)}
    roles = {"source": f"{cell}{SOURCE_SUFFIX}.tif", "cell_mask": f"{cell}{CELL_MASK_SUFFIX}.tif"}
    arrays[roles["cell_mask"]] = np.asarray(cell_mask, dtype=bool).astype(np.uint8) * 255
    for organelle, mask in masks.items():
        roles[organelle] = f"{cell}{MASK_SUFFIXES[organelle]}.tif"
        arrays[roles[organelle]] = np.asarray(mask, dtype=bool).astype(np.uint8) * 255
    written = write_files_atomically(out_dir, arrays, compress=[n for r, n in roles.items() if r != "source"])
    return {role: written[name] for role, name in roles.items()}

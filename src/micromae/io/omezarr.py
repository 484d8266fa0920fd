"""OME-Zarr (OME-NGFF v0.5, Zarr format 3) output of segmentations: label images, pyramids, voxel sizes.

A ``micromae segment --output seg.ome.zarr`` store is one OME-Zarr image::

    seg.ome.zarr/            ome.multiscales: the input image, levels "0", "1", ... (block means)
      labels/                ome.labels: ["clusters", "clusters_k4", ..., "classes"]
        clusters/            image-label (one colour and name per cluster) + multiscales "0", "1", ...
        clusters_k<K>/       the same for each k of a sweep
        classes/             (micromae label-clusters) named classes, 0 = unnamed
      features_pca, sample/  as in a plain micromae group (not part of the OME metadata)

The metadata are built and validated with ``ome-zarr-models`` (the OME community's pydantic models of the
specification); the pyramids are computed here, slab by slab (nearest neighbour for labels, the mean of each
block for the image), so memory stays bounded by a few planes whatever the volume size. A plain ``.zarr``
output (``labels``, ``labels_k<K>`` at the root) is still written for names not ending in ``.ome.zarr``;
:func:`label_arrays` reads both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from skimage.measure import block_reduce

from micromae.errors import input_error

OME_SUFFIX = ".ome.zarr"
NGFF_VERSION = "0.5"
MAIN_LABELS = "clusters"
CLASS_LABELS = "classes"
AXES = ("z", "y", "x")
UNIT = "micrometer"
PYRAMID_MIN_SIDE = 64  # stop adding levels once Y and X are both at most this many pixels
LEVEL_CHUNKS = (16, 256, 256)  # chunks of pyramid levels >= 1 (and of the image copy): viewer-sized
_UNIT_TO_UM = {"nm": 1e-3, "nanometer": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0,
               "mm": 1e3, "millimeter": 1e3, "Å": 1e-4, "angstrom": 1e-4}


def is_ome_path(path: str | os.PathLike) -> bool:
    """Whether an output name asks for OME-Zarr (``*.ome.zarr``) rather than a plain Zarr group."""
    return os.fspath(path).rstrip("/\\").lower().endswith(OME_SUFFIX)


def output_stem(path: str | os.PathLike) -> str:
    """``seg`` for ``seg.ome.zarr`` and ``seg.zarr``."""
    name = Path(path).name
    for suffix in (OME_SUFFIX, ".zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def label_name(k: int, main_k: int) -> str:
    """Name of the label image of ``k`` clusters: ``clusters`` for the main k, ``clusters_k<K>`` otherwise."""
    return MAIN_LABELS if k == main_k else f"{MAIN_LABELS}_k{k}"


def level_path(name: str, level: int = 0) -> str:
    """Path of pyramid level ``level`` of label image ``name`` inside the store."""
    return f"labels/{name}/{level}"


def parse_voxel_size(values: Sequence[Any] | None, what: str = "--voxel-size") -> tuple[float, float, float] | None:
    """Three positive voxel sizes (Z, Y, X, micrometres), or None; anything else is a clear error."""
    if values is None:
        return None
    vals = list(values)
    try:
        sizes = tuple(float(v) for v in vals)
    except (TypeError, ValueError) as exc:
        raise input_error(what, "three numbers Z Y X (micrometres)", repr(vals), "e.g. --voxel-size 0.005 0.004 "
                          "0.004") from exc
    if len(sizes) != 3 or not all(np.isfinite(s) and s > 0 for s in sizes):
        raise input_error(what, "three positive voxel sizes Z Y X (micrometres)",
                          f"{len(sizes)} value(s): {' '.join(map(str, vals)) or '(none)'}",
                          "Give one size per axis, e.g. --voxel-size 0.005 0.004 0.004")
    return sizes  # type: ignore[return-value]


def _ome_tiff_voxel_size(path: Path) -> tuple[float, float, float] | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    if not xml:
        return None
    image = tifffile.xml2dict(xml).get("OME", {}).get("Image", {})
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
    sizes = []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        sizes.append(float(value) * _UNIT_TO_UM.get(str(unit), 1.0))
    return tuple(sizes)  # type: ignore[return-value]


def _ome_zarr_voxel_size(path: Path) -> tuple[float, float, float] | None:
    attrs = dict(zarr.open_group(store=str(path), mode="r").attrs)
    multiscales = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        return None
    axes = multiscales[0].get("axes") or []
    scale = None
    for t in multiscales[0]["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = list(t["scale"])
    if scale is None or len(scale) < 3:
        return None
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes][-3:] or [None] * 3
    return tuple(float(s) * _UNIT_TO_UM.get(str(u), 1.0) for s, u in zip(scale[-3:], units))  # type: ignore


def voxel_size_of(path: Any) -> tuple[float, float, float] | None:
    """Voxel size (Z, Y, X) in micrometres recorded in an OME-TIFF or OME-Zarr input, else None."""
    if path is None or isinstance(path, np.ndarray):
        return None
    p = Path(os.fspath(path))
    name = p.name.lower()
    try:
        if name.endswith((".ome.tif", ".ome.tiff")) and p.is_file():
            return _ome_tiff_voxel_size(p)
        if p.is_dir() and ((p / "zarr.json").exists() or (p / ".zattrs").exists()):
            return _ome_zarr_voxel_size(p)
    except (OSError, ValueError, KeyError, TypeError):  # unreadable metadata: no voxel size, not an error
        return None
    return None


def pyramid_factors(shape: Sequence[int], voxel_size: Sequence[float] | None = None,
                    min_side: int = PYRAMID_MIN_SIDE) -> list[tuple[int, int, int]]:
    """Downsampling factor (Z, Y, X) from each level to the next: Y and X halve until both are at most
    ``min_side``; Z halves too while that keeps Z voxels no coarser than in-plane ones (anisotropic stacks
    keep their Z planes longer)."""
    shape = [int(s) for s in shape]
    scale = [float(s) for s in (voxel_size or (1.0, 1.0, 1.0))]
    factors = []
    while max(shape[1], shape[2]) > min_side:
        f = [1, 2 if shape[1] > 1 else 1, 2 if shape[2] > 1 else 1]
        new_yx = min(scale[1] * f[1], scale[2] * f[2])
        if shape[0] > 1 and scale[0] * 2 <= new_yx * (1 + 1e-9):
            f[0] = 2
        factors.append(tuple(f))
        shape = [-(-s // fi) for s, fi in zip(shape, f)]
        scale = [s * fi for s, fi in zip(scale, f)]
    return factors  # type: ignore[return-value]


def _level_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(min(int(s), c) for s, c in zip(shape, LEVEL_CHUNKS))


def _reduce(block: np.ndarray, factor: Sequence[int], method: str, dtype: np.dtype) -> np.ndarray:
    if method == "nearest":
        return block[:: factor[0], :: factor[1], :: factor[2]]
    mean = block_reduce(block.astype(np.float32), tuple(factor), func=np.nanmean, cval=np.nan)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        mean = np.clip(np.rint(mean), info.min, info.max)
    return mean.astype(dtype)


def build_pyramid(group: zarr.Group, base: str, factors: Sequence[Sequence[int]], method: str,
                  budget_bytes: int = 64 << 20) -> list[str]:
    """Write levels ``1..len(factors)`` beside ``<base>/0`` (``method``: ``nearest`` or ``mean``), streaming:
    each level is computed from the one before, one block of whole chunks (Z slab x Y rows) at a time.
    Returns the paths of all levels, level 0 first."""
    prefix = f"{base}/" if base else ""
    paths = [f"{prefix}0"]
    src = group[paths[0]]
    for level, factor in enumerate(factors, start=1):
        shape = tuple(-(-int(s) // int(f)) for s, f in zip(src.shape, factor))
        chunks = _level_chunks(shape)
        dst = group.create_array(f"{prefix}{level}", shape=shape, dtype=src.dtype, chunks=chunks, fill_value=0,
                                 dimension_names=AXES, overwrite=True)
        row_bytes = chunks[0] * factor[0] * factor[1] * int(src.shape[2]) * 4
        rows = max(chunks[1], budget_bytes // max(row_bytes, 1) // chunks[1] * chunks[1])
        for z0 in range(0, shape[0], chunks[0]):
            z1 = min(shape[0], z0 + chunks[0])
            for y0 in range(0, shape[1], rows):
                y1 = min(shape[1], y0 + rows)
                block = np.asarray(src[z0 * factor[0]: z1 * factor[0], y0 * factor[1]: y1 * factor[1]])
                dst[z0:z1, y0:y1] = _reduce(block, factor, method, np.dtype(src.dtype))
        paths.append(f"{prefix}{level}")
        src = dst
    return paths


def _transforms(voxel_size: Sequence[float] | None, factors: Sequence[Sequence[int]]
                ) -> tuple[list[list[float]], list[list[float]]]:
    """Scale and translation of each level (a level's voxel sits at the centre of the block it stands for)."""
    scale = [float(s) for s in (voxel_size or (1.0, 1.0, 1.0))]
    base = list(scale)
    cumulative = [1, 1, 1]
    scales, translations = [list(scale)], [[0.0, 0.0, 0.0]]
    for factor in factors:
        cumulative = [c * int(f) for c, f in zip(cumulative, factor)]
        scales.append([b * c for b, c in zip(base, cumulative)])
        translations.append([b * (c - 1) / 2 for b, c in zip(base, cumulative)])
    return scales, translations


def _multiscale_attrs(group: zarr.Group, paths: Sequence[str], voxel_size, factors, name: str, method: str,
                      image_label: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``ome`` attributes of an image (or, with ``image_label``, a label image) whose levels are
    ``paths`` (relative to ``group``), built and validated by ome-zarr-models."""
    from ome_zarr_models.v05.axes import Axis
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label_types import Label
    from pydantic_zarr.v3 import ArraySpec

    scales, translations = _transforms(voxel_size, factors)
    unit = UNIT if voxel_size is not None else None
    image = Image.new(array_specs=[ArraySpec.from_array(group[p]) for p in paths], paths=list(paths),
                      axes=[Axis(name=a, type="space", unit=unit) for a in AXES], scales=scales,
                      translations=translations, name=name, multiscale_type=method,
                      metadata={"method": "numpy strided slicing" if method == "nearest"
                                else "skimage.measure.block_reduce(np.nanmean)"})
    ome = image.attributes.ome.model_dump(by_alias=True, exclude_none=True, mode="json")
    if image_label is not None:
        ome["image-label"] = Label.model_validate({**image_label, "version": NGFF_VERSION}).model_dump(
            by_alias=True, exclude_none=True, mode="json")
    return ome


def label_colours(n: int, start: int = 0, background: int | None = None) -> list[dict[str, Any]]:
    """An RGBA colour (0-255) per label value ``start..start+n-1`` (matplotlib's tab20, then tab20b);
    ``background`` gets a transparent colour."""
    from matplotlib import colormaps

    table = np.vstack([colormaps["tab20"].colors, colormaps["tab20b"].colors])
    out = []
    for i in range(n):
        value = start + i
        rgba = [0, 0, 0, 0] if value == background else [*(int(round(c * 255)) for c in table[i % len(table)]), 255]
        out.append({"label-value": value, "rgba": rgba})
    return out


def write_label_image(root: zarr.Group, name: str, properties: Sequence[dict[str, Any]],
                      voxel_size: Sequence[float] | None, background: int | None = None,
                      min_side: int = PYRAMID_MIN_SIDE, folder: str | None = None) -> list[str]:
    """Pyramid (nearest neighbour) and ``image-label`` metadata of ``labels/<name>`` whose level 0 exists;
    ``properties``: one dict per label value (``label-value``, ``name``, ...); the name is listed in
    ``labels``'s ``ome.labels``. With ``folder`` the image is built in ``labels/<folder>`` and not listed (to
    be renamed to ``name`` and listed by :func:`register_label` once complete). Returns the level paths."""
    group = root[f"labels/{folder or name}"]
    factors = pyramid_factors(group["0"].shape, voxel_size, min_side)
    paths = build_pyramid(group, "", factors, "nearest")
    values = [int(p["label-value"]) for p in properties]
    colours = {c["label-value"]: c for c in label_colours(max(values) + 1 if values else 0, 0, background)}
    image_label = {"colors": [colours[v] for v in values], "properties": list(properties),
                   "source": {"image": "../../"}}
    group.attrs["ome"] = _multiscale_attrs(group, paths, voxel_size, factors, name, "nearest", image_label)
    if folder is None:
        register_label(root, name)
    return paths


def register_label(root: zarr.Group, name: str) -> None:
    """List ``name`` in ``labels``'s ``ome.labels`` (once)."""
    labels = root["labels"]
    listed = list(dict(labels.attrs.get("ome") or {}).get("labels", []))
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": [*(n for n in listed if n != name), name]}


def slab_planes(shape: Sequence[int], itemsize: int, budget_bytes: int = 256 << 20, most: int = 16) -> int:
    """Z planes of a slab that keep ``itemsize``-byte voxels of ``shape`` (Z, Y, X) within ``budget_bytes``."""
    plane = int(shape[1]) * int(shape[2]) * itemsize
    return max(1, min(most, budget_bytes // max(plane, 1)))


def write_image_copy(root: zarr.Group, volume: Any, voxel_size: Sequence[float] | None, chunks: Sequence[int],
                     min_side: int = PYRAMID_MIN_SIDE) -> list[str]:
    """Copy ``volume`` (Z, Y, X) into ``root/0`` slab by slab, add its mean pyramid and the root's
    ``ome.multiscales``; returns the level paths."""
    shape = tuple(int(s) for s in volume.shape)
    arr = root.create_array("0", shape=shape, dtype=np.dtype(volume.dtype), chunks=tuple(chunks), fill_value=0,
                            dimension_names=AXES, overwrite=True)
    slab = slab_planes(shape, np.dtype(volume.dtype).itemsize)
    for z in range(0, shape[0], slab):
        arr[z: z + slab] = np.asarray(volume[z: z + slab])
    factors = pyramid_factors(shape, voxel_size, min_side)
    paths = build_pyramid(root, "", factors, "mean")
    root.attrs["ome"] = _multiscale_attrs(root, paths, voxel_size, factors, "image", "mean")
    return paths


def label_arrays(group: zarr.Group) -> dict[int | str, Any]:
    """Cluster label arrays (level 0) of a segmentation group, OME-Zarr or plain: ``{"main": array,
    k: array, ...}`` (the sweep keyed by k); empty when the group holds none."""
    arrays: dict[int | str, Any] = {}
    if "labels" in group.group_keys():
        labels = group["labels"]
        for name in labels.group_keys():
            if f"{name}/0" not in labels:
                continue
            if name == MAIN_LABELS:
                arrays["main"] = labels[f"{name}/0"]
            elif name.startswith(f"{MAIN_LABELS}_k") and name[len(MAIN_LABELS) + 2:].isdigit():
                arrays[int(name[len(MAIN_LABELS) + 2:])] = labels[f"{name}/0"]
        return arrays if "main" in arrays else {}
    if "labels" in group.array_keys():
        arrays["main"] = group["labels"]
        for name in group.array_keys():
            if name.startswith("labels_k") and name[len("labels_k"):].isdigit():
                arrays[int(name[len("labels_k"):])] = group[name]
    return arrays


def is_ome_segmentation(group: zarr.Group) -> bool:
    return "labels" in group.group_keys() and bool(label_arrays(group))


def label_levels(group: zarr.Group, name: str) -> list[Any]:
    """The pyramid of ``labels/<name>`` as a list of arrays, level 0 first (from its multiscales)."""
    sub = group[f"labels/{name}"]
    multiscales = dict(sub.attrs.get("ome") or {}).get("multiscales") or []
    paths = [d["path"] for d in multiscales[0]["datasets"]] if multiscales else ["0"]
    return [sub[p] for p in paths]


def image_label_properties(group: zarr.Group, name: str) -> list[dict[str, Any]]:
    """The ``image-label`` ``properties`` of ``labels/<name>`` (one dict per label value)."""
    meta = dict(group[f"labels/{name}"].attrs.get("ome") or {}).get("image-label") or {}
    return [dict(p) for p in meta.get("properties") or []]


def store_voxel_size(group: zarr.Group) -> tuple[float, float, float] | None:
    """Voxel size (Z, Y, X, micrometres) of a segmentation: its ``voxel_size`` attribute (what segment wrote
    into the multiscales), else None."""
    vs = group.attrs.get("voxel_size")
    if vs:
        return tuple(float(v) for v in vs)  # type: ignore[return-value]
    return None


def validate(path: str | os.PathLike) -> Any:
    """Validate an OME-Zarr store with ome-zarr-models (raises on invalid metadata); returns the model."""
    from ome_zarr_models import open_ome_zarr

    return open_ome_zarr(zarr.open_group(store=os.fspath(path), mode="r"))


def finish_segmentation(root: zarr.Group, volume: Any, ks: dict[str, int], voxel_size: Sequence[float] | None,
                        image: bool = True, min_side: int = PYRAMID_MIN_SIDE) -> None:
    """Turn the level-0 label arrays of a ``micromae segment`` OME-Zarr store (``labels/<name>/0`` for each
    ``name → k`` of ``ks``) into label images (pyramid, colours, one name per cluster), and with ``image``
    copy ``volume`` in as the store's image (with its mean pyramid). Idempotent: a resumed run redoes it."""
    if "dist_labels" in root:  # emptied groups of the tri-planar distance arrays
        del root["dist_labels"]
    for name, k in ks.items():
        props = [{"label-value": i, "name": f"cluster {i}"} for i in range(k)]
        write_label_image(root, name, props, voxel_size, min_side=min_side)
    if image:
        main = root[level_path(MAIN_LABELS)]  # the image copy has the chunks of the labels
        write_image_copy(root, volume, voxel_size, main.chunks, min_side)


def ome_extra_bytes(shape: Sequence[int], label_bytes: int, image_itemsize: int) -> int:
    """What an OME-Zarr output adds to the labels (uncompressed upper bound): their pyramids (at most 1/3 of
    level 0 when only Y and X halve) and the image copy with its pyramid."""
    voxels = int(np.prod([int(s) for s in shape]))
    return label_bytes // 3 + (voxels * image_itemsize * 4) // 3

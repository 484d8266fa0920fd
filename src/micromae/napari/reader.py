"""Open a ``micromae segment`` Zarr group in napari: one Labels layer per k, the named classes, the image.

An OME-Zarr output (``seg.ome.zarr``, :mod:`micromae.io.omezarr`) gives multiscale layers: the image pyramid
(``0``, ``1``, ...), each label image of ``labels/`` (``clusters``, ``clusters_k<K>``, ``classes`` with the
class names of its ``image-label`` metadata) and the voxel size of its metadata. In a plain group, what it
holds (see :mod:`micromae.segment.volume` and :mod:`micromae.segment.pipeline`):
``labels`` (the main k, cluster ids ``0..k-1``), ``labels_k<K>`` (a sweep), ``classes`` (written by the
Name clusters widget: ``0`` unnamed, ``1..n`` the class names in the attribute ``class_names``), optionally
``image`` (the input, stored by the Segment widget), ``sample/`` and ``features_pca`` (not shown). The
attributes record ``k``, ``input`` (the image file read when there is no ``image`` array) and, when known,
``scale`` (voxel size per axis Z, Y, X).

Cluster 0 is a real cluster, not background: cluster layers colour every id (background value ``k``, which
never occurs); the class layer leaves ``0`` (unnamed) transparent. Only napari's colormap class is imported
(inside the functions, no Qt): the reader is tested without a viewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr

from micromae.errors import input_error
from micromae.io import omezarr, open_volume
from micromae.runtime import say

LayerData = tuple[Any, dict[str, Any], str]

#: attributes every group written by ``micromae segment`` has
SIGNATURE = ("settings", "clusters")


def is_segmentation(path: str | Path) -> bool:
    """Whether ``path`` is a Zarr group written by ``micromae segment`` (a ``labels`` array, its attributes)."""
    path = Path(path)
    if not (path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file())):
        return False
    try:
        group = zarr.open_group(store=str(path), mode="r")
    except (OSError, ValueError, KeyError, TypeError):  # not a group zarr can read
        return False
    return bool(omezarr.label_arrays(group)) and all(k in group.attrs for k in SIGNATURE)


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader hook: the reader function when ``path`` is a micromae segmentation, else None (so napari
    asks another plugin)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    return read_segmentation if is_segmentation(path) else None


def cluster_colours(k: int) -> dict[int | None, Any]:
    """A colour for every cluster id ``0..k-1`` (matplotlib's tab20, then tab20b), unknown ids transparent."""
    from matplotlib import colormaps

    table = np.vstack([colormaps["tab20"].colors, colormaps["tab20b"].colors])
    return {None: (0.0, 0.0, 0.0, 0.0), **{i: (*table[i % len(table)], 1.0) for i in range(k)}}


def scale_of(attrs: dict[str, Any]) -> tuple[float, float, float] | None:
    """Voxel size (Z, Y, X) recorded in the group: ``scale``, or OME-Zarr ``multiscales`` (level 0)."""
    scale = attrs.get("scale") or attrs.get("voxel_size")
    if scale is None:
        multiscales = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
        if multiscales:
            for t in multiscales[0]["datasets"][0].get("coordinateTransformations", []):
                if t.get("type") == "scale":
                    scale = t["scale"][-3:]
    if scale is None:
        return None
    values = tuple(float(s) for s in scale)
    if len(values) != 3 or min(values) <= 0:
        raise input_error("segmentation attribute 'scale'", "three positive voxel sizes (Z, Y, X)", str(scale),
                          "Fix or remove the attribute")
    return values  # type: ignore[return-value]


def _image(group: zarr.Group, path: Path) -> Any:
    """The stored ``image`` array, else the recorded input file if it can still be read, else None."""
    if "image" in group.array_keys():
        return group["image"]
    source = group.attrs.get("input")
    if not source or source == "<array>":
        return None
    src = Path(source) if Path(source).is_absolute() else path.parent / source
    if not src.exists():
        src = Path(source)
    try:
        vol = open_volume(src)
    except Exception as exc:  # any reader error: the labels are still worth showing without the image
        say(f"micromae reader: not showing the image ({exc})")
        return None
    return vol.read()[None] if vol.axes == "YX" else vol.read() if vol.axes == "ZYX" else None


def read_segmentation(path: str | Path) -> list[LayerData]:
    """Layer data of a segmentation group: the image (if any), ``classes`` (if named), each k's labels."""
    path = Path(path)
    if not is_segmentation(path):
        raise input_error(f"'{path}'", "a Zarr group written by micromae segment", "something else",
                          "Open the .zarr folder that micromae segment --output wrote")
    group = zarr.open_group(store=str(path), mode="r")
    attrs = dict(group.attrs)
    scale = scale_of(attrs)
    common = {"scale": scale} if scale is not None else {}
    name = omezarr.output_stem(path)
    if omezarr.is_ome_segmentation(group):
        return _read_ome(group, path, name, attrs, common)
    layers: list[LayerData] = []
    image = _image(group, path)
    if image is not None:
        if tuple(image.shape) != tuple(group["labels"].shape):
            say(f"micromae reader: the image {tuple(image.shape)} does not match the labels; not shown")
        else:
            layers.append((image, {"name": f"{name} image", **common}, "image"))
    arrays = {"labels": int(attrs.get("k") or group["labels"].attrs.get("k") or 0)}
    for key in sorted(group.array_keys()):
        if key.startswith("labels_k") and key[len("labels_k"):].isdigit():
            arrays[key] = int(key[len("labels_k"):])
    for key, k in arrays.items():
        data = group[key]
        k = k or int(np.asarray(data).max()) + 1
        meta = {"micromae_path": str(path), "micromae_array": key, "k": k,
                "cluster_names": dict(attrs.get("cluster_names", {}).get(key, {}))}
        layers.append((data, {"name": f"{name} k={k}", "colormap": label_colormap(cluster_colours(k), k),
                              "metadata": meta, "visible": key == "labels", **common}, "labels"))
    if "classes" in group.array_keys():
        names = list(attrs.get("class_names") or [])
        layers.append((group["classes"], {"name": f"{name} classes", **class_layer_kwargs(names), **common,
                                          "metadata": {"micromae_path": str(path), "micromae_array": "classes",
                                                       "class_names": names,
                                                       "named_from": attrs.get("classes_from")}}, "labels"))
    return layers


def _read_ome(group: zarr.Group, path: Path, name: str, attrs: dict[str, Any], common: dict[str, Any]
              ) -> list[LayerData]:
    """Multiscale layers of an OME-Zarr segmentation: its image, each cluster label image, the classes."""
    layers: list[LayerData] = []
    multiscales = dict(attrs.get("ome") or {}).get("multiscales")
    if multiscales:
        levels = [group[d["path"]] for d in multiscales[0]["datasets"]]
        layers.append((levels, {"name": f"{name} image", "multiscale": len(levels) > 1, **common}, "image"))
    else:
        image = _image(group, path)
        if image is not None and tuple(image.shape) == tuple(omezarr.label_arrays(group)["main"].shape):
            layers.append((image, {"name": f"{name} image", **common}, "image"))
    main_k = int(attrs.get("k") or 0)
    label_names = list(dict(group["labels"].attrs.get("ome") or {}).get("labels", []))
    for label in label_names:
        if label == omezarr.CLASS_LABELS:
            continue
        levels = omezarr.label_levels(group, label)
        props = omezarr.image_label_properties(group, label)
        k = len(props) or main_k
        meta = {"micromae_path": str(path), "micromae_array": omezarr.level_path(label), "k": k,
                "cluster_names": {str(p["label-value"]): p["class"] for p in props if "class" in p}}
        layers.append((levels, {"name": f"{name} k={k}", "colormap": label_colormap(cluster_colours(k), k),
                                "multiscale": len(levels) > 1, "metadata": meta,
                                "visible": label == omezarr.MAIN_LABELS, **common}, "labels"))
    if omezarr.CLASS_LABELS in label_names:
        levels = omezarr.label_levels(group, omezarr.CLASS_LABELS)
        props = omezarr.image_label_properties(group, omezarr.CLASS_LABELS)
        names = [str(p.get("name")) for p in sorted(props, key=lambda p: p["label-value"])]
        layers.append((levels, {"name": f"{name} classes", **class_layer_kwargs(names), **common,
                                "multiscale": len(levels) > 1,
                                "metadata": {"micromae_path": str(path), "micromae_array": "labels/classes/0",
                                             "class_names": names, "named_from": attrs.get("classes_from")}},
                       "labels"))
    return layers


def class_layer_kwargs(class_names: list[str]) -> dict[str, Any]:
    """Colours (0 = unnamed, transparent) and a features table naming each class, for a Labels layer."""
    colours = cluster_colours(max(len(class_names), 1))
    colour_of = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0),
                 **{i: colours[i - 1] for i in range(1, len(class_names))}}
    return {"colormap": label_colormap(colour_of, 0),
            "features": {"index": list(range(len(class_names))), "class": list(class_names)}}


def label_colormap(colours: dict[int | None, Any], background: int) -> Any:
    """napari's ``DirectLabelColormap`` of ``colours`` (label → RGBA) with ``background`` as its background."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict=colours, background_value=background)

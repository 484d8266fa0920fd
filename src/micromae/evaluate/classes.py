"""``micromae label-clusters``: name the clusters of an OME-Zarr segmentation, as a class label image.

``labels/classes`` holds ``0`` for unnamed clusters and ``1..n`` for the classes in the order they are first
named (several clusters may map to one class); its ``image-label`` gives each class a name, a colour and the
clusters it came from, and the cluster image's properties gain a ``class`` entry. The names come from
``--names "0=cytoplasm,3=nucleus"`` or from the mapping ``micromae evaluate segmentation`` found
(``metrics.json``). The class image is built under a temporary name and renamed, so a refused or interrupted
run leaves the previous state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from micromae.errors import input_error
from micromae.io import omezarr
from micromae.runtime import say

MAPPINGS = ("hungarian", "majority")
UNNAMED = "unnamed"


def parse_names(text: str) -> dict[int, str]:
    """``"0=cytoplasm,3=nucleus"`` → ``{0: "cytoplasm", 3: "nucleus"}``; a malformed entry is a clear error."""
    names: dict[int, str] = {}
    for entry in (e.strip() for e in str(text).split(",")):
        if not entry:
            continue
        cluster, sep, name = entry.partition("=")
        name = name.strip()
        if not sep or not cluster.strip().lstrip("-").isdigit() or not name:
            raise input_error("--names", "entries CLUSTER=NAME separated by commas, e.g. 0=cytoplasm,3=nucleus",
                              repr(entry), "Write each entry as a cluster id, '=', and a class name")
        cid = int(cluster)
        if cid in names and names[cid] != name:
            raise input_error("--names", "one name per cluster", f"cluster {cid} named {names[cid]!r} and {name!r}",
                              "Name each cluster once (several clusters may share one name)")
        if name == UNNAMED:
            raise input_error("--names", f"class names other than {UNNAMED!r} (class 0 is the unnamed clusters)",
                              repr(entry), "Leave the cluster out to keep it unnamed")
        names[cid] = name
    if not names:
        raise input_error("--names", "at least one CLUSTER=NAME entry", repr(text), "e.g. --names 0=cytoplasm")
    return names


def names_from_report(report: str | Path, k: int, mapping: str = "hungarian") -> dict[int, str]:
    """Cluster → class name from ``metrics.json`` of ``micromae evaluate segmentation`` (``mapping``:
    hungarian or majority); the report must be of a segmentation with ``k`` clusters."""
    path = Path(report)
    if mapping not in MAPPINGS:
        raise input_error("--mapping", " or ".join(MAPPINGS), repr(mapping), "Pick one of them")
    try:
        data = json.loads(path.read_text())
        names = [str(n) for n in data[mapping]["mapping_names"]]
        n_clusters = int(data["n_clusters"])
    except FileNotFoundError as exc:
        raise input_error("--from-report", "an existing metrics.json", f"nothing at '{path}'",
                          "Pass report/metrics.json written by micromae evaluate segmentation") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise input_error("--from-report", "metrics.json of micromae evaluate segmentation (with "
                          f"'{mapping}.mapping_names' and 'n_clusters')", f"'{path}' ({type(exc).__name__}: {exc})",
                          "Pass the metrics.json of micromae evaluate segmentation") from exc
    if n_clusters != k or len(names) != k:
        raise input_error("--from-report", f"a report of a segmentation with {k} clusters (this output's)",
                          f"{n_clusters} clusters in '{path}'",
                          "Evaluate this segmentation (or pass --k for the sweep's k the report scored)")
    return dict(enumerate(names))


def class_table(names: dict[int, str], k: int) -> tuple[np.ndarray, list[str], dict[str, list[int]]]:
    """A lookup table cluster id → class id (0 unnamed, 1..n by first naming), the class names
    (``unnamed`` first) and the clusters of each class. A cluster outside ``0..k-1`` is a clear error."""
    bad = sorted(c for c in names if not 0 <= c < k)
    if bad:
        raise input_error("--names", f"cluster ids of this segmentation, 0..{k - 1}",
                          ", ".join(map(str, bad)), f"Name only clusters that exist (it has k = {k})")
    classes = [UNNAMED]
    members: dict[str, list[int]] = {}
    lut = np.zeros(k, dtype=np.uint8 if len(set(names.values())) < 255 else np.uint16)
    for cluster in sorted(names):
        name = names[cluster]
        if name not in classes:
            classes.append(name)
        lut[cluster] = classes.index(name)
        members.setdefault(name, []).append(int(cluster))
    return lut, classes, members


def _source_name(root: zarr.Group, k: int | None) -> str:
    arrays = omezarr.label_arrays(root)
    main_k = int(root.attrs.get("k") or 0)
    if k is None or k == main_k:
        return omezarr.MAIN_LABELS
    if k not in arrays:
        ks = sorted([main_k, *(kk for kk in arrays if kk != "main")])
        raise input_error("--k", f"a k of this segmentation ({', '.join(map(str, ks))})", str(k),
                          "Pick the main k or one of its sweep")
    return omezarr.label_name(k, main_k)


def open_ome_segmentation(path: str | Path, mode: str = "r") -> zarr.Group:
    """The group of a ``micromae segment`` OME-Zarr output; anything else is a clear error."""
    path = Path(path)
    group = None
    if path.is_dir() and (path / "zarr.json").is_file():
        try:
            group = zarr.open_group(store=str(path), mode=mode)
        except (OSError, ValueError, KeyError, TypeError):
            group = None
    if group is None or not omezarr.is_ome_segmentation(group):
        found = "a plain Zarr group (labels at its root)" if group is not None and omezarr.label_arrays(group) \
            else "no micromae segmentation"
        raise input_error(f"segmentation '{path}'", "an OME-Zarr output of micromae segment (NAME.ome.zarr, "
                          "with labels/clusters)", found,
                          "Segment with --output NAME.ome.zarr (a plain .zarr group is named with napari's "
                          "Name clusters widget)")
    return group


def run_label_clusters(seg: str | Path, names: str | dict[int, str] | None = None,
                       from_report: str | Path | None = None, mapping: str = "hungarian", k: int | None = None
                       ) -> Path:
    """Write ``labels/classes`` into the OME-Zarr segmentation ``seg`` from cluster names (``names``:
    ``"0=cytoplasm,3=nucleus"`` or a dict) or from an evaluation report; ``k``: name the clusters of that k
    of a sweep (default the main k). Returns the class image's path."""
    if (names is None) == (from_report is None):
        raise input_error("label-clusters", "exactly one of --names and --from-report",
                          "both" if names is not None else "neither", "Give the names one way")
    root = open_ome_segmentation(seg, mode="a")
    source = _source_name(root, k)
    levels = omezarr.label_levels(root, source)
    n_clusters = len(omezarr.image_label_properties(root, source)) or int(root.attrs.get("k") or 0)
    mapping_names = (parse_names(names) if isinstance(names, str) else dict(names)) if names is not None \
        else names_from_report(from_report, n_clusters, mapping)
    lut, classes, members = class_table(mapping_names, n_clusters)
    voxel_size = omezarr.store_voxel_size(root)
    labels = root["labels"]
    tmp = f".{omezarr.CLASS_LABELS}.partial"
    if tmp in labels:
        del labels[tmp]
    base = levels[0]
    out = labels.create_array(f"{tmp}/0", shape=base.shape, dtype=lut.dtype, chunks=base.chunks, fill_value=0,
                              dimension_names=omezarr.AXES)
    slab = omezarr.slab_planes(base.shape, 2 * np.dtype(base.dtype).itemsize + lut.dtype.itemsize)
    for z in range(0, base.shape[0], slab):
        out[z: z + slab] = lut[np.asarray(base[z: z + slab])]
    props = [{"label-value": i, "name": name, **({"clusters": members[name]} if i else {})}
             for i, name in enumerate(classes)]
    omezarr.write_label_image(root, omezarr.CLASS_LABELS, props, voxel_size, background=0,
                              min_side=_min_side(levels), folder=tmp)
    store = Path(str(seg))
    final = store / "labels" / omezarr.CLASS_LABELS
    if final.exists():
        say(f"replacing the class labels in {final}")
        shutil.rmtree(final)
    (store / "labels" / tmp).rename(final)
    omezarr.register_label(root, omezarr.CLASS_LABELS)
    _annotate_clusters(root, source, mapping_names)
    root.attrs.update({"classes_from": source, "class_names": classes})
    say(f"named {len(mapping_names)} clusters of {source} as {len(classes) - 1} classes: "
        + ", ".join(f"{c} ({', '.join(map(str, members[c]))})" for c in classes[1:]))
    return final


def _min_side(levels: list[Any]) -> int:
    """The pyramid stop of an existing label image, so the class pyramid has as many levels."""
    if len(levels) < 2:
        return max(int(levels[0].shape[1]), int(levels[0].shape[2]))
    last = levels[-1]
    return max(int(last.shape[1]), int(last.shape[2]))


def _annotate_clusters(root: zarr.Group, source: str, names: dict[int, str]) -> None:
    """Add each cluster's class name to the cluster image's ``image-label`` properties."""
    group = root[f"labels/{source}"]
    ome = dict(group.attrs["ome"])
    label = dict(ome["image-label"])
    label["properties"] = [{**{k: v for k, v in p.items() if k != "class"},
                            **({"class": names[p["label-value"]]} if p["label-value"] in names else {})}
                           for p in label.get("properties", [])]
    ome["image-label"] = label
    group.attrs["ome"] = ome


def class_names_of(root: zarr.Group) -> dict[int, str]:
    """Class id → name of ``labels/classes`` (without the unnamed 0); a segmentation without named classes
    is a clear error."""
    if f"labels/{omezarr.CLASS_LABELS}/0" not in root:
        raise input_error("segmentation", "named classes (labels/classes)", "clusters only",
                          "Name the clusters first: micromae label-clusters SEG --names 0=cytoplasm,3=nucleus")
    props = omezarr.image_label_properties(root, omezarr.CLASS_LABELS)
    return {int(p["label-value"]): str(p.get("name", p["label-value"])) for p in props if int(p["label-value"])}


def classes_volume(root: zarr.Group) -> Any:
    """Level 0 of ``labels/classes``."""
    class_names_of(root)
    return root[f"labels/{omezarr.CLASS_LABELS}/0"]


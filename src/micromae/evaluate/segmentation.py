"""``micromae evaluate segmentation``: score a label volume against reference classes and draw the figures.

Counts are accumulated slab by slab (never whole volumes of one-hot masks), so a segmentation of any size is
evaluated in bounded memory. When the prediction is a ``micromae segment`` Zarr group, every ``labels_k<K>``
array in it is scored too (the k sweep) and the pixels k-means was fitted on give the UMAP figure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr

from micromae.errors import input_error
from micromae.evaluate.metrics import ContingencyAccumulator, evaluate_table, relabel, sweep_k_table
from micromae.evaluate.render3d import render_volume_surfaces
from micromae.evaluate.report import write_segmentation_report
from micromae.evaluate.seg_figures import plot_confusion, plot_k_sweep, plot_overlays, plot_umap
from micromae.io import atomic_path, check_output, open_volume
from micromae.io.omezarr import label_arrays
from micromae.runtime import say
from micromae.segment.cluster import ClusterModel
from micromae.segment.pipeline import centres_path


def open_prediction(path: str | Path) -> tuple[dict[int | str, Any], zarr.Group | None]:
    """Label arrays of a prediction: a ``micromae segment`` group, OME-Zarr (``labels/clusters``,
    ``labels/clusters_k<K>``) or plain (``labels``, ``labels_k<K>``), as ``{"main": array, k: array}``; or a
    label file."""
    path = Path(path)
    if path.is_dir() and ((path / "zarr.json").exists() or (path / ".zgroup").exists()):
        group = zarr.open_group(store=str(path), mode="r")
        arrays = label_arrays(group)
        if not arrays:
            raise input_error(f"prediction '{path}'", "a micromae segment output (OME-Zarr labels/clusters or a "
                              "Zarr group with a 'labels' array)",
                              f"arrays {sorted(group.array_keys())}, groups {sorted(group.group_keys())}",
                              "Pass the output of micromae segment")
        return arrays, group
    return {"main": open_volume(path, check=False)}, None


MAX_CLASSES = 64  # betaSeg has 8; an 8-bit image has up to 256 distinct values


def check_reference(ref: Any, path: str | Path) -> None:
    """Refuse a reference that holds no classes: floating-point values, or more distinct values than a
    class volume has (an image passed as ``--reference``). Reads at most a few slices."""
    dtype = np.dtype(ref.dtype)
    if dtype.kind not in "biu":
        raise input_error(f"--reference '{path}'", "a volume of integer class ids (e.g. labels.tif)",
                          f"{dtype} values", "Pass the reference labels, not the image")
    zs = np.unique(np.linspace(0, ref.shape[0] - 1, num=min(8, ref.shape[0])).round().astype(int))
    values = np.unique(np.concatenate([np.unique(np.asarray(ref[int(z)])) for z in zs]))
    if len(values) > MAX_CLASSES or (len(values) and int(values.max()) >= 1 << 16):
        raise input_error(f"--reference '{path}'", f"class ids (at most {MAX_CLASSES} classes)",
                          f"{len(values)} distinct values up to {int(values.max())}",
                          "Pass the reference labels, not the image (micromae data synth-em writes labels.tif)")


def _read_class_names(reference: str | Path, n: int) -> list[str]:
    """Names from ``classes.json`` next to the reference (as micromae data synth-em writes), else class_i."""
    side = Path(reference).with_name("classes.json")
    if side.is_file():
        data = json.loads(side.read_text())
        names = data.get("class_names", data) if isinstance(data, dict) else data
        if isinstance(names, list) and len(names) >= n:
            return [str(x) for x in names]
    return [f"class_{i}" for i in range(n)]


def _accumulate(pred: Any, ref: Any, mask: Any, slab: int = 8) -> np.ndarray:
    acc = ContingencyAccumulator()
    for z in range(0, ref.shape[0], slab):
        sl = slice(z, z + slab)
        acc.update(np.asarray(pred[sl]), np.asarray(ref[sl]), None if mask is None else np.asarray(mask[sl]) != 0)
    return acc.table


def run_evaluate_segmentation(pred_path: str | Path, reference: str | Path, out_dir: str | Path,
                              mask: str | Path | None = None, image: str | Path | None = None,
                              class_names: Sequence[str] | None = None, ignore: Sequence[str] = (),
                              figures: bool = True, umap_points: int = 50_000, overwrite: bool = False
                              ) -> dict[str, Any]:
    """Evaluate ``pred_path`` against ``reference`` (restricted to ``mask``); write metrics, report and PNGs.

    ``out_dir`` must not exist yet unless ``overwrite`` (then it is replaced whole): the report is written
    into a temporary sibling and renamed, so it appears complete or not at all.
    """
    out_dir = check_output(out_dir, overwrite=overwrite, what="--out", folder=True)
    arrays, group = open_prediction(pred_path)
    ref = open_volume(reference, check=False)
    check_reference(ref, reference)
    msk = None if mask is None else open_volume(mask, check=False)
    main = arrays["main"]
    for name, arr in (("reference", ref), ("mask", msk)):
        if arr is not None and tuple(arr.shape) != tuple(main.shape):
            raise input_error(name, f"the prediction's shape {tuple(main.shape)}", f"shape {tuple(arr.shape)}",
                              f"Pass a {name} volume of the same size as the segmentation")
    table = _accumulate(main, ref, msk)
    names = list(class_names) if class_names else _read_class_names(reference, table.shape[1])
    result = evaluate_table(table, names, ignore)
    result["masked"] = msk is not None
    sweep = {k: evaluate_table(_accumulate(a, ref, msk), names, ignore) for k, a in arrays.items() if k != "main"}
    if sweep:
        sweep[result["n_clusters"]] = result
    rows = sweep_k_table(sweep) if sweep else None
    figs: dict[str, Path] = {}
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        if figures:
            figs = _figures(result, main, ref, msk, image, group, names, rows, tmp, umap_points)
        paths = write_segmentation_report(result, tmp, figures=figs, sweep_rows=rows)
    figs = {title: out_dir / p.relative_to(tmp) for title, p in figs.items()}
    paths = {name: out_dir / Path(p).relative_to(tmp) for name, p in paths.items()}
    h = result["hungarian"]["scores"]
    say(f"mean Dice {h['mean_dice']:.3f} (Hungarian), {result['majority']['scores']['mean_dice']:.3f} (majority); "
        f"report: {paths['report']}")
    return {"result": result, "sweep": rows, "figures": figs, **paths}


def _figures(result, main, ref, msk, image, group, names, rows, out_dir, umap_points) -> dict[str, Path]:
    figs: dict[str, Path] = {}
    conf = result["hungarian"]["scores"]["confusion"]
    for norm, title in (("row", "recall (rows sum to 1)"), ("col", "precision (columns sum to 1)")):
        figs[f"Confusion matrix, {title}"] = plot_confusion(
            np.asarray(conf["counts"], float), conf["ref_names"], conf["pred_names"],
            out_dir / f"confusion_{norm}.png", title=f"Hungarian mapping: {title}", normalise=norm)
    mapping = np.asarray(result["hungarian"]["mapping"])
    zs = np.linspace(0, main.shape[0] - 1, num=min(4, main.shape[0])).round().astype(int)
    img_src = image if image is not None else (group.attrs.get("input") if group is not None else None)
    if img_src and Path(str(img_src)).exists():
        img = open_volume(img_src, check=False)
        pick = lambda a: np.stack([np.asarray(a[int(z)]) for z in zs])  # noqa: E731
        pred_sl = relabel(pick(main), mapping)
        if msk is not None:
            pred_sl = np.where(pick(msk) != 0, pred_sl, 0)
        figs["Slices: image, reference, prediction (Hungarian mapping)"] = plot_overlays(
            pick(img), pick(ref), pred_sl, out_dir / "overlays.png", slices=range(len(zs)), class_names=names,
            slice_names=[int(z) for z in zs])
    mapped = relabel(np.asarray(main[:]), mapping)
    if msk is not None:
        mapped = np.where(np.asarray(msk[:]) != 0, mapped, 0)
    organelles = [i for i, n in enumerate(names) if n not in ("outside", "cytoplasm") and i > 0]
    figs["3-D rendering of the predicted classes"] = render_volume_surfaces(
        mapped, out_dir / "render3d.png", class_names=names, classes=organelles or None)
    if group is not None and "sample" in group:
        feats = np.asarray(group["sample/features"][:], np.float32)
        coords = np.asarray(group["sample/coords"][:])
        centres = _main_centres(group, result["n_clusters"])
        if centres is not None and len(feats):
            d = ((feats[:, None, :] - centres[None]) ** 2).sum(-1)
            pred_cls = mapping[d.argmin(1)]
            ref_cls = np.asarray([ref[tuple(int(v) for v in c)] for c in coords[:umap_points]])
            figs["UMAP of token embeddings"] = plot_umap(feats[:umap_points], ref_cls, pred_cls[:umap_points],
                                                         names, out_dir / "umap.png", max_points=umap_points)
    if rows:
        figs["Mean Dice against k"] = plot_k_sweep(rows, out_dir / "k_sweep.png")
    return figs


def _main_centres(group: zarr.Group, k: int) -> np.ndarray | None:
    store = Path(str(group.store_path.store.root)) if hasattr(group, "store_path") else None
    if store is None:
        return None
    path = centres_path(store, k)
    return ClusterModel.load(path).centers if path.is_file() else None

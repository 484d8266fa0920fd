"""Segment a whole volume in one streaming pass: embed tile by tile, assign clusters on the fly, write Zarr.

Memory stays bounded by one tile of features (``D x tile x tile`` floats) whatever the volume size: features
are never stored for the whole volume (the public MAESTER code kept 768 bytes per voxel on disk). The output
is a Zarr group with ``labels`` (uint8/uint16) and, on request, ``labels_k<K>`` for other k (a k sweep costs
no extra encoder passes) and ``features_pca`` (float16, PCA-reduced embeddings).

Work goes into ``<out>.partial`` and is renamed to ``<out>`` only when complete; an interrupted run started
again with the same settings skips the planes it had finished.

Tri-planar inference (``axes=(0, 1, 2)``) embeds the volume slice by slice along each axis and fuses the
passes as if the three feature vectors of a voxel had been averaged: for centres c,
``mean_a ||f_a - c||^2 = ||mean_a f_a - c||^2 + const``, so the nearest centre of the averaged feature is the
argmin of the averaged squared distances, and only ``k`` distances per voxel and axis are kept (float16).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import zarr
from torch import nn
from tqdm.auto import tqdm

import micromae
from micromae.errors import input_error
from micromae.segment.cluster import ClusterModel
from micromae.segment.cover_stride import CompiledEncoder, block_size, embed_region
from micromae.segment.distributed import (DistInfo, DoneRecords, barrier, check_same, current_world, folder_of,
                                          share, together)
from micromae.segment.planes import check_axis, plane_index, plane_shape
from micromae.segment.prefetch import tile_reads

KEEP_FEATURES = ("none", "pca", "full")


@dataclass
class SegmentSettings:
    """How pixel embeddings are computed (see :mod:`micromae.segment.cover_stride`)."""

    central_tokens: int | None = None  # None: 4 in exact mode, g/2 in fast mode
    mode: str = "exact"  # exact | fast
    pad_mode: str = "reflect"
    axes: tuple[int, ...] = (0,)  # (0,): slice by slice along Z; (0, 1, 2): tri-planar
    batch_size: int = 0  # windows per encoder pass; 0: 256 on the CPU, from free device memory on CUDA
    tile: int = 0  # in-plane tile side in pixels; 0: the largest block multiple keeping a tile's features < 256 MB
    amp: bool = True
    compile: bool = False  # torch.compile the encoder pass (same labels up to float rounding)


def _tile_side(encoder: nn.Module, settings: SegmentSettings, budget_bytes: int = 256 << 20) -> int:
    block = block_size(encoder, settings.central_tokens, settings.mode)
    if settings.tile:
        return max(block, settings.tile // block * block)
    side = int((budget_bytes / (4 * encoder.embed_dim)) ** 0.5)
    return max(block, side // block * block)


def _settings_key(volume_shape, settings, clusters, pca, extra) -> str:
    h = hashlib.sha256(json.dumps({"shape": list(volume_shape), "settings": asdict(settings), **extra},
                                  sort_keys=True, default=str).encode())
    for name in sorted(clusters):
        h.update(name.encode() + clusters[name].centers.tobytes())
    if pca is not None:
        h.update(pca[0].tobytes() + pca[1].tobytes())
    return h.hexdigest()


def _label_dtype(k: int) -> np.dtype:
    return np.dtype(np.uint8 if k <= 255 else np.uint16)


def _open_partial(partial: Path, key: str, resume: bool) -> zarr.Group | None:
    if not partial.exists():
        return None
    group = zarr.open_group(store=str(partial), mode="a")
    if group.attrs.get("settings_key") == key and resume:
        return group
    shutil.rmtree(partial)  # left by a run with other settings (or resume off): start again
    shutil.rmtree(folder_of(partial), ignore_errors=True)
    return None


def feature_array(kind: str, axis: int | None) -> str:
    """Name of a stored feature array: ``features_pca`` / ``features`` (full embedding), with ``_axis<A>`` for
    one slicing axis of a tri-planar run."""
    base = "features_pca" if kind == "pca" else "features"
    return base if axis is None else f"{base}_axis{axis}"


def segment_volume(encoder: nn.Module, volume: Any, out_path: str | Path, clusters: dict[str, ClusterModel],
                   intensity_range: tuple[float, float], settings: SegmentSettings | None = None,
                   pca: tuple[np.ndarray, np.ndarray] | None = None, resume: bool = True, overwrite: bool = False,
                   progress: bool = True, metadata: dict[str, Any] | None = None,
                   finish: Callable[[zarr.Group], None] | None = None,
                   on_progress: Callable[[int, int], None] | None = None, keep_features: str = "none",
                   world: DistInfo | None = None, main: str = "labels") -> Path:
    """Label every voxel of ``volume`` (Z, Y, X) and write the Zarr group ``out_path``.

    clusters: output array name (a path in the group) → cluster model, e.g. ``{"labels": k6, "labels_k4": k4}``
    (an OME-Zarr output names level 0 of its label images: ``{"labels/clusters/0": k6, ...}``); ``main``: the
    name of the main one.
    pca: optional ``(mean (D,), components (d, D))`` → also write ``features_pca`` (d, Z, Y, X) float16.
    finish: called with the finished ``<out>.partial`` group (metadata written) just before it is renamed to
    ``out_path``, to add what else belongs to the output; the rename comes last, so ``out_path`` never
    holds a half-written result.
    on_progress: called as ``on_progress(planes_done, planes_total)`` after each finished plane (all slicing
    axes counted, planes done by an interrupted run included); an exception it raises stops the run, leaving
    ``<out>.partial`` to resume from (how the napari widget cancels).
    keep_features: ``none``; ``pca`` (needs ``pca``: the reduced features, and with tri-planar axes also the
    per-axis ones, ``features_pca_axis<A>``, so the fusion can be redone); ``full`` (the whole embedding,
    float16 ``features`` (D, Z, Y, X), or ``features_axis<A>`` per axis: 2·D bytes per voxel and axis, for
    small volumes). ``micromae cluster --features`` relabels from them (:mod:`micromae.segment.recluster`).
    world: the process group to share the planes with (default: the initialised one, if any; see
    :mod:`micromae.segment.distributed`). Every rank calls this with the same arguments; rank 0 alone writes
    the metadata, calls ``finish`` and renames, after every rank has finished.
    """
    settings = settings or SegmentSettings()
    info = world or current_world()
    if keep_features not in KEEP_FEATURES:
        raise input_error("--keep-features", " or ".join(KEEP_FEATURES), repr(keep_features), "Pick one")
    if keep_features == "pca" and pca is None:
        raise input_error("--keep-features pca", "PCA components to reduce the features with (--pca D)",
                          "none", "Pass --pca D, or --keep-features full")
    out_path = Path(out_path)
    if main not in clusters:
        raise input_error("clusters", f"a model named '{main}'", ", ".join(clusters) or "none",
                          f"Pass {{'{main}': model, ...}}")
    if out_path.exists() and not overwrite:
        raise input_error("output", "a path that does not exist yet", f"'{out_path}' exists",
                          "Choose another --output or pass --overwrite")
    axes = tuple(check_axis(a) for a in settings.axes)
    shape = tuple(int(s) for s in volume.shape)
    key = _settings_key(shape, settings, clusters, pca, {"metadata": metadata or {}, "keep": keep_features})
    partial = out_path.with_name(out_path.name + ".partial")
    tile = _tile_side(encoder, settings)
    fused = len(axes) > 1
    check_same(info, {"settings": key, "intensity_range": list(intensity_range), "output": str(out_path),
                      "tile": tile, "resume": resume})
    with together(info):
        if info.is_main:
            group = _create_partial(partial, key, resume, clusters, shape, axes, tile, fused, pca, encoder.embed_dim,
                                    keep_features)
            DoneRecords(partial, group.attrs["run_id"], info).merge(group)
    barrier(info)
    if not info.is_main:
        group = zarr.open_group(store=str(partial), mode="a")
    records = DoneRecords(partial, group.attrs["run_id"], info)
    done = {int(a): set(v) for a, v in group.attrs.get("done", {}).items()}
    total = sum(shape[a] for a in axes)
    finished = [sum(len(done.get(a, ())) for a in axes)]

    def plane_done() -> None:
        finished[0] += 1
        if on_progress is not None:
            on_progress(finished[0], total)

    plan = AxisPass(clusters, intensity_range, settings, pca, tile, fused, progress, plane_done,
                    keep_full=keep_features == "full", done=done, share=lambda todo: share(todo, info),
                    record=records.record)
    with together(info):
        for a in axes:
            _run_axis(encoder, volume, group, a, plan)
    barrier(info)
    if fused and not group.attrs.get("fused"):
        with together(info):
            _fuse(group, clusters, pca, axes, shape, progress, share(range(shape[0]), info))
        barrier(info)
    with together(info):
        if info.is_main:
            if fused:
                _drop_axis_arrays(group, clusters, pca, axes, keep_features)
            records.merge(group)
            group.attrs.update({
                "axes": "ZYX", "settings": {**asdict(settings), "axes": list(axes)},
                "intensity_range": list(intensity_range), "clusters": {name: m.meta for name, m in clusters.items()},
                "features": _features_record(keep_features, pca, axes), **(metadata or {}),
            })
            if finish is not None:
                finish(group)
            if out_path.exists():
                shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
            partial.rename(out_path)
    barrier(info)
    return out_path


def _create_partial(partial: Path, key: str, resume: bool, clusters: dict[str, ClusterModel], shape: tuple[int, ...],
                    axes: tuple[int, ...], tile: int, fused: bool, pca: tuple[np.ndarray, np.ndarray] | None,
                    embed_dim: int, keep_features: str) -> zarr.Group:
    """The ``<out>.partial`` group to work in: the one an interrupted run with the same settings left, or a
    new one with every array (one plane thick along its slicing axis, so ranks write disjoint chunks)."""
    group = _open_partial(partial, key, resume)
    if group is not None:
        if "run_id" not in group.attrs:  # left by an older micromae, which kept its done planes in the attrs
            group.attrs["run_id"] = uuid.uuid4().hex
        return group
    shutil.rmtree(folder_of(partial), ignore_errors=True)
    group = zarr.open_group(store=str(partial), mode="w")
    for name, model in clusters.items():
        group.create_array(name, shape=shape, dtype=_label_dtype(model.k), chunks=_chunks(shape, axes[0], tile),
                           fill_value=0, dimension_names=("z", "y", "x"))
        for a in axes if fused else ():
            group.create_array(f"dist_{name}_axis{a}", shape=(model.k, *shape), dtype="float16",
                               chunks=(model.k, *_chunks(shape, a, tile)), fill_value=0)
    if fused and pca is not None:  # the fused (mean) PCA features, one Z slice thick: ranks fuse disjoint slices
        group.create_array("features_pca", shape=(pca[1].shape[0], *shape), dtype="float16",
                           chunks=(pca[1].shape[0], *_chunks(shape, 0, tile)), fill_value=0)
    kinds = (["pca"] if pca is not None else []) + (["full"] if keep_features == "full" else [])
    for kind in kinds:
        dim = pca[1].shape[0] if kind == "pca" else embed_dim
        for a in axes:
            group.create_array(feature_array(kind, a if fused else None), shape=(dim, *shape), dtype="float16",
                               chunks=(dim, *_chunks(shape, a, tile)), fill_value=0)
    group.attrs.update({"settings_key": key, "done": {}, "run_id": uuid.uuid4().hex,
                        "micromae_version": micromae.__version__})
    return group


def _features_record(keep_features: str, pca: tuple[np.ndarray, np.ndarray] | None, axes: tuple[int, ...]
                     ) -> dict[str, Any] | None:
    """What ``micromae cluster --features`` can relabel from: the stored feature arrays (per axis, to redo the
    tri-planar fusion, or one array) and their kind."""
    fused = len(axes) > 1
    if keep_features == "none" and pca is None:
        return None
    kind = "pca" if keep_features == "none" else keep_features
    if fused and keep_features != "none":
        return {"kind": kind, "per_axis": True, "arrays": [feature_array(kind, a) for a in axes]}
    return {"kind": kind, "per_axis": False, "arrays": [feature_array(kind, None)]}


def _chunks(shape: tuple[int, ...], axis: int, tile: int) -> tuple[int, ...]:
    """One plane thick along the slicing axis, tile-sized in the plane."""
    return tuple(1 if i == axis else min(s, tile) for i, s in enumerate(shape))


@dataclass(frozen=True)
class AxisPass:
    """What one pass along a slicing axis needs besides the encoder, the volume and the output group.

    ``clusters``: output array name → cluster model; ``intensity_range``: ``(lo, hi)`` mapped to [0, 1];
    ``pca``: optional ``(mean (D,), components (d, D))``; ``tile``: in-plane tile side in pixels; ``fused``:
    write per-axis squared distances (tri-planar) instead of labels; ``progress``: show a progress bar;
    ``plane_done``: called after each finished plane.
    """

    clusters: dict[str, ClusterModel]
    intensity_range: tuple[float, float]
    settings: SegmentSettings
    pca: tuple[np.ndarray, np.ndarray] | None
    tile: int
    fused: bool
    progress: bool
    plane_done: Callable[[], None] | None = None
    keep_full: bool = False  # also write the whole embedding (features / features_axis<A>)
    done: dict[int, set[int]] | None = None  # axis → planes finished by earlier runs
    share: Callable[[list[int]], list[int]] = list  # this rank's part of the planes still to do
    record: Callable[[int, int], None] | None = None  # (axis, plane) finished


def _run_axis(encoder: nn.Module, volume: Any, group: zarr.Group, axis: int, plan: AxisPass) -> None:
    """Embed and label every plane of ``volume`` (Z, Y, X) normal to ``axis`` not yet done, tile by tile.

    Per tile, features ``(D, th, tw)`` become labels ``(th, tw)`` in ``group[name]`` (or, ``fused``, squared
    distances ``(k, th, tw)`` in ``group["dist_<name>_axis<axis>"]``) and, with ``pca``, reduced features in
    ``features_pca``. Only this rank's share of the planes not in ``plan.done`` is done; each finished plane
    goes to ``plan.record`` so an interrupted run resumes.
    """
    clusters, intensity_range, settings, pca = plan.clusters, plan.intensity_range, plan.settings, plan.pca
    tile, fused, progress = plan.tile, plan.fused, plan.progress
    done = (plan.done or {}).get(axis, set())
    shape = tuple(int(s) for s in volume.shape)
    height, width = plane_shape(shape, axis)
    todo = plan.share([i for i in range(shape[axis]) if i not in done])
    bar = tqdm(todo, desc=f"segment along {'ZYX'[axis]}", unit="plane", disable=not progress or not todo)
    # the next tile is read (and scaled) in a background thread while the encoder works on this one
    tiles = [(y0, x0, min(tile, height - y0), min(tile, width - x0))
             for y0 in range(0, height, tile) for x0 in range(0, width, tile)]
    encode = CompiledEncoder(encoder) if settings.compile else encoder
    reads = tile_reads(encoder, volume, axis, todo, tiles, settings, intensity_range)
    for index in bar:
        for (_, (y0, x0, th, tw)), region in itertools.islice(reads, len(tiles)):
            feats = embed_region(encode, region, settings.batch_size, amp=settings.amp)  # (D, th, tw), on device
            flat = feats.reshape(feats.shape[0], -1).T  # (th*tw, D)
            rows, cols = slice(y0, y0 + th), slice(x0, x0 + tw)
            for name, model in clusters.items():  # cluster assignment on the encoder's device
                if fused:
                    dist = model.squared_distances(flat).T.reshape(model.k, th, tw)
                    group[f"dist_{name}_axis{axis}"][(slice(None), *plane_index(axis, index, rows, cols))] = (
                        dist.cpu().numpy().astype(np.float16))
                else:
                    lab = model.predict(flat).reshape(th, tw).to(torch.int32).cpu().numpy()
                    group[name][plane_index(axis, index, rows, cols)] = lab.astype(group[name].dtype)
            if pca is not None:
                red = _project(flat, pca).T.reshape(-1, th, tw)
                arr = feature_array("pca", axis if fused else None)
                group[arr][(slice(None), *plane_index(axis, index, rows, cols))] = red.astype(np.float16)
            if plan.keep_full:
                full = feats.float().cpu().numpy().astype(np.float16)
                group[feature_array("full", axis if fused else None)][
                    (slice(None), *plane_index(axis, index, rows, cols))] = full
        if plan.record is not None:
            plan.record(axis, index)
        if plan.plane_done is not None:
            plan.plane_done()


def _project(flat: torch.Tensor, pca: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean = torch.as_tensor(pca[0], device=flat.device, dtype=torch.float32)
    comps = torch.as_tensor(pca[1], device=flat.device, dtype=torch.float32)
    return ((flat.float() - mean) @ comps.T).cpu().numpy()


def _fuse(group, clusters, pca, axes, shape, progress, zs):
    """Tri-planar fusion of Z slices ``zs`` (this rank's share): argmin of summed squared distances; mean of PCA
    features. The mean features array is made by rank 0 with the others (:func:`_create_partial`)."""
    for z in tqdm(zs, desc="fuse planes", unit="slice", disable=not progress):
        for name in clusters:
            total = sum(np.asarray(group[f"dist_{name}_axis{a}"][:, z], dtype=np.float32) for a in axes)
            group[name][z] = total.argmin(0).astype(group[name].dtype)
        if pca is not None:
            mean = sum(np.asarray(group[f"features_pca_axis{a}"][:, z], dtype=np.float32) for a in axes) / len(axes)
            group["features_pca"][:, z] = mean.astype(np.float16)


def _drop_axis_arrays(group, clusters, pca, axes, keep_features):
    """(rank 0, after the fusion) the per-axis distances, and the per-axis features unless they are kept."""
    for name in clusters:
        for a in axes:
            if f"dist_{name}_axis{a}" in group:
                del group[f"dist_{name}_axis{a}"]
    if pca is not None and keep_features != "pca":
        for a in axes:
            if feature_array("pca", a) in group:
                del group[feature_array("pca", a)]
    group.attrs["fused"] = True

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
from micromae.segment.planes import check_axis, plane_index, plane_shape
from micromae.segment.prefetch import tile_reads


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
    return None


def segment_volume(encoder: nn.Module, volume: Any, out_path: str | Path, clusters: dict[str, ClusterModel],
                   intensity_range: tuple[float, float], settings: SegmentSettings | None = None,
                   pca: tuple[np.ndarray, np.ndarray] | None = None, resume: bool = True, overwrite: bool = False,
                   progress: bool = True, metadata: dict[str, Any] | None = None,
                   finish: Callable[[zarr.Group], None] | None = None,
                   on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Label every voxel of ``volume`` (Z, Y, X) and write the Zarr group ``out_path``.

    clusters: output array name → cluster model, e.g. ``{"labels": k6, "labels_k4": k4}``.
    pca: optional ``(mean (D,), components (d, D))`` → also write ``features_pca`` (d, Z, Y, X) float16.
    finish: called with the finished ``<out>.partial`` group (metadata written) just before it is renamed to
    ``out_path``, to add what else belongs to the output; the rename comes last, so ``out_path`` never
    holds a half-written result.
    on_progress: called as ``on_progress(planes_done, planes_total)`` after each finished plane (all slicing
    axes counted, planes done by an interrupted run included); an exception it raises stops the run, leaving
    ``<out>.partial`` to resume from (how the napari widget cancels).
    """
    settings = settings or SegmentSettings()
    out_path = Path(out_path)
    if "labels" not in clusters:
        raise input_error("clusters", "a model named 'labels'", ", ".join(clusters) or "none",
                          "Pass {'labels': model, ...}")
    if out_path.exists() and not overwrite:
        raise input_error("output", "a path that does not exist yet", f"'{out_path}' exists",
                          "Choose another --output or pass --overwrite")
    axes = tuple(check_axis(a) for a in settings.axes)
    shape = tuple(int(s) for s in volume.shape)
    key = _settings_key(shape, settings, clusters, pca, {"metadata": metadata or {}})
    partial = out_path.with_name(out_path.name + ".partial")
    group = _open_partial(partial, key, resume)
    tile = _tile_side(encoder, settings)
    fused = len(axes) > 1
    if group is None:
        group = zarr.open_group(store=str(partial), mode="w")
        for name, model in clusters.items():
            group.create_array(name, shape=shape, dtype=_label_dtype(model.k), chunks=_chunks(shape, axes[0], tile),
                               fill_value=0)
            for a in axes if fused else ():
                group.create_array(f"dist_{name}_axis{a}", shape=(model.k, *shape), dtype="float16",
                                   chunks=(model.k, *_chunks(shape, a, tile)), fill_value=0)
        if pca is not None:
            for a in axes:
                arr = "features_pca" if not fused else f"features_pca_axis{a}"
                group.create_array(arr, shape=(pca[1].shape[0], *shape), dtype="float16",
                                   chunks=(pca[1].shape[0], *_chunks(shape, a, tile)), fill_value=0)
        group.attrs.update({"settings_key": key, "done": {}, "micromae_version": micromae.__version__})
    total = sum(shape[a] for a in axes)
    finished = [sum(len(group.attrs.get("done", {}).get(str(a), [])) for a in axes)]

    def plane_done() -> None:
        finished[0] += 1
        if on_progress is not None:
            on_progress(finished[0], total)

    plan = AxisPass(clusters, intensity_range, settings, pca, tile, fused, progress, plane_done)
    for a in axes:
        _run_axis(encoder, volume, group, a, plan)
    if fused:
        _fuse(group, clusters, pca, axes, shape, tile, progress)
    group.attrs.update({
        "axes": "ZYX", "settings": {**asdict(settings), "axes": list(axes)}, "intensity_range": list(intensity_range),
        "clusters": {name: m.meta for name, m in clusters.items()}, **(metadata or {}),
    })
    if finish is not None:
        finish(group)
    if out_path.exists():
        shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
    partial.rename(out_path)
    return out_path


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


def _run_axis(encoder: nn.Module, volume: Any, group: zarr.Group, axis: int, plan: AxisPass) -> None:
    """Embed and label every plane of ``volume`` (Z, Y, X) normal to ``axis`` not yet done, tile by tile.

    Per tile, features ``(D, th, tw)`` become labels ``(th, tw)`` in ``group[name]`` (or, ``fused``, squared
    distances ``(k, th, tw)`` in ``group["dist_<name>_axis<axis>"]``) and, with ``pca``, reduced features in
    ``features_pca``. Finished planes are recorded in ``group.attrs["done"]`` so an interrupted run resumes.
    """
    clusters, intensity_range, settings, pca = plan.clusters, plan.intensity_range, plan.settings, plan.pca
    tile, fused, progress = plan.tile, plan.fused, plan.progress
    done = set(group.attrs.get("done", {}).get(str(axis), []))
    shape = tuple(int(s) for s in volume.shape)
    height, width = plane_shape(shape, axis)
    todo = [i for i in range(shape[axis]) if i not in done]
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
                arr = f"features_pca_axis{axis}" if fused else "features_pca"
                group[arr][(slice(None), *plane_index(axis, index, rows, cols))] = red.astype(np.float16)
        done.add(index)
        all_done = dict(group.attrs.get("done", {}))
        all_done[str(axis)] = sorted(done)
        group.attrs["done"] = all_done
        if plan.plane_done is not None:
            plan.plane_done()


def _project(flat: torch.Tensor, pca: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean = torch.as_tensor(pca[0], device=flat.device, dtype=torch.float32)
    comps = torch.as_tensor(pca[1], device=flat.device, dtype=torch.float32)
    return ((flat.float() - mean) @ comps.T).cpu().numpy()


def _fuse(group, clusters, pca, axes, shape, tile, progress):
    """Tri-planar fusion, Z slab by Z slab: argmin of summed squared distances; mean of PCA features."""
    if group.attrs.get("fused"):
        return
    if pca is not None and "features_pca" not in group:
        group.create_array("features_pca", shape=(pca[1].shape[0], *shape), dtype="float16",
                           chunks=(pca[1].shape[0], 1, *shape[1:]), fill_value=0)
    for z in tqdm(range(shape[0]), desc="fuse planes", unit="slice", disable=not progress):
        for name in clusters:
            total = sum(np.asarray(group[f"dist_{name}_axis{a}"][:, z], dtype=np.float32) for a in axes)
            group[name][z] = total.argmin(0).astype(group[name].dtype)
        if pca is not None:
            mean = sum(np.asarray(group[f"features_pca_axis{a}"][:, z], dtype=np.float32) for a in axes) / len(axes)
            group["features_pca"][:, z] = mean.astype(np.float16)
    for name in clusters:
        for a in axes:
            del group[f"dist_{name}_axis{a}"]
    if pca is not None:
        for a in axes:
            del group[f"features_pca_axis{a}"]
    group.attrs["fused"] = True

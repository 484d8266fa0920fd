"""Re-cluster a segmentation from its stored per-voxel features, without the encoder (``micromae cluster
--features SEG.zarr --k 8 --output SEG_K8.zarr``).

``micromae segment --keep-features pca|full`` stores float16 features per voxel (PCA-reduced, or the whole
embedding), and with ``--tri-planar`` one array per slicing axis. Here k-means is fitted on the stored features
of ``n_samples`` voxels drawn uniformly at random (with tri-planar features, each sampled voxel gives one
sample per axis, as the segmentation's sample gives single-axis embeddings), then every voxel is assigned, 3-D
block by 3-D block: the nearest centre, or with per-axis features the argmin of the squared distances summed
over the axes (the nearest centre of the averaged features, as in :mod:`micromae.segment.volume`). Memory is
bounded by one block (``budget_bytes``) whatever the volume's size; the volume is read twice (sample, labels).
The output is a Zarr group with ``labels`` (and the centres beside it, ``<stem>_centres_k<K>.npz``, in the
stored features' space), written to ``<out>.partial`` and renamed when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

import micromae
from micromae.errors import at_least, input_error
from micromae.io import check_output, omezarr
from micromae.segment.cluster import fit_kmeans

__all__ = ["StoredFeatures", "blocks", "recluster", "sample_positions", "stored_features"]


class StoredFeatures:
    """The feature arrays of a segmentation output: ``arrays`` (each (d, Z, Y, X) float16), their ``kind``
    (``pca`` or ``full``) and whether they are per slicing axis (tri-planar: distances are summed over them)."""

    def __init__(self, group: zarr.Group, record: dict[str, Any]):
        self.kind, self.per_axis = str(record["kind"]), bool(record["per_axis"])
        self.names = list(record["arrays"])
        self.arrays = [group[name] for name in self.names]
        self.dim = int(self.arrays[0].shape[0])
        self.shape = tuple(int(s) for s in self.arrays[0].shape[1:])


def stored_features(path: str | Path) -> tuple[zarr.Group, StoredFeatures]:
    """Open the segmentation ``path`` and its stored features; a clear error when it has none."""
    path = Path(path)
    if not path.is_dir():
        raise input_error(f"--features '{path}'", "a Zarr group written by micromae segment",
                          "nothing there" if not path.exists() else "a file", "Pass the output of micromae segment")
    try:
        group = zarr.open_group(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a group
        raise input_error(f"--features '{path}'", "a Zarr group written by micromae segment",
                          f"a folder zarr cannot open ({exc})", "Pass the output of micromae segment") from exc
    record = group.attrs.get("features")
    if record is None and "features_pca" in group:  # written with --pca before --keep-features existed
        record = {"kind": "pca", "per_axis": False, "arrays": ["features_pca"]}
    if not record or any(name not in group for name in record.get("arrays", [])):
        raise input_error(f"--features '{path}'", "a segmentation with stored features (micromae segment "
                          "--keep-features pca or full)",
                          "no stored features (arrays: " + (", ".join(sorted(group.array_keys())) or "none") + ")",
                          "Run micromae segment again with --keep-features pca (or full), or re-cluster with the "
                          "encoder: micromae segment --k K")
    return group, StoredFeatures(group, record)


def sample_positions(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """(n, 3) (z, y, x) of ``n`` distinct voxels drawn uniformly, in C order (what :func:`recluster` fits on)."""
    flat = np.sort(np.random.default_rng(seed).choice(int(np.prod(shape)), n, replace=False))
    return np.stack(np.unravel_index(flat, shape), 1).astype(np.int64)


def blocks(shape: tuple[int, ...], chunks: list[tuple[int, ...]], bytes_per_voxel: int, budget_bytes: int
           ) -> Iterator[tuple[slice, slice, slice]]:
    """3-D blocks covering ``shape`` (Z, Y, X): as large as the largest chunk of ``chunks`` along each axis (so a
    chunk is read once per block row), halved until a block's ``bytes_per_voxel`` fit ``budget_bytes``, then
    deepened along Z while they still fit."""
    ext = [min(s, max(int(c[i]) for c in chunks)) for i, s in enumerate(shape)]
    while int(np.prod(ext)) * bytes_per_voxel > budget_bytes and max(ext) > 1:
        i = int(np.argmax(ext))
        ext[i] = (ext[i] + 1) // 2
    ext[0] = int(min(shape[0], max(ext[0], budget_bytes // (bytes_per_voxel * ext[1] * ext[2]))))
    for z in range(0, shape[0], ext[0]):
        for y in range(0, shape[1], ext[1]):
            for x in range(0, shape[2], ext[2]):
                yield slice(z, z + ext[0]), slice(y, y + ext[1]), slice(x, x + ext[2])


def _block_sample(feats: StoredFeatures, coords: np.ndarray, budget_bytes: int, progress: bool) -> np.ndarray:
    """The stored features at ``coords`` (sorted in C order): (len(coords) x n_arrays, d) float32, the arrays
    one after the other, read block by block."""
    out = np.zeros((len(feats.arrays), len(coords), feats.dim), np.float32)
    bpv = 4 * feats.dim * len(feats.arrays)
    parts = list(blocks(feats.shape, [a.chunks[1:] for a in feats.arrays], bpv, budget_bytes))
    for zs, ys, xs in tqdm(parts, desc="sampling stored features", unit="block", disable=not progress):
        inside = np.flatnonzero((coords[:, 0] >= zs.start) & (coords[:, 0] < zs.stop) & (coords[:, 1] >= ys.start)
                                & (coords[:, 1] < ys.stop) & (coords[:, 2] >= xs.start) & (coords[:, 2] < xs.stop))
        if not len(inside):
            continue
        local = coords[inside] - [zs.start, ys.start, xs.start]
        for a, arr in enumerate(feats.arrays):
            block = np.asarray(arr[:, zs, ys, xs])
            out[a, inside] = block[:, local[:, 0], local[:, 1], local[:, 2]].T
    return out.reshape(-1, feats.dim)


def recluster(features: str | Path, output: str | Path, k: int = 6, n_samples: int = 200_000, seed: int = 0,
              tri_planar: bool | None = None, overwrite: bool = False, progress: bool = True,
              budget_bytes: int = 256 << 20) -> Path:
    """Relabel the segmentation ``features`` (a ``micromae segment --keep-features`` output) with ``k`` new
    k-means clusters of its stored features; write the Zarr group ``output`` (``labels``) and its centres.

    tri_planar: ``None`` fuses per-axis features when they are stored; ``True`` insists on it (an error when
    only one array is stored). Everything is checked before anything is written.
    """
    at_least("--k", k, 2, "Pass --k 2 or more (k-means with one cluster labels every voxel alike)")
    at_least("--samples", n_samples, 1)
    source, feats = stored_features(features)
    if tri_planar and not feats.per_axis:
        raise input_error("--tri-planar", "a segmentation that kept per-axis features (micromae segment "
                          "--tri-planar --keep-features pca or full)", f"one {feats.names[0]} array",
                          "Drop --tri-planar (the stored features are used as they are)")
    output = check_output(output, overwrite=overwrite, suffixes=(".zarr",), folder=True)
    if output.resolve() == Path(features).resolve():
        raise input_error("--output", "a new Zarr group (not the --features input)", f"'{output}'",
                          "Choose another --output, e.g. seg_k8.zarr")
    n = min(n_samples, int(np.prod(feats.shape)))
    if k > n * len(feats.arrays):
        raise input_error("--k", f"at most the number of sampled voxels ({n * len(feats.arrays)})", str(k),
                          "Lower --k")
    coords = sample_positions(feats.shape, n, seed)
    sample = _block_sample(feats, coords, budget_bytes, progress)
    model = fit_kmeans(sample, k, seed=seed, meta={"features": str(features), "space": feats.kind,
                                                    "per_axis": feats.per_axis, "arrays": feats.names})
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    group = zarr.open_group(store=str(partial), mode="w")
    bpv = 4 * (feats.dim * len(feats.arrays) + 2 * k)
    parts = list(blocks(feats.shape, [a.chunks[1:] for a in feats.arrays], bpv, budget_bytes))
    first = parts[0]
    ome = omezarr.is_ome_path(output)
    name = omezarr.level_path(omezarr.MAIN_LABELS) if ome else "labels"
    labels = group.create_array(name, shape=feats.shape, dtype=np.uint8 if k <= 255 else np.uint16,
                                chunks=(1, first[1].stop - first[1].start, first[2].stop - first[2].start),
                                fill_value=0, dimension_names=("z", "y", "x"))
    for zs, ys, xs in tqdm(parts, desc="assigning clusters", unit="block", disable=not progress):
        total = None
        for arr in feats.arrays:
            block = np.asarray(arr[:, zs, ys, xs], dtype=np.float32)
            d2 = model.squared_distances(torch.from_numpy(block.reshape(feats.dim, -1).T))
            total = d2 if total is None else total + d2
        labels[zs, ys, xs] = total.argmin(1).numpy().reshape(block.shape[1:]).astype(labels.dtype)
    keep = {name: source.attrs[name] for name in ("settings", "intensity_range", "checkpoint_sha256", "input")
            if name in source.attrs}
    voxel_size = omezarr.store_voxel_size(source)
    group.attrs.update({"axes": "ZYX", "k": k, "clusters": {name: model.meta}, "reclustered_from": str(features),
                        "micromae_version": micromae.__version__, "format": "ome-zarr" if ome else "zarr",
                        "voxel_size": list(voxel_size) if voxel_size is not None else None, **keep})
    if ome:  # label pyramid and metadata; the image copy comes from the source when it holds one
        image = source["0"] if omezarr.is_ome_segmentation(source) and "0" in source else None
        omezarr.finish_segmentation(group, image, {omezarr.MAIN_LABELS: k}, voxel_size, image=image is not None)
    from micromae.segment.pipeline import centres_path

    if overwrite:
        for old in output.parent.glob(f"{omezarr.output_stem(output)}_centres_k*.npz"):
            old.unlink()
    model.save(centres_path(output, k))
    if output.exists():
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    partial.rename(output)
    return output


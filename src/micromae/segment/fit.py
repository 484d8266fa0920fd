"""Fit k-means (and optionally PCA) on exact pixel embeddings sampled at random from a volume.

One encoder window gives the exact embeddings of the ``c x c`` pixels its central tokens are centred on (the
windows lie on cover-and-stride's lattice, so they are the very embeddings the segmentation computes), so a
random sample of pixel embeddings costs one window per ``c**2`` pixels, the same rate as cover-and-stride,
without embedding the whole volume first. The sample also carries each pixel's (z, y, x) position, so it can
be coloured by reference labels (UMAP figure) or restricted to a region (a cell mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from micromae.errors import input_error
from micromae.runtime import eval_mode
from micromae.segment.cluster import ClusterModel, fit_kmeans
from micromae.segment.cover_stride import encode_windows, encoder_geometry, read_padded
from micromae.segment.planes import PlaneView, check_axis


@dataclass
class EmbeddingSample:
    """features: (N, D) float32 exact pixel embeddings; coords: (N, 3) int64 (z, y, x) of each pixel."""

    features: np.ndarray
    coords: np.ndarray


def pick_slices(shape: tuple[int, ...], axes: tuple[int, ...], seed: int, max_slices: int = 64
                ) -> list[tuple[int, int]]:
    """The (axis, index) slices :func:`sample_pixel_embeddings` draws its pixels from (the first draw of its
    random generator, so the same for the same ``seed``)."""
    picks = [(a, int(i)) for a in axes for i in range(shape[a])]
    order = np.random.default_rng(seed).permutation(len(picks))[:max_slices]
    return [picks[k] for k in order]


def sample_capacity(shape: tuple[int, ...], axes: tuple[int, ...] = (0,), mask: Any = None, seed: int = 0,
                    max_slices: int = 64) -> int:
    """How many distinct pixels :func:`sample_pixel_embeddings` can draw: those (inside ``mask``) of the slices
    it picks. Cheap (no encoder pass; reads only those slices of the mask), so a verb can check ``k`` and cap
    the sample size before it starts."""
    axes = tuple(check_axis(a) for a in axes)
    total = 0
    for axis, index in pick_slices(tuple(int(s) for s in shape), axes, seed, max_slices):
        if mask is None:
            total += int(np.prod([s for i, s in enumerate(shape) if i != axis]))
        else:
            total += int(np.count_nonzero(np.asarray(PlaneView(mask, axis, index)[:, :])))
    return total


@torch.inference_mode()
def sample_pixel_embeddings(encoder: nn.Module, volume: Any, n_samples: int, intensity_range: tuple[float, float],
                            axes: tuple[int, ...] = (0,), central_tokens: int | None = None, pad_mode: str = "reflect",
                            mask: Any = None, max_slices: int = 64, batch_size: int = 256, seed: int = 0,
                            progress: bool = True) -> EmbeddingSample:
    """Exact embeddings of about ``n_samples`` random pixels of ``volume`` (Z, Y, X).

    Slices are drawn at random along ``axes`` (at most ``max_slices`` of them, each read once); inside a slice
    random windows are encoded and their central tokens kept. With ``mask`` (same shape, nonzero = keep) only
    pixels inside the mask are kept (and at least one must be). A slice asked for at least as many pixels as
    it has gives each of them once (every window of cover-and-stride's lattice, no random draws), so the
    sample never holds more than :func:`sample_capacity` pixels.
    """
    geom = encoder_geometry(encoder, central_tokens, "exact")
    p, c, fov = geom.patch, geom.central, geom.fov(0)
    rng = np.random.default_rng(seed)
    axes = tuple(check_axis(a) for a in axes)
    shape = tuple(int(s) for s in volume.shape)
    if mask is not None and tuple(mask.shape) != shape:
        raise input_error("mask", f"the volume's shape {shape}", f"shape {tuple(mask.shape)}",
                          "Pass a mask of the same size as the volume")
    slices = pick_slices(shape, axes, seed, max_slices)
    rng.permutation(sum(shape[a] for a in axes))  # the draw pick_slices made: the same stream after it
    per_slice = int(np.ceil(n_samples / len(slices)))
    device = next(encoder.parameters()).device
    feats, coords = [], []
    with eval_mode(encoder):
        for axis, index in tqdm(slices, desc="sampling embeddings", unit="slice", disable=not progress):
            plane = PlaneView(volume, axis, index)
            height, width = plane.shape
            ys, xs = np.arange(-fov, height + fov), np.arange(-fov, width + fov)
            padded = read_padded(plane, ys, xs, pad_mode, intensity_range, device)[0]  # (C, Hp, Wp)
            keep = None if mask is None else np.asarray(PlaneView(mask, axis, index)[:, :]) != 0
            # Windows on cover-and-stride's lattice (block origin + shift), so every sampled embedding is the
            # one the segmentation computes for that pixel. Tokens past the plane's edge are dropped.
            block = c * p
            n_by, n_bx = -(-height // block), -(-width // block)
            inside_frac = height * width / (n_by * n_bx * block * block)
            got, rounds = 0, 0
            if keep is not None and not keep.any():
                continue
            if per_slice >= (height * width if keep is None else int(keep.sum())):  # all pixels, once each
                by, sy, bx, sx = np.meshgrid(np.arange(n_by), np.arange(p), np.arange(n_bx), np.arange(p),
                                             indexing="ij")
                y, x = (block * by + sy).ravel(), (block * bx + sx).ravel()
                f, xyz = _encode_sampled(encoder, padded, y, x, geom, fov, keep, axis, index, batch_size)
                feats.append(f)
                coords.append(xyz)
                continue
            while got < per_slice and rounds < 4:
                n_windows = int(np.ceil(1.2 * (per_slice - got) / (c * c * inside_frac))) + 1
                y = block * rng.integers(0, n_by, n_windows) + rng.integers(0, p, n_windows)
                x = block * rng.integers(0, n_bx, n_windows) + rng.integers(0, p, n_windows)
                f, xyz = _encode_sampled(encoder, padded, y, x, geom, fov, keep, axis, index, batch_size)
                feats.append(f)
                coords.append(xyz)
                got += len(f)
                rounds += 1
    features = np.concatenate(feats) if feats else np.zeros((0, geom.embed_dim), np.float32)
    if len(features) == 0:
        raise input_error("pixel sample", "some pixels inside the mask", "none in the sampled slices",
                          "Check the mask, or raise max_slices")
    coords_all = np.concatenate(coords).astype(np.int64)
    if len(features) > n_samples:
        pick = np.sort(rng.choice(len(features), n_samples, replace=False))
        features, coords_all = features[pick], coords_all[pick]
    return EmbeddingSample(features.astype(np.float32), coords_all)


def _encode_sampled(encoder: nn.Module, padded: torch.Tensor, y: np.ndarray, x: np.ndarray, geom: Any, fov: int,
                    keep: np.ndarray | None, axis: int, index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode the windows whose first central token is centred on (y[i], x[i]) in plane ``index`` along
    ``axis``; return the exact embeddings (n, D) of the central tokens that lie in the plane (and in ``keep``)
    and their volume coordinates (n, 3). padded: (C, H + 2*fov, W + 2*fov), index 0 at coordinate -fov."""
    p, c, h, o = geom.patch, geom.central, geom.half, geom.offset(0)
    height, width = padded.shape[1] - 2 * fov, padded.shape[2] - 2 * fov
    device = padded.device
    wy = torch.as_tensor(y - h - o * p + fov, device=device)
    wx = torch.as_tensor(x - h - o * p + fov, device=device)
    all_windows = padded.unfold(1, fov, 1).unfold(2, fov, 1)  # (C, nY, nX, F, F) view, no copy
    steps = p * np.arange(c)
    feats, coords = [], []
    for start in range(0, len(y), batch_size):
        sl = slice(start, start + batch_size)
        windows = all_windows[:, wy[sl], wx[sl]].transpose(0, 1).contiguous()  # (n, C, F, F)
        tokens = encode_windows(encoder, windows)[:, o:o + c, o:o + c].float().cpu().numpy()
        n = windows.shape[0]
        py = np.broadcast_to(y[sl, None, None] + steps[None, :, None], (n, c, c))
        px = np.broadcast_to(x[sl, None, None] + steps[None, None, :], (n, c, c))
        inside = (py >= 0) & (py < height) & (px >= 0) & (px < width)
        if keep is not None:
            inside &= keep[np.clip(py, 0, height - 1), np.clip(px, 0, width - 1)]
        feats.append(tokens[inside])
        vol_coords = [py[inside], px[inside]]
        vol_coords.insert(axis, np.full(int(inside.sum()), index))
        coords.append(np.stack(vol_coords, 1))
    return np.concatenate(feats), np.concatenate(coords)


def fit_cluster_models(sample: EmbeddingSample, ks: list[int], seed: int = 0,
                       meta: dict[str, Any] | None = None) -> dict[int, ClusterModel]:
    """One k-means model per k in ``ks`` on the same sample (for a k sweep)."""
    return {k: fit_kmeans(sample.features, k, seed=seed, meta=meta) for k in ks}

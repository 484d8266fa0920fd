"""The MAESTER segmentation verbs as Python functions: ``cluster``, ``segment`` and ``embed``.

``micromae segment`` = load encoder → sample exact pixel embeddings → fit k-means (or load centres) →
stream the volume, writing labels to Zarr. The CLI and the demo call these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import zarr

from micromae.data.normalize import intensity_range
from micromae.errors import input_error
from micromae.io import open_volume, write_array
from micromae.models.pretrained import load_encoder
from micromae.runtime import resolve_device, say
from micromae.segment.cluster import ClusterModel
from micromae.segment.cover_stride import embed_pixels_region
from micromae.segment.fit import EmbeddingSample, fit_cluster_models, sample_pixel_embeddings
from micromae.segment.planes import PlaneView
from micromae.segment.volume import SegmentSettings, segment_volume


def open_input_volume(path: str | Path | np.ndarray, axes: str | None = None, key: str | None = None) -> Any:
    """A single-channel (Z, Y, X) volume, read lazily; a 2-D image becomes one slice."""
    if isinstance(path, np.ndarray):
        arr = path
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise input_error("input", "a 2-D image or 3-D volume", f"shape {arr.shape}", "Pass one channel")
        return arr
    vol = open_volume(path, axes=axes, key=key)
    if vol.axes == "YX":
        return vol.read()[None]
    if vol.axes != "ZYX":
        raise input_error(f"input '{path}'", "a single-channel ZYX volume or YX image",
                          f"axes {vol.axes}, shape {vol.shape}", "Pass --axes for the file, or pick one channel")
    return vol


def encoder_on_device(checkpoint: str | Path, device: str = "auto") -> tuple[torch.nn.Module, dict, str]:
    """Encoder of a pre-training checkpoint (:func:`~micromae.models.pretrained.load_encoder`), in eval mode on
    ``device`` (said on the terminal); also its config dict and the file's SHA-256."""
    encoder, meta = load_encoder(checkpoint)
    dev = resolve_device(device)
    say(f"encoder from {checkpoint} on {dev}")
    return encoder.eval().to(dev), meta.config, meta.sha256


def volume_range(volume: Any, config: dict, normalize: str | None = None) -> tuple[float, float]:
    """Intensity range as in pre-training (the checkpoint's ``data.normalize`` unless overridden)."""
    data = config.get("data", {})
    mode = normalize or data.get("normalize", "dtype")
    return intensity_range(volume, mode, tuple(data.get("percentiles", (0.5, 99.5))))


def fit_clusters(encoder: torch.nn.Module, volume: Any, ks: Sequence[int], rng_range: tuple[float, float],
                 n_samples: int = 200_000, seed: int = 0, mask: Any = None, settings: SegmentSettings | None = None,
                 meta: dict[str, Any] | None = None) -> tuple[dict[int, ClusterModel], EmbeddingSample]:
    """Sample exact pixel embeddings (inside ``mask`` when given) and fit one k-means per k."""
    settings = settings or SegmentSettings()
    sample = sample_pixel_embeddings(encoder, volume, n_samples, rng_range, axes=settings.axes,
                                     central_tokens=settings.central_tokens, pad_mode=settings.pad_mode,
                                     mask=mask, batch_size=settings.batch_size, seed=seed)
    bad = [k for k in ks if k > len(sample.features)]
    if bad:
        raise input_error("--k", f"at most the number of sampled pixels ({len(sample.features)})", str(bad),
                          "Lower k or raise --samples")
    say(f"fitting k-means (k = {', '.join(map(str, ks))}) on {len(sample.features)} pixel embeddings")
    return fit_cluster_models(sample, list(ks), seed=seed, meta=meta), sample


def fit_pca(sample: EmbeddingSample, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (dim, D)) of the sampled embeddings (scikit-learn PCA)."""
    from sklearn.decomposition import PCA

    if not 1 <= dim <= sample.features.shape[1]:
        raise input_error("--pca", f"1..{sample.features.shape[1]}", str(dim), "Pick a smaller dimension")
    pca = PCA(n_components=dim, random_state=seed).fit(sample.features)
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


def run_segment(checkpoint: str | Path, input_path: Any, output: str | Path, k: int = 6,
                centres: str | Path | None = None, sweep: Sequence[int] = (), settings: SegmentSettings | None = None,
                n_samples: int = 200_000, seed: int = 0, mask_path: Any = None, pca_dim: int = 0,
                axes: str | None = None, key: str | None = None, device: str = "auto", resume: bool = True,
                overwrite: bool = False, save_sample: bool = True,
                on_progress: Callable[[int, int], None] | None = None) -> Path:
    """``micromae segment``: label every voxel of ``input_path`` by k-means on exact pixel embeddings.

    The Zarr group at ``output`` holds ``labels``, ``labels_k<K>`` for each k of ``sweep``, optionally
    ``features_pca``, and ``sample/features`` + ``sample/coords`` (the pixels k-means was fitted on, for the
    UMAP figure of ``micromae evaluate segmentation``); ``centres_k<K>.npz`` files are written beside it.
    ``on_progress(planes_done, planes_total)``: see :func:`~micromae.segment.volume.segment_volume`.
    """
    settings = settings or SegmentSettings()
    output = Path(output)
    if output.exists() and not overwrite:
        raise input_error("--output", "a path that does not exist yet", f"'{output}' exists",
                          "Choose another output or pass --overwrite")
    encoder, config, sha = encoder_on_device(checkpoint, device)
    volume = open_input_volume(input_path, axes, key)
    mask = None if mask_path is None else open_input_volume(mask_path)
    rng_range = volume_range(volume, config)
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "mode": settings.mode,
            "central_tokens": settings.central_tokens, "axes": list(settings.axes)}
    sample = None
    if centres is not None:
        main = ClusterModel.load(centres)
        if main.meta.get("checkpoint_sha256") not in (None, sha):
            say("warning: these centres were fitted with another checkpoint")
        models = {main.k: main}
        if sweep:
            raise input_error("--sweep", "no sweep when --centres is given", str(list(sweep)),
                              "Drop --centres to fit new centres for each k")
    else:
        ks = sorted({k, *sweep})
        models, sample = fit_clusters(encoder, volume, ks, rng_range, n_samples, seed, mask, settings, meta)
        main = models[k]
    clusters = {"labels": main, **{f"labels_k{kk}": m for kk, m in models.items() if kk != main.k}}
    pca = fit_pca(sample, pca_dim, seed) if (pca_dim and sample is not None) else None
    out = segment_volume(encoder, volume, output, clusters, rng_range, settings, pca=pca, resume=resume,
                         overwrite=overwrite, on_progress=on_progress, metadata={"checkpoint_sha256": sha, "k": main.k,
                                                        "input": str(input_path) if not isinstance(
                                                            input_path, np.ndarray) else "<array>"})
    for kk, m in models.items():
        m.save(out.with_name(f"{out.stem}_centres_k{kk}.npz"))
    if save_sample and sample is not None:
        group = zarr.open_group(store=str(out), mode="a")
        sub = group.require_group("sample")
        sub.create_array("features", data=sample.features.astype(np.float16), overwrite=True)
        sub.create_array("coords", data=sample.coords, overwrite=True)
    say(f"wrote {out} (k = {main.k}{', sweep ' + ', '.join(map(str, sweep)) if sweep else ''})")
    return out


def run_cluster(checkpoint: str | Path, input_path: Any, output: str | Path, k: int = 6,
                settings: SegmentSettings | None = None, n_samples: int = 200_000, seed: int = 0,
                mask_path: Any = None, axes: str | None = None, key: str | None = None,
                device: str = "auto") -> Path:
    """``micromae cluster``: fit k-means on exact pixel embeddings sampled from a volume (inside ``mask_path``
    when given) and save the centres with their metadata; returns the path written."""
    settings = settings or SegmentSettings()
    encoder, config, sha = encoder_on_device(checkpoint, device)
    volume = open_input_volume(input_path, axes, key)
    mask = None if mask_path is None else open_input_volume(mask_path)
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "mode": settings.mode,
            "central_tokens": settings.central_tokens}
    models, _ = fit_clusters(encoder, volume, [k], volume_range(volume, config), n_samples, seed, mask, settings,
                             meta)
    return models[k].save(output)


def run_embed(checkpoint: str | Path, input_path: Any, output: str | Path, slices: Sequence[int] | None = None,
              settings: SegmentSettings | None = None, axes: str | None = None, key: str | None = None,
              device: str = "auto", overwrite: bool = False) -> Path:
    """``micromae embed``: exact pixel embeddings of some Z slices (default: all) → .npy / .zarr / .tif.

    The array written is (D, S, H, W) float32 (axes CZYX: the embedding dimensions are the channels).

    Meant for images and a few slices: a whole volume's features are 4·D bytes per voxel (``micromae segment``
    never stores them).
    """
    settings = settings or SegmentSettings()
    encoder, config, _ = encoder_on_device(checkpoint, device)
    volume = open_input_volume(input_path, axes, key)
    rng_range = volume_range(volume, config)
    index = list(range(volume.shape[0])) if slices is None else list(slices)
    feats = []
    for z in index:
        plane = PlaneView(volume, 0, z)
        h, w = plane.shape
        f = embed_pixels_region(encoder, plane, 0, 0, h, w, settings.central_tokens, settings.mode,
                                settings.pad_mode, settings.batch_size, device="cpu", amp=settings.amp,
                                intensity_range=rng_range)
        feats.append(f.numpy())
    return write_array(output, np.stack(feats, axis=1), axes="CZYX", overwrite=overwrite)

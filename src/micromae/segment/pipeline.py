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
from micromae.errors import at_least, input_error
from micromae.io import check_free_space, check_output, open_volume, write_array
from micromae.io import omezarr
from micromae.io.preflight import existing_ancestor
from micromae.models.pretrained import load_encoder
from micromae.runtime import resolve_device, say
from micromae.segment.cluster import ClusterModel
from micromae.segment.cover_stride import auto_batch_size, embed_pixels_region
from micromae.segment.distributed import DistInfo, barrier, broadcast, check_same, current_world, share, together
from micromae.segment.fit import EmbeddingSample, fit_cluster_models, sample_capacity, sample_pixel_embeddings
from micromae.segment.planes import PlaneView
from micromae.segment.volume import SegmentSettings, segment_volume


def open_input_volume(path: str | Path | np.ndarray, axes: str | None = None, key: str | None = None,
                      check: bool = True) -> Any:
    """A single-channel (Z, Y, X) volume, read lazily; a 2-D image becomes one slice. ``check=False`` for masks
    (a mask that keeps every voxel is constant, and fine)."""
    if isinstance(path, np.ndarray):
        arr = path
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise input_error("input", "a 2-D image or 3-D volume", f"shape {arr.shape}", "Pass one channel")
        return arr
    vol = open_volume(path, axes=axes, key=key, check=check)
    if vol.axes == "YX":
        return vol.read()[None]
    if vol.axes != "ZYX":
        raise input_error(f"input '{path}'", "a single-channel ZYX volume or YX image",
                          f"axes {vol.axes}, shape {vol.shape}", "Pass --axes for the file, or pick one channel")
    return vol


def check_volume_encoder(encoder: torch.nn.Module, checkpoint: str | Path, config: dict) -> None:
    """Refuse an encoder these verbs cannot use on a one-channel volume, before any encoder pass: one with
    another channel count (a DAMA or multiplex checkpoint) or with non-finite weights (a diverged run)."""
    chans = int(encoder.in_chans)
    if chans != 1:
        objective = config.get("objective") or "an unknown"
        raise input_error(f"checkpoint '{checkpoint}'", "a single-channel encoder (MAESTER pre-training on "
                          "volumes): segment, cluster and embed read one-channel volumes",
                          f"an encoder of {chans} input channels ({objective} objective)",
                          "Pass a checkpoint of `micromae pretrain maester_*`; multi-channel encoders are used "
                          "by micromae probe, finetune and evaluate classification")
    bad = sum(int((~torch.isfinite(p)).sum()) for p in encoder.parameters())
    if bad:
        raise input_error(f"checkpoint '{checkpoint}'", "finite weights", f"{bad} weights that are NaN or infinite",
                          "The run diverged before this checkpoint: use an earlier one, or pre-train again with a "
                          "lower train.lr or train.grad_clip=1.0")


def encoder_on_device(checkpoint: str | Path, device: str = "auto") -> tuple[torch.nn.Module, dict, str]:
    """Encoder of a pre-training checkpoint (:func:`~micromae.models.pretrained.load_encoder`), checked by
    :func:`check_volume_encoder`, in eval mode on ``device`` (said on the terminal); also its config dict and
    the file's SHA-256."""
    encoder, meta = load_encoder(checkpoint)
    check_volume_encoder(encoder, checkpoint, meta.config)
    dev = resolve_device(device, current_world().local_rank, option="--device")
    say(f"encoder from {checkpoint} on {dev}")
    return encoder.eval().to(dev), meta.config, meta.sha256


def volume_range(volume: Any, config: dict, normalize: str | None = None) -> tuple[float, float]:
    """Intensity range as in pre-training (the checkpoint's ``data.normalize`` unless overridden)."""
    data = config.get("data", {})
    mode = normalize or data.get("normalize", "dtype")
    return intensity_range(volume, mode, tuple(data.get("percentiles", (0.5, 99.5))))


def check_settings(settings: SegmentSettings) -> None:
    """Options of the embedding the CLI cannot check by type."""
    at_least("--batch-size", settings.batch_size, 0,
             "Pass --batch-size 1 or more, or 0 to choose it from free device memory (256 on a CPU)")
    if settings.central_tokens is not None:
        at_least("--central-tokens", settings.central_tokens, 1)


def check_ks(ks: Sequence[int], option: str = "--k") -> None:
    for k in ks:
        at_least(option, k, 2, f"Pass {option} 2 or more (k-means with one cluster labels every voxel alike)")


def check_sample(volume: Any, mask: Any, ks: Sequence[int], n_samples: int, seed: int,
                 settings: SegmentSettings) -> int:
    """Check ``--samples``, the mask's shape and ``k`` against the pixels a sample can hold, before any encoder
    pass; return the sample size capped by the pixels that exist."""
    at_least("--samples", n_samples, 1)
    shape = tuple(int(s) for s in volume.shape)
    if mask is not None and tuple(int(s) for s in mask.shape) != shape:
        raise input_error("--mask", f"the volume's shape {shape}", f"shape {tuple(mask.shape)}",
                          "Pass a mask of the same size as the volume")
    capacity = sample_capacity(shape, settings.axes, mask, seed)
    if capacity == 0:
        raise input_error("--mask", "some nonzero pixels in the sampled slices", "none",
                          "Check the mask (nonzero = the region to fit k-means on)")
    n = min(n_samples, capacity)
    if n < n_samples:
        say(f"sampling all {n} pixels of the sampled slices (--samples {n_samples} asked for more)")
    bad = [k for k in ks if k > n]
    if bad:
        raise input_error("--k", f"at most the number of sampled pixels ({n})", ", ".join(map(str, bad)),
                          "Lower k, or give more pixels (a larger volume or mask)")
    return n


def _device_of(encoder: torch.nn.Module) -> torch.device:
    return next(encoder.parameters()).device


def fit_clusters(encoder: torch.nn.Module, volume: Any, ks: Sequence[int], rng_range: tuple[float, float],
                 n_samples: int = 200_000, seed: int = 0, mask: Any = None, settings: SegmentSettings | None = None,
                 meta: dict[str, Any] | None = None) -> tuple[dict[int, ClusterModel], EmbeddingSample]:
    """Sample exact pixel embeddings (inside ``mask`` when given) and fit one k-means per k."""
    settings = settings or SegmentSettings()
    n_samples = check_sample(volume, mask, ks, n_samples, seed, settings)
    sample = sample_pixel_embeddings(encoder, volume, n_samples, rng_range, axes=settings.axes,
                                     central_tokens=settings.central_tokens, pad_mode=settings.pad_mode,
                                     mask=mask, seed=seed,
                                     batch_size=settings.batch_size or auto_batch_size(encoder, _device_of(encoder)))
    bad = [k for k in ks if k > len(sample.features)]
    if bad:
        raise input_error("--k", f"at most the number of sampled pixels ({len(sample.features)})", str(bad),
                          "Lower k or raise --samples")
    say(f"fitting k-means (k = {', '.join(map(str, ks))}) on {len(sample.features)} pixel embeddings")
    return fit_cluster_models(sample, list(ks), seed=seed, meta=meta), sample


def fit_pca(sample: EmbeddingSample, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (dim, D)) of the sampled embeddings (scikit-learn PCA)."""
    from sklearn.decomposition import PCA

    if not 1 <= dim <= min(sample.features.shape):
        raise input_error("--pca", f"1..{min(sample.features.shape)}", str(dim), "Pick a smaller dimension")
    pca = PCA(n_components=dim, random_state=seed).fit(sample.features)
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


def segment_disk_bytes(shape: Sequence[int], ks: Sequence[int], embed_dim: int, n_samples: int, pca_dim: int,
                       axes: Sequence[int], keep_full: bool = False) -> int:
    """Upper bound on what ``micromae segment`` writes (uncompressed): labels per k, the tri-planar distance
    arrays while they exist, PCA features, the full features (``keep_full``) and the sample."""
    voxels = int(np.prod(shape))
    fused = len(axes) > 1
    total = sum(voxels * (1 if k <= 255 else 2) for k in ks)
    if fused:
        total += sum(2 * k * voxels * len(axes) for k in ks)
    if pca_dim:
        total += 2 * pca_dim * voxels * (1 + (len(axes) if fused else 0))
    if keep_full:
        total += 2 * embed_dim * voxels * len(axes)
    return total + n_samples * (2 * embed_dim + 3 * 8)


def centres_path(output: str | Path, k: int) -> Path:
    """Where ``micromae segment --output OUT`` writes the k-means centres for ``k``: beside OUT
    (``seg_centres_k6.npz`` for ``seg.ome.zarr`` and ``seg.zarr``)."""
    output = Path(output)
    return output.with_name(f"{omezarr.output_stem(output)}_centres_k{k}.npz")


def run_segment(checkpoint: str | Path, input_path: Any, output: str | Path, k: int | None = None,
                centres: str | Path | None = None, sweep: Sequence[int] = (), settings: SegmentSettings | None = None,
                n_samples: int = 200_000, seed: int = 0, mask_path: Any = None, pca_dim: int = 0,
                axes: str | None = None, key: str | None = None, device: str = "auto", resume: bool = True,
                overwrite: bool = False, save_sample: bool = True,
                on_progress: Callable[[int, int], None] | None = None, keep_features: str = "none",
                world: DistInfo | None = None, voxel_size: Sequence[float] | None = None, image_copy: bool = True,
                pyramid_min_side: int = omezarr.PYRAMID_MIN_SIDE) -> Path:
    """``micromae segment``: label every voxel of ``input_path`` by k-means on exact pixel embeddings.

    An ``output`` ending in ``.ome.zarr`` is an OME-Zarr v0.5 image (:mod:`micromae.io.omezarr`): label images
    ``labels/clusters`` and ``labels/clusters_k<K>`` for each k of ``sweep`` (pyramids down to
    ``pyramid_min_side`` pixels, one colour and name per cluster), with ``image_copy`` the input as its image,
    and the voxel size ``voxel_size`` (Z, Y, X micrometres; default: the input's OME metadata, if any). Any
    other ``.zarr`` is a plain Zarr group holding ``labels`` and ``labels_k<K>``. Both hold, optionally,
    ``features_pca``, and ``sample/features`` + ``sample/coords`` (the pixels k-means was fitted on, for the
    UMAP figure of ``micromae evaluate segmentation``); ``<stem>_centres_k<K>.npz`` files are written beside it.
    ``k``: clusters (default 6, or the k of ``centres``). Everything is checked before the first encoder pass
    (output, options, checkpoint against the data, k against the pixels a sample can hold, free disk space);
    the work goes to ``<output>.partial``, renamed to ``output`` only once labels, centres, sample and
    metadata are all written, so ``output`` is either absent or complete.
    ``on_progress(planes_done, planes_total)``: see :func:`~micromae.segment.volume.segment_volume`.
    ``keep_features``: ``none``, ``pca`` (``pca_dim`` components, default 16 or the encoder's width) or
    ``full``, stored for ``micromae cluster --features`` (see :func:`~micromae.segment.volume.segment_volume`).
    Under an initialised process group (``torchrun``; ``world``) every rank calls this with the same
    arguments: rank 0 samples and fits, every rank labels its share of the planes, and rank 0 writes the rest.
    """
    settings = settings or SegmentSettings()
    info = world or current_world()
    with together(info):
        output, prep = _prepare_segment(checkpoint, input_path, output, k, centres, sweep, settings, n_samples, seed,
                                        mask_path, pca_dim, axes, key, device, overwrite, keep_features,
                                        voxel_size, image_copy, pyramid_min_side)
    encoder, volume, mask, main, ks, rng_range, sha, meta, n_samples, pca_dim, ome, voxel_size = prep
    check_same(info, {"checkpoint": sha, "input": str(input_path) if not isinstance(input_path, np.ndarray) else
                      "<array>", "shape": list(volume.shape), "range": list(rng_range), "settings": vars(settings),
                      "ks": ks, "centres": None if main is None else main.centers.tobytes().hex(),
                      "samples": n_samples, "seed": seed, "mask": str(mask_path), "pca": pca_dim,
                      "keep_features": keep_features, "output": str(output), "voxel_size": voxel_size,
                      "image_copy": image_copy, "pyramid_min_side": pyramid_min_side})
    sample = None
    models: dict[int, ClusterModel] = {}
    pca = None
    with together(info):
        if info.is_main:
            if main is not None:
                if main.meta.get("checkpoint_sha256") not in (None, sha):
                    say("warning: these centres were fitted with another checkpoint")
                models = {main.k: main}
            else:
                models, sample = fit_clusters(encoder, volume, ks, rng_range, n_samples, seed, mask, settings, meta)
            pca = fit_pca(sample, pca_dim, seed) if (pca_dim and sample is not None) else None
    models, pca = broadcast((models, pca), info)
    k = main.k if main is not None else (6 if k is None else k)
    main = models[k]
    if ome:
        names = {kk: omezarr.level_path(omezarr.label_name(kk, main.k)) for kk in models}
    else:
        names = {kk: "labels" if kk == main.k else f"labels_k{kk}" for kk in models}
    clusters = {names[main.k]: main, **{names[kk]: m for kk, m in models.items() if kk != main.k}}

    def finish(group: zarr.Group) -> None:
        """Before the rename: the centres beside the output (atomically), the sample inside it."""
        if overwrite:  # --overwrite replaces the old output whole: its centres for other k go too
            for old in output.parent.glob(f"{omezarr.output_stem(output)}_centres_k*.npz"):
                old.unlink()
        for kk, m in models.items():
            m.save(centres_path(output, kk))
        if save_sample and sample is not None:
            sub = group.require_group("sample")
            sub.create_array("features", data=sample.features.astype(np.float16), overwrite=True)
            sub.create_array("coords", data=sample.coords, overwrite=True)
        if ome:
            ks = {omezarr.label_name(kk, main.k): m.k for kk, m in models.items()}
            omezarr.finish_segmentation(group, volume, ks, voxel_size, image=image_copy, min_side=pyramid_min_side)

    out = segment_volume(encoder, volume, output, clusters, rng_range, settings, pca=pca, resume=resume,
                         overwrite=overwrite, finish=finish, on_progress=on_progress, keep_features=keep_features,
                         world=info, progress=info.is_main, main=names[main.k],
                         metadata={"checkpoint_sha256": sha, "k": main.k, "format": "ome-zarr" if ome else "zarr",
                                   "voxel_size": list(voxel_size) if voxel_size is not None else None,
                                   "input": str(input_path) if not isinstance(input_path, np.ndarray) else "<array>"})
    if info.is_main:
        say(f"wrote {out} (k = {main.k}{', sweep ' + ', '.join(map(str, sweep)) if sweep else ''}"
            f"{f'; {info.world_size} processes' if info.enabled else ''})")
    return out


def _prepare_segment(checkpoint, input_path, output, k, centres, sweep, settings, n_samples, seed, mask_path,
                     pca_dim, axes, key, device, overwrite, keep_features, voxel_size, image_copy, pyramid_min_side):
    """Everything :func:`run_segment` checks and loads before the first encoder pass (on every rank)."""
    from micromae.segment.volume import KEEP_FEATURES

    check_settings(settings)
    if k is not None:
        check_ks([k])
    check_ks(sweep, "--sweep")
    at_least("--pca", pca_dim, 0)
    if keep_features not in KEEP_FEATURES:
        raise input_error("--keep-features", " or ".join(KEEP_FEATURES), repr(keep_features), "Pick one")
    if centres is not None and sweep:
        raise input_error("--sweep", "no sweep when --centres is given", str(list(sweep)),
                          "Drop --centres to fit new centres for each k")
    if centres is not None and keep_features == "pca":
        raise input_error("--keep-features pca", "a fitted sample to compute PCA on (no --centres)",
                          f"--centres '{centres}'", "Drop --centres, or keep the full features (--keep-features full)")
    output = check_output(output, overwrite=overwrite, suffixes=(".zarr",), folder=True)
    ome = omezarr.is_ome_path(output)
    voxel_size = omezarr.parse_voxel_size(voxel_size)
    at_least("pyramid_min_side", pyramid_min_side, 1)
    main = ClusterModel.load(centres) if centres is not None else None
    if main is not None and k is not None and k != main.k:
        raise input_error("--k", f"the k of --centres '{centres}' ({main.k}) or no --k", str(k),
                          f"Drop --k to label with those {main.k} centres, or drop --centres to fit k = {k}")
    k = main.k if main is not None else (6 if k is None else k)
    encoder, config, sha = encoder_on_device(checkpoint, device)
    if main is not None and main.dim != encoder.embed_dim:
        raise input_error(f"--centres '{centres}'", f"{encoder.embed_dim}-dimensional centres (the encoder's width)",
                          f"{main.dim} dimensions", "Use centres fitted with this checkpoint (micromae cluster)")
    volume = open_input_volume(input_path, axes, key)
    if voxel_size is None:
        voxel_size = omezarr.voxel_size_of(input_path)
    mask = None if mask_path is None else open_input_volume(mask_path, check=False)
    ks = sorted({k, *sweep})
    if keep_features == "pca" and not pca_dim:
        pca_dim = min(16, encoder.embed_dim)
    if main is None:
        n_samples = check_sample(volume, mask, ks, n_samples, seed, settings)
        if pca_dim > min(encoder.embed_dim, n_samples):
            raise input_error("--pca", f"0..{min(encoder.embed_dim, n_samples)} (the encoder's width, at most the "
                              "sampled pixels)", str(pca_dim), "Pick a smaller --pca")
    partial = output.with_name(output.name + ".partial")
    if not partial.exists():  # a resumed run's space is mostly taken already
        need = segment_disk_bytes(volume.shape, ks, encoder.embed_dim, n_samples if main is None else 0,
                                  pca_dim if main is None else 0, settings.axes, keep_full=keep_features == "full")
        if ome:
            label_bytes = sum(int(np.prod(volume.shape)) * (1 if kk <= 255 else 2) for kk in ks)
            need += omezarr.ome_extra_bytes(volume.shape, label_bytes,
                                            np.dtype(volume.dtype).itemsize if image_copy else 0)
        check_free_space(existing_ancestor(output, "--output"), need, "--output", output)
    rng_range = volume_range(volume, config)
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "mode": settings.mode,
            "central_tokens": settings.central_tokens, "axes": list(settings.axes)}
    return output, (encoder, volume, mask, main, ks, rng_range, sha, meta, n_samples, pca_dim, ome,
                    list(voxel_size) if voxel_size is not None else None)


def run_cluster(checkpoint: str | Path, input_path: Any, output: str | Path, k: int = 6,
                settings: SegmentSettings | None = None, n_samples: int = 200_000, seed: int = 0,
                mask_path: Any = None, axes: str | None = None, key: str | None = None,
                device: str = "auto", overwrite: bool = False, world: DistInfo | None = None) -> Path:
    """``micromae cluster``: fit k-means on exact pixel embeddings sampled from a volume (inside ``mask_path``
    when given) and save the centres with their metadata (refusing an existing ``output`` unless
    ``overwrite``); returns the path written. Under a process group (``torchrun``) every rank checks that it
    sees the same inputs; rank 0 samples, fits and writes (the same centres as one process), the others wait."""
    settings = settings or SegmentSettings()
    info = world or current_world()
    with together(info):
        check_settings(settings)
        check_ks([k])
        output = check_output(output, overwrite=overwrite, suffixes=(".npz",), folder=False)
        encoder, config, sha = encoder_on_device(checkpoint, device)
        volume = open_input_volume(input_path, axes, key)
        mask = None if mask_path is None else open_input_volume(mask_path, check=False)
        n_samples = check_sample(volume, mask, [k], n_samples, seed, settings)
        rng_range = volume_range(volume, config)
    check_same(info, {"checkpoint": sha, "input": str(input_path), "shape": list(volume.shape), "range": rng_range,
                      "settings": vars(settings), "k": k, "samples": n_samples, "seed": seed, "mask": str(mask_path),
                      "output": str(output)})
    meta = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha, "mode": settings.mode,
            "central_tokens": settings.central_tokens}
    with together(info):
        if info.is_main:
            models, _ = fit_clusters(encoder, volume, [k], rng_range, n_samples, seed, mask, settings, meta)
            models[k].save(output)
    barrier(info)
    return output


EMBED_SUFFIXES = (".npy", ".zarr", ".tif", ".tiff", ".h5", ".hdf5")


def run_embed(checkpoint: str | Path, input_path: Any, output: str | Path, slices: Sequence[int] | None = None,
              settings: SegmentSettings | None = None, axes: str | None = None, key: str | None = None,
              device: str = "auto", overwrite: bool = False, world: DistInfo | None = None) -> Path:
    """``micromae embed``: exact pixel embeddings of some Z slices (default: all) → .npy / .zarr / .tif.

    The array written is (D, S, H, W) float32 (axes CZYX: the embedding dimensions are the channels).

    Meant for images and a few slices: a whole volume's features are 4·D bytes per voxel (``micromae segment``
    never stores them). Under a process group (``torchrun``) the slices are shared out and rank 0 gathers
    and writes them.
    """
    settings = settings or SegmentSettings()
    info = world or current_world()
    with together(info):
        check_settings(settings)
        output = check_output(output, overwrite=overwrite, suffixes=EMBED_SUFFIXES)
        encoder, config, sha = encoder_on_device(checkpoint, device)
        volume = open_input_volume(input_path, axes, key)
        n_z = int(volume.shape[0])
        index = list(range(n_z)) if slices is None else list(slices)
        outside = [z for z in index if not 0 <= z < n_z]
        if outside or not index:
            raise input_error("--slices", f"Z slices in 0..{n_z - 1}", ", ".join(map(str, outside)) or "none",
                              f"Pick slices of the input (it has {n_z})")
        need = 4 * encoder.embed_dim * len(index) * int(volume.shape[1]) * int(volume.shape[2])
        check_free_space(existing_ancestor(output, "--output"), need, "--output", output)
        rng_range = volume_range(volume, config)
    check_same(info, {"checkpoint": sha, "input": str(input_path), "shape": list(volume.shape), "range": rng_range,
                      "settings": vars(settings), "slices": index, "output": str(output)})
    feats = {}
    with together(info):
        for i in share(range(len(index)), info):
            plane = PlaneView(volume, 0, index[i])
            h, w = plane.shape
            feats[i] = embed_pixels_region(encoder, plane, 0, 0, h, w, settings.central_tokens, settings.mode,
                                           settings.pad_mode, settings.batch_size, device="cpu", amp=settings.amp,
                                           intensity_range=rng_range).numpy()
    if info.enabled:
        import torch.distributed as dist

        parts: list | None = [None] * info.world_size if info.is_main else None
        dist.gather_object(feats, parts, dst=0)
        if info.is_main:
            feats = {i: f for part in parts for i, f in part.items()}
    with together(info):
        if info.is_main:
            write_array(output, np.stack([feats[i] for i in range(len(index))], axis=1), axes="CZYX",
                        overwrite=overwrite)
    barrier(info)
    return output

"""Command-line verbs of MAESTER inference: `micromae segment`, `micromae cluster`, `micromae embed`."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Any, Iterator

from micromae.errors import input_error

# micromae.segment (torch) is imported inside the verbs: `micromae --help` builds this parser and stays fast


def _settings(args: argparse.Namespace):
    """The embedding settings (``SegmentSettings``) of the inference options; ``embed`` has no --axis /
    --tri-planar (it embeds Z slices)."""
    from micromae.segment.volume import SegmentSettings

    if getattr(args, "tri_planar", False):
        axes = (0, 1, 2)
    else:
        axes = (args.axis,) if hasattr(args, "axis") else SegmentSettings().axes
    return SegmentSettings(central_tokens=args.central_tokens, mode=args.mode, pad_mode=args.pad_mode,
                           axes=axes, batch_size=args.batch_size, amp=not args.no_amp,
                           compile=getattr(args, "compile", False))


def _parse_ks(text: str | None, option: str = "--sweep") -> list[int]:
    """``4..10`` or ``4,6,8`` → list of ints (for ``option``: ``--sweep`` or ``--slices``); a range must
    ascend."""
    if not text:
        return []
    try:
        if ".." in text:
            lo, hi = (int(v) for v in text.split(".."))
            values = list(range(lo, hi + 1))
        else:
            lo = hi = 0
            values = [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise input_error(option, "a range like 4..10 or a list like 4,6,8", repr(text), f"Fix {option}") from exc
    if not values:
        raise input_error(option, "an ascending range FIRST..LAST", f"{text!r} ({lo} > {hi}: no values)",
                          f"Write it as {hi}..{lo}")
    return values


@contextmanager
def _world(device: str) -> Iterator[Any]:
    """The torchrun process group when launched by ``torchrun`` (gloo on CPU, NCCL with one GPU per
    ``LOCAL_RANK``), left at the end; alone otherwise."""
    from micromae.segment.distributed import join_world, leave_world

    info = join_world(device)
    try:
        yield info
    finally:
        leave_world(info)


def cmd_segment(args: argparse.Namespace) -> int:
    from micromae.segment.pipeline import run_segment

    with _world(args.device) as info:
        run_segment(args.checkpoint, args.input, args.output, k=args.k, centres=args.centres,
                    sweep=_parse_ks(args.sweep), settings=_settings(args), n_samples=args.samples, seed=args.seed,
                    mask_path=args.mask, pca_dim=args.pca, axes=args.axes, key=args.key, device=args.device,
                    overwrite=args.overwrite, keep_features=args.keep_features, world=info,
                    voxel_size=args.voxel_size, image_copy=not args.no_image)
    return 0


def _require(args: argparse.Namespace, *options: str) -> None:
    for option in options:
        if getattr(args, option.lstrip("-").replace("-", "_")) is None:
            raise input_error(option, f"a value ({option} is needed without --features)", "none",
                              f"Pass {option}, or --features SEG.zarr to re-cluster stored features")


def cmd_cluster(args: argparse.Namespace) -> int:
    if args.features is not None:
        from micromae.segment.recluster import recluster

        given = [o for o in ("--checkpoint", "--input", "--mask")
                 if getattr(args, o.lstrip("-")) is not None]
        if given:
            raise input_error(", ".join(given), "no encoder inputs with --features (re-clustering reads only the "
                              "stored features)", "both", f"Drop {', '.join(given)}, or drop --features")
        from micromae.segment.distributed import barrier, together

        with _world("cpu") as info:  # under torchrun: rank 0 re-clusters, the others wait
            with together(info):
                if info.is_main:
                    path = recluster(args.features, args.output, args.k, n_samples=args.samples, seed=args.seed,
                                     tri_planar=True if args.tri_planar else None, overwrite=args.overwrite)
                    print(f"wrote labels for k = {args.k} to {path}")
            barrier(info)
        return 0
    from micromae.segment.pipeline import run_cluster

    _require(args, "--checkpoint", "--input")
    with _world(args.device) as info:
        path = run_cluster(args.checkpoint, args.input, args.output, k=args.k, settings=_settings(args),
                           n_samples=args.samples, seed=args.seed, mask_path=args.mask, axes=args.axes,
                           key=args.key, device=args.device, overwrite=args.overwrite, world=info)
        if info.is_main:
            print(f"wrote {args.k} centres to {path}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from micromae.segment.pipeline import run_embed

    slices = _parse_ks(args.slices, "--slices") if args.slices else None
    with _world(args.device) as info:
        path = run_embed(args.checkpoint, args.input, args.output, slices, _settings(args), args.axes, args.key,
                         args.device, args.overwrite, world=info)
        if info.is_main:
            print(f"wrote pixel embeddings to {path}")
    return 0


def inference_options(q: argparse.ArgumentParser, volume: bool = True, required: bool = True) -> None:
    """The options every inference verb shares; ``volume``: also those of whole-volume verbs; ``required``:
    --checkpoint and --input are required by the parser (``cluster`` checks them itself: ``--features`` needs
    neither)."""
    q.add_argument("--checkpoint", required=required, help="pre-training checkpoint (RUN_DIR/checkpoints/last.pt)")
    q.add_argument("--input", required=required, help="volume or image (.tif, .zarr, .h5:key, .npy)")
    q.add_argument("--axes", help="dimension order of the input, e.g. ZYX (default: metadata or rank)")
    q.add_argument("--key", help="HDF5 dataset or Zarr array inside the file")
    q.add_argument("--mode", choices=("exact", "fast"), default="exact",
                   help="exact: every pixel gets the token centred on it (cover-and-stride, default); "
                        "fast: half-overlapping windows at token resolution, upsampled (~80x fewer passes)")
    q.add_argument("--central-tokens", type=int, default=None, metavar="C",
                   help="central tokens kept per window (default 4 exact; 8 or 12 are 4x / 9x faster "
                        "with less context)")
    q.add_argument("--pad-mode", default="reflect", choices=("reflect", "symmetric", "constant", "edge"),
                   help="how borders are padded (default reflect)")
    q.add_argument("--batch-size", type=int, default=0,
                   help="windows per encoder pass (default 0: 256 on the CPU, from free GPU memory on CUDA)")
    q.add_argument("--compile", action="store_true", help="torch.compile the encoder pass (needs a C++ compiler)")
    q.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N")
    q.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    if volume:
        q.add_argument("--axis", default="Z", help="slice the volume along this axis (Z, Y or X; default Z)")
        q.add_argument("--tri-planar", action="store_true",
                       help="embed along Z, Y and X and fuse (as averaged features); 3x the time")
        q.add_argument("--samples", type=int, default=200_000,
                       help="pixels sampled to fit k-means (default 200000)")
        q.add_argument("--seed", type=int, default=0, help="random seed for sampling and k-means")
        q.add_argument("--mask", help="fit k-means only on pixels inside this mask (e.g. the cell mask)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``segment``, ``cluster`` and ``embed`` to the top-level sub-parsers."""
    p = sub.add_parser("segment", help="label every voxel by k-means on pixel embeddings (streaming)",
                       description="Embed every pixel with the pre-trained encoder (cover-and-stride), fit "
                                   "k-means on a random sample, and write labels to a Zarr group, tile by tile "
                                   "in bounded memory. Interrupted runs resume. Example: micromae segment "
                                   "--checkpoint runs/demo/pretrain/checkpoints/last.pt --input cell.tif "
                                   "--axes ZYX --output seg.ome.zarr --k 6")
    inference_options(p)
    p.add_argument("--output", required=True,
                   help="output: seg.ome.zarr writes OME-Zarr v0.5 (label images with pyramids, the image, voxel "
                        "sizes: opens in napari, Fiji, neuroglancer); any other name ending in .zarr a plain "
                        "Zarr group (labels, labels_k<K> at its root)")
    p.add_argument("--voxel-size", nargs="+", metavar="SIZE",
                   help="voxel size in micrometres, Z Y X (default: the input's OME-TIFF / OME-Zarr metadata)")
    p.add_argument("--no-image", action="store_true",
                   help="OME-Zarr: do not copy the input image into the output (the labels only)")
    p.add_argument("--k", type=int, default=None, help="number of clusters (default 6, or the k of --centres)")
    p.add_argument("--centres", help="reuse centres from micromae cluster (.npz) instead of fitting")
    p.add_argument("--sweep", help="also write labels_k<K> for these k, e.g. 4..10 (no extra encoder passes)")
    p.add_argument("--pca", type=int, default=0, metavar="D", help="also write D PCA components of the features")
    p.add_argument("--keep-features", choices=("none", "pca", "full"), default="none",
                   help="store per-voxel features so `micromae cluster --features` can relabel without the "
                        "encoder: pca (D = --pca or 16 components, float16), full (the whole embedding, float16: "
                        "2 x width bytes per voxel, for small volumes); with --tri-planar the per-axis features "
                        "are kept so the fusion is redone (default none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("cluster", help="fit k-means centres on sampled pixel embeddings, or re-cluster stored "
                                       "features",
                       description="Fit k-means on exact embeddings of randomly sampled pixels and save the "
                                   "centres (.npz with metadata) to label new data with micromae segment "
                                   "--centres, without refitting. With --features SEG.zarr (a segmentation "
                                   "written with --keep-features pca or full): relabel the whole volume from the "
                                   "stored features, without the encoder, streaming in bounded memory; e.g. "
                                   "micromae cluster --features seg.zarr --k 8 --output seg_k8.zarr")
    inference_options(p, required=False)
    p.add_argument("--features", help="re-cluster the features stored in this micromae segment output instead "
                                      "(no --checkpoint / --input; --tri-planar: fuse its per-axis features)")
    p.add_argument("--output", required=True, help="centres file (.npz), or with --features a Zarr group (.zarr)")
    p.add_argument("--k", type=int, default=6, help="number of clusters (default 6)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing centres file")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("embed", help="write exact pixel embeddings of some slices",
                       description="Exact pixel embeddings (D, S, H, W) of Z slices of the input, to .npy, "
                                   ".zarr or .tif. For whole volumes use micromae segment (--pca to keep "
                                   "reduced features).")
    inference_options(p, volume=False)
    p.add_argument("--output", required=True, help="output file (.npy, .zarr, .tif)")
    p.add_argument("--slices", help="Z slices, e.g. 0..9 or 3,7 (default all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_embed)

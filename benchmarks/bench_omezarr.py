"""What the OME-Zarr output costs: ``segment --output seg.ome.zarr`` against a plain ``seg.zarr``, and the
pyramid + metadata step alone on a larger label volume.

1. The same volume (synthetic EM, a Zarr input of one plane by 64 px chunks), encoder (the ``maester_tiny``
   shape with seeded random weights, as in ``bench_segment_memory.py``) and k-means centres (k = 6), segmented
   by ``run_segment`` to a plain group and to OME-Zarr (label pyramid, image copy with its mean pyramid,
   metadata), alternately, ``REPEATS`` times each after one warm-up run of each (imports); figure
   ``ome_overhead``: median OME wall time / median plain wall time - 1 (the encoder's share shrinks that
   ratio on real encoders: the tiny one is ~100x cheaper per voxel than the paper's).
2. ``finish_segmentation`` (what the OME output adds after the labels: the pyramids of two label images, the
   image copy and its pyramid) on random label and image volumes of ``FINISH_SHAPE``; figure
   ``finish_mvoxels_per_s`` (level-0 voxels per second) and, from ``tracemalloc`` (numpy reports its buffers
   to it), ``finish_peak_traced_mb`` for that shape and ``finish_memory_ratio_2x_depth``, the peak for twice
   the planes over the peak for the shape: streaming keeps it about 1 (goal: at most 1.2).

    python benchmarks/bench_omezarr.py [--quick] [--device auto|cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import zarr

from common import Reporter, log, median, parse_args, resolve_device

SEG_SHAPE, QUICK_SEG_SHAPE = (16, 96, 96), (8, 48, 48)
FINISH_SHAPE, QUICK_FINISH_SHAPE = (64, 512, 512), (32, 64, 64)
REPEATS, QUICK_REPEATS = 3, 1


def _segment(paths: dict[str, Path], output: Path, mode: str) -> float:
    from micromae.segment.pipeline import run_segment
    from micromae.segment.volume import SegmentSettings

    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        run_segment(paths["checkpoint"], paths["small"], output, centres=paths["centres"], device="cpu",
                    settings=SegmentSettings(mode=mode), overwrite=True)
    return time.perf_counter() - start


def _finish_case(folder: Path, shape: tuple[int, int, int]) -> tuple[float, float]:
    """(seconds, peak traced bytes) of finish_segmentation on random labels (k = 6 and 4) and image."""
    from micromae.io import omezarr

    rng = np.random.default_rng(0)
    root = zarr.open_group(store=str(folder / f"finish_{'x'.join(map(str, shape))}.ome.zarr"), mode="w")
    chunks = (1, min(shape[1], 256), min(shape[2], 256))
    for name, k in (("clusters", 6), ("clusters_k4", 4)):
        arr = root.create_array(omezarr.level_path(name), shape=shape, dtype="uint8", chunks=chunks, fill_value=0,
                                dimension_names=omezarr.AXES)
        for z in range(shape[0]):
            arr[z] = rng.integers(0, k, size=shape[1:], dtype=np.uint8)
    image = root.create_array("input", shape=shape, dtype="uint8", chunks=chunks, fill_value=0)
    for z in range(shape[0]):
        image[z] = rng.integers(0, 255, size=shape[1:], dtype=np.uint8)
    tracemalloc.start()
    start = time.perf_counter()
    omezarr.finish_segmentation(root, root["input"], {"clusters": 6, "clusters_k4": 4}, (0.01, 0.005, 0.005))
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, float(peak)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    device = resolve_device(args.device)
    rep = Reporter("bench_omezarr", args.out, device, args.quick)
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_segment_memory import write_inputs

    seg_shape = QUICK_SEG_SHAPE if args.quick else SEG_SHAPE
    finish_shape = QUICK_FINISH_SHAPE if args.quick else FINISH_SHAPE
    repeats = QUICK_REPEATS if args.quick else REPEATS
    mode = "fast" if args.quick else "exact"
    with tempfile.TemporaryDirectory(prefix="micromae_omebench_") as tmp:
        folder = Path(tmp)
        log(f"writing a Zarr volume {seg_shape}, checkpoint and centres to {folder}")
        paths = write_inputs(folder, seg_shape)
        times: dict[str, list[float]] = {"plain": [], "ome": []}
        for name in ("seg.zarr", "seg.ome.zarr"):  # warm-up: imports (ome-zarr-models, pydantic) and caches
            _segment(paths, folder / name, "fast")
        for r in range(repeats):
            for kind, name in (("plain", "seg.zarr"), ("ome", "seg.ome.zarr")):
                times[kind].append(_segment(paths, folder / name, mode))
            log(f"repeat {r}: plain {times['plain'][-1]:.2f} s, OME {times['ome'][-1]:.2f} s, "
                f"load {os.getloadavg()}")
        plain, ome = median(times["plain"]), median(times["ome"])
        ctx = dict(shape=list(seg_shape), mode=mode, repeats=repeats, plain_s=plain, ome_s=ome,
                   encoder="maester_tiny shape (FOV 40, 64 wide, 4 blocks), random weights", threads=1,
                   load_avg=list(os.getloadavg()))
        rep.emit("ome_overhead", ome / plain - 1.0, "fraction", None, **ctx)
        log(f"finish_segmentation on {finish_shape} and twice the planes")
        _finish_case(folder, (2, 8, 8))  # warm-up: lazy imports (matplotlib's colour maps) are not the step's
        seconds, peak = _finish_case(folder, finish_shape)
        double = (finish_shape[0] * 2, *finish_shape[1:])
        _, peak2 = _finish_case(folder, double)
        voxels = int(np.prod(finish_shape))
        fctx = dict(shape=list(finish_shape), labels=["k=6", "k=4"], image="uint8", seconds=seconds,
                    load_avg=list(os.getloadavg()))
        rep.emit("finish_mvoxels_per_s", voxels / seconds / 1e6, "Mvoxel/s", None, **fctx)
        rep.emit("finish_peak_traced_mb", peak / 2**20, "MB", None, **fctx)
        with contextlib.redirect_stdout(io.StringIO()):
            record = rep.emit("finish_memory_ratio_2x_depth", peak2 / peak, "ratio", 1.2, double_shape=list(double),
                              **fctx)
        record.update(met=bool(peak2 / peak <= 1.2), goal_is="at most")
        print(json.dumps(record), flush=True)
    path = rep.close()
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

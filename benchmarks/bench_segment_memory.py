"""Peak memory of segmenting a Zarr volume vs one 8x larger (2x each side): streaming must keep it flat.

Each volume (synthetic EM, uint8) is written with ``micromae.io.write_zarr`` in chunks of one plane by
``CHUNK`` pixels, and segmented by ``micromae.segment.pipeline.run_segment`` (the ``micromae segment`` path:
lazy ``open_volume``, exact cover-and-stride, labels streamed to a Zarr group) in a fresh Python process, which
reports its own peak resident set size (``VmHWM`` of /proc/self/status; ``ru_maxrss`` elsewhere) before and
after. Encoder: the ``maester_tiny`` preset's shape (FOV 40, 64 wide, 4 blocks) with seeded random weights,
saved as a checkpoint; k-means centres (k = 6) are fitted once, on the small volume, and passed to both runs,
so both do the same work per voxel. Default ``SegmentSettings`` (exact mode, c = 4, tile = the largest block
multiple whose features stay under 256 MB, i.e. a whole plane here); ``--quick`` uses the fast mode and
tiny volumes. The children run torch on one thread: memory does not depend on it, and on this shared 2-core
machine two threads ran several times slower than one whenever other jobs were running.

Figures: ``peak_rss_small_mb``, ``peak_rss_large_mb``, ``memory_ratio`` (large / small, goal: at most 1.2;
this line carries ``"goal_is": "at most"`` and ``met = value <= goal``), and ``memory_increment_ratio``
(the same ratio over what segmentation adds to the process's peak before it starts: imports, interpreter).

    python benchmarks/bench_segment_memory.py [--quick] [--device auto|cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import Reporter, log, parse_args, resolve_device

CHUNK = 64  # in-plane chunk side of the input Zarr arrays
FULL_SHAPE = (16, 96, 96)  # the small volume; the large one is twice each side
QUICK_SHAPE = (8, 32, 32)
TINY_MODEL = dict(in_chans=1, img_size=40, patch_size=5, embed_dim=64, depth=4, num_heads=1, mlp_ratio=2.0,
                  pos_embed_weight=0.08, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                  decoder_mlp_ratio=2.0, mask_ratio=0.5)


class UpperBoundReporter(Reporter):
    """A :class:`common.Reporter` that can also emit a figure whose goal is an upper bound."""

    def emit_at_most(self, figure: str, value: float, unit: str, goal: float, **context: Any) -> dict[str, Any]:
        """Like ``emit``, with ``met = value <= goal`` and ``goal_is = "at most"`` in the line."""
        with contextlib.redirect_stdout(io.StringIO()):
            record = self.emit(figure, value, unit, goal, **context)
        record.update(met=bool(value <= goal), goal_is="at most")  # the same dict is kept for the .jsonl
        print(json.dumps(record), flush=True)
        return record


# ----------------------------------------------------------------------------------------------- memory
def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes: ``VmHWM`` (Linux), else ``ru_maxrss``."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            line = next(row for row in f if row.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, kB on Linux/BSD


def larger_shape(shape: tuple[int, int, int], factor: int = 2) -> tuple[int, int, int]:
    """``shape`` with every side multiplied by ``factor`` (``factor**3`` times the voxels)."""
    return tuple(int(s) * factor for s in shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- child process
def child(job: dict[str, Any]) -> dict[str, Any]:
    """Segment ``job["volume"]`` with ``run_segment`` and return peak RSS before / after, seconds, voxels."""
    import torch

    from micromae.io import open_volume
    from micromae.segment.pipeline import run_segment
    from micromae.segment.volume import SegmentSettings

    torch.set_num_threads(job["threads"])
    before = peak_rss_bytes()
    start = time.perf_counter()
    out = run_segment(job["checkpoint"], job["volume"], job["output"], centres=job["centres"],
                      settings=SegmentSettings(mode=job["mode"]), device=job["device"])
    seconds = time.perf_counter() - start
    after = peak_rss_bytes()
    labels = open_volume(Path(out), key="labels", check=False)
    return {"peak_before": before, "peak": after, "seconds": seconds, "voxels": int(np.prod(labels.shape)),
            "labels_shape": list(labels.shape)}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter and read its result (the last stdout line)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"segmentation child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- set-up
def write_inputs(folder: Path, shape: tuple[int, int, int]) -> dict[str, Path]:
    """Both Zarr volumes, a tiny random checkpoint and k-means centres fitted on the small volume."""
    import torch

    from micromae.config import ModelConfig, PretrainConfig, to_dict
    from micromae.data.synthetic_em import make_em_volume
    from micromae.io import write_zarr
    from micromae.models import MaskedAutoencoder
    from micromae.segment.cluster import fit_kmeans
    from micromae.segment.fit import sample_pixel_embeddings

    small = make_em_volume(shape, seed=0).image
    paths = {"small": write_zarr(folder / "small.zarr", small, chunks=(1, CHUNK, CHUNK), axes="ZYX"),
             "large": write_zarr(folder / "large.zarr", make_em_volume(larger_shape(shape), seed=0).image,
                                 chunks=(1, CHUNK, CHUNK), axes="ZYX")}
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**TINY_MODEL)
    cfg = PretrainConfig(name="memory_bench", model=ModelConfig(**TINY_MODEL))
    paths["checkpoint"] = folder / "tiny.pt"
    torch.save({"model": mae.state_dict(), "step": 0, "config": to_dict(cfg)}, paths["checkpoint"])
    sample = sample_pixel_embeddings(mae.encoder.eval(), small, 5000, (0.0, 255.0), progress=False)
    paths["centres"] = fit_kmeans(sample.features, 6, seed=0).save(folder / "centres_k6.npz")
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(json.loads(argv[1]))), flush=True)
        return 0
    args = parse_args(__doc__, argv)
    device = resolve_device(args.device)
    rep = UpperBoundReporter("bench_segment_memory", args.out, device, args.quick)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    mode = "fast" if args.quick else "exact"
    with tempfile.TemporaryDirectory(prefix="micromae_membench_") as tmp:
        folder = Path(tmp)
        log(f"writing Zarr volumes {shape} and {larger_shape(shape)}, checkpoint and centres to {folder}")
        paths = write_inputs(folder, shape)
        results = {}
        for name in ("small", "large"):
            job = {"checkpoint": str(paths["checkpoint"]), "volume": str(paths[name]), "centres": str(paths["centres"]),
                   "output": str(folder / f"{name}_seg.zarr"), "device": device.type,
                   "threads": 1, "mode": mode}
            log(f"segmenting the {name} volume in a fresh process")
            results[name] = run_child(job)
            log(f"{name}: {results[name]}, load {os.getloadavg()}")
    small, large = results["small"], results["large"]
    mb = 1024.0 ** 2
    ctx = dict(shape_small=list(shape), shape_large=list(larger_shape(shape)), voxels_small=small["voxels"],
               voxels_large=large["voxels"], seconds_small=small["seconds"], seconds_large=large["seconds"],
               chunk=[1, CHUNK, CHUNK], mode=mode, threads=1,
               encoder="maester_tiny shape (FOV 40, 64 wide, 4 blocks), random weights")
    rep.emit("peak_rss_small_mb", small["peak"] / mb, "MB", None, before_mb=small["peak_before"] / mb, **ctx)
    rep.emit("peak_rss_large_mb", large["peak"] / mb, "MB", None, before_mb=large["peak_before"] / mb, **ctx)
    rep.emit_at_most("memory_ratio", large["peak"] / small["peak"], "ratio", 1.2, **ctx)
    increment = [(r["peak"] - r["peak_before"]) / mb for r in (small, large)]
    rep.emit("memory_increment_ratio", increment[1] / max(increment[0], 1e-9), "ratio", None,
             increment_small_mb=increment[0], increment_large_mb=increment[1], **ctx)
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Segmentation in 1 vs 2 processes (torch.distributed, gloo on CPU) and re-clustering from stored features.

One synthetic EM volume (uint8 Zarr) is segmented by ``micromae.segment.pipeline.run_segment`` (exact
cover-and-stride, k = 6 fitted on a 5000-pixel sample, ``--keep-features pca`` with 8 components) once in one
process and once in two processes launched by ``torchrun --nproc_per_node 2`` (each rank: one torch thread, so
the two-process run uses two cores where the one-process run uses one). Each process reports its own peak
resident set size (``VmHWM``) and the seconds of ``run_segment`` (after imports); the wall time of each launch
(interpreter start and imports included) is measured around it. Then ``recluster`` (``micromae cluster
--features``, k = 8, a fresh process) relabels the one-process output from its stored features, without the
encoder, and its seconds are compared with those of the one-process segmentation. The labels of 1 and 2
processes are compared voxel for voxel (``identical`` in every line). Encoder: the ``maester_tiny`` preset's
shape with seeded random weights (as ``bench_segment_memory.py``). ``--quick``: a tiny volume, fast mode.

On this shared 2-core machine the speed-up of 2 processes is bounded by 2 and by whatever else runs: the load
average is in every line (``load_before``, ``load_after``).

Figures: ``seconds_1proc``, ``seconds_2proc`` (slowest rank), ``speedup_2proc`` (1proc / 2proc, the
``run_segment`` seconds; ``wall_speedup`` in the line counts the launches whole; ``to_first_plane``: the
seconds until rank 0 finished its first plane, i.e. the serial sample and k-means fit plus one plane),
``peak_rss_1proc_mb``, ``peak_rss_2proc_mb`` (the larger rank; ``sum_mb`` in the line), ``recluster_seconds``,
``recluster_vs_segment`` (recluster seconds / one-process segmentation seconds).

    python benchmarks/bench_segment_dist.py [--quick] [--out DIR]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench_segment_memory import TINY_MODEL, peak_rss_bytes
from common import Reporter, log, parse_args, resolve_device

FULL_SHAPE = (24, 128, 128)
QUICK_SHAPE = (8, 32, 32)


def child(job: dict[str, Any]) -> None:
    """One rank (or the only process): segment or re-cluster, and write this rank's figures to a JSON file."""
    import torch
    import torch.distributed as dist

    from micromae.segment.pipeline import run_segment
    from micromae.segment.recluster import recluster
    from micromae.segment.volume import SegmentSettings

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    start = time.perf_counter()
    first_plane: list[float] = []

    def on_progress(done: int, total: int) -> None:
        if not first_plane:
            first_plane.append(time.perf_counter() - start)

    if job["task"] == "segment":
        run_segment(job["checkpoint"], job["volume"], job["output"], k=6, n_samples=5000, pca_dim=8,
                    keep_features="pca", settings=SegmentSettings(mode=job["mode"]), device="cpu",
                    on_progress=on_progress)
    else:
        recluster(job["features"], job["output"], k=8, n_samples=20000, progress=False)
    seconds = time.perf_counter() - start
    Path(f"{job['report']}.rank{rank}").write_text(json.dumps({"seconds": seconds, "peak": peak_rss_bytes(),
                                                                  "first_plane": (first_plane or [0.0])[0]}))
    if world > 1:
        dist.destroy_process_group()


def launch(job: dict[str, Any], folder: Path, name: str, procs: int) -> dict[str, Any]:
    """Run :func:`child` in ``procs`` fresh processes (torchrun for 2); their figures and the wall time."""
    job = {**job, "report": str(folder / name)}
    me = [str(Path(__file__).resolve()), "--child", json.dumps(job)]
    if procs == 1:
        cmd = [sys.executable, *me]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
               "127.0.0.1", "--master_port", str(port), *me]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    ranks = [json.loads(Path(f"{job['report']}.rank{r}").read_text()) for r in range(procs)]
    return {"wall": wall, "seconds": max(r["seconds"] for r in ranks), "peak": max(r["peak"] for r in ranks),
            "peak_sum": sum(r["peak"] for r in ranks), "first_plane": ranks[0]["first_plane"]}


def write_inputs(folder: Path, shape: tuple[int, int, int]) -> dict[str, Path]:
    import torch

    from micromae.config import ModelConfig, PretrainConfig, to_dict
    from micromae.data.synthetic_em import make_em_volume
    from micromae.io import write_zarr
    from micromae.models import MaskedAutoencoder

    paths = {"volume": write_zarr(folder / "volume.zarr", make_em_volume(shape, seed=0).image,
                                  chunks=(1, 64, 64), axes="ZYX")}
    torch.manual_seed(0)
    cfg = PretrainConfig(name="dist_bench", model=ModelConfig(**TINY_MODEL))
    paths["checkpoint"] = folder / "tiny.pt"
    torch.save({"model": MaskedAutoencoder(**TINY_MODEL).state_dict(), "step": 0, "config": to_dict(cfg)},
               paths["checkpoint"])
    return paths


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child(json.loads(argv[1]))
        return 0
    args = parse_args(__doc__, argv)
    device = resolve_device("cpu")
    rep = Reporter("bench_segment_dist", args.out, device, args.quick)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    mode = "fast" if args.quick else "exact"
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="micromae_distbench_") as tmp:
        folder = Path(tmp)
        paths = write_inputs(folder, shape)
        base = {"task": "segment", "checkpoint": str(paths["checkpoint"]), "volume": str(paths["volume"]),
                "mode": mode}
        log(f"segmenting {shape} in 1 process (load {load_before})")
        one = launch({**base, "output": str(folder / "one.zarr")}, folder, "one", 1)
        log(f"1 process: {one}; now 2 processes (load {os.getloadavg()})")
        two = launch({**base, "output": str(folder / "two.zarr")}, folder, "two", 2)
        log(f"2 processes: {two}; re-clustering the 1-process output")
        re = launch({"task": "recluster", "features": str(folder / "one.zarr"), "output": str(folder / "k8.zarr")},
                    folder, "re", 1)
        import zarr

        a, b = (zarr.open_group(store=str(folder / n), mode="r") for n in ("one.zarr", "two.zarr"))
        identical = all(np.array_equal(a[n][:], b[n][:]) for n in a.array_keys())
    mb = 1024.0 ** 2
    ctx = dict(shape=list(shape), voxels=int(np.prod(shape)), mode=mode, threads_per_process=1, identical=identical,
               wall_1proc=one["wall"], wall_2proc=two["wall"], load_before=list(load_before),
               load_after=list(os.getloadavg()), cores=os.cpu_count(),
               encoder="maester_tiny shape (FOV 40, 64 wide, 4 blocks), random weights")
    rep.emit("seconds_1proc", one["seconds"], "s", None, to_first_plane=one["first_plane"], **ctx)
    rep.emit("seconds_2proc", two["seconds"], "s", None, to_first_plane=two["first_plane"], **ctx)
    rep.emit("speedup_2proc", one["seconds"] / two["seconds"], "ratio", None, bound=2.0,
             wall_speedup=one["wall"] / two["wall"], **ctx)
    rep.emit("peak_rss_1proc_mb", one["peak"] / mb, "MB", None, **ctx)
    rep.emit("peak_rss_2proc_mb", two["peak"] / mb, "MB", None, sum_mb=two["peak_sum"] / mb, **ctx)
    rep.emit("recluster_seconds", re["seconds"], "s", None, k=8, **ctx)
    rep.emit("recluster_vs_segment", re["seconds"] / one["seconds"], "ratio", None, **ctx)
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

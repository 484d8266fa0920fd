"""One rank of a gloo world for tests/test_segment_distributed.py (not a test module).

    python tests/dist_worker.py JOBS.json    (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

JOBS.json is a list of ``{"verb": "segment" | "cluster" | "embed", "kwargs": {...}, "rank_kwargs": {rank:
{...}}, "die_in_plane": [rank, n], "error_to": path}``: each verb is run with ``kwargs`` (updated by this
rank's ``rank_kwargs``) under the world; ``die_in_plane`` makes that rank kill itself (SIGKILL) when it starts
embedding its n-th plane, ``fail_in_plane`` makes it raise ``RuntimeError("boom")`` there; ``error_to``: the
job must fail, and its exception's type and message are written there (one file per rank:
``<path>.rank<R>``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from micromae.segment import pipeline, volume
from micromae.segment.volume import SegmentSettings


def _dying(real, n: int, kill: bool = True):
    """``real``, but this process kills itself (SIGKILL) or raises at the ``n``-th call."""
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if not kill:
                raise RuntimeError("boom")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return dying


def main(jobs_path: str) -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    real = volume.embed_region
    for job in json.loads(Path(jobs_path).read_text()):
        volume.embed_region = real
        kwargs = {**job["kwargs"], **job.get("rank_kwargs", {}).get(str(rank), {})}
        if "settings" in kwargs:
            kwargs["settings"] = SegmentSettings(**{**kwargs["settings"], "axes": tuple(kwargs["settings"]["axes"])})
        if job.get("die_in_plane") and job["die_in_plane"][0] == rank:
            volume.embed_region = _dying(real, job["die_in_plane"][1])
        if job.get("fail_in_plane") and job["fail_in_plane"][0] == rank:
            volume.embed_region = _dying(real, job["fail_in_plane"][1], kill=False)
        run = {"segment": pipeline.run_segment, "cluster": pipeline.run_cluster, "embed": pipeline.run_embed}
        try:
            run[job["verb"]](**kwargs)
        except Exception as exc:
            if not job.get("error_to"):
                raise
            Path(f"{job['error_to']}.rank{rank}").write_text(f"{type(exc).__name__}: {exc}")
        else:
            if job.get("error_to"):
                raise SystemExit(f"job {job} should have failed")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

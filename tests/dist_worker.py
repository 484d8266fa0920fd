"""One rank of a gloo world for tests/test_segment_distributed.py (not a test module).

    python tests/dist_worker.py JOBS.json    (with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

JOBS.json is a list of ``{"verb": "segment" | "cluster" | "embed", "kwargs": {...}, "rank_kwargs": {rank:
{...}}, "die_in_plane": [rank, n], "error_to": path}``: each verb is run with ``kwargs`` (updated by this
rank's ``rank_kwargs``) under the world; ``die_in_plane`` makes that rank kill itself (SIGKILL) when it starts
embedding its n-th plane; ``error_to``: the job must fail with a MicromaeInputError, whose message is written
there (one file per rank: ``<path>.rank<R>``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from micromae.errors import MicromaeInputError
from micromae.segment import pipeline, volume
from micromae.segment.volume import SegmentSettings


def _dying(real, n: int):
    """``real``, but this process kills itself (SIGKILL) at the ``n``-th call."""
    calls = [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    return dying


def main(jobs_path: str) -> int:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for job in json.loads(Path(jobs_path).read_text()):
        kwargs = {**job["kwargs"], **job.get("rank_kwargs", {}).get(str(rank), {})}
        if "settings" in kwargs:
            kwargs["settings"] = SegmentSettings(**{**kwargs["settings"], "axes": tuple(kwargs["settings"]["axes"])})
        if job.get("die_in_plane") and job["die_in_plane"][0] == rank:
            volume.embed_pixels_region = _dying(volume.embed_pixels_region, job["die_in_plane"][1])
        run = {"segment": pipeline.run_segment, "cluster": pipeline.run_cluster, "embed": pipeline.run_embed}
        try:
            run[job["verb"]](**kwargs)
        except MicromaeInputError as exc:
            if not job.get("error_to"):
                raise
            Path(f"{job['error_to']}.rank{rank}").write_text(str(exc))
        else:
            if job.get("error_to"):
                raise SystemExit(f"job {job} should have failed")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""Read the next tiles while the device encodes the current one.

:func:`prefetch` runs a read function over a sequence of jobs in one background thread, ``depth`` jobs
ahead, and yields ``(job, result)`` in the jobs' order; the consumer (the encoder loop) never waits for a read
unless reading is slower than encoding. An exception in a read is raised in the consumer at that job.

:func:`tile_reads` is what streaming segmentation reads: every tile of every plane still to do along one
axis, padded with its context margin and scaled to [0, 1] (:func:`~micromae.segment.cover_stride.read_region`),
into pinned host memory when the encoder is on CUDA, so the copy to the device is non-blocking. Reads take the
same code path as an unthreaded run, so the labels are the same bit for bit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import nn

from micromae.segment.cover_stride import RegionRead, read_region
from micromae.segment.planes import PlaneView

Job = TypeVar("Job")


def prefetch(read: Callable[[Job], Any], jobs: Iterable[Job], depth: int = 1) -> Iterator[tuple[Job, Any]]:
    """Yield ``(job, read(job))`` for ``jobs`` in order, reading up to ``depth`` jobs ahead in a thread."""
    pending: deque[tuple[Job, Future]] = deque()
    source = iter(jobs)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="micromae-prefetch") as pool:
        try:
            for job in source:
                pending.append((job, pool.submit(read, job)))
                if len(pending) > depth:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:  # the consumer stopped early (error, cancel): drop reads not started yet
            for _, future in pending:
                future.cancel()


def tile_reads(encoder: nn.Module, volume: Any, axis: int, planes: Sequence[int],
               tiles: Sequence[tuple[int, int, int, int]], settings: Any,
               intensity_range: tuple[float, float], depth: int = 1
               ) -> Iterator[tuple[tuple[int, tuple[int, int, int, int]], RegionRead]]:
    """``((plane, (y0, x0, th, tw)), region)`` for every tile of every plane in ``planes`` normal to ``axis``,
    read ahead in a background thread (module docstring). ``settings``: a ``SegmentSettings``."""
    device = next(encoder.parameters()).device
    on_cuda = device.type == "cuda"

    def read(job: tuple[int, tuple[int, int, int, int]]) -> RegionRead:
        index, (y0, x0, th, tw) = job
        plane = PlaneView(volume, axis, index)
        return read_region(encoder, plane, y0, x0, th, tw, settings.central_tokens, settings.mode,
                           settings.pad_mode, intensity_range, device=torch.device("cpu") if on_cuda else device,
                           pin=on_cuda)

    return prefetch(read, ((index, t) for index in planes for t in tiles), depth)

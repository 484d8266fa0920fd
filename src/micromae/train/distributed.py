"""Device choice and torchrun / DDP set-up (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from micromae.runtime import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly one-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_spec: str = "auto", timeout: datetime.timedelta | None = None
                     ) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1), else run alone.
    ``timeout``: how long a collective waits for the slowest rank (torch's default when None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank, world_size, local_rank)
    device = resolve_device(device_spec, local_rank)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    return info, device


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def main_process_first(info: DistInfo, build: Callable[[], T]) -> T:
    """``build()`` on the main process, then on the others once it is done (e.g. a data set whose files the
    first call writes and later calls only read)."""
    if info.is_main:
        result = build()
    barrier(info)
    if not info.is_main:
        result = build()
    return result


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    """Average a python float over ranks (for logging)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def cleanup_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()

"""The segmentation verbs under ``torch.distributed`` (``torchrun -m micromae segment ...``, or the Python API
inside an initialised process group).

Rank 0 draws the k-means sample and fits the centres, then broadcasts them, so every rank labels with the
same centres; the planes still to do are dealt out round-robin (``todo[rank::world]``), and since every output
array is chunked one plane thick along its slicing axis, ranks write disjoint chunks. Which planes are done is
kept per rank in its own small JSON file (no two processes ever rewrite the same file), merged into the
group's ``done`` attribute by rank 0 at the start and at the end of a run, so a run resumes per plane whatever
the number of ranks at restart. Before the first collective every rank checks, by comparing hashes, that it
sees the same inputs and settings as rank 0; a rank that fails inside a shared step makes every rank fail with
its message (:func:`together`). The process-group set-up itself is :mod:`micromae.train.distributed`'s.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from micromae.errors import MicromaeInputError, input_error
from micromae.train.distributed import DistInfo, barrier, cleanup_distributed, init_distributed

T = TypeVar("T")

# the other ranks wait this long for rank 0's sample and k-means fit (minutes on a large sample) and for the
# slowest rank's last plane
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=1)

__all__ = ["DistInfo", "DoneRecords", "RankFailed", "barrier", "broadcast", "check_same", "current_world",
           "done_planes", "join_world", "leave_world", "share", "together"]


class RankFailed(RuntimeError):
    """Another rank of the world failed; the message is that rank's."""


def current_world() -> DistInfo:
    """Where this process sits: the initialised default process group, or alone."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def join_world(device_spec: str = "auto") -> DistInfo:
    """Join torchrun's process group when launched by it (``WORLD_SIZE`` > 1: NCCL with one GPU per
    ``LOCAL_RANK`` on CUDA, gloo on CPU); alone otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        init_distributed(device_spec, timeout=COLLECTIVE_TIMEOUT)
    return current_world()


def leave_world(info: DistInfo) -> None:
    cleanup_distributed(info)


def share(items: Sequence[T], info: DistInfo) -> list[T]:
    """This rank's part of ``items``: every ``world_size``-th, from its rank on."""
    return list(items[info.rank::info.world_size])


def _device(info: DistInfo) -> torch.device:
    """The device collectives of this world run on (NCCL needs CUDA tensors)."""
    if info.enabled and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: T, info: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank (pickled; for centres, PCA and small records)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_device(info))
    return box[0]


def _all_gather(obj: Any, info: DistInfo) -> list[Any]:
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def check_same(info: DistInfo, fields: dict[str, Any], what: str = "torchrun world") -> None:
    """Refuse a world whose ranks see different inputs or settings: ``fields`` (name → a JSON-able value, or
    anything with a stable ``str``) are hashed on each rank and compared with rank 0's."""
    if not info.enabled:
        return
    mine = {name: _digest(value) for name, value in fields.items()}
    every = _all_gather(mine, info)
    bad = [(r, sorted(k for k in set(h) | set(every[0]) if h.get(k) != every[0].get(k)))
           for r, h in enumerate(every) if h != every[0]]
    if bad:
        found = "; ".join(f"rank {r} differs from rank 0 in {', '.join(names)}" for r, names in bad)
        raise input_error(what, f"the same inputs and settings on all {info.world_size} ranks", found,
                          "Start every rank with the same command, options and files (the same data on every "
                          "node)")


@contextmanager
def together(info: DistInfo) -> Iterator[None]:
    """Run a step on every rank and fail on every rank when one fails, with the failing rank's message.

    The step inside must not itself run collectives that a failing rank would skip. The failing rank raises
    its own exception; the others raise a :class:`~micromae.errors.MicromaeInputError` (bad input: exit 2
    from the CLI) or a :class:`RankFailed` naming the rank and its message.
    """
    if not info.enabled:
        yield
        return
    try:
        yield
    except BaseException as exc:
        _outcome(info, exc)
        raise
    _outcome(info, None)


def _outcome(info: DistInfo, exc: BaseException | None) -> None:
    mine = None if exc is None else (type(exc).__name__, str(exc), isinstance(exc, MicromaeInputError))
    every = _all_gather(mine, info)
    failed = [(r, o) for r, o in enumerate(every) if o is not None]
    if not failed or exc is not None:
        return
    rank, (name, message, is_input) = failed[0]
    if is_input:
        raise MicromaeInputError(f"rank {rank}: {message}")
    raise RankFailed(f"rank {rank} of {info.world_size} failed: {name}: {message}")


class DoneRecords:
    """Which planes of a ``<out>.partial`` group are finished, per slicing axis, safe with several writers.

    Each rank keeps the planes it finished in this run in its own file ``<out>.partial.done/rank<R>.json``
    (rewritten atomically after each plane; it holds the ``run_id`` of the partial group, so records of a
    discarded group are never trusted). Rank 0 merges every file into ``group.attrs["done"]`` (and removes
    them) at the start of a run, before the other ranks read it, and again at the end.
    """

    def __init__(self, partial: Path, run_id: str, info: DistInfo):
        self.folder = folder_of(partial)
        self.run_id, self.info = run_id, info
        self.mine: dict[str, list[int]] = {}

    def merge(self, group: Any) -> dict[str, list[int]]:
        """(rank 0) the group's ``done`` attribute united with every rank file of this run, written back."""
        merged = _united(group, self.folder, self.run_id)
        group.attrs["done"] = merged
        shutil.rmtree(self.folder, ignore_errors=True)
        return merged

    def record(self, axis: int, index: int) -> None:
        """Plane ``index`` along ``axis`` is written (all its chunks)."""
        self.mine.setdefault(str(axis), []).append(int(index))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{self.info.rank}.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "done": self.mine}))
        os.replace(tmp, path)


def _united(group: Any, folder: Path, run_id: str) -> dict[str, list[int]]:
    done = {a: set(v) for a, v in dict(group.attrs.get("done", {})).items()}
    for path in sorted(folder.glob("rank*.json")) if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file a killed rank left half-written: its planes are done again
        if record.get("run_id") != run_id:
            continue
        for axis, planes in record.get("done", {}).items():
            done.setdefault(axis, set()).update(int(i) for i in planes)
    return {a: sorted(v) for a, v in sorted(done.items())}


def done_planes(partial: str | Path) -> dict[str, list[int]]:
    """The planes an interrupted run left finished in ``<out>.partial``, per slicing axis (``"0"``: Z), from
    the group's ``done`` attribute and every rank's record (read only)."""
    import zarr

    partial = Path(partial)
    group = zarr.open_group(store=str(partial), mode="r")
    return _united(group, folder_of(partial), str(group.attrs.get("run_id")))


def folder_of(partial: Path) -> Path:
    """Where the per-rank done records of ``<out>.partial`` live (beside it: foreign files inside a Zarr group
    make zarr warn)."""
    return partial.with_name(partial.name + ".done")

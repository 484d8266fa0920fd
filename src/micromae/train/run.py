"""The one run skeleton every training verb goes through: check, join the process group, start the run,
seed, build, save the config, train, finish, clean up.

Pre-training, the segmentation baselines, classification and Mask R-CNN differ only in what they build (the
data stream, the model and its objective, the config as resolved against the data) and in what they do
once training is done; they give :func:`run_training` a ``build`` function returning a :class:`RunPlan`.

A run folder holds one run: :func:`start_run` refuses to start afresh over one that has checkpoints
(``--resume auto`` continues it). Synthetic multiplex images a run trains on are written once into the run
folder (:func:`~micromae.data.synthetic_mif.write_mif_dataset`, ``RUN_DIR/synthetic_mif``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from micromae.config import TrainConfig, save_config, to_dict
from micromae.errors import MicromaeInputError, at_least, input_error
from micromae.io.preflight import check_writable, existing_ancestor
from micromae.runtime import say
from micromae.train.checkpoint import find_resume_checkpoint
from micromae.train.distributed import DistInfo, cleanup_distributed, init_distributed
from micromae.train.engine import Objective, TrainResult, train

C = TypeVar("C")


@dataclass(frozen=True)
class RunContext:
    """Where a started run stands: its folder, this process's place, its device, the checkpoint to resume."""

    run_dir: Path
    info: DistInfo
    device: torch.device
    resume_from: Path | None


@dataclass
class RunPlan:
    """What a task built for the engine.

    ``config``: the run's config as resolved (e.g. classes filled in from the data), saved as
    ``RUN_DIR/config.yaml``. ``open_stream(start)`` yields ``(micro_step, batch)`` from ``start`` on.
    ``messages``: said once by the main process before training. ``train_cfg``: the engine's settings
    (default ``config.train``); ``config_dict``: the config stored in checkpoints (default the saved one).
    ``finish(result)``: runs after training, before the process group is left; its value is the run's result.
    """

    objective: Objective
    open_stream: Callable[[int], Iterable[tuple[int, Any]]]
    config: Any
    messages: Sequence[str] = ()
    train_cfg: TrainConfig | None = None
    config_dict: dict[str, Any] | None = None
    finish: Callable[[TrainResult], TrainResult] | None = None


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """``None`` → fresh run; ``auto`` → the run's last checkpoint if any; else a checkpoint path."""
    if resume is None:
        return None
    if resume == "auto":
        return find_resume_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise input_error("--resume", "auto or an existing checkpoint file", repr(resume),
                          "Use --resume auto to continue the run in --run-dir")
    return path


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that cannot hold a run: a file of that name, a path below a file, a folder micromae
    cannot write to (read-only, no permission)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise input_error(f"--run-dir '{run_dir}'", "a folder (or nothing yet)", "a file",
                          "Choose another --run-dir (or remove the file)")
    folder = run_dir if run_dir.is_dir() else existing_ancestor(run_dir, "--run-dir")
    check_writable(folder, run_dir, "--run-dir")


def check_train_numbers(train_cfg: Any) -> None:
    """The counts of ``train`` that must be positive (a run of 0 or -5 steps trains nothing and saves nothing)."""
    for name in ("steps", "batch_size", "accum_steps"):
        value = getattr(train_cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            at_least(f"train.{name}", value, 1)
    epochs = getattr(train_cfg, "epochs", None)
    if epochs is not None:
        at_least("train.epochs", epochs, 1e-9, "Set train.epochs above 0 (or null to count train.steps)")


def start_run(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (see :func:`resolve_resume`); refuses to start afresh over a finished or
    interrupted run, so nothing is overwritten by accident."""
    check_run_dir(run_dir)
    resume_path = resolve_resume(run_dir, resume)
    if resume_path is None and (run_dir / "checkpoints" / "last.pt").exists():
        raise input_error(f"run directory '{run_dir}'", "a new or empty run directory",
                          "a run with checkpoints", "Pass --resume auto to continue it, or another --run-dir")
    return resume_path


def run_training(cfg: C, run_dir: str | Path, resume: str | None, stop_after: int | None,
                 check: Callable[[C], None], build: Callable[[RunContext], RunPlan],
                 seed_numpy: bool = False) -> TrainResult:
    """Check ``cfg``, start the run in ``run_dir``, build it with ``build`` and train it.

    ``cfg.train`` must have ``device`` and ``seed``. Every process seeds torch's generator (and numpy's
    global one with ``seed_numpy``, for libraries drawing from it such as timm's Mixup) with
    ``cfg.train.seed + rank`` before ``build``. The process group is left however the run ends. A start
    refused for bad input (before a checkpoint was written) removes the run folder if this call made it.
    """
    check_train_numbers(cfg.train)
    check(cfg)
    run_dir = Path(run_dir)
    info, device = init_distributed(cfg.train.device)
    fresh = not run_dir.exists()
    try:
        resume_from = start_run(run_dir, resume)
        torch.manual_seed(cfg.train.seed + info.rank)
        if seed_numpy:
            np.random.seed(cfg.train.seed + info.rank)
        plan = build(RunContext(run_dir, info, device, resume_from))
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(plan.config, run_dir / "config.yaml")
            for message in plan.messages:
                say(message)
        train_cfg = plan.train_cfg if plan.train_cfg is not None else plan.config.train
        config_dict = plan.config_dict if plan.config_dict is not None else to_dict(plan.config)
        result = train(train_cfg, plan.objective, plan.open_stream, run_dir, config_dict, info, device,
                       resume_from=resume_from, stop_after=stop_after)
        return plan.finish(result) if plan.finish is not None else result
    except MicromaeInputError:
        if fresh and info.is_main and run_dir.is_dir() and not any((run_dir / "checkpoints").glob("*.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)  # a refused start leaves nothing behind
        raise
    finally:
        cleanup_distributed(info)

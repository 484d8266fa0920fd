"""One training loop for every objective.

The engine knows nothing of MAESTER or DAMA: it gets an :class:`Objective` (which owns the model and turns a
batch into a loss plus a dict of logged values) and a function that opens the data stream at a given
micro-step. It does the rest: device, DDP, bf16 autocast, AdamW, warm-up + cosine, gradient accumulation and
clipping, a NaN/inf guard, atomic checkpoints, ``--resume``, ``log.jsonl`` / tensorboard, a tqdm bar and
figures.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from micromae.config import TrainConfig
from micromae.errors import at_least, input_error
from micromae.io import check_free_space
from micromae.io.preflight import existing_ancestor
from micromae.models.dama import ema_momentum as cosine_momentum
from micromae.runtime import say
from micromae.train.checkpoint import (
    load_checkpoint,
    non_finite_entries,
    remove_orphans,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from micromae.train.distributed import DistInfo, all_reduce_mean
from micromae.train.log import RunLogger
from micromae.train.optim import build_optimizer, build_scheduler


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the optimiser state became NaN or infinite; nothing non-finite was saved, and
    the newest checkpoint (every one written is checked finite) is kept."""


def _load_resume_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                       objective: Objective, device: torch.device) -> int:
    """Load a checkpoint into the run; a foreign (another model or objective) or non-finite one is a clear
    error, not a state-dict key dump. Returns the step it was saved at."""
    state = load_checkpoint(path, map_location=device)
    bad = non_finite_entries(state["model"]) + non_finite_entries(state.get("optimizer"))
    if bad:
        raise input_error(f"--resume '{path}'", "a checkpoint with finite weights", f"{bad} NaN or infinite values",
                          "Resume from an earlier checkpoint (--resume auto picks the newest finite one)")
    theirs = (state.get("config") or {}).get("objective")
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise input_error(f"--resume '{path}'", "a checkpoint of this run's model and objective",
                          f"one that does not fit ({theirs or 'unknown'} objective; {first})",
                          "Resume with a checkpoint of the same config, or start a new --run-dir") from exc
    objective.load_state_dict(state.get("extra", {}))
    set_rng_state(state["rng"])
    return int(state["step"])


class Objective:
    """What the engine trains. Subclasses implement :meth:`loss`; the rest has sensible defaults.

    ``self.model`` is the module whose parameters are optimised and checkpointed; ``name`` labels the progress
    bar and ``figure_name`` the PNGs in ``RUN_DIR/figures/``.
    """

    name = "train"
    figure_name = "figure"

    def __init__(self, model: nn.Module):
        self.model = model

    def loss(self, module: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Return the scalar loss and values to log. ``module`` is ``self.model``, maybe wrapped in DDP."""
        raise NotImplementedError

    def build_optimizer(self, cfg: TrainConfig) -> torch.optim.Optimizer:
        """The optimiser over ``self.model`` (default: AdamW with the no-decay groups of ``cfg``); fine-tuning
        objectives override it for layer-wise lr decay."""
        return build_optimizer(self.model, cfg)

    def after_step(self, step: int) -> None:
        """Called after every optimiser step (e.g. to update an EMA teacher)."""

    def state_dict(self) -> dict[str, Any]:
        """Objective state beyond the model's parameters, saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_figure(self, batch: torch.Tensor, path: Path) -> None:
        """Write a PNG about the current model on ``batch`` (called on the main process only)."""


def check_resume(state: dict[str, Any], kind: str, expected: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint written with other objective settings (``kind`` = the objective's tag)."""
    if not state:
        return
    found = {k: state.get(k) for k in ["objective", *expected]}
    wanted = {"objective": kind, **expected}
    if found != wanted:
        raise input_error("checkpoint objective state", repr(wanted), repr(found),
                          "Resume with the config the run was started with")


class MomentumObjective(Objective):
    """An objective with a momentum (EMA) branch: the momentum follows a cosine from ``ema_momentum`` to 1
    over ``total_steps`` (:meth:`next_momentum` after each optimiser step). Checkpoints hold the model's
    ``settings()``, the schedule and the last momentum, tagged with ``name``; resuming with other settings is
    refused. ``option`` names the setting in the error for an out-of-range momentum."""

    def __init__(self, model: nn.Module, total_steps: int, ema_momentum: float, option: str = "ema_momentum"):
        super().__init__(model)
        if not 0.0 <= float(ema_momentum) <= 1.0:
            raise input_error(option, "a number in [0, 1]", repr(ema_momentum), "Use e.g. 0.996 (DAMA) or 0.99")
        self.total_steps, self.ema_base = max(1, int(total_steps)), float(ema_momentum)
        self.last_momentum = self.ema_base

    def next_momentum(self, step: int) -> float:
        """The momentum after optimiser step ``step`` (0-based), kept as ``last_momentum``."""
        self.last_momentum = cosine_momentum(step, self.total_steps, self.ema_base)
        return self.last_momentum

    def state_dict(self) -> dict[str, Any]:
        """The settings (checked on resume); the weights, momentum branch included, are in the model's state."""
        return {"objective": self.name, "settings": self.model.settings(), "total_steps": self.total_steps,
                "ema_momentum": self.ema_base, "last_momentum": self.last_momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_resume(state, self.name, {"settings": self.model.settings(), "ema_momentum": self.ema_base})
        self.last_momentum = float(state.get("last_momentum", self.ema_base))


@dataclass
class TrainResult:
    step: int  # optimiser steps done
    last_loss: float
    run_dir: Path
    checkpoint: Path | None


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    use_bf16 = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)):
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        return _batch_size(next(iter(batch.values())))
    return 1


def train(
    cfg: TrainConfig,
    objective: Objective,
    open_stream: Callable[[int], Iterable[tuple[int, Any]]],
    run_dir: Path,
    config_dict: dict[str, Any],
    info: DistInfo,
    device: torch.device,
    resume_from: Path | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``objective.model`` for ``cfg.steps`` optimiser steps.

    ``open_stream(start)`` must yield ``(micro_step, batch)`` for micro-steps ``start, start+1, ...``; each
    optimiser step consumes ``cfg.accum_steps`` micro-batches. ``stop_after`` ends this invocation after that
    many optimiser steps (for job time limits; resume later with ``resume_from``).
    """
    for name in ("steps", "accum_steps", "batch_size"):
        at_least(f"train.{name}", getattr(cfg, name), 1)
    if stop_after is not None:
        at_least("--stop-after", stop_after, 1)
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    model = objective.model.to(device)
    optimizer = objective.build_optimizer(cfg)
    scheduler = build_scheduler(optimizer, cfg)
    step = 0
    if info.is_main:
        for orphan in remove_orphans(ckpt_dir):
            say(f"removed {orphan}, left by a checkpoint write that did not finish")
        # a checkpoint holds the weights and about two optimiser moments each; step file, last.pt and the one
        # being written may exist at once
        need = 3 * 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
        check_free_space(existing_ancestor(ckpt_dir, "--run-dir"), need, "--run-dir", run_dir)
    if resume_from is not None:
        step = _load_resume_state(resume_from, model, optimizer, scheduler, objective, device)
        if info.is_main:
            say(f"resumed from {resume_from} at step {step}")
    module: nn.Module = model
    if info.enabled:
        ddp_ids = [device.index] if device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(model, device_ids=ddp_ids)
    if cfg.compile:
        module = compile_module(module)

    logger = RunLogger(run_dir, enabled=info.is_main)
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    last_ckpt: Path | None = resume_from
    last_loss = float("nan")

    def checkpoint() -> Path | None:
        # every rank checks (their weights agree under DDP), so all stop together; nothing non-finite is saved
        bad = non_finite_entries(model.state_dict()) + non_finite_entries(optimizer.state_dict())
        if bad:
            raise TrainingDiverged(
                f"at step {step} the weights and optimiser state hold {bad} NaN or infinite values, so no checkpoint "
                f"was written; {_newest_good(last_ckpt)}. Lower train.lr or set train.grad_clip=1.0 (or "
                "train.amp=off), then restart with --resume auto.")
        if not info.is_main:
            return None
        return save_checkpoint(ckpt_dir, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "rng": rng_state(),
            "config": config_dict, "extra": objective.state_dict(),
        }, keep=cfg.keep_checkpoints)

    stream: Iterator[tuple[int, Any]] = iter(open_stream(step * cfg.accum_steps))
    bar = tqdm(total=cfg.steps, initial=step, desc=objective.name, unit="step", disable=not info.is_main,
               dynamic_ncols=True)
    model.train()
    t_last, crops = time.perf_counter(), 0
    try:
        while step < end:
            optimizer.zero_grad(set_to_none=True)
            logs_sum: dict[str, float] = {}
            batch = None
            for micro in range(cfg.accum_steps):
                _, batch = next(stream)
                batch = _move(batch, device)
                crops += _batch_size(batch)
                sync = micro == cfg.accum_steps - 1 or not info.enabled
                ctx = contextlib.nullcontext() if sync else module.no_sync()
                with ctx:
                    with _autocast(device, cfg.amp):
                        loss, logs = objective.loss(module, batch)
                    _check_finite(loss, step, info, device, last_ckpt)
                    (loss / cfg.accum_steps).backward()
                for k, v in {"loss": float(loss.detach()), **logs}.items():
                    logs_sum[k] = logs_sum.get(k, 0.0) + float(v) / cfg.accum_steps
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            objective.after_step(step)
            step += 1
            last_loss = logs_sum["loss"]
            bar.update(1)
            if step % cfg.log_every == 0 or step == end:
                now = time.perf_counter()
                values = {k: all_reduce_mean(v, info, device) for k, v in logs_sum.items()}
                values["lr"] = max(g["lr"] for g in optimizer.param_groups)  # the top layer's
                values["crops_per_s"] = crops * info.world_size / max(now - t_last, 1e-9)
                if grad_norm is not None:
                    values["grad_norm"] = grad_norm
                logger.log(step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                t_last, crops = now, 0
            if info.is_main and cfg.figure_every > 0 and (step % cfg.figure_every == 0 or step == cfg.steps):
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    objective.save_figure(batch, run_dir / "figures" / f"{objective.figure_name}_step{step:07d}.png")
            if (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0) or step == end:
                last_ckpt = checkpoint() or last_ckpt
    finally:
        bar.close()
        logger.close()
    return TrainResult(step=step, last_loss=last_loss, run_dir=run_dir, checkpoint=last_ckpt)


def compile_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)`` (inductor) with random ops drawn from torch's generator as in eager mode, so
    masks, the resume and the loss curve match an eager run; a clear error where inductor cannot run."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    reason = compile_unavailable()
    if reason:
        raise input_error("train.compile=true", "a working torch.compile (inductor) backend", reason,
                          "Set train.compile=false (eager mode gives the same results, only slower)")
    return torch.compile(module)


def compile_unavailable() -> str | None:
    """Why torch.compile cannot run here (None if it can): inductor needs a C++ compiler for CPU code."""
    import shutil

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) on PATH, which inductor needs to build CPU kernels"
    return None


def _check_finite(loss: torch.Tensor, step: int, info: DistInfo, device: torch.device,
                  last_ckpt: Path | None) -> None:
    """Stop with a clear message when the loss is NaN/inf on any rank."""
    bad = 0.0 if torch.isfinite(loss.detach()).item() else 1.0
    if info.enabled:
        bad = all_reduce_mean(bad, info, device)
    if bad == 0.0:
        return
    raise TrainingDiverged(
        f"the loss became {float(loss.detach())} at step {step + 1}; {_newest_good(last_ckpt)}. Lower train.lr, "
        "set train.grad_clip=1.0 or train.amp=off, then restart with --resume auto."
    )


def _newest_good(last_ckpt: Path | None) -> str:
    """Which checkpoint to go back to: every checkpoint written was checked finite first, and a resumed one
    was checked when loaded, so the newest one is good."""
    if last_ckpt is None:
        return "no checkpoint was written yet"
    return f"the newest checkpoint, {last_ckpt}, holds only finite weights"

"""Atomic checkpoints holding everything needed to resume a run bit for bit.

A checkpoint is a ``torch.save`` dict: ``model`` (state dict of the unwrapped model), ``optimizer``,
``scheduler``, ``step`` (optimiser steps done), ``rng`` (python, numpy, torch CPU and CUDA states),
``config`` (the resolved run config as a dict), ``extra`` (objective state such as an EMA teacher's
momentum) and ``micromae_version``. Files are written to a temporary name and renamed, so a crash never
leaves a truncated checkpoint at the real name.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import micromae
from micromae.io import atomic_path, file_sha256
from micromae.models.pretrained import load_checkpoint
from micromae.runtime import say

__all__ = ["LAST", "checkpoint_problem", "file_sha256", "find_resume_checkpoint", "load_checkpoint",
           "non_finite_entries", "remove_orphans", "rng_state", "save_checkpoint", "set_rng_state"]
# load_checkpoint (models layer) and file_sha256 (io) are re-exported for resume

LAST = "last.pt"
_STEP_RE = re.compile(r"step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def non_finite_entries(state: Any) -> int:
    """How many floating-point values in the tensors of ``state`` (nested dicts, lists, tuples: a model or
    optimiser state dict, a whole checkpoint) are NaN or infinite."""
    if isinstance(state, torch.Tensor):
        return int((~torch.isfinite(state)).sum()) if state.is_floating_point() or state.is_complex() else 0
    if isinstance(state, dict):
        return sum(non_finite_entries(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(non_finite_entries(v) for v in state)
    return 0


def _save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path``; a write that failed for want of space is an ``OSError(ENOSPC)`` (torch's
    zip writer reports it as a ``RuntimeError`` such as "unexpected pos")."""
    try:
        torch.save(state, path)
    except RuntimeError as exc:
        free = shutil.disk_usage(path.parent).free
        if free < (path.stat().st_size if path.exists() else 0) + (64 << 20):
            raise OSError(errno.ENOSPC, "No space left on device while writing a checkpoint",
                          str(path.parent)) from exc
        raise


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step_XXXXXXX.pt`` and ``last.pt`` atomically; keep only the newest ``keep`` step files."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {**state, "micromae_version": micromae.__version__}
    step_path = ckpt_dir / f"step_{state['step']:07d}.pt"
    with atomic_path(step_path, overwrite=True) as tmp:
        _save(state, tmp)
    with atomic_path(ckpt_dir / LAST, overwrite=True) as tmp:
        _save(state, tmp)
    step_files = sorted(p for p in ckpt_dir.glob("step_*.pt") if _STEP_RE.search(p.name))
    for old in step_files[: max(0, len(step_files) - keep)]:
        old.unlink(missing_ok=True)
    return step_path


def remove_orphans(ckpt_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that never finished (``.*.partial.*``, left by a kill
    or a full disk during :func:`save_checkpoint`); return what was removed."""
    ckpt_dir = Path(ckpt_dir)
    orphans = sorted(ckpt_dir.glob(".*.partial.*")) if ckpt_dir.is_dir() else []
    for path in orphans:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return orphans


def checkpoint_problem(path: Path) -> tuple[int, str | None]:
    """``(step, None)`` for a checkpoint that loads and holds only finite model and optimiser values, else
    ``(-1, why not)``."""
    try:
        state = load_checkpoint(path)
    except ValueError as exc:  # MicromaeInputError: unreadable, truncated or foreign
        return -1, str(exc)
    bad = non_finite_entries(state.get("model")) + non_finite_entries(state.get("optimizer"))
    if bad:
        return -1, f"{bad} non-finite values (NaN or inf)"
    return int(state["step"]), None


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """``--resume auto``: the newest intact checkpoint of the run (the highest step among ``last.pt`` and
    ``step_*.pt`` that loads and holds finite weights and optimiser state), or ``None`` if there is none.

    ``last.pt`` is written after ``step_*.pt``, so a kill between the two leaves a step file newer than it;
    a truncated or non-finite file is passed over (and said on the terminal).
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    steps = sorted((p for p in ckpt_dir.glob("step_*.pt") if _STEP_RE.search(p.name)),
                   key=lambda p: int(_STEP_RE.search(p.name).group(1)), reverse=True)
    candidates = [p for p in (ckpt_dir / LAST, *steps) if p.is_file()]
    best: tuple[int, Path] | None = None
    for path in candidates:
        if best is not None and path != ckpt_dir / LAST and int(_STEP_RE.search(path.name).group(1)) <= best[0]:
            break  # step files are newest first: none after this one can be newer
        step, problem = checkpoint_problem(path)
        if problem is not None:
            say(f"skipping checkpoint {path}: {problem}")
        elif best is None or step > best[0]:
            best = (step, path)
    return None if best is None else best[1]

"""Atomic checkpoints holding everything needed to resume a run bit for bit.

A checkpoint is a ``torch.save`` dict: ``model`` (state dict of the unwrapped model), ``optimizer``,
``scheduler``, ``step`` (optimiser steps done), ``rng`` (python, numpy, torch CPU and CUDA states),
``config`` (the resolved run config as a dict), ``extra`` (objective state such as an EMA teacher's
momentum) and ``micromae_version``. Files are written to a temporary name and renamed, so a crash never
leaves a truncated checkpoint at the real name.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

import micromae
from micromae.io import atomic_path, file_sha256
from micromae.models.pretrained import load_checkpoint

__all__ = ["LAST", "file_sha256", "find_resume_checkpoint", "load_checkpoint", "rng_state", "save_checkpoint",
           "set_rng_state"]  # load_checkpoint (models layer) and file_sha256 (io), re-exported for resume

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


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``step_XXXXXXX.pt`` and ``last.pt`` atomically; keep only the newest ``keep`` step files."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {**state, "micromae_version": micromae.__version__}
    step_path = ckpt_dir / f"step_{state['step']:07d}.pt"
    with atomic_path(step_path, overwrite=True) as tmp:
        torch.save(state, tmp)
    with atomic_path(ckpt_dir / LAST, overwrite=True) as tmp:
        torch.save(state, tmp)
    step_files = sorted(p for p in ckpt_dir.glob("step_*.pt") if _STEP_RE.search(p.name))
    for old in step_files[: max(0, len(step_files) - keep)]:
        old.unlink(missing_ok=True)
    return step_path


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """``--resume auto``: the run's ``checkpoints/last.pt`` if there is one."""
    last = Path(run_dir) / "checkpoints" / LAST
    return last if last.is_file() else None

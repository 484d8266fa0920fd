"""Atomic checkpoints holding everything needed to resume a run bit for bit.

A checkpoint is a ``torch.save`` dict: ``model`` (state dict of the unwrapped model), ``optimizer``,
``scheduler``, ``step`` (optimiser steps done), ``rng`` (python, numpy, torch CPU and CUDA states),
``config`` (the resolved run config as a dict), ``extra`` (objective state such as an EMA teacher's
momentum) and ``micromae_version``. Files are written to a temporary name and renamed, so a crash never
leaves a truncated checkpoint at the real name.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

import micromae
from micromae.errors import input_error
from micromae.io import atomic_path

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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise input_error("checkpoint", "an existing .pt file", f"'{path}' does not exist",
                          "Pass a checkpoint from RUN_DIR/checkpoints/, e.g. last.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise input_error(f"checkpoint '{path}'", "a micromae checkpoint", f"an unreadable file ({exc})",
                          "The file is corrupt or truncated: use another checkpoint") from exc
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise input_error(f"checkpoint '{path}'", "a dict with 'model' and 'step'",
                          f"{type(state).__name__} with keys {sorted(state)[:8] if isinstance(state, dict) else '-'}",
                          "Pass a checkpoint written by micromae pretrain")
    return state


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """``--resume auto``: the run's ``checkpoints/last.pt`` if there is one."""
    last = Path(run_dir) / "checkpoints" / LAST
    return last if last.is_file() else None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file (used to tie outputs such as cluster centres to the checkpoint they came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_pretrained_encoder(path: str | Path, map_location: str | torch.device = "cpu", branch: int = 1):
    """The ViT encoder of a pre-training checkpoint (MAE, data2vec, or DAMA ``branch`` 1 or 2), ready for
    inference, and the checkpoint's config dict.

    Returns ``(encoder, config_dict, sha256_of_file)``; the hash ties outputs (cluster centres, label volumes)
    to the exact weights that made them.
    """
    from micromae.config import ModelConfig, from_dict
    from micromae.models import ViTEncoder
    from micromae.models.dama import encoder_state_dict

    state = load_checkpoint(path, map_location=map_location)
    config = state.get("config") or {}
    m = from_dict(ModelConfig, config.get("model", {}))
    encoder = ViTEncoder(img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
                         depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=m.qkv_bias,
                         pos_embed_weight=m.pos_embed_weight)
    try:
        encoder.load_state_dict(encoder_state_dict(state["model"], branch))
    except RuntimeError as exc:
        raise input_error(f"checkpoint '{path}'", "encoder weights matching the checkpoint's own model config",
                          f"a mismatch ({str(exc).splitlines()[0]})",
                          "Pass a checkpoint written by micromae pretrain") from exc
    return encoder.eval(), config, file_sha256(path)

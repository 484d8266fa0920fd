"""Pre-training entry point: config → volumes → sampler → model → engine. Used by ``micromae pretrain``."""

from __future__ import annotations

from pathlib import Path

import torch

from micromae.config import PretrainConfig, save_config, to_dict
from micromae.data.sampler import PlaneCropSampler, make_loader
from micromae.data.volumes import load_training_volumes
from micromae.errors import input_error
from micromae.models import MaskedAutoencoder
from micromae.train.checkpoint import find_resume_checkpoint
from micromae.train.distributed import cleanup_distributed, init_distributed
from micromae.train.engine import TrainResult, train
from micromae.train.log import say
from micromae.train.objectives import MAEObjective


def build_model(cfg: PretrainConfig) -> MaskedAutoencoder:
    """The masked autoencoder described by ``cfg.model``."""
    return MaskedAutoencoder(**to_dict(cfg.model))


def build_sampler(cfg: PretrainConfig, rank: int = 0) -> PlaneCropSampler:
    d = cfg.data
    return PlaneCropSampler(
        load_training_volumes(d), fov=cfg.model.img_size, planes=tuple(d.planes), pad=d.pad,
        pad_mode=d.pad_mode, min_crop_frac=d.min_crop_frac, flip_p=d.flip_p, normalize=d.normalize,
        percentiles=tuple(d.percentiles), seed=cfg.train.seed, rank=rank,
    )


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


def start_run(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (see :func:`resolve_resume`); refuses to start afresh over a finished or
    interrupted run, so nothing is overwritten by accident."""
    resume_path = resolve_resume(run_dir, resume)
    if resume_path is None and (run_dir / "checkpoints" / "last.pt").exists():
        raise input_error(f"run directory '{run_dir}'", "a new or empty run directory",
                          "a run with checkpoints", "Pass --resume auto to continue it, or another --run-dir")
    return resume_path


def run_pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: str | None = None,
                 stop_after: int | None = None) -> TrainResult:
    """Pre-train a masked autoencoder; writes config.yaml, log.jsonl, tb/, checkpoints/, figures/ in run_dir."""
    run_dir = Path(run_dir)
    if cfg.model.in_chans != 1:
        raise input_error("model.in_chans", "1 for MAESTER volume pre-training", str(cfg.model.in_chans),
                          "Set model.in_chans=1")
    info, device = init_distributed(cfg.train.device)
    try:
        resume_path = start_run(run_dir, resume)
        torch.manual_seed(cfg.train.seed + info.rank)
        sampler = build_sampler(cfg, rank=info.rank)
        model = build_model(cfg)
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            n_params = sum(p.numel() for p in model.parameters())
            say(f"device {device} ({cfg.train.device}), world size {info.world_size}, "
                f"{torch.get_num_threads()} CPU threads; model {n_params / 1e6:.2f} M parameters; run dir {run_dir}")

        def open_stream(start: int):
            return make_loader(sampler, cfg.train.batch_size, start_step=start,
                               num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")

        return train(cfg.train, MAEObjective(model), open_stream, run_dir, to_dict(cfg), info, device,
                     resume_from=resume_path, stop_after=stop_after)
    finally:
        cleanup_distributed(info)

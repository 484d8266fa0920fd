"""Pre-training entry point: config → volumes → sampler → model → engine. Used by ``micromae pretrain``."""

from __future__ import annotations

from pathlib import Path

import torch

from micromae.config import PretrainConfig, to_dict
from micromae.data.image_stream import build_image_dataset, image_stream
from micromae.data.sampler import PlaneCropSampler, make_loader
from micromae.data.torch_sampler import TorchPlaneCropSampler, choose_sampler
from micromae.data.volumes import load_training_volumes
from micromae.errors import input_error
from micromae.figures import plot_loss_curves
from micromae.data.views import FluorescenceViews
from micromae.models import MaskedAutoencoder
from micromae.models.mocov3 import MoCoV3
from micromae.models.pretrained import normalization_record
from micromae.models.simmim import SimMIM
from micromae.runtime import say
from micromae.train.dama_objectives import build_dama_comparison_objective
from micromae.train.distributed import main_process_first
from micromae.train.engine import Objective, TrainResult
from micromae.train.log import read_log
from micromae.train.objectives import MAEObjective
from micromae.train.run import RunContext, RunPlan, run_training
from micromae.train.ssl_objectives import MoCoV3Objective, SimMIMObjective

IMAGE_SOURCES = ("images", "synthetic_mif")


def build_model(cfg: PretrainConfig) -> MaskedAutoencoder:
    """The masked autoencoder described by ``cfg.model``."""
    return MaskedAutoencoder(**to_dict(cfg.model))


def build_objective(cfg: PretrainConfig, model: MaskedAutoencoder) -> Objective:
    """MAE, DAMA (docs/METHODS.md, DAMA pre-training; two students get independently initialised branches),
    data2vec, SimMIM or MoCo v3 (these two train ``model``'s encoder only; ``model.decoder_*`` are unused)."""
    dama = to_dict(cfg.dama)
    if cfg.objective == "mae":
        return MAEObjective(model)
    if cfg.objective == "simmim":
        return SimMIMObjective(SimMIM(model.encoder, mask_ratio=cfg.model.mask_ratio))
    if cfg.objective == "mocov3":
        m = cfg.mocov3
        views = FluorescenceViews(crop_scale=(m.crop_min_scale, 1.0), gain=tuple(m.gain), blur_p=m.blur_p,
                                  blur_sigma=m.blur_sigma, noise=m.noise)
        return MoCoV3Objective(MoCoV3(model.encoder, dim=m.dim, mlp_dim=m.mlp_dim, temperature=m.temperature),
                               cfg.train.steps, ema_momentum=m.ema_momentum, views=views)
    if cfg.objective == "data2vec":
        return build_dama_comparison_objective("data2vec", model, cfg.train.steps, K=cfg.dama.K,
                                               beta=cfg.dama.beta, ema_momentum=cfg.dama.ema_momentum,
                                               target_norm=cfg.dama.data2vec_target_norm)
    momentum = dama.pop("ema_momentum")
    dama.pop("data2vec_target_norm")
    branch2 = build_model(cfg) if cfg.dama.config == "student1-student2" else None
    return build_dama_comparison_objective("dama", model, cfg.train.steps, ema_momentum=momentum,
                                           branch2=branch2, **dama)


def sampler_planes(volumes: list, planes: list[str]) -> tuple[str, ...]:
    """The planes to sample: ``planes``, except that 2-D images (volumes of one slice) have only YX planes, so
    a config that lists ZX / ZY (the default) samples YX alone there (said on the terminal)."""
    planes = tuple(planes)
    if volumes and all(int(v.shape[0]) == 1 for v in volumes) and set(planes) - {"YX", "XY"}:
        say("2-D images: sampling YX crops only (data.planes=[YX]; ZX and ZY planes need a 3-D volume)")
        return ("YX",)
    return planes


def build_sampler(cfg: PretrainConfig, rank: int = 0, device: torch.device | str = "cpu") -> PlaneCropSampler:
    """The plane-crop sampler of ``cfg.data``: numpy (crops cut in data-loader workers) or, with
    ``data.sampler=torch`` (``auto`` on CUDA), :class:`TorchPlaneCropSampler` building batches on ``device``.
    Both draw the same crops for the same (seed, rank, step)."""
    d = cfg.data
    volumes = load_training_volumes(d)
    kwargs = dict(fov=cfg.model.img_size, planes=sampler_planes(volumes, d.planes), pad=d.pad,
                  pad_mode=d.pad_mode, min_crop_frac=d.min_crop_frac, flip_p=d.flip_p, normalize=d.normalize,
                  percentiles=tuple(d.percentiles), seed=cfg.train.seed, rank=rank)
    if choose_sampler(d.sampler, torch.device(device)) == "torch":
        return TorchPlaneCropSampler(volumes, device=device, **kwargs)
    return PlaneCropSampler(volumes, **kwargs)


LOSS_TERMS = ("loss", "loss_p1", "loss_p2", "loss_f")


def plot_run_losses(run_dir: Path) -> Path | None:
    """``figures/loss.png``: every logged loss term against step (DAMA: L_p1, L_p2, L_f and the total)."""
    records = read_log(run_dir)
    keys = tuple(k for k in LOSS_TERMS if any(k in r for r in records))
    return plot_loss_curves(records, run_dir / "figures" / "loss.png", keys=keys) if keys else None


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Refuse a run the volume sampler cannot feed: plane crops of volumes have one channel."""
    if cfg.model.in_chans != 1 and cfg.data.source not in IMAGE_SOURCES:
        raise input_error("model.in_chans", "1 for volume pre-training (plane crops of one channel)",
                          str(cfg.model.in_chans), "Set model.in_chans=1, or use data.source=images")


def build_pretrain_run(cfg: PretrainConfig, ctx: RunContext) -> RunPlan:
    """The data stream (images or volume plane crops), the model and its objective, and the loss figure."""
    info, device, run_dir = ctx.info, ctx.device, ctx.run_dir
    ranges = None
    if cfg.data.source in IMAGE_SOURCES:
        run_dir.mkdir(parents=True, exist_ok=True)
        # the main process writes synthetic images once, the others wait and read them
        dataset = main_process_first(info, lambda: build_image_dataset(cfg, run_dir))
        if cfg.data.normalize == "channel_stats":  # the folder's ranges, stored with the model
            ranges = dataset.ranges(0, None)

        # data.sampler=torch (auto on CUDA): the loader reads and crops, the augmentation runs on the device
        augment_on = device if choose_sampler(cfg.data.sampler, torch.device(device)) == "torch" else None

        def open_stream(start: int):
            return image_stream(dataset, cfg.train.batch_size, start, cfg.train.seed, info.rank,
                                info.world_size, cfg.data.num_workers, device.type == "cuda", device=augment_on)
    else:
        sampler = build_sampler(cfg, rank=info.rank, device=device)
        on_device = isinstance(sampler, TorchPlaneCropSampler)
        if on_device and cfg.data.num_workers > 0 and info.is_main:
            say(f"data.sampler=torch builds batches on {device} in the training process: "
                f"data.num_workers={cfg.data.num_workers} is not used")

        def open_stream(start: int):
            if on_device:
                return sampler.stream(cfg.train.batch_size, start_step=start)
            return make_loader(sampler, cfg.train.batch_size, start_step=start,
                               num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    model = build_model(cfg)
    objective = build_objective(cfg, model)
    n_params = sum(p.numel() for p in objective.model.parameters())
    message = (f"device {device} ({cfg.train.device}), world size {info.world_size}, "
               f"{torch.get_num_threads()} CPU threads; model {n_params / 1e6:.2f} M parameters; run dir {run_dir}")

    def finish(result: TrainResult) -> TrainResult:
        if info.is_main:
            plot_run_losses(run_dir)
        return result

    # the input scaling travels with the model: load_encoder / input_normalization read it back
    config_dict = {**to_dict(cfg), "normalization": normalization_record(cfg.data.normalize, cfg.data.percentiles,
                                                                         ranges)}
    return RunPlan(objective, open_stream, cfg, messages=[message], finish=finish, config_dict=config_dict)


def run_pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: str | None = None,
                 stop_after: int | None = None) -> TrainResult:
    """Pre-train a masked autoencoder; writes config.yaml, log.jsonl, tb/, checkpoints/, figures/ in run_dir."""
    return run_training(cfg, run_dir, resume, stop_after, check_pretrain_config,
                        lambda ctx: build_pretrain_run(cfg, ctx))

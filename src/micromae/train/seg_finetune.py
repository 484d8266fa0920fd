"""MAESTER's supervised baselines (supplement A.2, Tables S2-S4): Segmenter and a vanilla ViT decoder trained
with cross-entropy on partially labelled volumes. Used by ``micromae finetune``.

Training samples image crops and their label crops with the same geometry (:class:`PlaneCropSampler` with
``label_volumes``). betaSeg cells are only partly annotated, so the loss ignores unlabelled pixels
(``ignore_index``); :class:`LabelConfig` can also hide labels on purpose (keep a random share of slices or
blocks, :mod:`micromae.data.partial_labels`) to study how a baseline copes with sparse labels. Inference on
whole volumes is :mod:`micromae.segment.sliding_window`.

Encoder initialisation from a MAESTER checkpoint (``init: path``): every ``encoder.*`` weight is loaded
except ``pos_embed``. That buffer is not learned: it holds the fixed sin-cos table times the pre-training
weight (0.08), whereas the baselines use weight 1.0 (Tables S3/S4). It is recomputed for this run's
``model.pos_embed_weight`` and grid, so a checkpoint also loads at another FOV; set
``model.pos_embed_weight=0.08`` to keep the encoder's input exactly as pre-trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from micromae.config import from_dict, load_config
from micromae.config_tasks import SegFinetuneConfig
from micromae.data.partial_labels import load_labelled_volumes
from micromae.data.sampler import PlaneCropSampler, make_loader
from micromae.errors import input_error
from micromae.models import ViTEncoder
from micromae.models.heads import SupervisedSegmenter, build_head
from micromae.models.pretrained import ENCODER_FIELDS, encoder_fields, load_encoder
from micromae.runtime import eval_mode, unwrap
from micromae.train.checkpoint import load_checkpoint
from micromae.train.engine import Objective, TrainResult
from micromae.train.run import RunContext, RunPlan, run_training


def check_seg_config(cfg: SegFinetuneConfig) -> None:
    """Raise MicromaeInputError for values the dataclass types cannot rule out (the coercer checks the
    choices: ``head``, ``labels.partial``, ``labels.slice_axis``)."""
    if not 1 <= cfg.num_classes <= 256 or not 0 <= cfg.ignore_index or cfg.ignore_index < cfg.num_classes:
        raise input_error("num_classes / ignore_index", "1 <= num_classes <= 256 and ignore_index >= num_classes",
                          f"{cfg.num_classes} / {cfg.ignore_index}", "Use e.g. num_classes=6, ignore_index=255")
    lab = cfg.labels
    if not 0.0 < lab.fraction <= 1.0:
        raise input_error("labels.fraction", "a number in (0, 1]", str(lab.fraction), "e.g. labels.fraction=0.25")
    if lab.block_size < 1:
        raise input_error("labels.block_size", "a positive int", str(lab.block_size), "Fix the labels section")
    if cfg.model.in_chans != 1:
        raise input_error("model.in_chans", "1 (single-channel volumes)", str(cfg.model.in_chans),
                          "Set model.in_chans=1")


def load_seg_finetune_config(path: str | Path, overrides: list[str] | None = None) -> SegFinetuneConfig:
    """Read a fine-tuning preset (``configs/segmenter_*.yaml``) with ``key=value`` overrides, checked."""
    cfg = load_config(path, SegFinetuneConfig, overrides)
    check_seg_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# model


def build_seg_model(cfg: SegFinetuneConfig) -> SupervisedSegmenter:
    """Encoder (``cfg.model``'s encoder fields) + ``cfg.head`` (``decoder_*`` fields), randomly initialised."""
    m = cfg.model
    encoder = ViTEncoder.from_config(m)
    head = build_head(cfg.head, encoder, cfg.num_classes, decoder_embed_dim=m.decoder_embed_dim,
                      depth=m.decoder_depth, num_heads=m.decoder_num_heads, mlp_ratio=m.decoder_mlp_ratio,
                      pos_embed_weight=m.decoder_pos_embed_weight)
    return SupervisedSegmenter(encoder, head)


def load_encoder_weights(model: SupervisedSegmenter, path: str | Path) -> dict[str, Any]:
    """Copy the encoder weights of a checkpoint (MAESTER or fine-tuned) into ``model.encoder``.

    ``pos_embed`` is not taken from the file: it is recomputed at this model's weight and grid (module
    docstring). Returns what was loaded: ``{"path", "tensors", "checkpoint_pos_embed_weight"}``.
    """
    enc = model.encoder
    loaded, meta = load_encoder(path, img_size=enc.img_size[0], pos_embed="recompute",
                                pos_embed_weight=enc.pos_embed_weight)
    ours, theirs = encoder_fields(enc), encoder_fields(loaded)
    wrong = [k for k in ENCODER_FIELDS if k not in ("img_size", "pos_embed_weight") and ours[k] != theirs[k]]
    if wrong:
        raise input_error(f"init checkpoint '{path}'", "an encoder of this run's shape",
                          f"an encoder {meta.fields} ({', '.join(f'{k} {theirs[k]}, not {ours[k]}' for k in wrong)})",
                          "Set the model.* encoder fields to the checkpoint's (e.g. model.depth)")
    weights = loaded.state_dict()
    enc.load_state_dict(weights)
    return {"path": str(path), "tensors": len(weights) - 1,
            "checkpoint_pos_embed_weight": meta.fields.get("pos_embed_weight")}


def load_seg_model(path: str | Path, device: str | torch.device = "cpu") -> SupervisedSegmenter:
    """A trained baseline from its fine-tuning checkpoint (config and weights), in eval mode."""
    state = load_checkpoint(path, map_location=device)
    cfg = from_dict(SegFinetuneConfig, state.get("config"))
    model = build_seg_model(cfg)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------
# labels and data




def build_label_sampler(cfg: SegFinetuneConfig, rank: int = 0) -> PlaneCropSampler:
    """Crop sampler returning ``(imgs (B, 1, F, F), labels (B, F, F))`` batches."""
    d = cfg.data
    images, labels = load_labelled_volumes(d, cfg.labels, cfg.num_classes, cfg.ignore_index)
    return PlaneCropSampler(
        images, fov=cfg.model.img_size, planes=tuple(d.planes), pad=d.pad, pad_mode=d.pad_mode,
        min_crop_frac=d.min_crop_frac, flip_p=d.flip_p, normalize=d.normalize, percentiles=tuple(d.percentiles),
        seed=cfg.train.seed, rank=rank, label_volumes=labels, ignore_index=cfg.ignore_index)


# ----------------------------------------------------------------------------------------------------------
# objective


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over labelled pixels; 0 (not NaN) when none is labelled.

    logits: (N, n_cls, H, W); labels: (N, H, W) int64. Returns ``(loss, number of labelled pixels)``.
    """
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum()
    return total / count.clamp(min=1), count


class SegmentationObjective(Objective):
    """Cross-entropy on the labelled pixels of ``(imgs, labels)`` batches; logs pixel accuracy there."""

    name = "finetune"
    figure_name = "segmentation"

    def __init__(self, model: nn.Module, ignore_index: int = 255) -> None:
        super().__init__(model)
        self.ignore_index = ignore_index

    def loss(self, module: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        imgs, labels = batch
        logits = module(imgs)
        loss, count = masked_cross_entropy(logits, labels, self.ignore_index)
        with torch.no_grad():
            correct = ((logits.argmax(1) == labels) & (labels != self.ignore_index)).sum()
            n = float(count)
        return loss, {"pixel_acc": float(correct) / max(n, 1.0), "labelled_frac": n / labels.numel()}

    @torch.no_grad()
    def save_figure(self, batch: Any, path: Path) -> None:
        from micromae.figures import plt, save_figure  # local: this method shares the helper's name

        model = unwrap(self.model)
        imgs, labels = batch[0][:4].float(), batch[1][:4]
        with eval_mode(model):
            pred = model(imgs).argmax(1).cpu().numpy()
        labels = np.ma.masked_equal(labels.cpu().numpy(), self.ignore_index)
        k = max(model.num_classes - 1, 1)
        fig, axes = plt.subplots(len(imgs), 3, figsize=(6, 2.1 * len(imgs)), squeeze=False)
        for i in range(len(imgs)):
            for j, (im, kw) in enumerate(((imgs[i, 0].cpu().numpy(), dict(cmap="gray", vmin=0, vmax=1)),
                                          (labels[i], dict(cmap="tab10", vmin=0, vmax=k)),
                                          (pred[i], dict(cmap="tab10", vmin=0, vmax=k)))):
                axes[i, j].imshow(im, interpolation="nearest", **kw)
                axes[i, j].set_axis_off()
                if i == 0:
                    axes[i, j].set_title(("input", "labels (blank: ignored)", "prediction")[j], fontsize=8)
        save_figure(fig, path)


def build_seg_run(cfg: SegFinetuneConfig, ctx: RunContext) -> RunPlan:
    """Label crops, the baseline (encoder from ``cfg.init`` unless resuming) and its objective."""
    sampler = build_label_sampler(cfg, rank=ctx.info.rank)
    model = build_seg_model(cfg)
    loaded = None
    if cfg.init != "random" and ctx.resume_from is None:  # a resumed run gets its weights from the checkpoint
        loaded = load_encoder_weights(model, cfg.init)
    n_params = sum(p.numel() for p in model.parameters())
    messages = [f"device {ctx.device}, world size {ctx.info.world_size}; {cfg.head} baseline {n_params / 1e6:.2f} M "
                f"parameters; encoder init {cfg.init}; run dir {ctx.run_dir}"]
    if loaded:
        messages.append(f"loaded {loaded['tensors']} encoder tensors; pos_embed recomputed at weight "
                        f"{cfg.model.pos_embed_weight} (checkpoint: {loaded['checkpoint_pos_embed_weight']})")

    def open_stream(start: int):
        return make_loader(sampler, cfg.train.batch_size, start_step=start,
                           num_workers=cfg.data.num_workers, pin_memory=ctx.device.type == "cuda")

    return RunPlan(SegmentationObjective(model, cfg.ignore_index), open_stream, cfg, messages=messages)


def run_seg_finetune(cfg: SegFinetuneConfig, run_dir: str | Path, resume: str | None = None,
                     stop_after: int | None = None) -> TrainResult:
    """Train a supervised baseline; writes config.yaml, log.jsonl, tb/, checkpoints/, figures/ in run_dir."""
    return run_training(cfg, run_dir, resume, stop_after, check_seg_config, lambda ctx: build_seg_run(cfg, ctx))

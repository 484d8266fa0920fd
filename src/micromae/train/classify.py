"""Cell-type classification fine-tuning (DAMA.md §2; MAE's fine-tuning recipe). Used by ``micromae finetune``
for configs with ``task: classification`` and, per fold, by ``micromae evaluate classification``.

The model is :class:`~micromae.models.heads.classifier.ViTClassifier`: an encoder initialised at random
(``init: random``, shape from the ``model`` section) or from any micromae encoder (``init:`` a pre-training
or fine-tuning checkpoint, ``init_branch`` picking DAMA's branch, or an exported ``.safetensors``; the shape
then comes from the checkpoint and the resolved ``model`` section is saved with the run). Recipe:
lr = ``blr`` × effective batch / 256; AdamW over layer-wise lr-decay groups
(:mod:`micromae.train.layer_decay`: patch embedding lowest, head at the full rate); linear warm-up then
cosine to ``min_lr``; stochastic depth ``drop_path``; timm's ``Mixup`` (mixup / cutmix, label smoothing
folded into the soft targets) with ``SoftTargetCrossEntropy``, or ``LabelSmoothingCrossEntropy`` without
mixing. Lengths are given in ``epochs`` (passes over the train part; the paper's unit) or, when ``epochs``
is null, in optimiser ``steps``.

Train / test parts: ``data.train_files`` (paths relative to ``data.root``; empty = every crop not in
``data.test_files``) and ``data.test_files`` (scored at the end into ``RUN_DIR/eval.json``).
"""

from __future__ import annotations

import json
import math
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from micromae.config import ModelConfig, TrainConfig, from_dict, load_config, to_dict
from micromae.config_tasks import ClassifyConfig, ClassifyDataConfig, ClassifyModelConfig, ClassifyTrainConfig
from micromae.data.channel_norm import check_normalize
from micromae.errors import input_error
from micromae.io import atomic_path
from micromae.models import ViTEncoder
from micromae.models.heads.classifier import ViTClassifier
from micromae.models.pretrained import ENCODER_FIELDS, encoder_fields, input_normalization, load_encoder
from micromae.runtime import say
from micromae.train.checkpoint import load_checkpoint
from micromae.train.classify_data import (LabelledCrops, accuracy_report, crop_stream, load_labelled_crops, predict,
                                          select_files)
from micromae.train.engine import Objective, TrainResult
from micromae.train.layer_decay import build_layer_decay_optimizer
from micromae.train.run import RunContext, RunPlan, run_training


@dataclass
class ClassifyResult(TrainResult):
    test: dict | None = None  # accuracy_report of data.test_files, when given
    model: ViTClassifier | None = None


def check_classify_config(cfg: ClassifyConfig) -> None:
    """Raise MicromaeInputError for values the dataclass types cannot rule out (the coercer checks the
    choices: ``task``, ``init_branch``, ``train.amp``, ``train.schedule``, ``data.normalize``)."""
    t = cfg.train
    check_unused_fields(cfg)
    check_normalize(cfg.data.normalize, cfg.data.percentiles)
    for name, value, low, high in (("mixup", t.mixup, 0, 100), ("cutmix", t.cutmix, 0, 100),
                                   ("mixup_prob", t.mixup_prob, 0, 1), ("mixup_switch_prob", t.mixup_switch_prob, 0, 1),
                                   ("smoothing", t.smoothing, 0, 0.99), ("drop_path", t.drop_path, 0, 0.99)):
        if not low <= value <= high:
            raise input_error(f"train.{name}", f"a number in [{low}, {high}]", repr(value), "See classify_brain.yaml")
    if t.epochs is not None and t.epochs <= 0 or t.steps < 1 or t.batch_size < 1 or t.accum_steps < 1:
        raise input_error("train.epochs / steps / batch_size / accum_steps", "positive numbers",
                          f"{t.epochs} / {t.steps} / {t.batch_size} / {t.accum_steps}", "Fix the train section")
    if uses_mixup(cfg) and t.batch_size % 2:
        raise input_error("train.batch_size", "an even number (timm's Mixup pairs each crop with another)",
                          str(t.batch_size), f"Set train.batch_size={t.batch_size + 1} or train.mixup=0 cutmix=0")


def check_unused_fields(cfg: ClassifyConfig) -> None:
    """Refuse a non-default value in a ``ModelConfig`` / ``TrainConfig`` field classification does not use:
    the decoder and masking fields, ``model.drop_path_rate`` (``train.drop_path`` is the classifier's),
    ``train.no_decay_bias_norm`` (layer-decay groups always exclude them) and ``train.figure_every``."""
    model_default, train_default = ClassifyModelConfig(), ClassifyTrainConfig()
    unused = [f"model.{k}" for k in (f.name for f in dataclasses.fields(ModelConfig))
              if k not in ENCODER_FIELDS and getattr(cfg.model, k) != getattr(model_default, k)]
    unused += [f"train.{k}" for k in ("no_decay_bias_norm", "figure_every")
               if getattr(cfg.train, k) != getattr(train_default, k)]
    if unused:
        raise input_error(", ".join(unused), "their defaults (classification does not use them)",
                          ", ".join(f"{k}={getattr(getattr(cfg, k.split('.')[0]), k.split('.')[1])!r}" for k in unused),
                          "Remove them (for stochastic depth set train.drop_path)")


def uses_mixup(cfg: ClassifyConfig) -> bool:
    return cfg.train.mixup_prob > 0 and (cfg.train.mixup > 0 or cfg.train.cutmix > 0)


def load_classify_config(path: str | Path, overrides: list[str] | None = None) -> ClassifyConfig:
    """Read a classification preset (``configs/classify_*.yaml``) with ``key=value`` overrides, checked."""
    cfg = load_config(path, ClassifyConfig, overrides)
    check_classify_config(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------------------
# model, schedule, objective


def build_encoder(cfg: ClassifyConfig) -> tuple[ViTEncoder, dict[str, Any]]:
    """The encoder of ``cfg.init`` (random or loaded, see :func:`load_encoder`) at ``data.size``."""
    if cfg.init == "random":
        fields = {k: getattr(cfg.model, k) for k in ENCODER_FIELDS}
        if cfg.data.size is not None:
            fields["img_size"] = cfg.data.size
        return ViTEncoder(**fields, drop_path_rate=cfg.train.drop_path), {"init": "random"}
    encoder, meta = load_encoder(cfg.init, branch=cfg.init_branch, img_size=cfg.data.size, pos_embed="interpolate",
                                 drop_path_rate=cfg.train.drop_path)
    return encoder, meta.provenance


def check_channels(encoder: ViTEncoder, crops: LabelledCrops, init: str) -> None:
    if encoder.in_chans != crops.num_channels:
        raise input_error(f"encoder ({init})", f"as many input channels as the crops of '{crops.root}' "
                          f"({crops.num_channels}: {', '.join(crops.channel_names)})",
                          f"{encoder.in_chans} channels",
                          "Pick the panel the encoder was trained on with data.channels=[...], or use a "
                          "checkpoint (or model.in_chans for init=random) with this many channels")


def engine_config(cfg: ClassifyConfig, n_train: int, world_size: int = 1) -> TrainConfig:
    """The engine's :class:`TrainConfig`: steps and warm-up from epochs, lr from blr (module docstring)."""
    t = cfg.train
    batch = t.batch_size * t.accum_steps * world_size
    steps, warmup = t.steps, t.warmup_steps
    if t.epochs is not None:
        per_epoch = max(1, n_train // batch)
        steps, warmup = max(1, math.ceil(t.epochs * per_epoch)), round(t.warmup_epochs * per_epoch)
    lr = t.lr if t.lr is not None else t.blr * batch / 256
    return TrainConfig(steps=steps, batch_size=t.batch_size, lr=lr, weight_decay=t.weight_decay, betas=list(t.betas),
                       no_decay_bias_norm=True, schedule=t.schedule, warmup_steps=min(warmup, steps),
                       min_lr=min(t.min_lr, lr), grad_clip=t.grad_clip, accum_steps=t.accum_steps, amp=t.amp,
                       device=t.device, seed=t.seed, log_every=t.log_every, ckpt_every=t.ckpt_every,
                       figure_every=0, keep_checkpoints=t.keep_checkpoints)


def build_classify_optimizer(model: ViTClassifier, tcfg: TrainConfig, layer_decay: float) -> torch.optim.AdamW:
    """AdamW over layer-decay groups: head and ``fc_norm`` at ``lr``, patch embedding at
    ``lr × layer_decay ** (depth + 1)``."""
    return build_layer_decay_optimizer(model, model.encoder, tcfg.lr, tcfg.weight_decay, layer_decay,
                                       betas=tuple(tcfg.betas))


class ClassifyObjective(Objective):
    """Cross-entropy of the classifier on (mixed) batches ``(imgs (B, C, S, S), labels (B,))``."""

    name = "classify"

    def __init__(self, model: ViTClassifier, cfg: ClassifyConfig) -> None:
        super().__init__(model)
        t = cfg.train
        self.mixup = None
        if uses_mixup(cfg):
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                               switch_prob=t.mixup_switch_prob, label_smoothing=t.smoothing,
                               num_classes=model.num_classes)
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.layer_decay = t.layer_decay
        self.soft_loss = SoftTargetCrossEntropy()
        self.hard_loss = LabelSmoothingCrossEntropy(t.smoothing) if t.smoothing > 0 else torch.nn.CrossEntropyLoss()

    def build_optimizer(self, cfg: TrainConfig) -> torch.optim.AdamW:
        return build_classify_optimizer(self.model, cfg, self.layer_decay)

    def loss(self, module: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        imgs, labels = batch
        if self.mixup is not None:
            mixed, targets = self.mixup(imgs, labels)
            logits = module(mixed)
            loss = self.soft_loss(logits.float(), targets)
        else:
            logits = module(imgs)
            loss = self.hard_loss(logits.float(), labels)
        acc = (logits.detach().argmax(-1) == labels).float().mean()  # against the unmixed labels
        return loss, {"train_acc": float(acc)}


# ----------------------------------------------------------------------------------------------------------
# run


def split_parts(cfg: ClassifyConfig, crops: LabelledCrops) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the train and test crops (``data.train_files`` / ``data.test_files``)."""
    test = select_files(crops, cfg.data.test_files, "data.test_files")
    if cfg.data.train_files:
        train = select_files(crops, cfg.data.train_files, "data.train_files")
    else:
        train = np.setdiff1d(np.arange(len(crops)), test)
    if np.intersect1d(train, test).size:
        raise input_error("data.train_files / data.test_files", "disjoint parts", "files in both",
                          "Remove the test crops from the train part")
    missing = [c for k, c in enumerate(crops.classes) if not (crops.labels[train] == k).any()]
    if missing:
        raise input_error("train part", "at least one crop of every class", f"none of {missing}",
                          "Use a split that keeps every class in the train part (a stratified split)")
    return train, test


def resolve_config(cfg: ClassifyConfig, encoder: ViTEncoder, crops: LabelledCrops) -> ClassifyConfig:
    """``cfg`` with the encoder's real shape in ``model`` and the class list filled in (saved with the run)."""
    if cfg.num_classes is not None and cfg.num_classes != len(crops.classes):
        raise input_error("num_classes", f"the number of class folders in '{crops.root}' ({len(crops.classes)})",
                          str(cfg.num_classes), "Set num_classes=null to take it from the folder")
    fields = encoder_fields(encoder)
    data = from_dict(ClassifyDataConfig, {**to_dict(cfg.data), "classes": list(crops.classes)})
    return from_dict(ClassifyConfig, {**to_dict(cfg), "model": fields, "data": to_dict(data),
                                      "num_classes": len(crops.classes)})


def build_classify_run(cfg: ClassifyConfig, ctx: RunContext, crops: LabelledCrops | None = None) -> RunPlan:
    """Encoder, crops (read at the encoder's side unless given), train / test parts, classifier and objective;
    the finish step scores the test part into ``eval.json``."""
    info, run_dir = ctx.info, ctx.run_dir
    encoder, origin = build_encoder(cfg)
    if crops is None:
        if cfg.data.root is None:
            raise input_error("data.root", "a folder of class sub-folders of crops", "nothing",
                              "Set data.root=/path/to/cells (e.g. the cells/ folder of micromae data synth-mif)")
        # the config's scaling; with channel_stats as in pre-training, the encoder's stored per-channel ranges
        norm = input_normalization(cfg.init, cfg.data.normalize, cfg.data.percentiles, who="init")
        crops = load_labelled_crops(cfg.data.root, encoder.img_size[0], cfg.data.axes, cfg.data.channels,
                                    cfg.data.classes, cfg.data.normalize, cfg.data.percentiles, ranges=norm.ranges)
    check_channels(encoder, crops, cfg.init)
    if tuple(crops.images.shape[-2:]) != encoder.img_size:
        raise input_error("crops", f"side {encoder.img_size[0]} (the model's input)",
                          str(tuple(crops.images.shape[-2:])), "Read the crops at the model's size")
    cfg = resolve_config(cfg, encoder, crops)
    train_idx, test_idx = split_parts(cfg, crops)
    tcfg = engine_config(cfg, len(train_idx), info.world_size)
    model = ViTClassifier(encoder, len(crops.classes))
    config_dict = {**to_dict(cfg), "resolved_train": to_dict(tcfg), "init_info": origin}
    message = (f"classification: {len(train_idx)} train / {len(test_idx)} test crops, classes {crops.classes}; "
               f"init {cfg.init}; {tcfg.steps} steps, lr {tcfg.lr:.3g}; device {ctx.device}")
    images, labels = crops.images[train_idx], crops.labels[train_idx]

    def open_stream(start: int):
        return crop_stream(images, labels, cfg.train.batch_size, start, cfg.train.seed, cfg.data.augment,
                           info.rank, info.world_size)

    def finish(result: TrainResult) -> ClassifyResult:
        test = None
        if len(test_idx) and result.step >= tcfg.steps:
            test = accuracy_report(predict(model, crops.images[test_idx]), crops.labels[test_idx], crops.classes)
            if info.is_main:
                with atomic_path(run_dir / "eval.json", overwrite=True) as tmp:
                    tmp.write_text(json.dumps({**test, "step": result.step, "test_files": len(test_idx)}, indent=2))
                say(f"test accuracy {test['accuracy']:.4f} on {len(test_idx)} crops")
        return ClassifyResult(result.step, result.last_loss, result.run_dir, result.checkpoint, test, model)

    return RunPlan(ClassifyObjective(model, cfg), open_stream, cfg, messages=[message], train_cfg=tcfg,
                   config_dict=config_dict, finish=finish)


def run_classify_finetune(cfg: ClassifyConfig, run_dir: str | Path, resume: str | None = None,
                          stop_after: int | None = None, crops: LabelledCrops | None = None) -> ClassifyResult:
    """Fine-tune a classifier; writes config.yaml, log.jsonl, tb/, checkpoints/ and (with test files)
    eval.json in ``run_dir``. ``crops``: already-read crops at the right size (the protocol passes them).
    numpy's global generator is seeded too: timm's Mixup draws from it."""
    return run_training(cfg, run_dir, resume, stop_after, check_classify_config,
                        lambda ctx: build_classify_run(cfg, ctx, crops), seed_numpy=True)


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[ViTClassifier, ClassifyConfig]:
    """A fine-tuned classifier and its resolved config from a fine-tuning checkpoint, in eval mode."""
    state = load_checkpoint(path, map_location=device)
    raw = {k: v for k, v in (state.get("config") or {}).items() if k not in ("resolved_train", "init_info")}
    cfg = from_dict(ClassifyConfig, raw)
    if cfg.num_classes is None:
        raise input_error(f"checkpoint '{path}'", "a classification fine-tuning checkpoint", "no num_classes",
                          "Pass RUN_DIR/checkpoints/last.pt of micromae finetune classify_*")
    model = ViTClassifier(ViTEncoder.from_config(cfg.model), cfg.num_classes)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg

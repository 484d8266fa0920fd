"""The fine-tuning config trees (``micromae.config_tasks``): one base, ``Literal`` choices checked by the
coercer, classification's ``ModelConfig`` / ``TrainConfig`` sections, and old files that still load."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest
import yaml

from micromae.config import ModelConfig, TrainConfig, resolve_config
from micromae.config_tasks import (ClassifyConfig, ClassifyModelConfig, FinetuneConfig, Head, MaskRCNNConfig,
                                   SegFinetuneConfig)
from micromae.errors import MicromaeInputError


def test_every_task_config_is_a_finetune_config_with_model_and_train_sections():
    for cls in (SegFinetuneConfig, ClassifyConfig, MaskRCNNConfig):
        cfg = cls()
        assert isinstance(cfg, FinetuneConfig) and cfg.init == "random"
        assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)


def test_literal_choices_match_what_the_trainers_accept():
    from micromae.models.heads import HEADS

    assert typing.get_args(Head) == tuple(HEADS)


@pytest.mark.parametrize("load, preset, override, listed", [
    ("seg", "segmenter_tiny", "labels.partial=random", "none, slices, blocks"),
    ("seg", "segmenter_tiny", "labels.slice_axis=W", "Z, Y, X"),
    ("seg", "segmenter_tiny", "head=unet", "segmenter, vit_decoder"),
    ("instances", "maskrcnn_tiny", "inference=sliding", "whole, tiles"),
    ("instances", "maskrcnn_tiny", "data.source=files", "coco, synthetic_mif"),
    ("instances", "maskrcnn_tiny", "init_branch=3", "1, 2"),
    ("classification", "classify_tiny", "train.amp=fp16", "auto, bf16, off"),
    ("classification", "classify_tiny", "init_branch=0", "1, 2"),
])
def test_a_bad_choice_is_refused_with_the_valid_ones(load, preset, override, listed):
    from micromae.train.classify import load_classify_config
    from micromae.train.maskrcnn import load_maskrcnn_config
    from micromae.train.seg_finetune import load_seg_finetune_config

    loader = {"seg": load_seg_finetune_config, "classification": load_classify_config,
              "instances": load_maskrcnn_config}[load]
    with pytest.raises(MicromaeInputError, match=override.split("=")[0]) as err:
        loader(resolve_config(preset), [override, "data.annotations=x.json"] if load == "instances" else [override])
    assert listed in str(err.value)


def test_classification_refuses_fields_it_does_not_use_and_honours_the_schedule():
    from micromae.train.classify import engine_config, load_classify_config

    path = resolve_config("classify_tiny")
    for override in ("model.decoder_depth=3", "model.mask_ratio=0.9", "model.drop_path_rate=0.2",
                     "train.figure_every=10", "train.no_decay_bias_norm=false"):
        with pytest.raises(MicromaeInputError, match=override.split("=")[0].replace(".", r"\.")):
            load_classify_config(path, [override])
    assert engine_config(load_classify_config(path, ["train.schedule=constant"]), 64).schedule == "constant"


def test_a_classify_config_of_the_old_key_set_gives_the_same_run(tmp_path):
    """A ``config.yaml`` written before the model section was a ``ModelConfig`` (the old ``EncoderConfig``
    and ``ClassifyTrainConfig`` keys) loads and gives the same encoder and engine settings."""
    from micromae.train.classify import engine_config, load_classify_config

    old = {"name": "old", "task": "classification", "init": "random", "init_branch": 1, "num_classes": None,
           "model": {"img_size": 32, "patch_size": 4, "in_chans": 7, "embed_dim": 64, "depth": 4, "num_heads": 4,
                     "mlp_ratio": 2.0, "qkv_bias": True, "pos_embed_weight": 1.0},
           "train": {"epochs": None, "warmup_epochs": 5.0, "steps": 40, "warmup_steps": 4, "batch_size": 8,
                     "accum_steps": 1, "blr": 5e-4, "lr": None, "min_lr": 1e-6, "layer_decay": 0.65,
                     "weight_decay": 0.05, "betas": [0.9, 0.999], "drop_path": 0.1, "mixup": 0.0, "cutmix": 0.0,
                     "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "smoothing": 0.1, "grad_clip": 0.0,
                     "amp": "auto", "device": "auto", "seed": 0, "log_every": 10, "ckpt_every": 500,
                     "keep_checkpoints": 2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = load_classify_config(tmp_path / "config.yaml")
    assert cfg.model == ClassifyModelConfig() and cfg.train.drop_path == 0.1
    assert engine_config(cfg, 100) == TrainConfig(
        steps=40, batch_size=8, lr=5e-4 * 8 / 256, weight_decay=0.05, betas=[0.9, 0.999], no_decay_bias_norm=True,
        schedule="cosine", warmup_steps=4, min_lr=1e-6, grad_clip=0.0, accum_steps=1, amp="auto", device="auto",
        seed=0, log_every=10, ckpt_every=500, figure_every=0, keep_checkpoints=2)


def test_config_tasks_imports_no_torch():
    code = "import sys, micromae.config_tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

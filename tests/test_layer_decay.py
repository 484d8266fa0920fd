"""Layer-wise lr decay: which parameter gets which lr scale, and the scheduler keeps the ratios."""

from __future__ import annotations

import pytest
from torch import nn

from micromae.config import TrainConfig
from micromae.errors import MicromaeInputError
from micromae.models import ViTEncoder
from micromae.train.layer_decay import build_layer_decay_optimizer, encoder_layer_id, layer_decay_groups
from micromae.train.optim import build_scheduler


class Classifier(nn.Module):
    def __init__(self, depth: int = 3):
        super().__init__()
        self.encoder = ViTEncoder(img_size=16, patch_size=4, in_chans=2, embed_dim=16, depth=depth, num_heads=2)
        self.head = nn.Linear(16, 5)


def test_layer_ids_follow_the_dama_numbering():
    depth = 3
    assert encoder_layer_id("patch_embed.proj.weight", depth) == 0
    assert encoder_layer_id("cls_token", depth) == 0
    assert encoder_layer_id("blocks.0.attn.qkv.weight", depth) == 1
    assert encoder_layer_id("blocks.2.mlp.fc2.bias", depth) == 3
    assert encoder_layer_id("norm.weight", depth) == depth + 1


def test_each_parameter_gets_its_layer_scale():
    model, decay = Classifier(depth=3), 0.5
    groups = layer_decay_groups(model, model.encoder, lr=1.0, weight_decay=0.05, layer_decay=decay)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["encoder.patch_embed.proj.weight"] == decay ** 4
    assert scale["encoder.blocks.0.attn.qkv.weight"] == decay ** 3
    assert scale["encoder.blocks.2.attn.qkv.weight"] == decay ** 1
    assert scale["head.weight"] == 1.0
    assert scale["encoder.norm.weight"] == 1.0
    # every trainable parameter lands in exactly one group, with lr = base lr x scale
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(g["lr"] == g["lr_scale"] for g in groups)
    assert wd["head.weight"] == 0.05 and wd["head.bias"] == 0.0 and wd["encoder.blocks.1.norm1.weight"] == 0.0


def test_scheduler_keeps_the_ratios_between_groups():
    model = Classifier(depth=2)
    opt = build_layer_decay_optimizer(model, model.encoder, lr=1e-3, weight_decay=0.0, layer_decay=0.65)
    sched = build_scheduler(opt, TrainConfig(steps=10, warmup_steps=2, lr=1e-3, schedule="cosine"))
    for _ in range(4):
        opt.step()
        sched.step()
    top = max(opt.param_groups, key=lambda g: g["lr_scale"])
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(top["lr"] * g["lr_scale"], rel=1e-9)
    assert 0 < top["lr"] < 1e-3


def test_frozen_parameters_are_left_out_and_bad_decay_is_rejected():
    model = Classifier()
    model.encoder.patch_embed.proj.weight.requires_grad_(False)
    names = [n for g in layer_decay_groups(model, model.encoder, 1.0, 0.0, 0.7) for n in g["names"]]
    assert "encoder.patch_embed.proj.weight" not in names and "head.weight" in names
    with pytest.raises(MicromaeInputError, match="layer_decay"):
        layer_decay_groups(model, model.encoder, 1.0, 0.0, 1.5)

"""Config: YAML round trip, dotted overrides, rejection of unknown keys and wrong types, presets."""

from __future__ import annotations

import pytest
import yaml

from micromae.config import (PretrainConfig, apply_overrides, config_keys, from_dict, list_presets, load_config,
                             resolve_config, save_config)
from micromae.errors import MicromaeInputError


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(PretrainConfig(), ["train.steps=7", "model.mask_ratio=0.6", "data.planes=[YX]"])
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back == cfg
    assert back.train.steps == 7 and back.model.mask_ratio == 0.6 and back.data.planes == ["YX"]


def test_overrides_parse_types():
    cfg = apply_overrides(PretrainConfig(), ["train.lr=3e-4", "model.qkv_bias=false", "data.axes=null",
                                             "train.betas=[0.9, 0.95]", "model.mask_ratio=1"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.qkv_bias is False
    assert cfg.data.axes is None
    assert cfg.train.betas == [0.9, 0.95]
    assert isinstance(cfg.model.mask_ratio, float)  # int promoted to float


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=5", "train.steps"),           # unknown key: the message lists the valid ones
    ("train.steps=abc", "int"),                 # wrong type
    ("model.qkv_bias=3", "bool"),
    ("train.steps", "key=value"),               # no '='
    ("train.schedule=linear", "cosine"),        # not one of the choices
])
def test_bad_overrides_are_rejected(override, needle):
    with pytest.raises(MicromaeInputError) as err:
        apply_overrides(PretrainConfig(), [override])
    assert needle in str(err.value)
    assert "expected" in str(err.value)


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"model": {"embed_dimm": 8}}))
    with pytest.raises(MicromaeInputError, match="model.embed_dim"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(MicromaeInputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_section_must_be_mapping():
    with pytest.raises(MicromaeInputError, match="model"):
        from_dict(PretrainConfig, {"model": 3})


def test_paper_preset_has_the_papers_numbers():
    cfg = load_config(resolve_config("maester_betaseg"))
    m, t, d = cfg.model, cfg.train, cfg.data
    assert (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.mlp_ratio) == (80, 5, 192, 14, 1, 2.0)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads, m.decoder_mlp_ratio) == (128, 7, 8, 2.0)
    assert m.pos_embed_weight == 0.08 and m.decoder_pos_embed_weight == 1.0
    assert m.mask_ratio == 0.5 and m.norm_pix_loss is False
    assert (t.lr, t.weight_decay, t.betas, t.batch_size) == (1.5e-4, 1e-5, [0.9, 0.999], 32)
    assert t.steps * t.batch_size == 5_600_000  # the supplement's 5.6 M crops
    assert d.planes == ["YX", "ZX", "ZY"] and d.pad == 4 and d.min_crop_frac == 0.5 and d.flip_p == 0.5


def test_every_preset_loads():
    from micromae.config import finetune_task
    from micromae.config_tasks import ClassifyConfig, MaskRCNNConfig, SegFinetuneConfig
    from micromae.train.classify import load_classify_config
    from micromae.train.maskrcnn import load_maskrcnn_config
    from micromae.train.seg_finetune import load_seg_finetune_config

    presets = list_presets()
    assert {"maester_betaseg", "maester_tiny", "segmenter_tiny", "vitdec_betaseg", "dama_brain", "dama_tiny",
            "classify_tiny", "classify_brain", "maskrcnn_tiny", "maskrcnn_brain", "simmim_tiny",
            "mocov3_tiny"} <= set(presets)
    loaders = {"segmentation": (load_seg_finetune_config, SegFinetuneConfig),
               "classification": (load_classify_config, ClassifyConfig),
               "instances": (load_maskrcnn_config, MaskRCNNConfig)}
    for name in presets:
        path = resolve_config(name)
        if name.startswith(("maester", "dama", "simmim", "mocov3")):
            assert isinstance(load_config(path), PretrainConfig)
        else:
            load, cls = loaders[finetune_task(path)]
            needs = ["data.annotations=train.json"] if name == "maskrcnn_brain" else []  # its data: the user's
            cfg = load(path, needs)
            assert isinstance(cfg, cls) and cfg.name == name


def test_config_keys_are_dotted_and_complete():
    keys = config_keys()
    assert "train.steps" in keys and "model.pos_embed_weight" in keys and "data.planes" in keys
    assert "name" in keys and not any(k.endswith(".") for k in keys)


@pytest.mark.parametrize("task", ["pretrain", "segmentation", "classification", "instances"])
def test_every_tasks_keys_are_dotted_complete_and_overridable(task):
    """Every key of every task's config has a default and takes an override of that default."""
    from micromae.cli import TASK_CONFIGS, task_config_class
    from micromae.config import FINETUNE_TASKS, to_dict

    assert set(TASK_CONFIGS) == {"pretrain", *FINETUNE_TASKS}
    cls = task_config_class(task)
    keys, defaults = config_keys(cls), to_dict(cls())
    assert "name" in keys and "train.seed" in keys and not any(k.endswith(".") for k in keys)
    for key in keys:
        node = defaults
        for part in key.split("."):
            node = node[part]
        assert to_dict(apply_overrides(cls(), [f"{key}={yaml.safe_dump(node, default_flow_style=True).strip()}"
                                              .replace("\n...", "")])) == defaults, key


def test_dama_paper_preset_has_the_papers_numbers():
    cfg = load_config(resolve_config("dama_brain"))
    m, t, d = cfg.model, cfg.train, cfg.dama
    assert cfg.objective == "dama" and m.in_chans == 7 and m.img_size == 128 and m.patch_size == 16
    assert (m.embed_dim, m.depth, m.num_heads, m.mlp_ratio) == (768, 12, 12, 4.0)
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == (512, 8, 16)
    assert m.mask_ratio == 0.8 and m.norm_pix_loss
    assert (d.config, d.masking, d.overlap_ratio, d.K, d.beta, d.alpha) == ("student1-student2", "adaptive", 0.5, 6,
                                                                            2.0, 1.0)
    assert t.batch_size == 512 and t.lr == pytest.approx(1.5e-4 * 512 / 256) and t.betas == [0.9, 0.95]
    assert t.weight_decay == 0.05 and t.no_decay_bias_norm and t.schedule == "cosine" and t.min_lr == 0.0
    assert t.warmup_steps / t.steps == pytest.approx(40 / 500, rel=0.01)  # 40 of 500 epochs


def test_config_paths_named_in_the_readme_exist():
    """Every ``configs/<name>.yaml`` the README shows resolves from the repository root (``configs`` links to
    the shipped presets)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"configs/[a-z0-9_]+\.yaml", (root / "README.md").read_text()))
    assert named, "the README names no config files"
    missing = [p for p in sorted(named) if not (root / p).is_file()]
    assert not missing, missing

"""Classification fine-tuning: model, encoder loading and pos-embed interpolation, layer decay in the run's
optimiser, overfitting a tiny set, resume, clear errors, and `micromae finetune` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from micromae.cli import main
from micromae.config import apply_overrides, resolve_config
from micromae.errors import MicromaeInputError
from micromae.models import ViTEncoder
from micromae.models.heads.classifier import ViTClassifier
from micromae.models.pretrained import encoder_fields, load_encoder
from micromae.train.checkpoint import load_checkpoint, save_checkpoint
from micromae.train.classify import (build_classify_optimizer, engine_config, load_classifier, load_classify_config,
                                     run_classify_finetune)
from micromae.train.classify_data import load_labelled_crops, predict

QUIET = ["train.device=cpu", "train.log_every=1", "train.ckpt_every=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder(img_size: int = 16, in_chans: int = 7, seed: int = 0, **kw) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(img_size=img_size, patch_size=4, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2,
                      mlp_ratio=2.0, pos_embed_weight=kw.pop("pos_embed_weight", 1.0), **kw)


def fake_pretrain_checkpoint(tmp_path, encoders: dict[str, ViTEncoder], objective: str = "mae"):
    """A checkpoint laid out as micromae pretrain writes it (MAE: encoder.*, DAMA: branch1/branch2.encoder.*)."""
    model = {f"{prefix}{k}": v for prefix, enc in encoders.items() for k, v in enc.state_dict().items()}
    first = next(iter(encoders.values()))
    config = {"objective": objective, "model": encoder_fields(first)}
    return save_checkpoint(tmp_path / objective / "checkpoints", {"model": model, "step": 7, "config": config})


def tiny_cfg(cells, *extra: str):
    return load_classify_config(resolve_config("classify_tiny"), [
        f"data.root={cells}", "data.size=16", "model.img_size=16", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "train.epochs=null", "train.steps=4", "train.batch_size=8", *QUIET, *extra])


def test_classifier_shapes_and_head_init():
    model = ViTClassifier(tiny_encoder(), num_classes=5)
    assert model(torch.rand(3, 7, 16, 16)).shape == (3, 5)
    assert model.head.weight.std() < 1e-4 and torch.all(model.head.bias == 0)
    assert not model.encoder.norm.weight.requires_grad  # fc_norm replaces it after the pool
    with pytest.raises(MicromaeInputError, match="num_classes"):
        ViTClassifier(tiny_encoder(), num_classes=1)


def test_optimizer_uses_layer_decay_groups():
    model = ViTClassifier(tiny_encoder(), num_classes=5)
    opt = build_classify_optimizer(model, engine_config(tiny_cfg("x"), n_train=64), layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0 == max(scale.values())
    assert scale["encoder.patch_embed.proj.weight"] == 0.5 ** 3 == min(scale.values())  # depth 2: layers 0..3
    assert scale["encoder.blocks.1.mlp.fc1.weight"] == 0.5
    assert "encoder.norm.weight" not in scale


def test_pos_embed_interpolation_keeps_matching_positions(tmp_path):
    enc = tiny_encoder(img_size=16, pos_embed_weight=0.5)  # 4 x 4 tokens
    path = fake_pretrain_checkpoint(tmp_path, {"encoder.": enc})
    same, info = load_encoder(path, pos_embed="interpolate")
    assert torch.equal(same.pos_embed, enc.pos_embed) and info.provenance["pretrain_img_size"] == 16
    # 12 x 12 tokens: scale 3, token 1 + 3i sits on old token i
    big, _ = load_encoder(path, img_size=48, pos_embed="interpolate")
    old = enc.pos_embed[0, 1:].reshape(4, 4, -1)
    new = big.pos_embed[0, 1:].reshape(12, 12, -1)
    assert torch.allclose(new[1::3, 1::3], old, atol=1e-5)
    assert torch.equal(big.pos_embed[0, 0], enc.pos_embed[0, 0])  # CLS row kept
    assert not torch.allclose(new[0, 0], old[0, 0])  # other positions are resampled, not copied
    assert torch.equal(big.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
    assert ViTClassifier(big, 5)(torch.rand(2, 7, 48, 48)).shape == (2, 5)  # runs at the new size


def test_encoder_loads_from_dama_branch_and_safetensors(tmp_path):
    from micromae.train.export import export_encoder

    b1, b2 = tiny_encoder(seed=1), tiny_encoder(seed=2)
    path = fake_pretrain_checkpoint(tmp_path, {"branch1.encoder.": b1, "branch2.encoder.": b2}, objective="dama")
    for branch, ref in ((1, b1), (2, b2)):
        enc, info = load_encoder(path, branch=branch, pos_embed="interpolate")
        assert torch.equal(enc.patch_embed.proj.weight, ref.patch_embed.proj.weight)
        assert info.provenance["branch"] == branch
    exported = export_encoder(path, tmp_path / "enc.safetensors", branch=2)
    model = ViTClassifier.from_checkpoint(exported, num_classes=3, img_size=32, drop_path_rate=0.1)
    assert torch.equal(model.encoder.blocks[1].mlp.fc2.weight, b2.blocks[1].mlp.fc2.weight)
    assert model.img_size == (32, 32) and model.init_info["format"] == "safetensors"


def test_classifier_overfits_twenty_crops(cells, tmp_path):
    crops = load_labelled_crops(cells, 16)
    idx = torch.cat([torch.nonzero(crops.labels == k)[:4, 0] for k in range(5)])  # 4 crops per class
    cfg = tiny_cfg(cells, "train.steps=300", "train.batch_size=10", "train.warmup_steps=5", "train.lr=3e-3",
                   "train.mixup=0", "train.cutmix=0", "train.smoothing=0", "train.drop_path=0",
                   "train.layer_decay=1.0", "train.weight_decay=0", "data.augment=false")
    cfg.data.train_files = [crops.files[i] for i in idx.tolist()]
    result = run_classify_finetune(cfg, tmp_path / "run", crops=crops)
    train_acc = (predict(result.model, crops.images[idx]).argmax(-1) == crops.labels[idx]).float().mean()
    assert len(idx) == 20 and train_acc == 1.0


def test_run_uses_layer_decay_and_resumes_bit_exact(cells, tmp_path):
    cfg = tiny_cfg(cells, "train.steps=6", "train.warmup_steps=2", "train.layer_decay=0.6", "train.mixup=0.8",
                   "train.cutmix=1.0", "train.drop_path=0.1")  # every random draw must replay on resume
    straight = run_classify_finetune(cfg, tmp_path / "a")
    run_classify_finetune(cfg, tmp_path / "b", stop_after=3)
    resumed = run_classify_finetune(cfg, tmp_path / "b", resume="auto")
    assert straight.step == resumed.step == 6
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    groups = a["optimizer"]["param_groups"]
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["encoder.patch_embed.proj.weight"] == pytest.approx(0.6 ** 3)
    model, saved = load_classifier(straight.checkpoint)
    assert saved.data.classes == ["astrocyte", "endothelial", "microglia", "neuron", "oligodendrocyte"]
    assert model.num_classes == 5


def test_clear_errors(cells, tmp_path):
    path = fake_pretrain_checkpoint(tmp_path, {"encoder.": tiny_encoder()})
    with pytest.raises(MicromaeInputError, match="input channels"):
        run_classify_finetune(tiny_cfg(cells, f"init={path}", "data.channels=[0,1,2]"), tmp_path / "c")
    with pytest.raises(MicromaeInputError, match="multiple of the checkpoint's patch size 4"):
        run_classify_finetune(tiny_cfg(cells, f"init={path}", "data.size=18"), tmp_path / "p")
    crops = load_labelled_crops(cells, 16)
    cfg = tiny_cfg(cells)
    cfg.data.train_files = [f for f in crops.files if f.startswith("neuron/")]
    with pytest.raises(MicromaeInputError, match="every class"):
        run_classify_finetune(cfg, tmp_path / "s", crops=crops)
    with pytest.raises(MicromaeInputError, match="even number"):
        tiny_cfg(cells, "train.batch_size=7", "train.mixup=0.8")
    with pytest.raises(MicromaeInputError, match="data.root"):
        run_classify_finetune(apply_overrides(tiny_cfg(cells), ["data.root=null"]), tmp_path / "r")


def test_finetune_cli_end_to_end(cells, tmp_path):
    path = fake_pretrain_checkpoint(tmp_path, {"encoder.": tiny_encoder()})
    crops = load_labelled_crops(cells, 16)
    test_files = "[" + ",".join(crops.files[::4]) + "]"
    run = tmp_path / "ft"
    args = ["finetune", "classify_tiny", f"init={path}", f"data.root={cells}", f"data.test_files={test_files}",
            "train.epochs=2", "train.warmup_epochs=1", "train.batch_size=8", *QUIET, "--run-dir", str(run)]
    assert main(args) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["n"] == len(crops.files[::4]) and 0.0 <= report["accuracy"] <= 1.0
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.yaml").is_file()
    assert main(args) == 2  # refuses to start afresh over a run with checkpoints
    assert main(args + ["--resume", "auto"]) == 0

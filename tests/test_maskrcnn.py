"""Mask R-CNN with the ViT backbone: pyramid, losses and gradients, data (crops, LSJ), errors, a short
training that finds bright squares, initialisation from encoder checkpoints, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from micromae.cli import main
from micromae.config import to_dict
from micromae.data.coco import CocoInstanceDataset, instance_batches, target_from_masks
from micromae.data.synthetic_mif import mif_to_coco, write_mif_dataset
from micromae.errors import MicromaeInputError
from micromae.models import ViTEncoder
from micromae.models.heads.maskrcnn import SimpleFeaturePyramid, ViTDetBackbone, build_maskrcnn
from micromae.train.checkpoint import load_checkpoint, save_checkpoint
from micromae.config_tasks import MaskRCNNConfig
from micromae.train.maskrcnn import (init_encoder, load_maskrcnn_config, load_maskrcnn_model,
                                     run_maskrcnn_finetune)

LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder(in_chans: int = 1, img_size: int = 32, patch_size: int = 4, depth: int = 1) -> ViTEncoder:
    return ViTEncoder(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=32, depth=depth,
                      num_heads=2, pos_embed_weight=1.0)


def tiny_model(encoder: ViTEncoder) -> torch.nn.Module:
    return build_maskrcnn(encoder, 1, out_channels=32, anchor_sizes=[8, 16, 32, 64], representation_size=64,
                          mask_head_channels=16, rpn_batch_size_per_image=64, box_batch_size_per_image=32)


def squares(rng: np.random.Generator, size: int = 32, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """2-3 bright, non-touching squares (side 6-10) on black: ``(C, size, size)`` uint16 and instance ids."""
    img, inst = np.zeros((channels, size, size), np.uint16), np.zeros((size, size), np.int32)
    count, target = 0, int(rng.integers(2, 4))
    for _ in range(100):
        s = int(rng.integers(6, 11))
        y, x = (int(v) for v in rng.integers(0, size - s + 1, 2))
        if count == target or inst[max(0, y - 1):y + s + 1, max(0, x - 1):x + s + 1].any():
            continue
        count += 1
        inst[y:y + s, x:x + s] = count
        img[:, y:y + s, x:x + s] = 60000
    return img, inst


def write_squares(root: Path, n: int, seed: int, size: int = 32, channels: int = 1) -> Path:
    """A COCO data set of :func:`squares` images (CYX TIFFs); returns the annotations path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    maps, names = [], []
    for i in range(n):
        img, inst = squares(rng, size, channels)
        tifffile.imwrite(root / "images" / f"{i}.tif", img, metadata={"axes": "CYX"})
        maps.append(inst)
        names.append(f"images/{i}.tif")
    (root / "annotations.json").write_text(json.dumps(mif_to_coco(maps, names)))
    return root / "annotations.json"


def two_targets(size: int = 32) -> list[dict]:
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 4:12, 4:12] = 1
    masks[1, 18:28, 10:20] = 1
    return [target_from_masks(masks[i:i + 1], torch.ones(1, dtype=torch.long)) for i in range(2)]


# ----------------------------------------------------------------------------------------------------------
# model


def test_pyramid_strides_and_channels():
    enc = ViTEncoder(img_size=64, patch_size=16, in_chans=2, embed_dim=64, depth=1, num_heads=2)
    backbone = ViTDetBackbone(enc)
    feats = backbone(torch.rand(2, 2, 64, 96))  # another size than img_size: sin-cos of the 4 x 6 grid
    assert list(feats) == ["0", "1", "2", "3"] and backbone.out_channels == 256
    for (name, f), stride in zip(feats.items(), (4, 8, 16, 32)):
        assert f.shape == (2, 256, 64 // stride, 96 // stride), name
    stride4 = SimpleFeaturePyramid(64, 16).stages[0]  # two transposed convs with LayerNorm + GELU between
    kinds = [type(m).__name__ for m in stride4][:4]
    assert kinds == ["ConvTranspose2d", "LayerNorm2d", "GELU", "ConvTranspose2d"]


def test_pos_embed_is_the_grid_sincos():
    enc = tiny_encoder(img_size=16)
    backbone = ViTDetBackbone(enc)
    same = backbone.pos_embed_for(enc.grid_size, enc.pos_embed)
    assert torch.equal(same, enc.pos_embed[:, 1:])
    bigger = backbone.pos_embed_for((8, 8), enc.pos_embed)  # the 4 x 4 grid is the top-left corner of 8 x 8
    corner = bigger.reshape(8, 8, -1)[:4, :4].reshape(1, 16, -1)
    torch.testing.assert_close(corner, enc.pos_embed[:, 1:])


def test_forward_backward_losses_and_gradients():
    torch.manual_seed(0)
    model = tiny_model(tiny_encoder(in_chans=3)).train()
    losses = model(list(torch.rand(2, 3, 32, 32)), two_targets())
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 40, 48)])[0]  # any size: padded to 32, masks at the input size
    assert out["masks"].shape[1:] == (1, 40, 48) and out["boxes"].shape[1] == 4


def test_build_rejects_bad_arguments():
    enc = tiny_encoder(in_chans=2)
    with pytest.raises(MicromaeInputError, match="image_mean"):
        build_maskrcnn(enc, 1, image_mean=[0.0])
    with pytest.raises(MicromaeInputError, match="anchor_sizes"):
        build_maskrcnn(enc, 1, anchor_sizes=[8, 16])
    with pytest.raises(MicromaeInputError, match="pyramid strides"):
        build_maskrcnn(enc, 1, strides=[3, 8])


# ----------------------------------------------------------------------------------------------------------
# data


def test_dataset_crops_and_jitter_keep_masks_and_boxes_consistent(tmp_path):
    paths = write_mif_dataset(tmp_path / "mif", n_images=2, shape=(64, 64), seed=0)
    ds = CocoInstanceDataset(paths["annotations"], in_chans=7, crop_size=32, scale_range=(0.5, 2.0))
    rng = np.random.default_rng(0)
    seen_empty_drop = False
    for _ in range(20):
        image, target = ds.sample(int(rng.integers(2)), rng)
        assert image.shape == (7, 32, 32) and target["masks"].shape[1:] == (32, 32)
        assert (target["masks"].flatten(1).sum(1) > 0).all()  # instances cut to nothing are dropped
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        seen_empty_drop |= len(target["boxes"]) < len(ds.annotations[1])
    assert seen_empty_drop
    whole, target = ds[0]
    assert whole.shape == (7, 64, 64) and len(target["boxes"]) == len(ds.annotations[1])
    step, (images, targets) = next(instance_batches(ds, 3, start_step=5, seed=1))
    again = next(instance_batches(ds, 3, start_step=5, seed=1))[1]
    assert step == 5 and images.shape == (3, 7, 32, 32) and torch.equal(images, again[0])


def test_dataset_errors(tmp_path):
    ann = write_squares(tmp_path / "sq", 2, seed=0)
    with pytest.raises(MicromaeInputError, match="3 channels"):
        CocoInstanceDataset(ann, in_chans=3)
    data = json.loads(ann.read_text())
    (tmp_path / "sq" / "empty.json").write_text(json.dumps({**data, "annotations": []}))
    with pytest.raises(MicromaeInputError, match="at least one annotation"):
        CocoInstanceDataset(tmp_path / "sq" / "empty.json")
    (tmp_path / "sq" / "images" / "1.tif").unlink()
    with pytest.raises(MicromaeInputError, match="1 missing"):
        CocoInstanceDataset(ann)


# ----------------------------------------------------------------------------------------------------------
# training


def squares_config(ann: Path, steps: int) -> MaskRCNNConfig:
    cfg = load_maskrcnn_config(Path(__file__).parents[1] / "src/micromae/configs/maskrcnn_tiny.yaml", [
        "data.source=coco", f"data.annotations={ann}", "data.crop_size=32", "data.scale_range=[1.0,1.0]",
        "model.in_chans=1", "model.img_size=32", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "detector.out_channels=32", "detector.anchor_sizes=[8,16,32,64]", "detector.representation_size=64",
        "detector.mask_head_channels=16", "detector.rpn_batch_size_per_image=64",
        "detector.box_batch_size_per_image=32", f"train.steps={steps}", "train.lr=2.0e-3", "train.warmup_steps=0",
        "train.schedule=constant", "train.weight_decay=0.0", "train.ckpt_every=0", "train.figure_every=0",
        "train.log_every=50", "train.device=cpu", "layer_decay=0.9"])
    return cfg


def test_short_training_finds_bright_squares(tmp_path):
    from micromae.evaluate.coco import run_evaluate_instances

    torch.manual_seed(0)
    train_ann = write_squares(tmp_path / "train", 16, seed=0)
    test_ann = write_squares(tmp_path / "test", 8, seed=1)
    result = run_maskrcnn_finetune(squares_config(train_ann, 120), tmp_path / "run")
    assert result.step == 120
    state = load_checkpoint(result.checkpoint)
    scales = {g["lr_scale"] for g in state["optimizer"]["param_groups"]}
    assert min(scales) == pytest.approx(0.9 ** 2) and max(scales) == 1.0  # layer decay over 1 block
    metrics = run_evaluate_instances(test_ann, tmp_path / "eval", checkpoint=result.checkpoint, device="cpu")
    assert metrics["bbox"]["mAP50"] > 0.8 and metrics["segm"]["mAP50"] > 0.8
    assert (tmp_path / "eval" / "pr_curves.png").stat().st_size > 0


def test_init_from_pretraining_checkpoints_and_export(tmp_path):
    from micromae.train.export import export_encoder

    cfg = MaskRCNNConfig(init="x")
    for k, v in dict(in_chans=1, img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0,
                     pos_embed_weight=1.0, drop_path_rate=0.0).items():
        setattr(cfg.model, k, v)
    enc1, enc2 = tiny_encoder(), tiny_encoder()
    state = {**{f"branch1.encoder.{k}": v for k, v in enc1.state_dict().items()},
             **{f"branch2.encoder.{k}": v for k, v in enc2.state_dict().items()}}
    ckpt = save_checkpoint(tmp_path / "pre", {"model": state, "step": 1, "config": {"model": to_dict(cfg.model)}})
    for branch, source in ((1, enc1), (2, enc2)):
        cfg.init, cfg.init_branch = str(ckpt), branch
        encoder, origin = init_encoder(cfg)
        assert torch.equal(encoder.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight), origin
    exported = export_encoder(ckpt, tmp_path / "enc.safetensors", branch=2)
    cfg.init = str(exported)
    assert torch.equal(init_encoder(cfg)[0].patch_embed.proj.weight, enc2.patch_embed.proj.weight)
    cfg.init, cfg.model.in_chans = str(ckpt), 7
    with pytest.raises(MicromaeInputError, match="in_chans 1"):
        init_encoder(cfg)
    cfg.model.in_chans, cfg.model.patch_size = 1, 8
    with pytest.raises(MicromaeInputError, match="patch_size"):
        init_encoder(cfg)


def test_checkpoint_channels_must_match_the_data(tmp_path):
    ann = write_squares(tmp_path / "sq", 4, seed=0, channels=2)
    with pytest.raises(MicromaeInputError, match="2 channels"):
        run_maskrcnn_finetune(squares_config(ann, 1), tmp_path / "run")


def test_cli_finetune_then_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["finetune", "maskrcnn_tiny", "data.n_images=2", "data.synthetic_shape=[64,64]", "train.steps=2",
                 "train.batch_size=2", "train.device=cpu", "--run-dir", str(run)]) == 0
    model, cfg = load_maskrcnn_model(run / "checkpoints" / "last.pt")
    assert cfg.num_classes == 1 and cfg.category_ids == [1] and model.backbone.encoder.in_chans == 7
    out = tmp_path / "report"
    assert main(["evaluate", "instances", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--coco",
                 str(run / "synthetic_mif" / "annotations.json"), "--out", str(out), "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm"} and 0.0 <= metrics["segm"]["mAP"] <= 1.0
    assert {p.name for p in out.iterdir()} == {"metrics.json", "report.md", "pr_curves.png", "predictions.json",
                                               "error_analysis.png"}
    assert "mask mAP" in capsys.readouterr().out
    assert main(["evaluate", "instances", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--coco",
                 str(tmp_path / "nope.json"), "--out", str(out)]) == 2

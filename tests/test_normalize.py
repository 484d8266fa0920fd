"""Intensity normalisation of multi-channel images (dtype / percentile / minmax) and its path through every
loader: DAMA pre-training, classification crops, Mask R-CNN's COCO images, and the evaluations that read
images again with the checkpoint's setting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from micromae.config import PretrainConfig, load_config
from micromae.data.channel_norm import dataset_channel_ranges, normalize_channels, scale_to_unit
from micromae.data.multichannel import MultiChannelImageFolder
from micromae.data.synthetic_mif import mif_to_coco
from micromae.errors import MicromaeInputError

CONFIGS = Path(__file__).parents[1] / "src/micromae/configs"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def faint(rng: np.random.Generator, channels: int = 3, size: int = 48) -> np.ndarray:
    """A dim uint16 image ``(C, size, size)``: background ~300, a few cells up to ~3000 (of 65535), one
    brightness per channel."""
    img = rng.normal(300, 20, (channels, size, size))
    yy, xx = np.mgrid[:size, :size]
    for _ in range(4):
        cy, cx = rng.integers(4, size - 4, 2)
        img += (((yy - cy) ** 2 + (xx - cx) ** 2) < 25) * rng.uniform(500, 2700, (channels, 1, 1))
    return np.clip(img, 0, 65535).astype(np.uint16)


def top_is_one(images: torch.Tensor | np.ndarray) -> None:
    """Every channel of every image (..., C, H, W) reaches 1 at its 99.8-th percentile and stays in [0, 1]."""
    x = np.asarray(images, dtype=np.float32)
    flat = x.reshape(-1, x.shape[-3], x.shape[-2] * x.shape[-1])
    assert x.min() >= 0.0 and x.max() == 1.0
    np.testing.assert_allclose(np.percentile(flat, 99.8, axis=-1), 1.0, atol=0.01)
    assert float(np.asarray(flat).mean()) > 0.05  # the faint images averaged < 0.02 by dtype


# ----------------------------------------------------------------------------------------------------------
# the mapping


def test_percentile_mapping_is_exact_on_a_hand_made_array():
    ramp = np.arange(101, dtype=np.uint16).reshape(1, 1, 101)  # percentile p of 0..100 is p
    twice = (ramp * 2).astype(np.uint16)
    out = normalize_channels(np.concatenate([ramp, twice]), "percentile", (10, 90))
    expected = np.clip((np.arange(101) - 10) / 80.0, 0, 1)
    assert out.dtype == np.float32 and out.shape == (2, 1, 101)
    np.testing.assert_allclose(out[0, 0], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1, 0], expected, rtol=0, atol=1e-6)  # per channel: own range
    mm = normalize_channels(np.concatenate([ramp, twice]) + 5, "minmax")
    np.testing.assert_allclose(mm[:, 0], np.tile(np.arange(101) / 100.0, (2, 1)), atol=1e-6)


def test_constant_channel_becomes_zero_not_nan():
    img = np.stack([np.full((8, 8), 1234, np.uint16), np.arange(64, dtype=np.uint16).reshape(8, 8)])
    for mode in ("percentile", "minmax"):
        out = normalize_channels(img, mode)
        assert np.isfinite(out).all() and (out[0] == 0).all() and out[1].max() == 1.0
    assert (normalize_channels(np.zeros((2, 4, 4), np.float32), "percentile") == 0).all()


def test_dtype_mode_is_bit_identical_to_dividing_by_the_type_maximum():
    img = faint(np.random.default_rng(0))
    assert np.array_equal(normalize_channels(img), img.astype(np.float32) / np.float32(65535))
    assert np.array_equal(normalize_channels(img, "dtype"), scale_to_unit(img))
    floats = np.random.default_rng(1).random((2, 5, 5)).astype(np.float32) * 3
    assert np.array_equal(normalize_channels(floats, "dtype"), floats / floats.max())


def test_bad_modes_and_percentiles_are_input_errors():
    img = np.zeros((1, 4, 4), np.uint16)
    with pytest.raises(MicromaeInputError, match="normalize"):
        normalize_channels(img, "zscore")
    for bad in ((99, 1), (-1, 50), (1, 101), (5,)):
        with pytest.raises(MicromaeInputError, match="percentiles"):
            normalize_channels(img, "percentile", bad)


# ----------------------------------------------------------------------------------------------------------
# the loaders


@pytest.fixture
def faint_folder(tmp_path):
    """``images/`` of 3 faint uint16 CYX TIFFs, ``cells/<a|b>/`` of 4 faint crops each, and a COCO file."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    maps, names = [], []
    for i in range(3):
        img = faint(rng)
        tifffile.imwrite(tmp_path / "images" / f"{i}.tif", img, metadata={"axes": "CYX"}, photometric="minisblack")
        inst = np.zeros(img.shape[1:], np.int32)
        inst[10:20, 10:20], inst[30:40, 5:15] = 1, 2
        maps.append(inst)
        names.append(f"images/{i}.tif")
    (tmp_path / "annotations.json").write_text(json.dumps(mif_to_coco(maps, names)))
    for cls in ("a", "b"):
        (tmp_path / "cells" / cls).mkdir(parents=True)
        for i in range(4):
            tifffile.imwrite(tmp_path / "cells" / cls / f"{i}.tif", faint(rng, size=16), metadata={"axes": "CYX"},
                             photometric="minisblack")
    return tmp_path


def test_image_folder_scales_whole_files_as_asked(faint_folder):
    plain = MultiChannelImageFolder(faint_folder / "images")
    assert float(plain.read(0).mean()) < 0.02  # the problem: dtype scaling leaves them faint
    ds = MultiChannelImageFolder(faint_folder / "images", normalize="percentile")
    top_is_one(torch.stack([ds.read(i) for i in range(len(ds))]))
    again = ds.read(1)  # from the cached per-file ranges: the same as computed afresh
    raw = tifffile.imread(faint_folder / "images" / "1.tif")
    assert torch.equal(again, torch.from_numpy(normalize_channels(raw, "percentile"))) and 1 in ds._ranges
    with pytest.raises(MicromaeInputError, match="normalize"):
        MultiChannelImageFolder(faint_folder / "images", normalize="dataset")


def test_pretraining_data_uses_data_normalize(faint_folder, tmp_path):
    from micromae.data.image_stream import build_image_dataset

    cfg = load_config(CONFIGS / "dama_tiny.yaml", PretrainConfig, [
        "data.source=images", f"data.root={faint_folder / 'images'}", "model.in_chans=3",
        "data.normalize=percentile", "data.percentiles=[0.5,99.8]"])
    ds = build_image_dataset(cfg, tmp_path)
    assert (ds.normalize, ds.percentiles) == ("percentile", (0.5, 99.8))
    top_is_one(ds.read(1))
    cfg.data.normalize = "dtype"
    assert float(build_image_dataset(cfg, tmp_path).read(1).mean()) < 0.02


def test_channel_stats_uses_one_range_per_channel_for_the_folder(faint_folder):
    first, second = np.arange(50).reshape(1, 1, 50), np.arange(50, 101).reshape(1, 1, 51)
    np.testing.assert_allclose(dataset_channel_ranges([first, second], (10, 90)), [[10.0], [90.0]])
    with pytest.raises(MicromaeInputError, match="ranges"):
        normalize_channels(first, "channel_stats")
    ds = MultiChannelImageFolder(faint_folder / "cells", normalize="channel_stats", percentiles=(0.5, 99.8))
    images = torch.stack([ds.read(i) for i in range(len(ds))])
    lo, hi = ds.dataset_ranges
    for i in (0, 5):  # the same affine map for every crop: a dim crop stays dimmer than a bright one
        expected = np.clip((ds.read_raw(i) - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1)
        np.testing.assert_allclose(images[i].numpy(), expected, atol=1e-6)
    top_is_one(images.permute(1, 0, 2, 3).reshape(1, 3, -1, 16))  # the pooled pixels, not each crop, reach 1
    per_crop = np.percentile(images.numpy().reshape(len(ds), 3, -1), 99.8, axis=-1)
    assert per_crop.min() < 0.9


def test_classification_crops_and_coco_images_are_normalised(faint_folder):
    from micromae.data.coco import CocoInstanceDataset
    from micromae.train.classify_data import load_labelled_crops

    crops = load_labelled_crops(faint_folder / "cells", 16, normalize="percentile")
    top_is_one(crops.images)
    coco = CocoInstanceDataset(faint_folder / "annotations.json", crop_size=16, normalize="percentile",
                               percentiles=(0.5, 99.8))
    top_is_one(torch.stack([coco.read_image(i) for i in range(len(coco))]))
    image, _ = coco.sample(0, np.random.default_rng(0))  # crops come from the normalised whole image
    assert float(image.max()) <= 1.0 and float(image.mean()) > 0.02
    pooled = CocoInstanceDataset(faint_folder / "annotations.json", crop_size=16, normalize="channel_stats")
    top_is_one(torch.stack([pooled.read_image(i) for i in range(len(pooled))]).permute(1, 0, 2, 3)
               .reshape(1, 3, -1, 48))


def test_classification_run_saves_the_choice_and_evaluation_reads_it(faint_folder, tmp_path, monkeypatch):
    from micromae.train.classify import load_classifier, load_classify_config, run_classify_finetune

    cfg = load_classify_config(CONFIGS / "classify_tiny.yaml", [
        f"data.root={faint_folder / 'cells'}", "data.size=16", "model.img_size=16", "model.in_chans=3",
        "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "train.epochs=null", "train.steps=2",
        "train.batch_size=4", "train.device=cpu", "train.ckpt_every=0", "data.normalize=percentile",
        "data.percentiles=[1.0,99.0]", "data.test_files=[a/0.tif,b/0.tif]"])
    import micromae.data.multichannel as mc

    seen = []

    original = mc.normalize_channels
    monkeypatch.setattr(mc, "normalize_channels",
                        lambda a, m, p, *r: seen.append((m, tuple(p))) or original(a, m, p, *r))
    result = run_classify_finetune(cfg, tmp_path / "run")
    assert set(seen) == {("percentile", (1.0, 99.0))}
    _, saved = load_classifier(result.checkpoint)
    assert (saved.data.normalize, list(saved.data.percentiles)) == ("percentile", [1.0, 99.0])
    with pytest.raises(MicromaeInputError, match="normalize"):
        load_classify_config(CONFIGS / "classify_tiny.yaml", ["data.normalize=zscore"])


def test_probe_reads_crops_as_the_checkpoint_was_trained(faint_folder, tmp_path, monkeypatch):
    import micromae.data.multichannel as mc
    from micromae.evaluate.probe import checkpoint_normalize, run_probe
    from micromae.models.pretrained import encoder_fields
    from micromae.models import ViTEncoder
    from micromae.train.checkpoint import save_checkpoint

    enc = ViTEncoder(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2, pos_embed_weight=1.0)
    config = {"objective": "mae", "model": encoder_fields(enc),
              "data": {"normalize": "percentile", "percentiles": [2.0, 98.0]}}
    ckpt = save_checkpoint(tmp_path / "ckpts", {"model": {f"encoder.{k}": v for k, v in enc.state_dict().items()},
                                                "step": 1, "config": config})
    assert checkpoint_normalize(ckpt) == ("percentile", (2.0, 98.0))
    seen = []
    original = mc.normalize_channels
    monkeypatch.setattr(mc, "normalize_channels",
                        lambda a, m, p, *r: seen.append((m, tuple(p))) or original(a, m, p, *r))
    result = run_probe({"pre": str(ckpt), "random": "random"}, faint_folder / "cells", folds=1, k=2, epochs=2,
                       device="cpu")
    assert set(seen) == {("percentile", (2.0, 98.0))}  # the random encoder sees the same inputs
    assert [r["normalize"] for r in result["rows"]] == ["percentile", "percentile"]
    seen.clear()
    run_probe({"pre": str(ckpt)}, faint_folder / "cells", folds=1, k=2, epochs=2, device="cpu", normalize="dtype")
    assert {m for m, _ in seen} == {"dtype"}


@pytest.mark.slow
def test_instance_evaluation_uses_the_checkpoint_normalisation(faint_folder, tmp_path, monkeypatch):
    import micromae.data.coco as coco_mod
    from micromae.evaluate.coco import run_evaluate_instances
    from micromae.train.maskrcnn import load_maskrcnn_config, run_maskrcnn_finetune

    ann = faint_folder / "annotations.json"
    cfg = load_maskrcnn_config(CONFIGS / "maskrcnn_tiny.yaml", [
        "data.source=coco", f"data.annotations={ann}", "data.crop_size=32", "data.scale_range=[1.0,1.0]",
        "model.in_chans=3", "model.img_size=32", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "detector.out_channels=32", "detector.anchor_sizes=[8,16,32,64]", "detector.representation_size=32",
        "detector.mask_head_channels=8", "train.steps=1", "train.batch_size=2", "train.ckpt_every=0",
        "train.figure_every=0", "train.device=cpu", "data.normalize=percentile", "data.percentiles=[1.0,99.5]"])
    seen = []
    original = coco_mod.normalize_channels
    monkeypatch.setattr(coco_mod, "normalize_channels",
                        lambda a, m, p, *r: seen.append((m, tuple(p))) or original(a, m, p, *r))
    result = run_maskrcnn_finetune(cfg, tmp_path / "run")
    assert set(seen) == {("percentile", (1.0, 99.5))}
    seen.clear()
    run_evaluate_instances(ann, tmp_path / "eval", checkpoint=result.checkpoint, device="cpu")
    assert seen and set(seen) == {("percentile", (1.0, 99.5))}
    with pytest.raises(MicromaeInputError, match="percentiles"):
        load_maskrcnn_config(CONFIGS / "maskrcnn_tiny.yaml", ["data.percentiles=[50,10]"])

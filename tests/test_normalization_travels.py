"""The input scaling travels with the model: checkpoints and exported encoders carry it, readers use it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from micromae.config import PretrainConfig, apply_overrides
from micromae.data.multichannel import MultiChannelImageFolder
from micromae.errors import MicromaeInputError
from micromae.models.pretrained import input_normalization, load_encoder, read_normalization
from micromae.train.export import export_encoder
from micromae.train.pretrain import run_pretrain

TINY = ["objective=mae", "model.in_chans=7", "model.img_size=16", "model.patch_size=4", "model.embed_dim=16",
        "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
        "model.decoder_num_heads=2", "data.source=synthetic_mif", "data.synthetic_shape=[96,96]",
        "data.n_images=4", "train.batch_size=2", "train.steps=1", "train.figure_every=0", "train.device=cpu"]


@pytest.fixture(scope="module")
def channel_stats_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("norm")
    cfg = apply_overrides(PretrainConfig(), TINY + ["data.normalize=channel_stats", "data.percentiles=[1.0,99.0]"])
    run_pretrain(cfg, root / "run")
    return root


def folder_ranges(run_root, percentiles=(1.0, 99.0)) -> np.ndarray:
    folder = MultiChannelImageFolder(run_root / "run" / "synthetic_mif" / "images", normalize="channel_stats",
                                     percentiles=percentiles)
    return folder.ranges(0, None)


def test_checkpoint_and_export_carry_mode_percentiles_and_ranges(channel_stats_run, tmp_path):
    ckpt = channel_stats_run / "run" / "checkpoints" / "last.pt"
    expected = folder_ranges(channel_stats_run)
    assert expected.shape == (2, 7) and (expected[1] > expected[0]).all()
    mode, pct, ranges = read_normalization(ckpt)
    assert (mode, pct) == ("channel_stats", (1.0, 99.0))
    np.testing.assert_allclose(ranges, expected, rtol=1e-6)
    _, meta = load_encoder(ckpt)
    assert meta.normalize == "channel_stats" and meta.percentiles == (1.0, 99.0)
    np.testing.assert_allclose(meta.channel_ranges, expected, rtol=1e-6)
    # the exported pair says the same, without the checkpoint
    out = export_encoder(ckpt, tmp_path / "enc.safetensors")
    assert json.loads(out.with_suffix(".json").read_text())["normalization"]["normalize"] == "channel_stats"
    ckpt.rename(ckpt.with_suffix(".moved"))
    try:
        _, exported = load_encoder(out)
        assert exported.normalize == "channel_stats" and exported.percentiles == (1.0, 99.0)
        np.testing.assert_allclose(exported.channel_ranges, expected, rtol=1e-6)
        assert input_normalization(out).ranges == exported.channel_ranges
    finally:
        ckpt.with_suffix(".moved").rename(ckpt)


def test_stored_ranges_are_used_and_an_override_that_differs_is_warned(channel_stats_run, capsys):
    ckpt = channel_stats_run / "run" / "checkpoints" / "last.pt"
    same = input_normalization(ckpt)
    assert same.normalize == "channel_stats" and same.ranges is not None
    assert "warning" not in capsys.readouterr().err
    other = input_normalization(ckpt, normalize="percentile")
    assert (other.normalize, other.ranges) == ("percentile", None)
    err = capsys.readouterr().err
    assert "warning" in err and "normalize=channel_stats" in err and "normalize=percentile" in err
    input_normalization(ckpt, normalize="channel_stats", percentiles=(0.5, 99.5))  # other ranges: warned, own
    assert "percentiles=[1.0, 99.0]" in capsys.readouterr().err
    # a folder read with the stored ranges scales with them, not with its own
    images = channel_stats_run / "run" / "synthetic_mif" / "images"
    stored = np.asarray(same.ranges, dtype=np.float32)
    shifted = stored.copy()
    shifted[1] *= 2.0
    a = MultiChannelImageFolder(images, normalize="channel_stats", percentiles=(1.0, 99.0), ranges=stored).read(0)
    b = MultiChannelImageFolder(images, normalize="channel_stats", percentiles=(1.0, 99.0), ranges=shifted).read(0)
    assert not np.allclose(a.numpy(), b.numpy())
    with pytest.raises(MicromaeInputError, match="channel_stats ranges"):
        MultiChannelImageFolder(images, normalize="channel_stats", ranges=stored[:, :3])


def test_percentile_runs_record_their_setting_without_ranges(tmp_path):
    cfg = apply_overrides(PretrainConfig(), TINY + ["data.normalize=percentile", "data.percentiles=[2.0,98.0]"])
    run_pretrain(cfg, tmp_path / "r")
    ckpt = tmp_path / "r" / "checkpoints" / "last.pt"
    assert read_normalization(ckpt) == ("percentile", (2.0, 98.0), None)
    assert input_normalization("random", default="dtype").normalize == "dtype"

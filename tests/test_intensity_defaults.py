"""Intensity defaults that do not fail silently: 8-bit vs narrow-range 16-bit data, faint images, 2-D images."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from micromae.config import PretrainConfig, apply_overrides
from micromae.data.normalize import intensity_range, resolve_mode
from micromae.data.sampler import PlaneCropSampler
from micromae.errors import MicromaeInputError
from micromae.segment.pipeline import run_segment
from micromae.train.pretrain import run_pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def faint_discs(shape=(96, 96), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A uint16 image whose values span 0..250 (of 65535): bright discs (~200) on a dim background (~30)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    discs = np.zeros(shape, bool)
    for cy, cx in rng.integers(12, min(shape) - 12, size=(6, 2)):
        discs |= (yy - cy) ** 2 + (xx - cx) ** 2 < 8 ** 2
    image = np.where(discs, 200.0, 30.0) + rng.normal(0, 10, shape)
    return np.clip(image, 0, 250).astype(np.uint16), discs


def test_auto_is_dtype_for_8bit_and_percentile_otherwise():
    assert resolve_mode("auto", np.uint8) == "dtype" and resolve_mode("auto", np.bool_) == "dtype"
    assert resolve_mode("auto", np.uint16) == "percentile" and resolve_mode("auto", np.float32) == "percentile"
    assert resolve_mode("minmax", np.uint8) == "minmax"
    img8 = np.random.default_rng(0).integers(40, 200, (32, 32)).astype(np.uint8)
    assert intensity_range(img8) == (0.0, 255.0)
    faint, _ = faint_discs()
    lo, hi = intensity_range(faint)
    assert 0 <= lo < 40 and 180 < hi <= 250  # the data's own range, not 0..65535


def test_a_faint_image_scaled_by_its_type_is_refused_with_the_fix():
    faint, _ = faint_discs()
    with pytest.raises(MicromaeInputError) as err:
        intensity_range(faint, "dtype")
    assert "data.normalize=percentile" in str(err.value) and "0.3" in str(err.value)  # 250 / 65535 = 0.38 %
    with pytest.raises(MicromaeInputError, match="data.normalize=percentile"):
        PlaneCropSampler([faint[None]], fov=16, planes=("YX",), normalize="dtype")


def test_sparse_bright_objects_on_a_flat_background_are_not_called_faint():
    img = np.zeros((64, 64), np.uint8)
    img[10:13, 10:13] = 255  # 0.2 % of the pixels: the central 99 % are all 0
    assert intensity_range(img, "dtype") == (0.0, 255.0)


def test_faint_uint16_2d_image_pretrains_and_segments_bright_from_dark(tmp_path):
    """The user's case: a 16-bit 2-D image using 250 of 65536 values, the default planes and scaling."""
    image, discs = faint_discs((96, 96))
    path = tmp_path / "faint.tif"
    tifffile.imwrite(path, image)
    cfg = apply_overrides(PretrainConfig(), [
        "model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
        "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.source=files", f"data.paths=[{path}]", "train.batch_size=8", "train.steps=3",
        "train.figure_every=0", "train.device=cpu"])
    assert cfg.data.planes == ["YX", "ZX", "ZY"] and cfg.data.normalize == "auto"  # the defaults, untouched
    result = run_pretrain(cfg, tmp_path / "run")
    out = run_segment(result.checkpoint, path, tmp_path / "seg.zarr", k=2, n_samples=4000, device="cpu")
    labels = np.asarray(zarr.open_group(str(out), mode="r")["labels"])[0]
    best = max(2 * np.sum((labels == c) & discs) / (np.sum(labels == c) + discs.sum()) for c in (0, 1))
    assert best > 0.9  # one cluster is the discs


def test_2d_image_samples_yx_planes_only(tmp_path, capsys):
    from micromae.train.pretrain import sampler_planes

    assert sampler_planes([np.zeros((1, 40, 40))], ["YX", "ZX", "ZY"]) == ("YX",)
    assert "data.planes=[YX]" in capsys.readouterr().err
    assert sampler_planes([np.zeros((9, 40, 40))], ["YX", "ZX"]) == ("YX", "ZX")

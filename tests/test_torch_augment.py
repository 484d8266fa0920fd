"""TorchDamaAugment (DAMA's augmentation batched on a torch device): the same images as DamaAugment item by
item, the same draws through the image stream, and pre-training with data.sampler=torch resuming bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micromae.config import PretrainConfig, apply_overrides
from micromae.data.augment import DamaAugment
from micromae.data.image_stream import build_image_dataset, image_stream
from micromae.data.torch_augment import TorchDamaAugment, params_tensor
from micromae.errors import MicromaeInputError
from micromae.train.checkpoint import load_checkpoint
from micromae.train.pretrain import run_pretrain

TOL = 1e-4  # max abs difference on [0, 1] data: float rounding of the sampling grid (seen: ~4e-6)


@pytest.mark.parametrize("kwargs", [
    dict(),  # DAMA: half-size crop, free rotation in [-90, 90], shift 0.3, flips
    dict(rotation="right_angles"),  # exact rot90 path
    dict(scale=0.7, fill=0.3),
    dict(scale=1.5, degrees=45.0, rotation="right_angles", fill=0.2),  # shrinking (antialias), 45° resampled
    dict(degrees=180.0, rotation="right_angles", shift=0.0),  # rot180 only: no resampling at all
    dict(scale=0.8, interpolation="nearest", degrees=0.0),  # nearest resize + integer shifts
])
def test_batched_output_equals_dama_augment_item_by_item(kwargs):
    aug = DamaAugment(24, **kwargs)
    images = torch.rand(12, 3, 50, 50, generator=torch.Generator().manual_seed(0))
    params = [aug.draw_params(50, 50, np.random.default_rng([3, i])) for i in range(12)]
    ref = torch.stack([aug.apply(images[i], p) for i, p in enumerate(params)])
    out = TorchDamaAugment(aug)(images, params)
    assert out.shape == ref.shape == (12, 3, 24, 24)
    assert (out - ref).abs().max().item() < TOL
    if aug.rotation == "right_angles" and aug.degrees % 90 == 0 and aug.shift == 0:
        assert torch.equal(out, ref)  # no resampling: rot90 / flips are exact
    # the draws exercised what the case is about
    assert {p.hflip for p in params} == {True, False} and {p.vflip for p in params} == {True, False}
    if aug.shift:
        assert any(p.shift_x or p.shift_y for p in params)
    if aug.degrees:
        assert len({p.angle for p in params}) > 1 and any(p.angle for p in params)
    if aug.fill:  # fill reaches the corners rotated in from outside
        assert ((out - aug.fill).abs() < 1e-6).any()


def test_crops_cut_first_give_the_same_batch_and_bad_input_is_refused():
    aug = DamaAugment(16, scale=0.75)
    t = TorchDamaAugment(aug)
    images = [torch.rand(2, h, w) for h, w in ((30, 40), (12, 12), (25, 19))]  # sizes differ: cut per item
    params = [aug.draw_params(*im.shape[-2:], np.random.default_rng(i)) for i, im in enumerate(images)]
    crops = torch.stack([t.cut(im, p) for im, p in zip(images, params)])
    out = t.augment_crops(crops, params_tensor(params))
    ref = torch.stack([aug.apply(im, p) for im, p in zip(images, params)])
    assert (out - ref).abs().max().item() < TOL
    with pytest.raises(MicromaeInputError, match="DamaAugment"):
        TorchDamaAugment(lambda x: x)
    with pytest.raises(MicromaeInputError, match="interpolation"):
        TorchDamaAugment(DamaAugment(16, interpolation="bicubic"))
    with pytest.raises(MicromaeInputError, match="params"):
        t.augment_crops(crops, params_tensor(params[:2]))
    with pytest.raises(MicromaeInputError, match="crops"):
        t.augment_crops(torch.rand(3, 2, 13, 13), params)
    with pytest.raises(MicromaeInputError, match="inside"):
        t(torch.rand(1, 2, 12, 12), [params[0]])  # corner drawn for a 30×40 image


TINY = ["objective=dama", "model.in_chans=7", "model.img_size=16", "model.patch_size=4", "model.embed_dim=16",
        "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
        "model.decoder_num_heads=2", "model.mask_ratio=0.75", "data.source=synthetic_mif",
        "data.synthetic_shape=[48,48]", "data.n_images=6", "data.crop_scale=0.7", "dama.K=1",
        "train.batch_size=2", "train.log_every=1", "train.figure_every=0", "train.device=cpu",
        "train.ckpt_every=100"]


def test_stream_on_device_has_the_same_draws_and_resumes(tmp_path):
    dataset = build_image_dataset(apply_overrides(PretrainConfig(), TINY), tmp_path)
    numpy_side = image_stream(dataset, 2, seed=5)
    torch_side = image_stream(dataset, 2, seed=5, device="cpu")
    straight = [next(torch_side) for _ in range(5)]  # 3 per epoch: crosses an epoch
    for (s, ref), (t, out) in zip([next(numpy_side) for _ in range(5)], straight):
        assert s == t and out.shape == ref.shape == (2, 7, 16, 16)
        assert (out - ref).abs().max().item() < TOL
    resumed = image_stream(dataset, 2, start_step=2, seed=5, device="cpu")
    for step, images in straight[2:]:
        s, again = next(resumed)
        assert s == step and torch.equal(again, images)
    assert not torch.equal(straight[0][1], straight[3][1])  # fresh draws in the next epoch


def test_pretraining_with_device_augmentation_resumes_bit_exactly(tmp_path, monkeypatch):
    calls = []
    batched = TorchDamaAugment.augment_crops
    monkeypatch.setattr(TorchDamaAugment, "augment_crops", lambda self, *a: calls.append(1) or batched(self, *a))
    cfg = apply_overrides(PretrainConfig(), TINY + ["data.sampler=torch", "train.steps=6"])
    straight = run_pretrain(cfg, tmp_path / "straight")
    assert len(calls) >= 6  # the run's batches were augmented by TorchDamaAugment
    run_pretrain(cfg, tmp_path / "split", stop_after=3)
    split = run_pretrain(cfg, tmp_path / "split", resume="auto")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    assert split.step == 6 and all(torch.equal(a[k], b[k]) for k in a)
    numpy_run = run_pretrain(apply_overrides(PretrainConfig(), TINY + ["data.sampler=numpy", "train.steps=6"]),
                             tmp_path / "np")
    assert abs(numpy_run.last_loss - straight.last_loss) < 1e-3 * abs(numpy_run.last_loss)  # same images ~1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_batch_matches_dama_augment_on_the_cpu(tmp_path):
    aug = DamaAugment(24, scale=0.6, fill=0.1)
    images = torch.rand(16, 7, 40, 40, generator=torch.Generator().manual_seed(1))
    params = [aug.draw_params(40, 40, np.random.default_rng([4, i])) for i in range(16)]
    out = TorchDamaAugment(aug)(images.cuda(), params)
    ref = torch.stack([aug.apply(images[i], p) for i, p in enumerate(params)])
    assert out.is_cuda and (out.cpu() - ref).abs().max().item() < TOL
    dataset = build_image_dataset(apply_overrides(PretrainConfig(), TINY), tmp_path)
    (_, on_gpu), (_, on_cpu) = next(image_stream(dataset, 2, device="cuda")), next(image_stream(dataset, 2))
    assert on_gpu.is_cuda and (on_gpu.cpu() - on_cpu).abs().max().item() < TOL

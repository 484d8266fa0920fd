"""The on-device plane-crop sampler: the same crops as the numpy sampler, the same draw frequencies,
reproducible from (seed, rank, step), wired into pre-training with a bit-exact resume."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from micromae.config import PretrainConfig, apply_overrides
from micromae.data.sampler import PlaneCropSampler
from micromae.data.torch_sampler import TorchPlaneCropSampler, choose_sampler
from micromae.errors import MicromaeInputError
from micromae.train.checkpoint import load_checkpoint
from micromae.train.pretrain import build_sampler, run_pretrain

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
BLEND_TOL = 2e-6  # the bilinear blend is summed in another order than F.interpolate's: float32 rounding only


def volumes(dtype, seed=0):
    rng = np.random.default_rng(seed)
    top = 60000 if dtype == np.uint16 else 255
    vols = [rng.integers(0, top, size=s).astype(dtype) for s in ((30, 40, 50), (20, 33, 41))]
    labels = [rng.integers(0, 7, size=v.shape).astype(np.uint8) for v in vols]
    return vols, labels


@pytest.mark.parametrize("dtype,pad_mode,normalize", [(np.uint8, "constant", "dtype"),
                                                      (np.uint16, "reflect", "percentile"),
                                                      (np.float32, "constant", "percentile")])
def test_same_crops_and_labels_as_the_numpy_sampler(dtype, pad_mode, normalize):
    vols, labels = volumes(dtype)
    kw = dict(fov=24, pad=6, pad_mode=pad_mode, vflip_p=0.5, seed=3, rank=1, normalize=normalize,
              label_volumes=labels, volume_weights=[0.3, 0.7])
    ref, dev = PlaneCropSampler(vols, **kw), TorchPlaneCropSampler(vols, **kw)
    for step in range(4):
        (a, la), pa = ref.sample_batch(step, 48, return_params=True)
        (b, lb), pb = dev.sample_batch(step, 48, return_params=True)
        assert np.array_equal(pa.crop_h, pb.crop_h) and np.array_equal(pa.hflip, pb.hflip)
        assert b.shape == a.shape and b.dtype == torch.float32 and lb.dtype == torch.int64
        assert torch.allclose(a, b, rtol=0, atol=BLEND_TOL), float((a - b).abs().max())
        assert torch.equal(la, lb)
    # the batches did use padding, several crop sizes, flips and both volumes (the comparison is not vacuous)
    assert len(set(pa.crop_h)) > 5 and pa.hflip.any() and pa.vflip.any() and len(set(pa.volume)) == 2
    assert (lb == 255).any() if pad_mode == "constant" else True


def test_draw_frequencies_and_intensity_statistics_match_the_numpy_sampler():
    vol = np.random.default_rng(1).integers(0, 256, (40, 48, 48)).astype(np.uint8)
    kw = dict(fov=20, pad=4, vflip_p=0.3, seed=0)
    dev, ref = TorchPlaneCropSampler([vol], **kw), PlaneCropSampler([vol], **kw)
    steps, batch = 120, 50
    planes, sides, hflips, vflips, means, stds = [], [], [], [], [], []
    for step in range(steps):
        imgs, p = dev.sample_batch(step, batch, return_params=True)
        planes.append(p.plane), sides.append(p.crop_h), hflips.append(p.hflip), vflips.append(p.vflip)
        means.append(imgs.mean().item()), stds.append(imgs.std().item())
    n = steps * batch
    plane_freq = np.bincount(np.concatenate(planes), minlength=3) / n
    side_freq = np.bincount(np.concatenate(sides) - dev.min_crop, minlength=dev.fov - dev.min_crop + 1) / n
    assert np.abs(plane_freq - 1 / 3).max() < 0.03
    assert np.abs(side_freq - 1 / len(side_freq)).max() < 0.03 and len(side_freq) == 11
    assert abs(np.concatenate(hflips).mean() - 0.5) < 0.03 and abs(np.concatenate(vflips).mean() - 0.3) < 0.03
    # intensities of independent draws (other steps) of the numpy sampler: same mean and spread
    other = torch.cat([ref.sample_batch(10_000 + s, batch) for s in range(steps // 4)])
    assert abs(np.mean(means) - other.mean().item()) < 0.01
    assert abs(np.mean(stds) - other.std().item()) < 0.01


def test_reproducible_from_seed_rank_step_and_stream_resumes():
    vols, _ = volumes(np.uint8)
    a = TorchPlaneCropSampler(vols, fov=16, seed=5, rank=0)
    b = TorchPlaneCropSampler(vols, fov=16, seed=5, rank=0)
    assert torch.equal(a.sample_batch(7, 16), b.sample_batch(7, 16))
    assert not torch.equal(a.sample_batch(7, 16), a.sample_batch(8, 16))
    other_rank = TorchPlaneCropSampler(vols, fov=16, seed=5, rank=1)
    assert not torch.equal(a.sample_batch(7, 16), other_rank.sample_batch(7, 16))
    straight = [batch for _, batch in a.stream(16, start_step=0, num_steps=6)]
    resumed = list(a.stream(16, start_step=4, num_steps=2))
    assert [s for s, _ in resumed] == [4, 5]
    assert all(torch.equal(x, y) for x, (_, y) in zip(straight[4:], resumed))


def test_memmap_volume_is_used_without_a_copy_and_workers_are_refused(tmp_path):
    path = tmp_path / "v.npy"
    np.save(path, volumes(np.uint16)[0][0])
    mm = np.load(path, mmap_mode="r")
    sampler = TorchPlaneCropSampler([mm], fov=16)
    assert sampler._flat[0][0].data_ptr() == mm.ctypes.data  # the mapped pages, not a copy
    assert sampler.describe()["storage"] == "cpu"
    with pytest.raises(TypeError, match="num_workers=0"):
        pickle.dumps(sampler)


def test_choose_sampler_auto_is_torch_on_cuda_numpy_on_cpu():
    assert choose_sampler("auto", torch.device("cpu")) == "numpy"
    assert choose_sampler("auto", torch.device("cuda", 0)) == "torch"
    assert choose_sampler("numpy", torch.device("cuda", 0)) == "numpy"
    with pytest.raises(MicromaeInputError, match="data.sampler"):
        choose_sampler("jax", torch.device("cpu"))
    with pytest.raises(MicromaeInputError):
        apply_overrides(PretrainConfig(), ["data.sampler=jax"])


TINY = ["model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
        "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.synthetic_shape=[12,40,40]", "train.batch_size=8", "train.log_every=1", "train.figure_every=0",
        "train.device=cpu", "train.steps=4", "train.ckpt_every=100"]


def test_pretraining_with_the_torch_sampler_resumes_bit_exactly(tmp_path):
    cfg = apply_overrides(PretrainConfig(), TINY + ["data.sampler=torch"])
    assert isinstance(build_sampler(cfg, device="cpu"), TorchPlaneCropSampler)
    straight = run_pretrain(cfg, tmp_path / "straight")
    run_pretrain(cfg, tmp_path / "split", stop_after=2)
    split = run_pretrain(cfg, tmp_path / "split", resume="auto")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    assert split.step == 4 and all(torch.equal(a[k], b[k]) for k in a)
    numpy_run = run_pretrain(apply_overrides(PretrainConfig(), TINY + ["data.sampler=numpy"]), tmp_path / "np")
    assert abs(numpy_run.last_loss - straight.last_loss) < 1e-3 * abs(numpy_run.last_loss)  # same crops, ~1e-6 apart


@CUDA
def test_cuda_sampler_keeps_volumes_on_the_device_and_matches_the_cpu():
    vols, labels = volumes(np.uint16)
    kw = dict(fov=24, pad=4, seed=2, label_volumes=labels, normalize="percentile")
    cpu, gpu = TorchPlaneCropSampler(vols, **kw), TorchPlaneCropSampler(vols, device="cuda", **kw)
    assert gpu.storage.type == "cuda"
    (a, la), (b, lb) = cpu.sample_batch(3, 64), gpu.sample_batch(3, 64)
    assert b.is_cuda and torch.allclose(a, b.cpu(), atol=BLEND_TOL) and torch.equal(la, lb.cpu())

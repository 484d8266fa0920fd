"""Tests of the MAESTER plane-crop sampler and of intensity normalisation (tiny volumes, seeded, fast)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from micromae.data.normalize import intensity_range, is_constant, sample_voxels, scale_intensity
from micromae.data.sampler import PLANES, CropStream, PlaneCropSampler, make_loader
from micromae.errors import MicromaeInputError

NO_AUG = dict(min_crop_frac=1.0, flip_p=0.0, normalize="dtype")  # dtype: decode() reads exact values back


def coord_volume(shape: tuple[int, int, int] = (20, 24, 28)) -> np.ndarray:
    """uint16 volume whose value encodes its voxel: v = 1 + z + 32*y + 1024*x (never 0, so 0 marks padding)."""
    z, y, x = np.indices(shape)
    return (1 + z + 32 * y + 1024 * x).astype(np.uint16)


def decode(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(raw, z, y, x) of every pixel of a batch cut from :func:`coord_volume` with normalize='dtype'."""
    raw = np.rint(batch[:, 0].numpy().astype(np.float64) * 65535).astype(np.int64)
    code = raw - 1
    return raw, code % 32, (code // 32) % 32, code // 1024


def random_volume(shape=(24, 32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


class ReadRecorder:
    """Array-like that records the number of voxels of every read of the wrapped array."""

    def __init__(self, array):
        self.array, self.reads = array, []
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, index):
        out = np.asarray(self.array[index])
        self.reads.append(out.size)
        return out


# ---------------------------------------------------------------- batches


def test_batch_shape_dtype_range_and_describe():
    sampler = PlaneCropSampler([random_volume()], fov=16, seed=3)
    batch = sampler.sample_batch(0, 8)
    assert batch.shape == (8, 1, 16, 16) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1 and batch.std() > 0.1
    info = json.loads(json.dumps(sampler.describe()))
    assert info["fov"] == 16 and info["planes"] == ["YX", "ZX", "ZY"] and info["crop_sides"] == [8, 16]
    assert info["volumes"][0]["intensity_range"] == [0.0, 255.0]


def test_each_plane_is_cut_from_the_right_orientation():
    volume = coord_volume()
    sampler = PlaneCropSampler([volume], fov=16, pad=0, **NO_AUG, seed=1)
    batch, p = sampler.sample_batch(0, 150, return_params=True)
    raw, z, y, x = decode(batch)
    coords = np.stack([z, y, x], 1)  # (B, 3, F, F)
    i = np.arange(16)
    for b in range(len(raw)):
        slice_axis, row_axis, col_axis = PLANES[sampler.planes[p.plane[b]]]
        assert np.all(coords[b, slice_axis] == p.slice_index[b])  # constant-Z, -Y or -X slice
        assert np.array_equal(coords[b, row_axis], np.broadcast_to(p.window_row[b] + i[:, None], (16, 16)))
        assert np.array_equal(coords[b, col_axis], np.broadcast_to(p.window_col[b] + i[None, :], (16, 16)))
    share = np.bincount(sampler.draw_params(1, 3000).plane, minlength=3) / 3000
    assert np.all(np.abs(share - 1 / 3) < 0.05), share


def test_plane_aliases_and_subsets():
    sampler = PlaneCropSampler([coord_volume()], fov=16, planes=("xy", "YZ"), pad=0, **NO_AUG)
    assert sampler.planes == ("YX", "ZY")
    batch, p = sampler.sample_batch(0, 40, return_params=True)
    _, z, _, x = decode(batch)
    is_z_slice = np.all(z == z[:, :1, :1], axis=(1, 2))
    is_x_slice = np.all(x == x[:, :1, :1], axis=(1, 2))
    assert np.array_equal(is_z_slice, p.plane == 0) and np.array_equal(is_x_slice, p.plane == 1)


def test_constant_padding_only_in_the_pad_margin():
    volume, pad, fov = coord_volume(), 4, 16
    sampler = PlaneCropSampler([volume], fov=fov, pad=pad, **NO_AUG, seed=2)
    batch, p = sampler.sample_batch(0, 300, return_params=True)
    raw = decode(batch)[0]
    i = np.arange(fov)
    padded_crops = 0
    for b in range(len(raw)):
        _, row_axis, col_axis = PLANES[sampler.planes[p.plane[b]]]
        rows, cols = p.window_row[b] + i, p.window_col[b] + i  # padded coordinates
        out_r = (rows < pad) | (rows >= volume.shape[row_axis] + pad)
        out_c = (cols < pad) | (cols >= volume.shape[col_axis] + pad)
        outside = out_r[:, None] | out_c[None, :]
        assert np.array_equal(raw[b] == 0, outside)  # pad value exactly where the window leaves the volume
        assert not np.any(out_r[pad:fov - pad]) and not np.any(out_c[pad:fov - pad])  # only in the margin
        padded_crops += outside.any()
    assert padded_crops > 20
    shifted = volume.astype(np.float32) - 20000  # minmax range straddles 0: padding must still scale to 0
    same_draws = PlaneCropSampler([shifted], fov=fov, pad=pad, **{**NO_AUG, "normalize": "minmax"}, seed=2)
    darkest = (raw == 0) | (raw == 1)  # padding, and voxel (0, 0, 0) which is the volume's minimum
    assert torch.equal(same_draws.sample_batch(0, 300) == 0, torch.from_numpy(darkest)[:, None])


def reference_batch(volume, sampler, p):
    """Obviously-correct crops: np.pad the whole plane, slice, crop, scale, F.interpolate, flip."""
    out = []
    for b in range(len(p.volume)):
        slice_axis, row_axis, col_axis = PLANES[sampler.planes[p.plane[b]]]
        plane = np.moveaxis(volume, (slice_axis, row_axis, col_axis), (0, 1, 2))[p.slice_index[b]]
        plane = np.pad(plane, sampler.pad, mode=sampler.pad_mode)
        r, c = p.window_row[b] + p.crop_row[b], p.window_col[b] + p.crop_col[b]
        crop = torch.from_numpy(plane[r:r + p.crop_h[b], c:c + p.crop_w[b]].astype(np.float32) / 255)
        crop = F.interpolate(crop[None, None], size=(sampler.fov,) * 2, mode="bilinear", align_corners=False)[0]
        crop = crop.flip(-1) if p.hflip[b] else crop
        out.append(crop.flip(-2) if p.vflip[b] else crop)
    return torch.stack(out)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_crops_match_reference(pad_mode):
    volume = random_volume((4, 20, 22), seed=5)  # Z=4 < pad+1: reflect padding folds more than once
    sampler = PlaneCropSampler([volume], fov=12, pad=4, pad_mode=pad_mode, vflip_p=0.5, seed=4)
    batch, p = sampler.sample_batch(0, 200, return_params=True)
    assert np.any(p.crop_h != 12) and np.any(p.hflip) and np.any(p.vflip)
    torch.testing.assert_close(batch, reference_batch(volume, sampler, p), atol=1e-6, rtol=0)


def test_crop_sizes_drawn_independently_in_range():
    sampler = PlaneCropSampler([random_volume((96, 96, 96))], fov=80)
    p = sampler.draw_params(0, 4000)
    for side in (p.crop_h, p.crop_w):
        assert side.min() == 40 and side.max() == 80 and abs(side.mean() - 60) < 1.5
    assert abs(np.corrcoef(p.crop_h, p.crop_w)[0, 1]) < 0.08 and np.mean(p.crop_h != p.crop_w) > 0.9
    assert np.all(p.crop_row + p.crop_h <= 80) and np.all(p.crop_col + p.crop_w <= 80)
    assert np.all(p.crop_row >= 0) and len(np.unique(p.crop_row)) > 30
    full = PlaneCropSampler([random_volume((96, 96, 96))], fov=80, min_crop_frac=1.0).draw_params(0, 100)
    assert np.all(full.crop_h == 80) and np.all(full.crop_w == 80)


def test_flip_frequencies():
    volume = random_volume()
    p = PlaneCropSampler([volume], fov=16, flip_p=0.5, vflip_p=0.2).draw_params(0, 4000)
    assert abs(p.hflip.mean() - 0.5) < 0.04 and abs(p.vflip.mean() - 0.2) < 0.04
    p = PlaneCropSampler([volume], fov=16).draw_params(0, 500)
    assert not p.vflip.any()  # MAESTER flips horizontally only by default
    assert not PlaneCropSampler([volume], fov=16, flip_p=0.0).draw_params(0, 500).hflip.any()


def test_volume_weights():
    volumes = [random_volume(seed=0), random_volume(seed=1)]
    p = PlaneCropSampler(volumes, fov=16, volume_weights=[1, 3]).draw_params(0, 4000)
    assert abs(p.volume.mean() - 0.75) < 0.03
    p = PlaneCropSampler(volumes, fov=16).draw_params(0, 4000)
    assert abs(p.volume.mean() - 0.5) < 0.03


# ---------------------------------------------------------------- randomness


def test_determinism_and_fresh_randomness():
    volume = random_volume()
    make = lambda **kw: PlaneCropSampler([volume], fov=16, **kw)  # noqa: E731
    a = make(seed=1, rank=0)
    assert torch.equal(a.sample_batch(5, 4), make(seed=1, rank=0).sample_batch(5, 4))
    assert not torch.equal(a.sample_batch(5, 4), a.sample_batch(6, 4))
    assert not torch.equal(a.sample_batch(5, 4), make(seed=1, rank=1).sample_batch(5, 4))
    assert not torch.equal(a.sample_batch(5, 4), make(seed=2, rank=0).sample_batch(5, 4))


def test_dataloader_workers_reproduce_single_process_without_replay():
    sampler = PlaneCropSampler([random_volume()], fov=8, seed=7)
    single = list(make_loader(sampler, 2, num_workers=0, num_steps=51))
    multi = list(make_loader(sampler, 2, num_workers=2, num_steps=51))
    assert [s for s, _ in multi] == [s for s, _ in single] == list(range(51))  # in order, each once
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(single, multi))
    assert len({batch.numpy().tobytes() for _, batch in multi}) == 51  # no batch replayed


def test_resume_reproduces_the_tail_of_the_stream():
    sampler = PlaneCropSampler([random_volume()], fov=8, seed=3)
    full = list(CropStream(sampler, 3, start_step=0, num_steps=15))
    resumed = list(CropStream(sampler, 3, start_step=10, num_steps=5))
    assert [s for s, _ in resumed] == list(range(10, 15)) and len(CropStream(sampler, 3, num_steps=5)) == 5
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full[10:], resumed))


# ---------------------------------------------------------------- errors


def test_bad_input_is_rejected_with_clear_messages():
    volume = random_volume()
    with pytest.raises(MicromaeInputError, match="at least one"):
        PlaneCropSampler([])
    with pytest.raises(MicromaeInputError, match="3 dimensions"):
        PlaneCropSampler([volume[0]], fov=16)
    with pytest.raises(MicromaeInputError, match="one of YX, ZX, ZY"):
        PlaneCropSampler([volume], fov=16, planes=("YX", "ZZ"))
    with pytest.raises(MicromaeInputError, match="twice"):
        PlaneCropSampler([volume], fov=16, planes=("YX", "XY"))
    with pytest.raises(MicromaeInputError, match=r"plane ZX.*16x72.*fov=30.*fov <= 16.*drop plane ZX"):
        PlaneCropSampler([random_volume((8, 64, 64))], fov=30)
    assert PlaneCropSampler([random_volume((8, 64, 64))], fov=30, planes=("YX",)).sample_batch(0, 2).shape[-1] == 30
    with pytest.raises(MicromaeInputError, match="volume_weights"):
        PlaneCropSampler([volume], fov=16, volume_weights=[1, 2])
    with pytest.raises(MicromaeInputError, match="pad_mode"):
        PlaneCropSampler([volume], fov=16, pad_mode="wrap")
    constant = np.full((10, 20, 20), 7, dtype=np.uint8)
    for mode in ("dtype", "minmax", "percentile"):
        with pytest.raises(MicromaeInputError, match="constant|hi > lo"):
            PlaneCropSampler([constant], fov=8, normalize=mode)


# ---------------------------------------------------------------- lazy volumes


def test_memmap_and_zarr_give_the_same_crops_reading_only_crops(tmp_path):
    zarr = pytest.importorskip("zarr")
    volume = random_volume((20, 40, 44), seed=9)
    memmap = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.uint8, shape=volume.shape)
    memmap[:] = volume
    memmap.flush()
    stored = zarr.create_array(store=str(tmp_path / "v.zarr"), shape=volume.shape, chunks=(8, 16, 16),
                               dtype="uint8")
    stored[:] = volume
    kw = dict(fov=16, pad_mode="reflect", seed=11)
    expected = PlaneCropSampler([volume], **kw).sample_batch(3, 12)
    for lazy in (np.load(tmp_path / "v.npy", mmap_mode="r"), zarr.open_array(str(tmp_path / "v.zarr"), mode="r")):
        recorder = ReadRecorder(lazy)
        sampler = PlaneCropSampler([recorder], **kw)
        recorder.reads.clear()
        assert torch.equal(sampler.sample_batch(3, 12), expected)
        assert len(recorder.reads) == 12 and max(recorder.reads) <= 16 * 16  # one crop-sized read per crop
    on_disk = PlaneCropSampler([np.load(tmp_path / "v.npy", mmap_mode="r")], **kw)
    blob = pickle.dumps(on_disk)  # spawned workers get the file name, not the data
    assert len(blob) < volume.size // 4
    assert torch.equal(pickle.loads(blob).sample_batch(3, 12), expected)


# ---------------------------------------------------------------- normalisation


def test_intensity_range_modes():
    rng = np.random.default_rng(0)
    assert intensity_range(random_volume()) == (0.0, 255.0)  # auto: 8-bit -> dtype
    # dtype on purpose (min_contrast=0: these tiny arrays would be refused as too faint for it)
    assert intensity_range(np.array([[0, 1]], np.uint16), "dtype", min_contrast=0) == (0.0, 65535.0)
    assert intensity_range(np.array([[-1, 5]], np.int16), "dtype", min_contrast=0) == (-32768.0, 32767.0)
    floats = rng.normal(size=(10, 10, 10)).astype(np.float32)
    exact = (float(floats.min()), float(floats.max()))
    assert intensity_range(floats, "dtype") == exact == intensity_range(floats, "minmax")  # float: dtype -> minmax
    assert intensity_range(floats) == tuple(np.percentile(floats, [0.5, 99.5]))  # auto: float -> percentile
    lo, hi = intensity_range(floats, "percentile", percentiles=(1, 99))
    assert np.allclose([lo, hi], np.percentile(floats, [1, 99]))
    big = rng.integers(0, 1000, (40, 50, 60)).astype(np.uint16)
    recorder = ReadRecorder(big)
    lo, hi = intensity_range(recorder, "percentile", max_samples=5000, seed=1)
    assert sum(recorder.reads) <= 5000 and abs(lo - 5) < 15 and abs(hi - 995) < 15  # estimated from a subsample


def test_mostly_background_volume_is_not_called_constant():
    volume = np.zeros((40, 40, 40), np.uint8)
    volume[37, 3, 29] = 200
    values, complete = sample_voxels(volume, max_samples=1000)
    assert not complete and values.size <= 1000
    assert not is_constant(volume, max_samples=1000) and is_constant(np.ones((40, 40, 40)), max_samples=1000)
    assert intensity_range(volume, "minmax", max_samples=1000) == (0.0, 200.0)


def test_scale_intensity_and_bad_data():
    x = np.array([-10, 0, 50, 100, 300], np.int32)
    out = scale_intensity(x, 0, 100)
    assert out.dtype == np.float32 and np.allclose(out, [0, 0, 0.5, 1, 1])
    t = scale_intensity(torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0]]), torch.tensor([[4.0]]))
    assert isinstance(t, torch.Tensor) and torch.allclose(t, torch.tensor([[0.0, 0.5]]))
    with pytest.raises(MicromaeInputError, match="hi > lo"):
        scale_intensity(x, 5, 5)
    with pytest.raises(MicromaeInputError, match="NaN"):
        intensity_range(np.array([1.0, np.nan, 2.0]), "minmax")
    with pytest.raises(MicromaeInputError, match="normalize mode"):
        intensity_range(x, "zscore")

"""The speed paths give today's results: tiles read ahead in a thread give the same labels bit for bit, the
batch size chosen from device memory, and torch.compile (training and the cover-and-stride pass) following
eager mode."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zarr

from micromae.config import PretrainConfig, apply_overrides
from micromae.data.synthetic_em import make_em_volume
from micromae.models import ViTEncoder
from micromae.segment import prefetch as prefetch_mod
from micromae.segment.cluster import fit_kmeans
from micromae.segment.cover_stride import CompiledEncoder, auto_batch_size, embed_pixels, embed_pixels_region
from micromae.segment.fit import sample_pixel_embeddings
from micromae.segment.prefetch import prefetch
from micromae.segment.volume import SegmentSettings, segment_volume
from micromae.train.engine import compile_unavailable
from micromae.train.log import read_log
from micromae.train.pretrain import run_pretrain

RANGE = (0.0, 255.0)
NO_COMPILE = compile_unavailable()
COMPILE = pytest.mark.skipif(NO_COMPILE is not None, reason=f"torch.compile cannot run here: {NO_COMPILE}")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ViTEncoder(img_size=20, patch_size=5, in_chans=1, embed_dim=16, depth=1, num_heads=2).eval()


def test_prefetch_reads_the_next_job_while_the_current_one_is_used():
    next_read = threading.Event()
    threads = []

    def read(job):
        threads.append(threading.current_thread().name)
        if job == 1:
            next_read.set()
        return job * 10

    got = []
    for job, value in prefetch(read, range(4)):
        if job == 0:  # job 1 is read while job 0 is still being used (timeout only guards against a hang)
            assert next_read.wait(timeout=30)
        got.append((job, value))
    assert got == [(0, 0), (1, 10), (2, 20), (3, 30)]
    assert all(name.startswith("micromae-prefetch") for name in threads)


def test_prefetch_raises_a_read_error_at_its_job():
    def read(job):
        if job == 2:
            raise ValueError("bad tile 2")
        return job

    seen = []
    with pytest.raises(ValueError, match="bad tile 2"):
        for job, _ in prefetch(read, range(5)):
            seen.append(job)
    assert seen == [0, 1]


def test_overlapped_segmentation_gives_the_unthreaded_labels_bit_for_bit(tmp_path, encoder, monkeypatch):
    vol = make_em_volume(shape=(8, 37, 45), seed=2).image[:5]
    sample = sample_pixel_embeddings(encoder, vol, 300, RANGE, max_slices=3, progress=False)
    model = fit_kmeans(sample.features, 3, seed=0)
    readers = []
    real = prefetch_mod.read_region

    def recording(*args, **kwargs):
        readers.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefetch_mod, "read_region", recording)
    out = segment_volume(encoder, vol, tmp_path / "s.zarr", {"labels": model}, RANGE, SegmentSettings(tile=20),
                         progress=False)
    got = zarr.open_group(store=str(out), mode="r")["labels"][:]
    assert len(readers) == 5 * 2 * 3 and all(r.startswith("micromae-prefetch") for r in readers)
    # today's path: each tile embedded in the calling thread, batch 256, labels by the nearest centre
    want = np.zeros_like(got)
    for z in range(vol.shape[0]):
        for y0 in range(0, 37, 20):
            for x0 in range(0, 45, 20):
                th, tw = min(20, 37 - y0), min(20, 45 - x0)
                f = embed_pixels_region(encoder, vol[z], y0, x0, th, tw, batch_size=256, intensity_range=RANGE)
                want[z, y0:y0 + th, x0:x0 + tw] = model.predict_map(f).numpy()
    assert np.array_equal(got, want)
    assert len(np.unique(got)) == 3  # all clusters used: the comparison is not between constant maps


def test_batch_size_from_free_device_memory(encoder, monkeypatch):
    assert auto_batch_size(encoder, "cpu") == 256
    per_window = 80 * (4 * 4 + 1) * 16  # bytes: 80 per token and channel
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_window * 1000, per_window * 4000))
    assert auto_batch_size(encoder, "cuda") == 256  # half of 1000 windows, rounded down to a power of two
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_window * 10, per_window * 4000))
    assert auto_batch_size(encoder, "cuda") == 64  # never below 64
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 45, 1 << 46))
    assert auto_batch_size(encoder, "cuda") == 8192  # never above the cap


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
def test_cuda_segmentation_agrees_with_the_cpu(tmp_path, encoder):
    vol = make_em_volume(shape=(8, 37, 45), seed=2).image[:3]
    sample = sample_pixel_embeddings(encoder, vol, 300, RANGE, max_slices=3, progress=False)
    model = fit_kmeans(sample.features, 3, seed=0)
    outs = {}
    for dev in ("cpu", "cuda"):
        out = segment_volume(encoder.to(dev), vol, tmp_path / f"{dev}.zarr", {"labels": model}, RANGE,
                             SegmentSettings(tile=20, amp=False), progress=False)
        outs[dev] = zarr.open_group(store=str(out), mode="r")["labels"][:]
    encoder.to("cpu")
    assert (outs["cpu"] == outs["cuda"]).mean() > 0.999  # fp32 on both: only ties at cluster borders differ


TINY = ["model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
        "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2",
        "data.synthetic_shape=[12,40,40]", "train.batch_size=8", "train.log_every=1", "train.figure_every=0",
        "train.device=cpu", "train.steps=4", "train.ckpt_every=100"]
COMPILED_LOSS_RTOL = 1e-4  # fused kernels round differently; masks and crops are the same (eager random ops)


@COMPILE
def test_compiled_training_follows_the_eager_loss(tmp_path):
    eager = run_pretrain(apply_overrides(PretrainConfig(), TINY), tmp_path / "eager")
    compiled = run_pretrain(apply_overrides(PretrainConfig(), TINY + ["train.compile=true"]), tmp_path / "compiled")
    a = [r["loss"] for r in read_log(eager.run_dir)]
    b = [r["loss"] for r in read_log(compiled.run_dir)]
    assert len(a) == len(b) == 4 and len(set(a)) == 4  # the loss moved: four different steps compared
    assert np.allclose(a, b, rtol=COMPILED_LOSS_RTOL, atol=0), (a, b)


@COMPILE
def test_compiled_cover_and_stride_gives_the_eager_labels(encoder):
    image = make_em_volume(shape=(8, 32, 33), seed=4).image[0].astype(np.float32) / 255.0
    eager = embed_pixels(encoder, image)
    compiled = embed_pixels(CompiledEncoder(encoder), image)
    model = fit_kmeans(eager.reshape(eager.shape[0], -1).T.numpy()[::3], 4, seed=0)
    assert torch.allclose(eager, compiled, atol=1e-5)
    assert torch.equal(model.predict_map(eager), model.predict_map(compiled))

"""Whole-volume segmentation: streaming equals direct computation, resume, tri-planar fusion, sampling, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr

from micromae.cli import main as cli_main
from micromae.data.synthetic_em import make_em_volume
from micromae.errors import MicromaeInputError
from micromae.models import ViTEncoder
from micromae.segment import volume as volume_mod
from micromae.segment.cluster import ClusterModel, fit_kmeans
from micromae.segment.cover_stride import embed_pixels
from micromae.segment.fit import sample_pixel_embeddings
from micromae.segment.volume import SegmentSettings, segment_volume

RANGE = (0.0, 255.0)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ViTEncoder(img_size=20, patch_size=5, in_chans=1, embed_dim=16, depth=1, num_heads=2).eval()


@pytest.fixture(scope="module")
def vol():
    return make_em_volume(shape=(8, 37, 45), seed=2)


def _models(encoder, image, k=3):
    sample = sample_pixel_embeddings(encoder, image, 400, RANGE, max_slices=4, progress=False)
    return {"labels": fit_kmeans(sample.features, k, seed=0), "labels_k2": fit_kmeans(sample.features, 2, seed=0)}


def _direct(encoder, image, model, axis=0, central=None):
    """Reference: embed each plane whole with embed_pixels, then nearest centre."""
    planes = np.moveaxis(image, axis, 0)
    out = []
    for plane in planes:
        f = embed_pixels(encoder, plane.astype(np.float32) / 255.0, central_tokens=central)
        out.append(model.predict_map(f).numpy())
    return np.moveaxis(np.stack(out), 0, axis)


def test_streaming_with_small_tiles_equals_direct(tmp_path, encoder, vol):
    models = _models(encoder, vol.image)
    settings = SegmentSettings(tile=20)  # 37 x 45 planes → 2 x 3 tiles, edge tiles partial
    out = segment_volume(encoder, vol.image, tmp_path / "s.zarr", models, RANGE, settings, progress=False)
    g = zarr.open_group(store=str(out), mode="r")
    assert g["labels"].dtype == np.uint8 and g["labels"].shape == vol.image.shape
    assert np.array_equal(g["labels"][:], _direct(encoder, vol.image, models["labels"]))
    assert np.array_equal(g["labels_k2"][:], _direct(encoder, vol.image, models["labels_k2"]))
    assert not (tmp_path / "s.zarr.partial").exists()
    assert g.attrs["settings"]["mode"] == "exact"


def test_other_axis_equals_direct(tmp_path, encoder, vol):
    models = {"labels": _models(encoder, vol.image)["labels"]}
    out = segment_volume(encoder, vol.image, tmp_path / "y.zarr", models, RANGE, SegmentSettings(axes=(1,)),
                         progress=False)
    got = zarr.open_group(store=str(out), mode="r")["labels"][:]
    assert np.array_equal(got, _direct(encoder, vol.image, models["labels"], axis=1))


def test_interrupted_run_resumes_and_skips_finished_planes(tmp_path, encoder, vol, monkeypatch):
    models = {"labels": _models(encoder, vol.image)["labels"]}
    real = volume_mod.embed_region
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # dies inside the 4th plane (one tile per plane)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(volume_mod, "embed_region", flaky)
    target = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt):
        segment_volume(encoder, vol.image, target, models, RANGE, progress=False)
    assert not target.exists() and (tmp_path / "r.zarr.partial").exists()  # never a half-written output
    calls["n"] = -100  # no more failures
    segment_volume(encoder, vol.image, target, models, RANGE, progress=False)
    assert calls["n"] == -100 + (vol.image.shape[0] - 3)  # only the 5 unfinished planes were embedded
    got = zarr.open_group(store=str(target), mode="r")["labels"][:]
    assert np.array_equal(got, _direct(encoder, vol.image, models["labels"]))


def test_partial_from_other_settings_is_discarded(tmp_path, encoder, vol):
    models = {"labels": _models(encoder, vol.image)["labels"]}
    partial = tmp_path / "o.zarr.partial"
    g = zarr.open_group(store=str(partial), mode="w")
    g.attrs["settings_key"] = "something else"
    out = segment_volume(encoder, vol.image, tmp_path / "o.zarr", models, RANGE, progress=False)
    assert np.array_equal(zarr.open_group(store=str(out), mode="r")["labels"][:],
                          _direct(encoder, vol.image, models["labels"]))


def test_tri_planar_fusion_is_nearest_centre_of_averaged_features(tmp_path, encoder, vol):
    model = _models(encoder, vol.image)["labels"]
    out = segment_volume(encoder, vol.image, tmp_path / "t.zarr", {"labels": model}, RANGE,
                         SegmentSettings(axes=(0, 1, 2)), pca=None, progress=False)
    got = zarr.open_group(store=str(out), mode="r")["labels"][:]
    feats = []
    for axis in range(3):
        planes = np.moveaxis(vol.image, axis, 0)
        f = torch.stack([embed_pixels(encoder, p.astype(np.float32) / 255.0) for p in planes])  # (n, D, h, w)
        feats.append(torch.movedim(f.permute(1, 0, 2, 3), 1, axis + 1))  # (D, Z, Y, X)
    mean = sum(feats) / 3
    expect = model.predict(mean.reshape(mean.shape[0], -1).T).reshape(vol.image.shape).numpy()
    agree = (got == expect).mean()
    assert agree > 0.995, agree  # float16 distances may flip a few near-ties
    assert not [k for k in zarr.open_group(store=str(out), mode="r").array_keys() if k.startswith("dist_")]


def test_pca_features_are_written(tmp_path, encoder, vol):
    models = {"labels": _models(encoder, vol.image)["labels"]}
    rng = np.random.default_rng(0)
    pca = (rng.normal(size=16).astype(np.float32), rng.normal(size=(3, 16)).astype(np.float32))
    out = segment_volume(encoder, vol.image, tmp_path / "p.zarr", models, RANGE, pca=pca, progress=False)
    feats = zarr.open_group(store=str(out), mode="r")["features_pca"]
    assert feats.shape == (3, *vol.image.shape) and feats.dtype == np.float16
    f0 = embed_pixels(encoder, vol.image[0].astype(np.float32) / 255.0)
    ref = ((f0.reshape(16, -1).T - torch.from_numpy(pca[0])) @ torch.from_numpy(pca[1]).T).T.reshape(3, 37, 45)
    assert np.allclose(feats[:, 0], ref.numpy(), atol=2e-2, rtol=1e-2)


def test_sampled_embeddings_are_exact_at_their_coordinates(encoder, vol):
    sample = sample_pixel_embeddings(encoder, vol.image, 300, RANGE, axes=(0, 2), max_slices=6, progress=False)
    assert sample.features.shape == (300, 16) and sample.coords.shape == (300, 3)
    full = {}
    for feat, (z, y, x) in zip(sample.features[:40], sample.coords[:40]):
        # find the plane the sample came from: both candidates are checked, one must match exactly
        key = ("z", z)
        if key not in full:
            full[key] = embed_pixels(encoder, vol.image[z].astype(np.float32) / 255.0).numpy()
        keyx = ("x", x)
        if keyx not in full:
            full[keyx] = embed_pixels(encoder, vol.image[:, :, x].astype(np.float32) / 255.0).numpy()
        ok = np.allclose(feat, full[key][:, y, x], atol=1e-4) or np.allclose(feat, full[keyx][:, z, y], atol=1e-4)
        assert ok


def test_sampling_respects_the_mask(encoder, vol):
    sample = sample_pixel_embeddings(encoder, vol.image, 200, RANGE, mask=vol.cell_mask, max_slices=4,
                                     progress=False)
    assert vol.cell_mask[tuple(sample.coords.T)].all()


def test_errors(tmp_path, encoder, vol):
    models = {"labels": ClusterModel(np.zeros((2, 16), np.float32))}
    (tmp_path / "exists.zarr").mkdir()
    with pytest.raises(MicromaeInputError, match="exists"):
        segment_volume(encoder, vol.image, tmp_path / "exists.zarr", models, RANGE, progress=False)
    with pytest.raises(MicromaeInputError, match="labels"):
        segment_volume(encoder, vol.image, tmp_path / "x.zarr", {"other": models["labels"]}, RANGE, progress=False)
    with pytest.raises(MicromaeInputError, match="shape"):
        sample_pixel_embeddings(encoder, vol.image, 10, RANGE, mask=np.ones((2, 2, 2), bool), progress=False)


def test_cli_segment_then_evaluate(tiny_run, capsys):
    ckpt, data = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data"
    seg, report = tiny_run / "seg.zarr", tiny_run / "report"
    assert cli_main(["segment", "--checkpoint", str(ckpt), "--input", str(data / "image.tif"), "--output", str(seg),
                     "--k", "3", "--sweep", "2..4", "--samples", "500", "--device", "cpu"]) == 0
    g = zarr.open_group(store=str(seg), mode="r")
    assert {"labels", "labels_k2", "labels_k4"} <= set(g.array_keys())
    assert g.attrs["checkpoint_sha256"] and (tiny_run / "seg_centres_k3.npz").is_file()
    assert cli_main(["evaluate", "segmentation", "--pred", str(seg), "--reference", str(data / "labels.tif"),
                     "--mask", str(data / "cell_mask.tif"), "--image", str(data / "image.tif"),
                     "--out", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n_clusters"] == 3 and [r["k"] for r in metrics["k_sweep"]] == [2, 3, 4]
    assert "mitochondria" in metrics["class_names"]
    for png in ("confusion_row.png", "confusion_col.png", "overlays.png", "render3d.png", "umap.png",
                "k_sweep.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG", png
    # the centres fitted once label new data without refitting
    assert cli_main(["segment", "--checkpoint", str(ckpt), "--input", str(data / "image.tif"), "--output",
                     str(tiny_run / "again.zarr"), "--centres", str(tiny_run / "seg_centres_k3.npz"),
                     "--device", "cpu"]) == 0
    again = zarr.open_group(store=str(tiny_run / "again.zarr"), mode="r")["labels"][:]
    assert np.array_equal(again, g["labels"][:])


def test_cli_errors(tiny_run, capsys):
    ckpt, data = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data"
    assert cli_main(["segment", "--checkpoint", str(ckpt), "--input", str(data / "image.tif"), "--output",
                     str(tiny_run / "big.zarr"), "--k", "100000", "--samples", "50", "--device", "cpu"]) == 2
    assert "sampled pixels" in capsys.readouterr().err
    assert cli_main(["evaluate", "segmentation", "--pred", str(data / "labels.tif"), "--reference",
                     str(tiny_run / "run" / "checkpoints" / "last.pt"), "--out", str(tiny_run / "r2")]) == 2
    capsys.readouterr()
    rgb = tiny_run / "rgb.npy"
    np.save(rgb, np.random.default_rng(0).integers(0, 255, (3, 8, 40, 40), dtype=np.uint8))
    assert cli_main(["segment", "--checkpoint", str(ckpt), "--input", str(rgb), "--output",
                     str(tiny_run / "c.zarr"), "--device", "cpu"]) == 2
    assert "single-channel" in capsys.readouterr().err


def test_on_progress_counts_planes_and_an_exception_in_it_stops_leaving_the_partial(tmp_path, encoder, vol):
    models = {"labels": _models(encoder, vol.image)["labels"]}
    seen = []
    segment_volume(encoder, vol.image, tmp_path / "p.zarr", models, RANGE, progress=False,
                   on_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i + 1, vol.image.shape[0]) for i in range(vol.image.shape[0])]

    class Stop(Exception):
        pass

    def stop_at_three(done, total):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        segment_volume(encoder, vol.image, tmp_path / "q.zarr", models, RANGE, progress=False,
                       on_progress=stop_at_three)
    assert not (tmp_path / "q.zarr").exists() and (tmp_path / "q.zarr.partial").exists()
    resumed = []
    segment_volume(encoder, vol.image, tmp_path / "q.zarr", models, RANGE, progress=False,
                   on_progress=lambda done, total: resumed.append(done))
    assert resumed[0] == 4 and resumed[-1] == vol.image.shape[0]  # the 3 finished planes are counted, not redone

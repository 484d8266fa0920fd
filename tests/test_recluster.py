"""Re-clustering from stored features (`micromae cluster --features`): equal to k-means on the same features in
memory (plain PCA features, tri-planar full features in several blocks), and clear errors for outputs without
features and misused options, with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from micromae.cli import main as cli_main
from micromae.errors import MicromaeInputError
from micromae.segment.cluster import ClusterModel, fit_kmeans
from micromae.segment.pipeline import centres_path, run_segment
from micromae.segment.recluster import blocks, recluster, sample_positions
from micromae.segment.volume import SegmentSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tiny_run):
    return {"checkpoint": tiny_run / "run" / "checkpoints" / "last.pt", "input_path": tiny_run / "data" / "image.tif",
            "k": 3, "n_samples": 2000, "device": "cpu"}


def _in_memory(arrays: list[np.ndarray], k: int, n: int, seed: int) -> tuple[ClusterModel, np.ndarray]:
    """The reference: k-means on the stored features of the same voxels, read whole; nearest centre of every
    voxel (summed squared distances over per-axis arrays)."""
    coords = sample_positions(arrays[0].shape[1:], n, seed)
    sample = np.concatenate([a[:, coords[:, 0], coords[:, 1], coords[:, 2]].T for a in arrays]).astype(np.float32)
    model = fit_kmeans(sample, k, seed=seed)
    total = sum(model.squared_distances(torch.from_numpy(a.reshape(a.shape[0], -1).T.astype(np.float32)))
                for a in arrays)
    return model, total.argmin(1).numpy().reshape(arrays[0].shape[1:])


def test_recluster_pca_features_equals_in_memory(data, tmp_path):
    seg = run_segment(**data, output=tmp_path / "seg.zarr", keep_features="pca", pca_dim=4)
    feats = zarr.open_group(store=str(seg), mode="r")["features_pca"][:]
    assert feats.shape == (4, 8, 40, 44) and feats.dtype == np.float16
    out = recluster(seg, tmp_path / "seg_k5.zarr", k=5, n_samples=3000, seed=1, progress=False,
                    budget_bytes=40_000)  # many blocks
    assert len(list(blocks((8, 40, 44), [(1, 40, 44)], 4 * 4 + 2 * 4 * 5, 40_000))) > 4
    model, expect = _in_memory([feats], 5, 3000, 1)
    got = zarr.open_group(store=str(out), mode="r")
    assert np.array_equal(got["labels"][:], expect)
    assert np.array_equal(ClusterModel.load(centres_path(out, 5)).centers, model.centers)
    assert got.attrs["k"] == 5 and got.attrs["clusters"]["labels"]["space"] == "pca"
    assert not (tmp_path / "seg_k5.zarr.partial").exists()


def test_recluster_tri_planar_full_features_fuses_axes_like_in_memory(data, tmp_path):
    seg = run_segment(**data, output=tmp_path / "tri.zarr", settings=SegmentSettings(axes=(0, 1, 2)),
                      keep_features="full")
    g = zarr.open_group(store=str(seg), mode="r")
    assert g.attrs["features"] == {"kind": "full", "per_axis": True,
                                   "arrays": ["features_axis0", "features_axis1", "features_axis2"]}
    arrays = [g[f"features_axis{a}"][:] for a in range(3)]
    assert arrays[0].shape == (16, 8, 40, 44) and not np.array_equal(arrays[0], arrays[1])
    assert cli_main(["cluster", "--features", str(seg), "--k", "4", "--samples", "1500", "--tri-planar",
                     "--output", str(tmp_path / "tri_k4.zarr")]) == 0
    _, expect = _in_memory(arrays, 4, 1500, 0)
    assert np.array_equal(zarr.open_group(store=str(tmp_path / "tri_k4.zarr"), mode="r")["labels"][:], expect)


def test_featureless_output_is_refused_and_nothing_written(data, tmp_path, capsys):
    seg = tmp_path / "plain.zarr"
    g = zarr.open_group(store=str(seg), mode="w")
    g.create_array("labels", shape=(2, 4, 4), dtype="uint8")
    out = tmp_path / "re.zarr"
    assert cli_main(["cluster", "--features", str(seg), "--k", "3", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no stored features (arrays: labels)" in err and "--keep-features pca" in err
    assert not out.exists() and not (tmp_path / "re.zarr.partial").exists() and not list(tmp_path.glob("re_*"))
    assert cli_main(["cluster", "--features", str(tmp_path / "missing.zarr"), "--output", str(out)]) == 2
    assert "nothing there" in capsys.readouterr().err


def test_misused_options_are_clear_errors(data, tmp_path, capsys):
    seg = tmp_path / "pca.zarr"
    g = zarr.open_group(store=str(seg), mode="w")
    g.create_array("features_pca", shape=(2, 2, 4, 4), dtype="float16")
    g.attrs["features"] = {"kind": "pca", "per_axis": False, "arrays": ["features_pca"]}
    out = str(tmp_path / "o.zarr")
    assert cli_main(["cluster", "--features", str(seg), "--checkpoint", "x.pt", "--output", out]) == 2
    assert "Drop --checkpoint" in capsys.readouterr().err
    assert cli_main(["cluster", "--features", str(seg), "--tri-planar", "--output", out]) == 2
    assert "per-axis features" in capsys.readouterr().err
    assert cli_main(["cluster", "--output", str(tmp_path / "c.npz")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    with pytest.raises(MicromaeInputError, match="at most the number of sampled voxels"):
        recluster(seg, out, k=40, progress=False)
    with pytest.raises(MicromaeInputError, match="not the --features input"):
        recluster(seg, seg, k=2, overwrite=True, progress=False)
    centres = tmp_path / "c.npz"
    ClusterModel(np.zeros((3, 16), np.float32)).save(centres)
    with pytest.raises(MicromaeInputError, match="--keep-features pca"):
        run_segment(data["checkpoint"], data["input_path"], tmp_path / "s.zarr", centres=centres,
                    keep_features="pca", device="cpu")
    assert not list(tmp_path.glob("s.zarr*")) and not list(tmp_path.glob("o.zarr*"))


def test_recluster_ome_in_and_out_is_a_valid_ome_zarr_with_the_same_labels(data, tmp_path):
    """OME-Zarr in (features at the store's root) and OME-Zarr out: the label image validates, carries the
    source's voxel size and image copy, and holds the same labels as a plain-group re-clustering."""
    from micromae.io import omezarr

    seg = run_segment(**data, output=tmp_path / "seg.ome.zarr", keep_features="pca", pca_dim=4,
                      voxel_size=(0.05, 0.01, 0.01))
    plain = recluster(seg, tmp_path / "re.zarr", k=4, n_samples=2000, progress=False)
    ome = recluster(seg, tmp_path / "re.ome.zarr", k=4, n_samples=2000, progress=False)
    omezarr.validate(ome)
    got = zarr.open_group(store=str(ome), mode="r")
    assert np.array_equal(got["labels/clusters/0"][:], zarr.open_group(store=str(plain), mode="r")["labels"][:])
    assert omezarr.store_voxel_size(got) == (0.05, 0.01, 0.01)
    src = zarr.open_group(store=str(seg), mode="r")
    assert np.array_equal(got["0"][:], src["0"][:])
    assert [p["label-value"] for p in omezarr.image_label_properties(got, "clusters")] == [0, 1, 2, 3]
    assert centres_path(ome, 4).name == "re_centres_k4.npz" and centres_path(ome, 4).exists()

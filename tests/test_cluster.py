"""k-means cluster model: fitting, nearest-centre prediction, saving with metadata, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from micromae.errors import MicromaeInputError
from micromae.segment.cluster import ClusterModel, fit_kmeans


def _blobs(n=600, k=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (k, d))
    truth = rng.integers(0, k, n)
    return (centres[truth] + rng.normal(0, 0.5, (n, d))).astype(np.float32), truth


@pytest.mark.parametrize("method", ["kmeans", "minibatch"])
def test_fit_recovers_separated_clusters(method):
    x, truth = _blobs()
    model = fit_kmeans(x, k=4, seed=0, method=method, meta={"checkpoint_sha256": "abc"})
    assert adjusted_rand_score(truth, model.predict(x)) == pytest.approx(1.0)
    assert model.meta["k"] == 4 and model.meta["sample_size"] == 600 and model.meta["checkpoint_sha256"] == "abc"


def test_predict_is_nearest_centre_on_numpy_and_torch():
    x, _ = _blobs(n=200)
    model = ClusterModel(np.random.default_rng(1).normal(0, 10, (5, 8)).astype(np.float32))
    brute = np.argmin(((x[:, None, :] - model.centers[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(model.predict(x), brute)
    assert torch.equal(model.predict(torch.from_numpy(x)), torch.from_numpy(brute))
    fmap = torch.from_numpy(x[:120].T.reshape(8, 10, 12).copy())
    assert torch.equal(model.predict_map(fmap).flatten(), torch.from_numpy(brute[:120]))


def test_save_load_round_trip(tmp_path):
    x, _ = _blobs()
    model = fit_kmeans(x, k=3, seed=2)
    path = model.save(tmp_path / "centres.npz")
    back = ClusterModel.load(path)
    assert np.array_equal(back.centers, model.centers) and back.meta == model.meta
    assert not [p for p in tmp_path.iterdir() if p.name != "centres.npz"]  # no temporary left behind


def test_errors(tmp_path):
    x, _ = _blobs(n=10)
    with pytest.raises(MicromaeInputError, match="sample size"):
        fit_kmeans(x, k=11)
    with pytest.raises(MicromaeInputError, match="2-D"):
        fit_kmeans(x[0], k=2)
    model = fit_kmeans(x, k=2)
    with pytest.raises(MicromaeInputError, match="8-dimensional"):
        model.predict(np.zeros((3, 5), np.float32))
    with pytest.raises(MicromaeInputError, match="does not exist"):
        ClusterModel.load(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(MicromaeInputError, match="unreadable"):
        ClusterModel.load(tmp_path / "bad.npz")

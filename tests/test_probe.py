"""Frozen-feature probes: linear probe and k-NN, feature extraction, `micromae probe`."""

from __future__ import annotations

import json

import pytest
import torch

from micromae.cli import main
from micromae.errors import MicromaeInputError
from micromae.evaluate.probe import extract_features, knn_predict, knn_probe, linear_probe
from micromae.models import ViTEncoder


def clusters(n_per_class: int, n_classes: int = 3, dim: int = 16, spread: float = 0.3, seed: int = 0):
    """Gaussian blobs around random unit centres: features (N, dim) and labels (N,)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=gen), dim=1) * 3
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=gen)
    return x, y


def test_probes_separate_trivially_separable_features():
    x, y = clusters(60)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    x, y = x[perm], y[perm]
    tr, te = slice(0, 90), slice(90, None)
    assert (linear_probe(x[tr], y[tr], x[te], 3, epochs=50) == y[te]).float().mean() > 0.97
    for vote in ("weighted", "majority"):
        assert knn_probe(x[tr], y[tr], x[te], y[te], k=5, vote=vote) > 0.97


def test_probes_are_at_chance_on_shuffled_labels():
    x, y = clusters(200, n_classes=2, spread=1.0)
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(2))]  # labels unrelated to features
    tr, te = slice(0, 200), slice(200, None)
    lin = float((linear_probe(x[tr], y[tr], x[te], 2, epochs=30) == y[te]).float().mean())
    knn = knn_probe(x[tr], y[tr], x[te], y[te], k=20)
    assert 0.35 < lin < 0.65 and 0.35 < knn < 0.65  # chance is 0.5


def test_weighted_and_majority_votes_differ_as_documented():
    # two far neighbours of class 0, one almost identical neighbour of class 1
    train_x = torch.tensor([[1.0, 1.0], [1.0, 1.2], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    test_x = torch.tensor([[0.02, 1.0]])
    assert knn_predict(train_x, train_y, test_x, k=3, vote="weighted").item() == 1
    assert knn_predict(train_x, train_y, test_x, k=3, vote="majority").item() == 0
    with pytest.raises(MicromaeInputError, match="k-NN"):
        knn_predict(train_x, train_y, test_x, vote="plurality")


def test_features_are_the_mean_of_the_normalised_patch_tokens():
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2)
    imgs = torch.rand(5, 3, 16, 16)
    feats = extract_features(enc, imgs, batch_size=2)
    with torch.no_grad():
        tokens = enc(imgs)
    assert feats.shape == (5, 16)
    assert torch.allclose(feats, tokens[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(extract_features(enc, imgs, pool="cls"), tokens[:, 0], atol=1e-6)


def test_probe_cli_end_to_end(cells, tmp_path, capsys):
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", "random", "--data", str(cells), "--folds", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    result = json.loads((out / "probe.json").read_text())
    (row,) = result["rows"]
    assert row["encoder"] == "random init" and len(row["linear_folds"]) == 2 and len(row["knn_folds"]) == 2
    # the synthetic types differ by marker channels: even random features beat chance clearly
    assert row["linear_mean"] > result["settings"]["chance"] + 0.2
    assert "linear probe" in (out / "probe.md").read_text()
    assert "random init" in capsys.readouterr().out


def test_probe_rejects_a_folder_with_one_class(cells, tmp_path, capsys):
    from micromae.evaluate.probe import run_probe

    one = tmp_path / "one"
    (one / "neuron").mkdir(parents=True)
    for f in sorted((cells / "neuron").glob("*.tif"))[:4]:
        (one / "neuron" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(MicromaeInputError, match="at least 2 classes"):
        run_probe(["random"], one)
    assert main(["probe", "--checkpoint", "random", "--data", str(one)]) == 2
    assert "at least 2 classes" in capsys.readouterr().err


def test_probe_cli_rejects_missing_checkpoint(cells, capsys):
    assert main(["probe", "--checkpoint", "nope.pt", "--data", str(cells)]) == 2
    assert "no file" in capsys.readouterr().err


def test_probe_cli_passes_the_normalisation(cells, tmp_path):
    out = tmp_path / "probe"
    assert main(["probe", "--checkpoint", "random", "--data", str(cells), "--folds", "2", "--out", str(out),
                 "--device", "cpu", "--normalize", "channel_stats", "--percentiles", "1", "99"]) == 0
    (row,) = json.loads((out / "probe.json").read_text())["rows"]
    assert row["normalize"] == "channel_stats" and list(row["percentiles"]) == [1.0, 99.0]

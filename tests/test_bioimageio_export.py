"""``micromae export-bioimageio``: the packages pass bioimageio.core's own test, offline.

Every test here runs with sockets refused and bioimageio's cache in a temporary folder, so a package (or
bioimageio.core) that tried to download anything would fail the test.
"""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from micromae.cli import main as cli_main

core = pytest.importorskip("bioimageio.core", reason="the bioimageio extra is not installed "
                                                     "(pip install 'micromae[bioimageio]')")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: any socket connection raises; bioimageio's cache lives in tmp_path."""
    from bioimageio.spec._internal._settings import settings

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(settings, "cache_path", tmp_path / "bioimageio-cache")


def _zip_npy(package: Path, name: str) -> np.ndarray:
    import io

    with zipfile.ZipFile(package) as z:
        return np.load(io.BytesIO(z.read(name)))


def _rdf(package: Path) -> dict:
    with zipfile.ZipFile(package) as z:
        return yaml.safe_load(z.read("rdf.yaml"))


@pytest.fixture(scope="module")
def centres(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("centres") / "centres_k3.npz"
    assert cli_main(["cluster", "--checkpoint", str(tiny_run / "run" / "checkpoints" / "last.pt"), "--input",
                     str(tiny_run / "data" / "image.tif"), "--output", str(out), "--k", "3", "--samples", "500",
                     "--device", "cpu"]) == 0
    return out


def test_segmenter_package_passes_bioimageio_core_and_matches_micromae_segment(tiny_run, centres, tmp_path):
    import tifffile

    from micromae.segment.pipeline import run_segment

    ckpt, image = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data" / "image.tif"
    package = tmp_path / "segmenter.zip"
    assert cli_main(["export-bioimageio", "segmenter", "--checkpoint", str(ckpt), "--centres", str(centres),
                     "--input", str(image), "--output", str(package), "--test-size", "32",
                     "--author", "A. Tester"]) == 0
    rdf = _rdf(package)
    assert rdf["format_version"].startswith("0.5") and rdf["type"] == "model"
    assert [t["id"] for t in rdf["inputs"]] == ["raw"] and [t["id"] for t in rdf["outputs"]] == ["labels",
                                                                                                  "embeddings"]
    assert rdf["authors"][0]["name"] == "A. Tester" and rdf["cite"] and rdf["license"] == "MIT"
    arch = rdf["weights"]["pytorch_state_dict"]["architecture"]
    assert arch["callable"] == "MaesterSegmenter" and arch["kwargs"]["k"] == 3
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
    assert {"rdf.yaml", "weights.pt", arch["source"], "README.md", "cover.png", "environment.yaml",
            "test_raw.npy", "test_labels.npy", "test_embeddings.npy"} <= names

    summary = core.test_model(package)
    assert summary.status == "passed", summary.format()

    # the package labels its test image exactly as micromae segment does with the same centres
    raw = _zip_npy(package, "test_raw.npy")
    volume = tifffile.imread(image)
    z, (h, w) = volume.shape[0] // 2, raw.shape[-2:]
    y0, x0 = (volume.shape[1] - h) // 2, (volume.shape[2] - w) // 2
    crop = volume[z, y0:y0 + h, x0:x0 + w]
    assert np.array_equal(raw[0, 0], crop.astype(np.float32))
    out = run_segment(ckpt, crop, tmp_path / "crop.zarr", centres=centres, device="cpu")
    cli_labels = zarr.open_group(store=str(out), mode="r")["labels"][0]
    assert np.array_equal(_zip_npy(package, "test_labels.npy")[0, 0], cli_labels)


def test_classifier_package_passes_bioimageio_core_with_both_weight_formats(cells, tmp_path):
    from micromae.config import resolve_config
    from micromae.train.classify import load_classify_config, run_classify_finetune

    cfg = load_classify_config(resolve_config("classify_tiny"), [
        f"data.root={cells}", "data.size=32", "model.img_size=32", "model.embed_dim=32", "model.depth=1",
        "model.num_heads=2", "train.epochs=null", "train.steps=2", "train.batch_size=8", "train.device=cpu",
        "train.ckpt_every=0"])
    result = run_classify_finetune(cfg, tmp_path / "cls")
    crop = sorted(Path(cells).glob("*/*.tif"))[0]
    package = tmp_path / "classifier.zip"
    assert cli_main(["export-bioimageio", "classifier", "--checkpoint", str(result.checkpoint), "--input",
                     str(crop), "--output", str(package)]) == 0
    rdf = _rdf(package)
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"}
    classes = sorted(p.name for p in Path(cells).iterdir() if p.is_dir())
    assert [c for c in rdf["outputs"][0]["axes"] if c["type"] == "channel"][0]["channel_names"] == classes
    import tifffile

    scale = [p for p in rdf["inputs"][0]["preprocessing"] if p["id"] == "scale_linear"]
    dtype = tifffile.imread(crop).dtype  # raw crops in, as stored: the package scales them as training did
    assert scale and scale[0]["kwargs"]["gain"] == pytest.approx(1.0 / np.iinfo(dtype).max)
    probs = _zip_npy(package, "test_probabilities.npy")
    assert probs.shape == (1, len(classes)) and np.isclose(probs.sum(), 1.0, atol=1e-5)
    summary = core.test_model(package)
    assert summary.status == "passed", summary.format()
    tested = {d.name for d in summary.details if "inference" in d.name.lower() or "reproduce" in d.name.lower()}
    assert any("torchscript" in n for n in tested) and any("pytorch_state_dict" in n for n in tested), tested


def test_bad_input_is_refused_and_nothing_is_written(tiny_run, centres, tmp_path, capsys):
    ckpt, image = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data" / "image.tif"
    out = tmp_path / "m.zip"
    base = ["export-bioimageio", "segmenter", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out)]
    assert cli_main(base) == 2
    assert "micromae cluster" in capsys.readouterr().err and not out.exists()
    other = tmp_path / "other.npz"
    np.savez(other, centers=np.zeros((3, 5), np.float32), meta=np.array("{}"))
    assert cli_main([*base, "--centres", str(other)]) == 2
    assert "16-dimensional" in capsys.readouterr().err and not out.exists()
    assert cli_main([*base[:-1], str(tmp_path / "m.tif"), "--centres", str(centres)]) == 2
    assert ".zip" in capsys.readouterr().err
    out.write_text("keep me")
    assert cli_main([*base, "--centres", str(centres)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    assert list(tmp_path.glob(".*partial*")) == []

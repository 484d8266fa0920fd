"""Synthetic EM-like volumes: shape, classes, morphology, the intensity-only baseline failing, file I/O."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.measure import label, regionprops
from sklearn.cluster import KMeans

from micromae.data.synthetic_em import (
    CLASS_NAMES,
    EMOptions,
    make_em_volume,
    read_em_volume,
    write_em_volume,
)
from micromae.errors import MicromaeInputError

OUTSIDE, CYTOPLASM, MEMBRANE, NUCLEUS, MITOCHONDRIA, GRANULES = range(6)


@pytest.fixture(scope="module")
def vol():
    """The default-size volume (64, 256, 256): the class-frequency ranges are stated for it."""
    return make_em_volume(seed=0)


@pytest.fixture(scope="module")
def small():
    return make_em_volume((16, 64, 64), seed=3)


def test_shapes_dtypes_and_label_consistency(vol):
    assert vol.image.shape == vol.labels.shape == vol.cell_mask.shape == vol.instances.shape == (64, 256, 256)
    assert (vol.image.dtype, vol.labels.dtype, vol.cell_mask.dtype, vol.instances.dtype) == (
        np.uint8, np.uint8, np.bool_, np.uint32)
    assert vol.class_names == CLASS_NAMES
    assert vol.labels.max() == len(CLASS_NAMES) - 1
    np.testing.assert_array_equal(vol.cell_mask, vol.labels != OUTSIDE)
    np.testing.assert_array_equal(vol.instances > 0, vol.cell_mask)
    assert vol.image.std() > 10  # an image, not a constant


@pytest.mark.parametrize("shape", [(8, 32, 32), (12, 40, 56)])
def test_any_shape_from_the_minimum(shape):
    v = make_em_volume(shape, seed=1)
    assert v.image.shape == v.labels.shape == shape
    assert v.image.dtype == np.uint8 and v.labels.dtype == np.uint8


def test_class_frequencies_of_all_voxels(vol):
    f = vol.class_fractions()
    assert set(np.unique(vol.labels)) == set(range(6))
    assert 0.10 <= f["outside"] <= 0.30
    assert 0.15 <= f["nucleus"] <= 0.30
    assert 0.05 <= f["mitochondria"] <= 0.10
    assert 0.03 <= f["membrane"] <= 0.05
    assert 0.01 <= f["granules"] <= 0.03
    assert abs(sum(f.values()) - 1) < 1e-9


def test_reproducible_for_a_seed_and_different_across_seeds(small):
    again = make_em_volume((16, 64, 64), seed=3)
    np.testing.assert_array_equal(small.image, again.image)
    np.testing.assert_array_equal(small.labels, again.labels)
    other = make_em_volume((16, 64, 64), seed=4)
    assert np.mean(small.labels != other.labels) > 0.1
    assert np.mean(small.image != other.image) > 0.5


def test_one_nucleus_per_cell_clear_of_the_membrane(vol):
    n_cells = int(vol.instances.max())
    assert n_cells >= 3
    for cell in range(1, n_cells + 1):
        _, n = ndi.label((vol.labels == NUCLEUS) & (vol.instances == cell))
        assert n == 1, f"cell {cell} has {n} nuclei"
    assert not np.any(ndi.binary_dilation(vol.labels == NUCLEUS) & (vol.labels == MEMBRANE))


def test_mitochondria_elongated_and_granules_small(vol):
    mito = [p for p in regionprops(label(vol.labels == MITOCHONDRIA, connectivity=1)) if p.area >= 100]
    ratios = [p.axis_major_length / p.axis_minor_length for p in mito]
    assert len(mito) > 50
    assert np.median(ratios) > 1.8
    granules = regionprops(label(vol.labels == GRANULES, connectivity=1))
    r_max = EMOptions().granule_radius[1] + EMOptions().halo_width
    assert len(granules) > 50
    assert max(p.area for p in granules) <= 4 / 3 * np.pi * (r_max + 1) ** 3
    assert np.median([p.axis_major_length / p.axis_minor_length for p in granules]) < 1.3
    assert np.median([p.area for p in mito]) > 2 * np.median([p.area for p in granules])


def test_granule_core_as_dark_as_membrane_and_halo_pale(vol):
    """Granules are told by shape and context: their mean is close to the cytoplasm's, not to an extreme."""
    means = {k: vol.image[vol.labels == k].mean() for k in range(6)}
    assert means[MEMBRANE] < means[CYTOPLASM] < means[OUTSIDE]
    assert abs(means[MITOCHONDRIA] - means[NUCLEUS]) < abs(means[MEMBRANE] - means[NUCLEUS])
    assert means[MEMBRANE] < means[GRANULES] < means[OUTSIDE]


def test_intensity_only_kmeans_misses_mitochondria_and_granules(vol):
    """k-means on raw voxel intensities (k = 6) must not recover mitochondria or granules (Dice < 0.5),
    while it does find the bright, smooth outside: the classes differ by texture and shape, not intensity."""
    rng = np.random.default_rng(0)
    idx = rng.choice(vol.image.size, 100_000, replace=False)
    x = vol.image.ravel()[idx].astype(np.float32)[:, None]
    y = vol.labels.ravel()[idx]
    clusters = KMeans(n_clusters=6, n_init=3, random_state=0).fit_predict(x)

    def best_dice(cls: int) -> float:
        truth = y == cls
        return max(2 * np.sum(truth & (clusters == j)) / (truth.sum() + np.sum(clusters == j)) for j in range(6))

    assert best_dice(MITOCHONDRIA) < 0.5
    assert best_dice(GRANULES) < 0.5
    assert best_dice(OUTSIDE) > 0.5


def test_misalignment_shifts_whole_slices_with_their_labels():
    plain = make_em_volume((12, 48, 48), seed=2)
    shifted = make_em_volume((12, 48, 48), seed=2, misalignment=2.0)
    assert np.any(plain.labels != shifted.labels)
    for z in range(12):  # every slice is the plain slice moved by one integer offset
        matches = [
            np.array_equal(ndi.shift(plain.labels[z], (dy, dx), order=0, mode="nearest"), shifted.labels[z])
            for dy in range(-8, 9) for dx in range(-8, 9)
        ]
        assert any(matches), f"slice {z} is not a shifted copy"
    np.testing.assert_array_equal(shifted.cell_mask, shifted.labels != OUTSIDE)


def test_noise_option_scales_the_noise(small):
    clean = make_em_volume((16, 64, 64), seed=3, noise=0.0)
    half = make_em_volume((16, 64, 64), seed=3, noise=0.5)
    np.testing.assert_array_equal(clean.labels, small.labels)
    residual_full = np.std(small.image.astype(float) - clean.image)
    residual_half = np.std(half.image.astype(float) - clean.image)
    assert residual_full > 5
    assert residual_half < 0.75 * residual_full


def test_write_read_round_trip(tmp_path, small):
    written = write_em_volume(tmp_path / "vol", small)
    assert set(written) == {"image", "labels", "cell_mask", "instances", "classes"}
    assert sorted(p.name for p in (tmp_path / "vol").iterdir()) == sorted(p.name for p in written.values())
    back = read_em_volume(tmp_path / "vol")
    for name in ("image", "labels", "cell_mask", "instances"):
        np.testing.assert_array_equal(getattr(back, name), getattr(small, name))
        assert getattr(back, name).dtype == getattr(small, name).dtype
    assert back.class_names == small.class_names and back.spacing == small.spacing
    assert tifffile.imread(written["image"]).shape == small.image.shape


def test_failed_write_leaves_no_file(tmp_path, small, monkeypatch):
    real = tifffile.imwrite
    calls = []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", failing)
    with pytest.raises(OSError):
        write_em_volume(tmp_path / "vol", small)
    assert list((tmp_path / "vol").iterdir()) == []


def test_bad_inputs_raise_input_errors():
    with pytest.raises(MicromaeInputError, match="at least"):
        make_em_volume((4, 32, 32))
    with pytest.raises(MicromaeInputError, match="3 integers"):
        make_em_volume((32, 32))
    with pytest.raises(MicromaeInputError, match="n_celss"):
        make_em_volume((8, 32, 32), n_celss=3)
    with pytest.raises(MicromaeInputError, match="nucleus_fraction"):
        make_em_volume((8, 32, 32), nucleus_fraction=1.5)
    with pytest.raises(MicromaeInputError, match="missing"):
        read_em_volume("/nonexistent/folder")

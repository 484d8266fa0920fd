"""betaSeg layout: the synthetic volume written in it loads back; mask conventions; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from micromae.data.betaseg import (
    BETASEG_SPLIT,
    ORGANELLES,
    list_betaseg_cells,
    load_betaseg_cell,
    write_betaseg_cell,
)
from micromae.data.synthetic_em import CLASS_NAMES, make_em_volume, write_em_volume
from micromae.errors import MicromaeInputError

ORGANELLES_WRITTEN = ("nucleus", "mitochondria", "granules")


@pytest.fixture(scope="module")
def vol():
    return make_em_volume((16, 64, 64), seed=5)


def _assert_same_cell(cell, vol):
    np.testing.assert_array_equal(cell.image, vol.image)
    np.testing.assert_array_equal(cell.cell_mask, vol.cell_mask)
    assert cell.class_names == ("outside", "cytoplasm") + ORGANELLES  # fixed, whatever masks exist
    assert cell.labels.dtype == np.uint8
    for organelle in ORGANELLES_WRITTEN:
        np.testing.assert_array_equal(cell.labels == cell.class_names.index(organelle),
                                      vol.labels == CLASS_NAMES.index(organelle))
    # betaSeg has no membrane class: membrane voxels are cytoplasm of the cell
    membrane = vol.labels == CLASS_NAMES.index("membrane")
    assert membrane.any() and np.all(cell.labels[membrane] == 1)
    np.testing.assert_array_equal(cell.labels == 0, ~vol.cell_mask)


def test_flat_layout_round_trip(tmp_path, vol):
    other = make_em_volume((16, 64, 64), seed=6)
    written = write_em_volume(tmp_path, vol, betaseg_layout=True, cell_name="high_c1")
    write_em_volume(tmp_path, other, betaseg_layout=True, cell_name="high_c4")
    assert written["source"].name == "high_c1_source.tif"
    assert written["cell_mask"].name == "high_c1_membrane_full_mask.tif"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left
    assert list_betaseg_cells(tmp_path) == ["high_c1", "high_c4"]
    _assert_same_cell(load_betaseg_cell(tmp_path, "high_c1"), vol)
    _assert_same_cell(load_betaseg_cell(tmp_path, "high_c4"), other)


def test_one_folder_per_cell_layout(tmp_path, vol):
    write_em_volume(tmp_path / "synthetic_c1", vol, betaseg_layout=True)
    write_em_volume(tmp_path / "high_c2", vol, betaseg_layout=True, cell_name="high_c2")
    assert list_betaseg_cells(tmp_path) == ["high_c2", "synthetic_c1"]
    cell = load_betaseg_cell(tmp_path, "synthetic_c1")
    assert cell.name == "synthetic_c1"
    _assert_same_cell(cell, vol)


def test_masks_0_1_tiff_extension_and_missing_masks(tmp_path, vol):
    nucleus = vol.labels == CLASS_NAMES.index("nucleus")
    tifffile.imwrite(tmp_path / "c_source.tiff", vol.image)
    tifffile.imwrite(tmp_path / "c_membrane_full_mask.tif", vol.cell_mask.astype(np.uint8))  # 0/1
    tifffile.imwrite(tmp_path / "c_nucleus_mask.tif", nucleus.astype(np.uint8))
    cell = load_betaseg_cell(tmp_path, "c")
    assert cell.class_names == ("outside", "cytoplasm") + ORGANELLES  # same indices as a fully masked cell
    np.testing.assert_array_equal(cell.labels == cell.class_names.index("nucleus"), nucleus)
    assert set(np.unique(cell.labels)) == {0, 1, cell.class_names.index("nucleus")}
    np.testing.assert_array_equal(cell.labels == 1, vol.cell_mask & ~nucleus)


def test_overlapping_masks_follow_the_priority_order(tmp_path):
    shape = (8, 16, 16)
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    nucleus = np.zeros(shape, bool)
    nucleus[:, :8] = True
    granules = np.zeros(shape, bool)
    granules[:, 6:10] = True  # overlaps the nucleus on rows 6-7
    mito = np.zeros(shape, bool)
    mito[:, :, 4:6] = True
    microtubules = np.zeros(shape, bool)
    microtubules[:, :, 5] = True  # inside the mitochondria column
    write_betaseg_cell(tmp_path, "c", image, {"nucleus": nucleus, "granules": granules, "mitochondria": mito,
                                              "microtubules": microtubules}, np.ones(shape, bool))
    cell = load_betaseg_cell(tmp_path, "c")
    assert cell.class_names == ("outside", "cytoplasm") + ORGANELLES
    idx = {name: i for i, name in enumerate(cell.class_names)}
    assert np.all(cell.labels[:, 6:8, :4] == idx["granules"])  # granules over nucleus
    assert np.all(cell.labels[:, :6, 4] == idx["mitochondria"])  # mitochondria over nucleus
    assert np.all(cell.labels[:, 6:10, 4] == idx["granules"])  # granules over mitochondria
    assert np.all(cell.labels[:, :, 5] == idx["microtubules"])  # microtubules over everything
    assert np.all(cell.labels[:, 10:, 10:] == idx["cytoplasm"])


def test_missing_cell_mask_warns_and_uses_the_whole_volume(tmp_path, vol):
    tifffile.imwrite(tmp_path / "c_source.tif", vol.image)
    with pytest.warns(UserWarning, match="membrane_full_mask"):
        cell = load_betaseg_cell(tmp_path, "c")
    assert cell.cell_mask.all() and np.all(cell.labels == 1)


def test_errors_say_what_was_found(tmp_path, vol):
    with pytest.raises(MicromaeInputError, match="existing folder"):
        list_betaseg_cells(tmp_path / "absent")
    with pytest.raises(MicromaeInputError, match="existing folder"):
        load_betaseg_cell(tmp_path / "absent", "high_c1")
    assert list_betaseg_cells(tmp_path) == []
    write_em_volume(tmp_path, vol, betaseg_layout=True, cell_name="high_c1")
    with pytest.raises(MicromaeInputError, match=r"cells found: \['high_c1'\]"):
        load_betaseg_cell(tmp_path, "high_c3")
    tifffile.imwrite(tmp_path / "high_c1_granules.tif", np.zeros((4, 8, 8), np.uint8), photometric="minisblack")
    with pytest.raises(MicromaeInputError, match=r"shape \(4, 8, 8\)"):
        load_betaseg_cell(tmp_path, "high_c1")
    tifffile.imwrite(tmp_path / "flat_source.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(MicromaeInputError, match="3-D"):
        load_betaseg_cell(tmp_path, "flat")
    (tmp_path / "broken_source.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(MicromaeInputError, match="readable TIFF"):
        load_betaseg_cell(tmp_path, "broken")


def test_paper_split():
    assert BETASEG_SPLIT["test"] == ["high_c4"]
    assert set(BETASEG_SPLIT["train"]).isdisjoint(BETASEG_SPLIT["test"])
    assert len(BETASEG_SPLIT["train"]) == 3

"""Tests for micromae.io: readers, lazy Volume views, axes, validation and atomic writers."""

from __future__ import annotations

import os
import pickle

import h5py
import imageio.v3
import numpy as np
import pytest
import tifffile
import zarr

import micromae.io.writers as writers_module
from micromae.errors import MicromaeInputError
from micromae.io import (
    Volume,
    ZarrWriter,
    atomic_path,
    check_crop_fits,
    open_volume,
    require_axes,
    write_array,
    write_files_atomically,
    write_hdf5,
    write_npy,
    write_tiff,
    write_zarr,
)


@pytest.fixture
def stack() -> np.ndarray:
    """A seeded (Z, Y, X) = (5, 12, 9) uint16 volume with distinct values along every axis."""
    return np.random.default_rng(0).integers(0, 60000, size=(5, 12, 9), dtype=np.uint16)


@pytest.fixture
def multichannel() -> np.ndarray:
    """A seeded (C, Z, Y, X) = (3, 4, 10, 7) float32 volume."""
    return np.random.default_rng(1).normal(size=(3, 4, 10, 7)).astype(np.float32)


def leftovers(directory) -> list[str]:
    """Names in ``directory`` (temporary siblings included: they start with a dot)."""
    return sorted(os.listdir(directory))


def raises_input_error(*needles: str):
    """Context manager: a MicromaeInputError whose message holds 'expected' and every needle."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(MicromaeInputError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            swallowed = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "expected" in message
            for needle in needles:
                assert needle in message, f"{needle!r} not in {message!r}"
            return swallowed

    return _Check()


# -- round trips per format -----------------------------------------------------------------------------

def test_plain_tiff_defaults_to_zyx(tmp_path, stack):
    tifffile.imwrite(tmp_path / "a.tif", stack)
    with open_volume(str(tmp_path / "a.tif")) as volume:
        assert volume.axes == "ZYX" and volume.shape == stack.shape and volume.ndim == 3
        assert volume.dtype == stack.dtype
        np.testing.assert_array_equal(volume.read(), stack)


def test_compressed_tiff_is_read_by_region(tmp_path, stack):
    tifffile.imwrite(tmp_path / "c.tif", stack, compression="zlib", tile=(16, 16))
    with open_volume(tmp_path / "c.tif") as volume:
        np.testing.assert_array_equal(volume[1:4, 3:, 2], stack[1:4, 3:, 2])
        np.testing.assert_array_equal(volume.read(), stack)


def test_ome_tiff_axes_from_metadata(tmp_path, multichannel):
    zcyx = np.transpose(multichannel, (1, 0, 2, 3))
    tifffile.imwrite(tmp_path / "m.ome.tif", zcyx, ome=True, metadata={"axes": "ZCYX"})
    with open_volume(tmp_path / "m.ome.tif") as volume:
        assert volume.axes == "CZYX" and volume.shape == multichannel.shape
        np.testing.assert_array_equal(volume.read(), multichannel)


def test_ome_tiff_singleton_time_is_dropped(tmp_path, stack):
    tifffile.imwrite(tmp_path / "t.ome.tif", stack[None], ome=True, metadata={"axes": "TZYX"})
    with open_volume(tmp_path / "t.ome.tif") as volume:
        assert volume.axes == "ZYX"
        np.testing.assert_array_equal(volume[2], stack[2])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_array(tmp_path, stack, zarr_format):
    array = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=stack.shape, dtype=stack.dtype,
                              chunks=(2, 5, 5), zarr_format=zarr_format)
    array[...] = stack
    with open_volume(tmp_path / "a.zarr") as volume:
        assert volume.axes == "ZYX" and volume.chunks == (2, 5, 5)
        np.testing.assert_array_equal(volume.read(), stack)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_group_reads_level0_with_its_axes(tmp_path, stack, zarr_format):
    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=zarr_format)
    group.create_array("0", data=stack[None, None])
    group.create_array("1", data=stack[None, None, :, ::2, ::2])
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space"} for n in "zyx"]
    multiscales = [{"axes": axes, "datasets": [{"path": "0"}, {"path": "1"}]}]
    if zarr_format == 2:  # OME-Zarr 0.4 keeps multiscales at the top; 0.5 (Zarr v3) under "ome"
        group.attrs["multiscales"] = [{"version": "0.4", **multiscales[0]}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": multiscales}
    with open_volume(tmp_path / "img.ome.zarr") as volume:
        assert volume.axes == "CZYX" and volume.shape == (1,) + stack.shape
        np.testing.assert_array_equal(volume[0], stack)


def test_zarr_group_with_one_array_and_with_a_key(tmp_path, stack):
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", data=stack)
    np.testing.assert_array_equal(open_volume(tmp_path / "g.zarr").read(), stack)
    group.create_array("labels", data=stack // 2)
    with raises_input_error("labels", "raw"):
        open_volume(tmp_path / "g.zarr")
    np.testing.assert_array_equal(open_volume(tmp_path / "g.zarr", key="labels").read(), stack // 2)
    np.testing.assert_array_equal(open_volume(f"{tmp_path / 'g.zarr'}:labels").read(), stack // 2)
    with raises_input_error("nope", "labels", "raw"):
        open_volume(tmp_path / "g.zarr", key="nope")


def test_hdf5_with_key_and_path_syntax(tmp_path, stack):
    with h5py.File(tmp_path / "v.h5", "w") as file:
        file["volumes/raw"] = stack
        file["volumes/labels"] = stack % 7
    with open_volume(tmp_path / "v.h5", key="volumes/raw") as volume:
        np.testing.assert_array_equal(volume.read(), stack)
    with open_volume(f"{tmp_path / 'v.h5'}:volumes/labels") as volume:
        assert volume.key == "volumes/labels"
        np.testing.assert_array_equal(volume[:, 4], stack[:, 4] % 7)


def test_hdf5_missing_or_wrong_key_lists_datasets(tmp_path, stack):
    with h5py.File(tmp_path / "v.h5", "w") as file:
        file["raw"] = stack
        file["labels"] = stack % 7
    with raises_input_error("raw", "labels"):
        open_volume(tmp_path / "v.h5")
    with raises_input_error("nope", "raw", "labels"):
        open_volume(tmp_path / "v.h5", key="nope")


def test_npy_is_memory_mapped_and_read_by_region(tmp_path, stack):
    np.save(tmp_path / "a.npy", stack)
    with open_volume(tmp_path / "a.npy") as volume:
        np.testing.assert_array_equal(volume[-1, ::3, 1:8:2], stack[-1, ::3, 1:8:2])


@pytest.mark.parametrize("name", ["p.npy", "p.h5", "p.tif"])
def test_volume_pickles_by_path(tmp_path, stack, name):
    write_array(tmp_path / name, np.transpose(stack, (2, 1, 0)), axes="XYZ")
    volume = open_volume(tmp_path / name)
    payload = pickle.dumps(volume)
    assert len(payload) < stack.nbytes  # the path travels, not the voxels
    again = pickle.loads(payload)
    assert again.axes == volume.axes
    np.testing.assert_array_equal(again[1:3], stack[1:3])
    volume.close()
    again.close()


def test_png_reads_gray_as_yx_and_rgb_as_cyx(tmp_path, stack):
    gray = (stack[0] // 256).astype(np.uint8)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    imageio.v3.imwrite(tmp_path / "g.png", gray)
    imageio.v3.imwrite(tmp_path / "rgb.png", rgb)
    np.testing.assert_array_equal(open_volume(tmp_path / "g.png").read(), gray)
    volume = open_volume(tmp_path / "rgb.png")
    assert volume.axes == "CYX"
    np.testing.assert_array_equal(volume.read(), np.moveaxis(rgb, -1, 0))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    with raises_input_error("bad.png", "corrupt"):
        open_volume(tmp_path / "bad.png")


# -- axes and regions -----------------------------------------------------------------------------------

def test_xyz_axes_are_transposed_to_zyx(tmp_path, stack):
    np.save(tmp_path / "xyz.npy", np.transpose(stack, (2, 1, 0)))
    with open_volume(tmp_path / "xyz.npy", axes="XYZ") as volume:
        assert volume.axes == "ZYX" and volume.shape == stack.shape
        np.testing.assert_array_equal(volume.read(), stack)
        np.testing.assert_array_equal(volume[3, 2:9], stack[3, 2:9])
        assert volume[3, 2:9].flags.c_contiguous


def test_yxc_axes_become_cyx(tmp_path, multichannel):
    cyx = multichannel[:, 0]
    np.save(tmp_path / "yxc.npy", np.moveaxis(cyx, 0, -1))
    with open_volume(tmp_path / "yxc.npy", axes="yxc") as volume:
        assert volume.axes == "CYX" and volume.shape == cyx.shape
        np.testing.assert_array_equal(volume.read(), cyx)


def test_region_reads_equal_slices_of_the_full_array(multichannel):
    volume = Volume.from_array(np.transpose(multichannel, (2, 3, 1, 0)), axes="YXZC")
    assert volume.axes == "CZYX"
    full = volume.read()
    np.testing.assert_array_equal(full, multichannel)
    for index in [(1,), (slice(None), 2), (..., 3), (0, slice(1, 3), slice(None, None, 2), -1),
                  (-1, ..., slice(2, 5)), (slice(1, 1),), (2, 3, 4, 5)]:
        np.testing.assert_array_equal(volume[index], full[index])
    with pytest.raises(IndexError):
        volume[3]


def test_iter_blocks_covers_every_voxel_once(stack):
    volume = Volume.from_array(stack)
    seen = np.zeros(stack.shape, dtype=np.int64)
    shapes = set()
    for slices, block in volume.iter_blocks((2, 5, None)):
        np.testing.assert_array_equal(block, stack[slices])
        seen[slices] += 1
        shapes.add(block.shape)
    assert (seen == 1).all()
    assert shapes == {(2, 5, 9), (2, 2, 9), (1, 5, 9), (1, 2, 9)}


# -- bad inputs -----------------------------------------------------------------------------------------

def test_missing_path_and_unsupported_extension(tmp_path):
    with raises_input_error("nothing.tif"):
        open_volume(tmp_path / "nothing.tif")
    (tmp_path / "image.czi").write_bytes(b"ZISRAWFILE")
    with raises_input_error(".czi", ".tif", ".zarr", ".h5", ".npy"):
        open_volume(tmp_path / "image.czi")
    (tmp_path / "empty.zarr").mkdir()
    with raises_input_error("empty.zarr"):
        open_volume(tmp_path / "empty.zarr")


@pytest.mark.parametrize(("axes", "needle"), [("ZYT", "T"), ("ZZX", "Z"), ("YX", "'YX'"), ("CZYX", "'CZYX'"),
                                              ("ZYQ", "Q"), ("CZY", "CZY")])
def test_bad_axes_are_refused(tmp_path, stack, axes, needle):
    np.save(tmp_path / "a.npy", stack)
    with raises_input_error(needle):
        open_volume(tmp_path / "a.npy", axes=axes)


def test_axes_may_skip_singleton_dims(tmp_path, stack):
    np.save(tmp_path / "a.npy", stack[:, None])
    with open_volume(tmp_path / "a.npy", axes="ZYX") as volume:
        assert volume.shape == stack.shape
        np.testing.assert_array_equal(volume.read(), stack)


def test_empty_nonfinite_and_constant_data_are_refused(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), np.uint8))
    with raises_input_error("(0, 4, 4)"):
        open_volume(tmp_path / "empty.npy")
    image = np.random.default_rng(2).random((6, 8, 8)).astype(np.float32)
    image[4, 3, 2] = np.nan
    np.save(tmp_path / "nan.npy", image)
    with raises_input_error("nan", "ZYX = (4, 3, 2)"):
        open_volume(tmp_path / "nan.npy")
    image[4, 3, 2] = np.inf
    np.save(tmp_path / "inf.npy", image)
    with raises_input_error("inf"):
        open_volume(tmp_path / "inf.npy")
    np.save(tmp_path / "flat.npy", np.full((3, 5, 5), 7, np.uint16))
    with raises_input_error("7", "constant"):
        open_volume(tmp_path / "flat.npy")
    assert open_volume(tmp_path / "flat.npy", check=False).shape == (3, 5, 5)


def test_nonfinite_scan_reaches_the_last_block(tmp_path):
    image = np.random.default_rng(3).random((40, 16, 16))
    image[-1, -1, -1] = np.nan
    np.save(tmp_path / "late_nan.npy", image)
    with pytest.raises(MicromaeInputError, match="nan"):
        from micromae.io import check_values
        check_values(open_volume(tmp_path / "late_nan.npy", check=False), target_bytes=4096)


@pytest.mark.parametrize("options", [{}, {"compression": "zlib"}, {"imagej": True}])
def test_truncated_tiff_is_reported_as_corrupt(tmp_path, stack, options):
    tifffile.imwrite(tmp_path / "full.tif", stack, **options)
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with raises_input_error("cut.tif", "truncated"):
        open_volume(tmp_path / "cut.tif")
    assert (tmp_path / "cut.tif").stat().st_size == len(data) // 2  # opening never writes to the file


@pytest.mark.parametrize("name", ["a.npy", "a.h5"])
def test_truncated_npy_and_hdf5_are_reported_as_corrupt(tmp_path, stack, name):
    write_array(tmp_path / name, stack)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with raises_input_error(name, "corrupt"):
        open_volume(tmp_path / name)


def test_require_axes_and_crop_checks(stack):
    volume = Volume.from_array(stack)
    require_axes(volume, "ZYX", "plane sampler")
    require_axes(volume, {"ZYX", "CZYX"}, "plane sampler")
    with raises_input_error("'CYX'", "'ZYX'", "multichannel loader"):
        require_axes(volume, "CYX", "multichannel loader")
    with raises_input_error("axes='ZYX'"):
        require_axes(Volume.from_array(stack[None]), "ZYX", "plane sampler")
    check_crop_fits(stack.shape, (12, 9), "fov")
    check_crop_fits(stack.shape, 9, "fov")
    with raises_input_error("(16, 16)", "(5, 12, 9)", "smaller"):
        check_crop_fits(stack.shape, 16, "fov")
    with raises_input_error("(0, 4)"):
        check_crop_fits(stack.shape, (0, 4), "fov")


# -- writers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["w.tif", "w.ome.tif", "w.zarr", "w.npy", "w.h5"])
def test_write_array_round_trip_with_axes(tmp_path, multichannel, name):
    zyxc = np.transpose(multichannel, (1, 2, 3, 0))
    write_array(tmp_path / name, zyxc, axes="ZYXC")
    with open_volume(tmp_path / name) as volume:
        assert volume.axes == "CZYX"
        np.testing.assert_array_equal(volume.read(), multichannel)
    assert leftovers(tmp_path) == [name]


@pytest.mark.parametrize("dtype", [np.uint8, np.int32])
def test_write_tiff_yxc_round_trip(tmp_path, dtype):
    yxc = np.random.default_rng(4).integers(0, 200, size=(10, 8, 3)).astype(dtype)
    write_tiff(tmp_path / "rgbish.tif", yxc, axes="YXC")
    with open_volume(tmp_path / "rgbish.tif") as volume:
        assert volume.axes == "CYX"
        np.testing.assert_array_equal(volume.read(), np.moveaxis(yxc, -1, 0))


@pytest.mark.parametrize("name", ["grey.tif", "grey.ome.tif"])
@pytest.mark.parametrize("shape", [(3, 10, 12), (4, 10, 12), (4, 10, 3)])
def test_three_or_four_slice_uint8_stack_is_written_as_grey_pages(tmp_path, name, shape):
    """tifffile would store a (3|4, Y, X) stack, or one with 3 or 4 columns, as a single RGB(A) image."""
    zyx = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    write_tiff(tmp_path / name, zyx)
    with tifffile.TiffFile(tmp_path / name) as tif:
        assert len(tif.pages) == shape[0]
        for page in tif.pages:
            assert page.photometric == tifffile.PHOTOMETRIC.MINISBLACK
            assert page.samplesperpixel == 1 and page.shape == shape[1:]
    with open_volume(tmp_path / name) as volume:
        assert volume.axes == "ZYX"
        np.testing.assert_array_equal(volume.read(), zyx)


def test_zarr_writer_streams_blocks_and_write_zarr_copies_a_volume(tmp_path, stack):
    with ZarrWriter(tmp_path / "s.zarr", stack.shape, stack.dtype, chunks=(2, 6, 9), attrs={"axes": "ZYX"}) as w:
        assert not (tmp_path / "s.zarr").exists()
        for z in range(0, stack.shape[0], 2):
            w.array[z:z + 2] = stack[z:z + 2]
    with open_volume(tmp_path / "s.zarr") as volume:
        np.testing.assert_array_equal(volume.read(), stack)
        write_zarr(tmp_path / "copy.zarr", volume)
    np.testing.assert_array_equal(open_volume(tmp_path / "copy.zarr").read(), stack)
    assert leftovers(tmp_path) == ["copy.zarr", "s.zarr"]


def test_exception_inside_zarr_writer_leaves_nothing(tmp_path, stack):
    with pytest.raises(RuntimeError, match="boom"):
        with ZarrWriter(tmp_path / "out.zarr", stack.shape, stack.dtype, chunks=(1, 12, 9)) as writer:
            writer.array[0] = stack[0]
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []


def test_failing_tiff_write_leaves_nothing(tmp_path, stack, monkeypatch):
    def half_write(path, data, **kwargs):
        with open(path, "wb") as file:
            file.write(b"II*\x00partial")
        raise OSError("disk full")

    monkeypatch.setattr(writers_module.tifffile, "imwrite", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_tiff(tmp_path / "out.tif", stack)
    assert leftovers(tmp_path) == []


def test_atomic_path_renames_only_on_success(tmp_path):
    with atomic_path(tmp_path / "ckpt.pt") as tmp:
        tmp.write_bytes(b"weights")
        assert tmp.parent == tmp_path and not (tmp_path / "ckpt.pt").exists()
    assert (tmp_path / "ckpt.pt").read_bytes() == b"weights"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "ckpt.pt", overwrite=True) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert (tmp_path / "ckpt.pt").read_bytes() == b"weights"
    assert leftovers(tmp_path) == ["ckpt.pt"]


@pytest.fixture
def file_set(stack) -> dict[str, np.ndarray]:
    """A 4-slice image, a 0/255 mask and uint32 ids, all (4, 12, 9), named as files of one output."""
    return {"image.tif": stack[:4], "mask.tif": (stack[:4] > 30000).astype(np.uint8) * 255,
            "ids.tif": stack[:4].astype(np.uint32) * 70000}


def test_write_files_atomically_writes_every_file(tmp_path, file_set):
    (tmp_path / "mask.tif").write_bytes(b"old")  # replaced
    written = write_files_atomically(tmp_path, file_set, texts={"meta.json": '{"a": 1}'}, compress=["mask.tif"])
    assert written == {name: tmp_path / name for name in [*file_set, "meta.json"]}
    assert leftovers(tmp_path) == sorted(written)
    assert (tmp_path / "meta.json").read_text() == '{"a": 1}'
    for name, array in file_set.items():
        with open_volume(tmp_path / name, check=False) as volume:
            assert volume.axes == "ZYX" and volume.dtype == array.dtype
            np.testing.assert_array_equal(volume.read(), array)
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert len(tif.pages) == 4
            compressed = tif.pages[0].compression != tifffile.COMPRESSION.NONE
            assert compressed == (name == "mask.tif")


def test_write_files_atomically_leaves_nothing_when_one_file_fails(tmp_path, file_set, monkeypatch):
    real = writers_module.tifffile.imwrite

    def fail_on_ids(path, data, **kwargs):
        if str(path).endswith("ids.tif"):
            with open(path, "wb") as file:
                file.write(b"II*\x00partial")
            raise OSError("disk full")
        return real(path, data, **kwargs)

    (tmp_path / "image.tif").write_bytes(b"old")
    monkeypatch.setattr(writers_module.tifffile, "imwrite", fail_on_ids)
    with pytest.raises(OSError, match="disk full"):
        write_files_atomically(tmp_path, file_set, texts={"meta.json": "{}"})
    assert leftovers(tmp_path) == ["image.tif"]  # no new file, no temporary sibling
    assert (tmp_path / "image.tif").read_bytes() == b"old"  # the old file is untouched
    (tmp_path / "not_a_folder").write_bytes(b"")
    with raises_input_error("not_a_folder", "a folder"):
        write_files_atomically(tmp_path / "not_a_folder", file_set)


def test_overwrite_is_refused_unless_asked(tmp_path, stack):
    write_npy(tmp_path / "a.npy", stack)
    with raises_input_error("a.npy", "overwrite=True"):
        write_npy(tmp_path / "a.npy", stack + 1)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), stack)
    write_zarr(tmp_path / "a.zarr", stack)
    with raises_input_error("a.zarr"):
        write_zarr(tmp_path / "a.zarr", stack)
    write_zarr(tmp_path / "a.zarr", stack[:2], overwrite=True)
    np.testing.assert_array_equal(open_volume(tmp_path / "a.zarr").read(), stack[:2])
    write_hdf5(f"{tmp_path / 'a.h5'}:raw", stack)
    np.testing.assert_array_equal(open_volume(tmp_path / "a.h5").read(), stack)
    assert leftovers(tmp_path) == ["a.h5", "a.npy", "a.zarr"]

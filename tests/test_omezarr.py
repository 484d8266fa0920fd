"""OME-Zarr output of segment (validated by ome-zarr-models), label-clusters, measure, and their bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage
from skimage.measure import block_reduce, marching_cubes, mesh_surface_area

from micromae.cli import main as cli_main
from micromae.errors import MicromaeInputError
from micromae.evaluate.measure import measure_instances
from micromae.evaluate.segmentation import run_evaluate_segmentation
from micromae.io import omezarr
from micromae.segment.pipeline import run_segment

VOXEL = (0.02, 0.01, 0.01)


@pytest.fixture(scope="module")
def ome_input(tiny_run, tmp_path_factory):
    """The tiny image as an OME-TIFF carrying physical voxel sizes (nm, to test the unit conversion)."""
    path = tmp_path_factory.mktemp("ome_in") / "image.ome.tif"
    image = tifffile.imread(tiny_run / "data" / "image.tif")
    tifffile.imwrite(path, image, ome=True, metadata={"axes": "ZYX", "PhysicalSizeZ": 20.0, "PhysicalSizeZUnit": "nm",
                                                      "PhysicalSizeY": 10.0, "PhysicalSizeYUnit": "nm",
                                                      "PhysicalSizeX": 10.0, "PhysicalSizeXUnit": "nm"})
    return path


@pytest.fixture(scope="module")
def ome_seg(tiny_run, ome_input, tmp_path_factory):
    """segment of the OME-TIFF into seg.ome.zarr: k = 3, sweep 2, pyramids down to 16 px (3 levels)."""
    out = tmp_path_factory.mktemp("ome") / "seg.ome.zarr"
    run_segment(tiny_run / "run" / "checkpoints" / "last.pt", ome_input, out, k=3, sweep=[2], n_samples=500,
                device="cpu", pyramid_min_side=16)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    for f in src.parent.glob("seg_centres_k*.npz"):
        shutil.copy(f, dst.parent / f.name)
    return dst


def test_segment_writes_an_ome_zarr_image_that_ome_zarr_models_validates(ome_seg, tiny_run):
    from ome_zarr_models import open_ome_zarr

    root = zarr.open_group(store=str(ome_seg), mode="r")
    model = open_ome_zarr(root)  # validates the image, the labels group and each label image
    assert model.ome_zarr_version == "0.5"
    assert model.labels.label_paths == ["clusters", "clusters_k2"] or set(model.labels.label_paths) == {
        "clusters", "clusters_k2"}
    label = model.labels.get_image_labels_group("clusters")
    props = label.attributes.ome.image_label.properties
    assert [p.label_value for p in props] == [0, 1, 2]
    assert [c.label_value for c in label.attributes.ome.image_label.colors] == [0, 1, 2]
    # physical voxel sizes from the OME-TIFF (nm -> micrometres), doubled per level
    datasets = model.ome_attributes.multiscales[0].datasets
    assert [d.path for d in datasets] == ["0", "1", "2"]
    scales = [d.coordinateTransformations[0].scale for d in datasets]
    np.testing.assert_allclose(scales[0], VOXEL)
    np.testing.assert_allclose(scales[1], [0.02, 0.02, 0.02])  # Z stays until in-plane voxels are as coarse
    np.testing.assert_allclose(scales[2], [0.04, 0.04, 0.04])
    assert model.ome_attributes.multiscales[0].axes[0].unit == "micrometer"
    np.testing.assert_allclose(omezarr.voxel_size_of(ome_seg), VOXEL)  # read back as an OME-Zarr input
    # level 0 of the image is the input; the next levels are block means (edges: means of what is there)
    image = tifffile.imread(tiny_run / "data" / "image.tif")
    np.testing.assert_array_equal(root["0"][:], image)
    expect = np.rint(block_reduce(image.astype(np.float32), (1, 2, 2), func=np.nanmean, cval=np.nan))
    np.testing.assert_array_equal(root["1"][:], expect.astype(np.uint8))
    # label pyramids: nearest neighbour (every other voxel), never a value that is not a cluster
    lab = root["labels/clusters"]
    np.testing.assert_array_equal(lab["1"][:], lab["0"][:][:, ::2, ::2])
    np.testing.assert_array_equal(lab["2"][:], lab["1"][:][::2, ::2, ::2])
    assert lab["0"].shape == image.shape and set(np.unique(lab["0"][:])) <= {0, 1, 2}
    assert "features_pca" not in root and root["sample/features"].shape[0] == 500
    assert (ome_seg.parent / "seg_centres_k3.npz").is_file() and (ome_seg.parent / "seg_centres_k2.npz").is_file()


def test_ome_labels_equal_the_plain_group_and_centres_relabel_them(ome_seg, tiny_run, ome_input, tmp_path):
    ckpt = tiny_run / "run" / "checkpoints" / "last.pt"
    plain = run_segment(ckpt, ome_input, tmp_path / "plain.zarr", k=3, sweep=[2], n_samples=500, device="cpu")
    g_plain = zarr.open_group(store=str(plain), mode="r")
    g_ome = zarr.open_group(store=str(ome_seg), mode="r")
    arrays = omezarr.label_arrays(g_ome)
    np.testing.assert_array_equal(arrays["main"][:], g_plain["labels"][:])
    np.testing.assert_array_equal(arrays[2][:], g_plain["labels_k2"][:])
    again = run_segment(ckpt, ome_input, tmp_path / "again.ome.zarr", centres=ome_seg.parent / "seg_centres_k3.npz",
                        device="cpu", image_copy=False)
    g_again = zarr.open_group(store=str(again), mode="r")
    np.testing.assert_array_equal(omezarr.label_arrays(g_again)["main"][:], arrays["main"][:])
    assert "0" not in g_again and "ome" not in g_again.attrs  # no image copy: the label images only
    omezarr.validate(again / "labels" / "clusters")  # each label image is a valid OME-Zarr image itself


def test_evaluate_reads_the_ome_output_like_the_plain_one(ome_seg, tiny_run, tmp_path):
    ref = tiny_run / "data" / "labels.tif"
    report = run_evaluate_segmentation(ome_seg, ref, tmp_path / "rep", figures=False)
    labels = omezarr.label_arrays(zarr.open_group(store=str(ome_seg), mode="r"))["main"][:]
    tifffile.imwrite(tmp_path / "labels.tif", labels)
    direct = run_evaluate_segmentation(tmp_path / "labels.tif", ref, tmp_path / "rep2", figures=False)
    assert report["result"]["hungarian"]["mapping"] == direct["result"]["hungarian"]["mapping"]
    assert report["result"]["hungarian"]["scores"]["mean_dice"] == direct["result"]["hungarian"]["scores"]["mean_dice"]
    assert [row["k"] for row in report["sweep"]] == [2, 3]  # the sweep's label image was scored too


def test_pyramid_is_built_in_bounded_blocks_and_keeps_anisotropic_z(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, size=(9, 75, 61)).astype(np.uint16)
    group = zarr.open_group(store=str(tmp_path / "p.zarr"), mode="w")
    group.create_array("0", data=data, chunks=(1, 75, 61))
    factors = [(2, 2, 2), (1, 2, 2)]
    paths = omezarr.build_pyramid(group, "", factors, "mean", budget_bytes=1)  # one chunk row at a time
    whole = block_reduce(data.astype(np.float32), (2, 2, 2), func=np.nanmean, cval=np.nan)
    np.testing.assert_array_equal(group[paths[1]][:], np.rint(whole).astype(np.uint16))
    np.testing.assert_array_equal(group[paths[2]][:], np.rint(block_reduce(
        group[paths[1]][:].astype(np.float32), (1, 2, 2), func=np.nanmean, cval=np.nan)).astype(np.uint16))
    # 3x coarser Z: Y and X halve first, Z only once in-plane voxels are as coarse
    assert omezarr.pyramid_factors((40, 512, 512), (3.0, 1.0, 1.0), 64) == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert omezarr.pyramid_factors((40, 64, 60), None, 64) == []


def test_cli_voxel_size_and_its_bad_input(tiny_run, tmp_path, capsys):
    ckpt, image = str(tiny_run / "run" / "checkpoints" / "last.pt"), str(tiny_run / "data" / "image.tif")
    base = ["segment", "--checkpoint", ckpt, "--input", image, "--k", "3", "--samples", "300", "--device", "cpu"]
    bad = tmp_path / "bad.ome.zarr"
    assert cli_main([*base, "--output", str(bad), "--voxel-size", "0.01", "0.02"]) == 2
    err = capsys.readouterr().err
    assert "--voxel-size" in err and "three positive voxel sizes" in err and "2 value(s)" in err
    assert cli_main([*base, "--output", str(bad), "--voxel-size", "0.01", "0", "x"]) == 2
    assert "--voxel-size" in capsys.readouterr().err
    assert not bad.exists() and not list(tmp_path.iterdir())  # nothing written
    out = tmp_path / "v.ome.zarr"
    assert cli_main([*base, "--output", str(out), "--voxel-size", "0.03", "0.005", "0.005", "--tri-planar"]) == 0
    model = omezarr.validate(out)
    scale = model.ome_attributes.multiscales[0].datasets[0].coordinateTransformations[0].scale
    np.testing.assert_allclose(scale, (0.03, 0.005, 0.005))
    root = zarr.open_group(store=str(out), mode="r")
    assert "dist_labels" not in root and sorted(root.group_keys()) == ["labels", "sample"]  # temporaries gone


def test_label_clusters_writes_a_named_class_image_and_refuses_unknown_clusters(ome_seg, tmp_path, capsys):
    seg = _copy(ome_seg, tmp_path / "seg.ome.zarr")
    assert cli_main(["label-clusters", str(seg), "--names", "0=cytoplasm,2=nucleus,1=cytoplasm,7=granules"]) == 2
    err = capsys.readouterr().err
    assert "0..2" in err and "7" in err
    root = zarr.open_group(store=str(seg), mode="r")
    assert "classes" not in root["labels"] and list((seg / "labels").iterdir()) == [
        p for p in (seg / "labels").iterdir() if not p.name.startswith(".")]  # nothing half-written
    assert cli_main(["label-clusters", str(seg), "--names", "0=oops"]) == 0
    assert cli_main(["label-clusters", str(seg), "--names", "2=nucleus, 0=cytoplasm,1=cytoplasm"]) == 0
    model = omezarr.validate(seg)  # the class image has as many levels as the image
    assert "classes" in model.labels.label_paths
    root = zarr.open_group(store=str(seg), mode="r")
    clusters = root["labels/clusters/0"][:]
    lut = np.array([1, 1, 2])  # classes numbered by first naming in cluster order: cytoplasm (0, 1), nucleus (2)
    np.testing.assert_array_equal(root["labels/classes/0"][:], lut[clusters])
    np.testing.assert_array_equal(root["labels/classes/1"][:], lut[root["labels/clusters/1"][:]])
    props = omezarr.image_label_properties(root, "classes")
    assert [(p["label-value"], p["name"]) for p in props] == [(0, "unnamed"), (1, "cytoplasm"), (2, "nucleus")]
    assert props[1]["clusters"] == [0, 1] and props[2]["clusters"] == [2]
    colours = dict(root["labels/classes"].attrs["ome"])["image-label"]["colors"]
    assert colours[0]["rgba"][3] == 0 and colours[1]["rgba"][3] == 255  # unnamed is transparent
    cluster_props = omezarr.image_label_properties(root, "clusters")
    assert [p.get("class") for p in cluster_props] == ["cytoplasm", "cytoplasm", "nucleus"]
    assert not [p for p in (seg / "labels").iterdir() if p.name.startswith(".")]


def test_label_clusters_from_the_evaluation_report(ome_seg, tiny_run, tmp_path, capsys):
    seg = _copy(ome_seg, tmp_path / "seg.ome.zarr")
    rep = run_evaluate_segmentation(seg, tiny_run / "data" / "labels.tif", tmp_path / "rep", figures=False)
    assert cli_main(["label-clusters", str(seg), "--from-report", str(rep["metrics"])]) == 0
    root = zarr.open_group(store=str(seg), mode="r")
    names = rep["result"]["hungarian"]["mapping_names"]
    props = {p["label-value"]: p["name"] for p in omezarr.image_label_properties(root, "classes")}
    classes, clusters = root["labels/classes/0"][:], root["labels/clusters/0"][:]
    for cluster, name in enumerate(names):
        assert set(np.unique(classes[clusters == cluster])) <= {[v for v, n in props.items() if n == name][0]}
    # a report of another k is refused
    json_text = json.loads(rep["metrics"].read_text())
    json_text["n_clusters"] = 5
    (tmp_path / "m5.json").write_text(json.dumps(json_text))
    assert cli_main(["label-clusters", str(seg), "--from-report", str(tmp_path / "m5.json")]) == 2
    assert "3 clusters" in capsys.readouterr().err


def _one_shot(vol, spacing):
    """Instances of a class volume measured on the whole volume at once (the reference)."""
    out = {}
    for c in np.unique(vol[vol > 0]):
        lab, n = ndimage.label(vol == c, structure=np.ones((3, 3, 3)))
        for i in range(1, n + 1):
            m = lab == i
            v, f, _, _ = marching_cubes(np.pad(m.astype(np.float32), 1), 0.5, spacing=spacing)
            zz, yy, xx = np.nonzero(m)
            out.setdefault(int(c), []).append((int(m.sum()), round(mesh_surface_area(v, f), 6), zz.min(), zz.max() + 1,
                                               yy.min(), xx.min()))
    return {c: sorted(v) for c, v in out.items()}


def test_measure_known_objects_across_slab_borders():
    vol = np.zeros((20, 30, 30), np.uint8)
    vol[2:14, 3:9, 3:9] = 1  # a 12 x 6 x 6 box crossing the slab borders at z = 4, 8, 12
    vol[5:7, 20:25, 20:26] = 2  # a small box inside one slab
    vol[0:6, 20:22, 2:4] = 2  # a U: two arms joined only by the bar below, in a later slab
    vol[0:6, 20:22, 8:10] = 2
    vol[6:12, 20:22, 2:10] = 2
    vol[16, 10, 10] = 1  # a single voxel, and one touching it only by a corner (26-connected: one object)
    vol[17, 11, 11] = 1
    cells = np.zeros_like(vol)
    cells[:, :, :15] = 1
    cells[:, :, 15:] = 2
    spacing = (2.0, 1.0, 1.0)
    rows, summary = measure_instances(vol, {1: "mito", 2: "granule"}, spacing, cells, slab=4)
    got = {}
    for r in rows:
        got.setdefault({"mito": 1, "granule": 2}[r["class"]], []).append(
            (r["voxels"], round(r["surface_area"], 6), r["bbox_z0"], r["bbox_z1"], r["bbox_y0"], r["bbox_x0"]))
    assert {c: sorted(v) for c, v in got.items()} == _one_shot(vol, spacing)
    box = next(r for r in rows if r["class"] == "mito" and r["voxels"] == 432)
    assert (box["bbox_z0"], box["bbox_z1"], box["bbox_y1"], box["bbox_x1"]) == (2, 14, 9, 9)
    assert box["volume"] == 432 * 2.0 and box["cell"] == 1
    assert (box["centroid_z"], box["centroid_y"], box["centroid_x"]) == (7.5 * 2.0, 5.5, 5.5)
    u = next(r for r in rows if r["class"] == "granule" and r["voxels"] == 2 * 2 * 2 * 6 + 6 * 2 * 8)
    assert u["cell"] == 1 and [r["id"] for r in rows if r["class"] == "granule"] == [1, 2]
    small = next(r for r in rows if r["voxels"] == 60)
    assert small["cell"] == 2
    per_class = {s["class"]: s for s in summary}
    assert per_class["mito"]["count"] == 2 and per_class["granule"]["count"] == 2
    assert per_class["mito"]["total_volume"] == (432 + 2) * 2.0
    assert per_class["granule"]["volume_fraction"] == pytest.approx((vol == 2).sum() / vol.size)
    # the slab size changes nothing
    again, _ = measure_instances(vol, {1: "mito", 2: "granule"}, spacing, cells, slab=7)
    assert [(r["voxels"], round(r["surface_area"], 6), r["cell"]) for r in again] == [
        (r["voxels"], round(r["surface_area"], 6), r["cell"]) for r in rows]


def test_cli_measure_writes_instances_and_summary_and_refuses_unnamed(ome_seg, tiny_run, tmp_path, capsys):
    seg = _copy(ome_seg, tmp_path / "seg.ome.zarr")
    out = tmp_path / "organelles.csv"
    assert cli_main(["measure", str(seg), "--out", str(out)]) == 2
    assert "label-clusters" in capsys.readouterr().err and not out.exists()
    assert cli_main(["label-clusters", str(seg), "--names", "1=nucleus,2=mito"]) == 0
    cells = tiny_run / "data" / "cell_mask.tif"
    assert cli_main(["measure", str(seg), "--out", str(out), "--cells", str(cells), "--slab", "3"]) == 0
    rows = list(csv.DictReader(out.open()))
    summary = {r["class"]: r for r in csv.DictReader((tmp_path / "organelles_summary.csv").open())}
    root = zarr.open_group(store=str(seg), mode="r")
    classes = root["labels/classes/0"][:]
    for value, name in ((1, "nucleus"), (2, "mito")):
        _, n = ndimage.label(classes == value, structure=np.ones((3, 3, 3)))
        mine = [r for r in rows if r["class"] == name]
        assert len(mine) == n == int(summary[name]["count"])
        assert sum(int(r["voxels"]) for r in mine) == int((classes == value).sum())
        mask = tifffile.imread(cells) != 0
        assert float(summary[name]["volume_fraction"]) == pytest.approx((classes[mask] == value).sum() / mask.sum())
    assert {r["unit"] for r in rows} == {"micrometer"}
    assert float(rows[0]["volume"]) == pytest.approx(int(rows[0]["voxels"]) * np.prod(VOXEL))
    assert cli_main(["measure", str(seg), "--out", str(out)]) == 2  # exists: --overwrite
    tifffile.imwrite(tmp_path / "small_cells.tif", np.ones((2, 4, 4), np.uint8))
    assert cli_main(["measure", str(seg), "--out", str(tmp_path / "y.csv"), "--cells",
                     str(tmp_path / "small_cells.tif")]) == 2
    assert "shape" in capsys.readouterr().err and not (tmp_path / "y.csv").exists()
    assert cli_main(["measure", str(tmp_path / "nothing.ome.zarr"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "OME-Zarr output of micromae segment" in capsys.readouterr().err
    plain = zarr.open_group(store=str(tmp_path / "plain.zarr"), mode="w")
    plain.create_array("labels", data=np.zeros((2, 4, 4), np.uint8))
    assert cli_main(["label-clusters", str(tmp_path / "plain.zarr"), "--names", "0=a"]) == 2
    assert "plain Zarr group" in capsys.readouterr().err
    assert cli_main(["label-clusters", str(seg), "--names", "0=a", "--from-report", str(out)]) == 2
    assert "exactly one of --names and --from-report" in capsys.readouterr().err


def test_bad_names_are_refused():
    from micromae.evaluate.classes import class_table, parse_names

    for text in ("0cytoplasm", "a=b", "0=", "0=x,0=y", "1=unnamed", ""):
        with pytest.raises(MicromaeInputError):
            parse_names(text)
    with pytest.raises(MicromaeInputError, match="0..3"):
        class_table({4: "x"}, 4)
    assert parse_names("0=a, 3=b,5=a") == {0: "a", 3: "b", 5: "a"}


def test_an_interrupted_ome_finish_resumes_to_the_same_store(tiny_run, tmp_path, monkeypatch):
    ckpt, image = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data" / "image.tif"
    out = tmp_path / "seg.ome.zarr"
    real = omezarr.build_pyramid

    def broken(*args, **kwargs):
        raise RuntimeError("killed while building the pyramid")

    monkeypatch.setattr(omezarr, "build_pyramid", broken)
    with pytest.raises(RuntimeError, match="killed"):
        run_segment(ckpt, image, out, k=3, n_samples=300, device="cpu", pyramid_min_side=16)
    assert not out.exists() and (tmp_path / "seg.ome.zarr.partial").is_dir()  # never a half-written output
    monkeypatch.setattr(omezarr, "build_pyramid", real)
    run_segment(ckpt, image, out, k=3, n_samples=300, device="cpu", pyramid_min_side=16)
    fresh = run_segment(ckpt, image, tmp_path / "fresh.ome.zarr", k=3, n_samples=300, device="cpu",
                        pyramid_min_side=16)
    a, b = zarr.open_group(store=str(out), mode="r"), zarr.open_group(store=str(fresh), mode="r")
    omezarr.validate(out)
    for level in ("0", "1", "2"):
        np.testing.assert_array_equal(a[f"labels/clusters/{level}"][:], b[f"labels/clusters/{level}"][:])
        np.testing.assert_array_equal(a[level][:], b[level][:])

"""The napari plugin: manifest, reader, jobs, and the widgets in a real napari viewer.

The viewer tests use napari's ``make_napari_viewer`` fixture (pytest-qt) under Xvfb, which pytest-xvfb starts
when the Debian package is installed (``make setup`` installs it): Qt's ``offscreen`` platform has no OpenGL,
and napari's canvas needs it. Without the ``napari`` extra everything here skips; without an X display
only the viewer tests skip.
"""

from __future__ import annotations

import os
import shutil
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zarr

from micromae.cli import main as cli_main
from micromae.errors import MicromaeInputError

napari = pytest.importorskip("napari", reason="the napari extra is not installed (pip install 'micromae[napari]')")
npe2 = pytest.importorskip("npe2", reason="the napari extra is not installed (pip install 'micromae[napari]')")

from micromae.napari import MANIFEST, jobs  # noqa: E402
from micromae.napari.reader import get_reader, read_segmentation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_display = pytest.mark.skipif(
    not os.environ.get("DISPLAY"),
    reason="no X display: napari's canvas needs OpenGL, which Qt's offscreen platform lacks; install the Debian "
           "package xvfb (make setup does) so that pytest-xvfb starts one")


@pytest.fixture(scope="module")
def seg(tiny_run, tmp_path_factory):
    """``micromae segment`` of the tiny run's image, k = 3 with a k = 2 sweep (read only)."""
    out = tmp_path_factory.mktemp("napari") / "cell.zarr"
    ckpt, data = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data"
    assert cli_main(["segment", "--checkpoint", str(ckpt), "--input", str(data / "image.tif"), "--output", str(out),
                     "--k", "3", "--sweep", "2", "--samples", "500", "--device", "cpu"]) == 0
    return out


@pytest.fixture
def plugin():
    """The micromae manifest registered with npe2 (an editable install of another checkout may lack the entry
    point; a normal install registers it through ``napari.manifest``)."""
    pm = npe2.PluginManager.instance()
    try:
        pm.get_manifest("micromae")
    except KeyError:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    return pm


def test_manifest_is_valid_packaged_and_imports():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    manifest.validate_imports()  # every python_name resolves
    contributions = manifest.contributions
    assert {w.display_name for w in contributions.widgets} == {"Segment", "Name clusters", "Pre-train", "Evaluate"}
    assert {s.key for s in contributions.sample_data} == {"synthetic-em", "nuclei", "islet"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["napari.manifest"]["micromae"] == "micromae.napari:napari.yaml"
    assert "napari" in project["optional-dependencies"] and "bioimageio" in project["optional-dependencies"]


def test_reader_gives_each_k_the_image_and_the_scale(seg, tiny_run, tmp_path):
    import tifffile

    assert get_reader(str(seg)) is read_segmentation
    assert get_reader(str(tiny_run / "data" / "image.tif")) is None
    zarr.open_group(store=str(tmp_path / "other.zarr"), mode="w").create_array("labels", shape=(2, 2), dtype="u1")
    assert get_reader(str(tmp_path / "other.zarr")) is None  # a Zarr group micromae did not write
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in read_segmentation(seg)}
    assert set(layers) == {"cell image", "cell k=3", "cell k=2"}
    group = zarr.open_group(store=str(seg), mode="r")
    image = tifffile.imread(tiny_run / "data" / "image.tif")
    assert np.array_equal(np.asarray(layers["cell image"][0]), image) and layers["cell image"][2] == "image"
    for name, key in (("cell k=3", "labels"), ("cell k=2", "labels_k2")):
        data, kw, kind = layers[name]
        assert kind == "labels" and np.array_equal(np.asarray(data), group[key][:])
        assert kw["metadata"]["micromae_array"] == key
        # cluster 0 is a cluster: it gets a colour, the background value is one no voxel has
        assert kw["colormap"].background_value == kw["metadata"]["k"]
        assert kw["colormap"].map(np.array([0]))[0][3] == 1.0
    assert layers["cell k=3"][1]["visible"] and not layers["cell k=2"][1]["visible"]
    # the physical scale, from the attribute or OME-Zarr multiscales
    copy = tmp_path / "scaled.zarr"
    shutil.copytree(seg, copy)
    zarr.open_group(store=str(copy), mode="a").attrs["scale"] = [0.04, 0.01, 0.01]
    assert all(kw["scale"] == (0.04, 0.01, 0.01) for _, kw, _ in read_segmentation(copy))
    zarr.open_group(store=str(copy), mode="a").attrs["scale"] = [1, 2]
    with pytest.raises(MicromaeInputError, match="three positive voxel sizes"):
        read_segmentation(copy)


def test_reader_opens_the_ome_zarr_output_with_its_voxel_size_and_named_classes(tiny_run, tmp_path):
    import tifffile

    out = tmp_path / "cell.ome.zarr"
    ckpt, data = tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data"
    assert cli_main(["segment", "--checkpoint", str(ckpt), "--input", str(data / "image.tif"), "--output", str(out),
                     "--k", "3", "--sweep", "2", "--samples", "500", "--device", "cpu",
                     "--voxel-size", "0.04", "0.01", "0.01"]) == 0
    assert get_reader(str(out)) is read_segmentation
    layers = {kw["name"]: (data, kw, kind) for data, kw, kind in read_segmentation(out)}
    assert set(layers) == {"cell image", "cell k=3", "cell k=2"}
    image = tifffile.imread(data / "image.tif")
    assert np.array_equal(np.asarray(layers["cell image"][0][0]), image)  # level 0 of the image pyramid
    group = zarr.open_group(store=str(out), mode="r")
    for name, key in (("cell k=3", "labels/clusters/0"), ("cell k=2", "labels/clusters_k2/0")):
        levels, kw, kind = layers[name]
        assert kind == "labels" and np.array_equal(np.asarray(levels[0]), group[key][:])
        assert kw["metadata"]["micromae_array"] == key and kw["scale"] == (0.04, 0.01, 0.01)
    names = {0: "cytoplasm", 1: "", 2: "nucleus"}
    classes, class_names = jobs.name_clusters(group["labels/clusters/0"][:], names)
    jobs.save_classes(out, "labels/clusters/0", classes, class_names, names)  # the Name clusters widget
    layers = {kw["name"]: (data, kw) for data, kw, _ in read_segmentation(out)}
    levels, kw = layers["cell classes"]
    assert np.array_equal(np.asarray(levels[0]), classes) and kw["metadata"]["class_names"] == class_names
    assert layers["cell k=3"][1]["metadata"]["cluster_names"] == {"0": "cytoplasm", "2": "nucleus"}


def test_name_clusters_merges_clusters_and_round_trips_to_the_file(seg, tmp_path):
    path = tmp_path / "named.zarr"
    shutil.copytree(seg, path)
    labels = zarr.open_group(store=str(path), mode="r")["labels"][:]
    names = {0: "cytoplasm", 1: "", 2: "cytoplasm"}  # two clusters to one class, one left unnamed
    classes, class_names = jobs.name_clusters(labels, names)
    assert class_names == ["unnamed", "cytoplasm"]
    assert np.array_equal(classes, np.where(labels == 1, 0, 1))
    jobs.save_classes(path, "labels", classes, class_names, names)
    assert not (path / "classes.partial").exists()
    layers = {kw["name"]: (data, kw) for data, kw, _ in read_segmentation(path)}
    data, kw = layers["named classes"]
    assert np.array_equal(np.asarray(data), classes) and kw["metadata"]["class_names"] == class_names
    assert list(kw["features"]["class"]) == class_names
    assert layers["named k=3"][1]["metadata"]["cluster_names"] == {"0": "cytoplasm", "2": "cytoplasm"}
    with pytest.raises(MicromaeInputError, match="shape"):
        jobs.save_classes(path, "labels", classes[:1], class_names, names)
    with pytest.raises(MicromaeInputError, match="unnamed"):
        jobs.name_clusters(labels, {0: "unnamed"})


def test_stepped_yields_progress_returns_and_cancels():
    def job(report):
        for i in range(3):
            report(i + 1, 3, f"step {i + 1}", loss=1.0 / (i + 1))
        return "done"

    gen = jobs.stepped(job)
    events = []
    with pytest.raises(StopIteration) as stop:
        while True:
            events.append(next(gen))
    assert stop.value.value == "done"
    assert [(e.done, e.total, e.values["loss"]) for e in events] == [(1, 3, 1.0), (2, 3, 0.5), (3, 3, 1 / 3)]

    cancel, started, reached = threading.Event(), threading.Event(), []

    def endless(report):
        for i in range(10_000):
            started.set()
            report(i, 10_000)
            reached.append(i)
            cancel.wait(0.01)
        return "never"

    gen = jobs.stepped(endless, cancel)
    next(gen)
    cancel.set()
    with pytest.raises(jobs.JobCancelled):
        list(gen)
    assert len(reached) < 10_000

    def broken(report):
        raise MicromaeInputError("bad input")

    with pytest.raises(MicromaeInputError, match="bad input"):
        list(jobs.stepped(broken))


def test_evaluate_labels_refuses_another_shape():
    with pytest.raises(MicromaeInputError, match="same size"):
        jobs.evaluate_labels(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 5), np.uint8))


# ----------------------------------------------------------------------------------------------------------
# a real viewer


def _wait(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)


def _name_clusters(viewer, layer, names: dict[int, str], qtbot) -> None:
    """Name clusters of ``layer`` (k = 3) in the NameClustersWidget and wait until it has written them."""
    from micromae.napari.widgets import NameClustersWidget

    widget = NameClustersWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.labels.value = layer
    assert widget.table.to_dict("list")["cluster"] == [0, 1, 2]
    for cluster, name in names.items():
        widget.table.data[cluster, 1] = name
    widget.start()
    _wait(qtbot, widget)
    assert widget.error is None, widget.status.value


@needs_display
def test_viewer_opens_a_segmentation_through_the_reader(make_napari_viewer, plugin, seg):
    viewer = make_napari_viewer()
    viewer.open(str(seg), plugin="micromae")
    assert [layer.name for layer in viewer.layers] == ["cell image", "cell k=3", "cell k=2"]
    group = zarr.open_group(store=str(seg), mode="r")
    assert isinstance(viewer.layers["cell k=3"], napari.layers.Labels)
    assert np.array_equal(np.asarray(viewer.layers["cell k=3"].data), group["labels"][:])


@needs_display
def test_viewer_opens_a_multiscale_ome_zarr_output_and_names_its_clusters(make_napari_viewer, plugin, tiny_run,
                                                                         tmp_path, qtbot):
    from micromae.segment.pipeline import run_segment

    out = run_segment(tiny_run / "run" / "checkpoints" / "last.pt", tiny_run / "data" / "image.tif",
                      tmp_path / "cell.ome.zarr", k=3, n_samples=500, device="cpu", pyramid_min_side=16,
                      voxel_size=(0.04, 0.01, 0.01))
    viewer = make_napari_viewer()
    viewer.open(str(out), plugin="micromae")
    assert [layer.name for layer in viewer.layers] == ["cell image", "cell k=3"]
    layer = viewer.layers["cell k=3"]
    group = zarr.open_group(store=str(out), mode="r")
    assert layer.multiscale and len(layer.data) == 3 and viewer.layers["cell image"].multiscale
    assert np.array_equal(np.asarray(layer.data[0]), group["labels/clusters/0"][:])
    assert tuple(layer.scale) == (0.04, 0.01, 0.01)
    _name_clusters(viewer, layer, {0: "cytoplasm", 2: "nucleus"}, qtbot)
    stored = zarr.open_group(store=str(out), mode="r")
    clusters = stored["labels/clusters/0"][:]
    np.testing.assert_array_equal(stored["labels/classes/0"][:], np.array([1, 0, 2])[clusters])


@needs_display
def test_segment_widget_equals_the_cli_then_names_clusters_and_screenshot(make_napari_viewer, plugin, seg,
                                                                          tiny_run, tmp_path, qtbot):
    import tifffile

    from micromae.napari.widgets import SegmentWidget

    viewer = make_napari_viewer(show=True)
    image = tifffile.imread(tiny_run / "data" / "image.tif")
    viewer.add_image(image, name="cell")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.checkpoint.value = tiny_run / "run" / "checkpoints" / "last.pt"
    widget.k.value, widget.samples.value, widget.device.value = 3, 500, "cpu"
    out = tmp_path / "widget.zarr"
    widget.output.value = str(out)
    widget.start()
    assert widget.busy and widget.cancel_button.enabled  # the job runs in a worker thread
    _wait(qtbot, widget)
    assert widget.error is None, widget.status.value
    layer = viewer.layers["cell k=3"]
    cli = zarr.open_group(store=str(seg), mode="r")["labels"][:]
    assert layer.data.shape == image.shape and np.array_equal(layer.data, cli)  # same as micromae segment
    assert widget.progress.value == widget.progress.max == image.shape[0]
    assert np.array_equal(zarr.open_group(store=str(out), mode="r")["labels"][:], cli)
    assert np.array_equal(zarr.open_group(store=str(out), mode="r")["image"][:], image)

    _name_clusters(viewer, layer, {0: "cytoplasm", 2: "cytoplasm", 1: "nucleus"}, qtbot)
    classes = viewer.layers["cell classes"]
    expected = np.select([cli == 1, cli != 1], [2, 1])
    assert np.array_equal(classes.data, expected)
    stored = zarr.open_group(store=str(out), mode="r")
    assert np.array_equal(stored["classes"][:], expected)
    assert stored.attrs["class_names"] == ["unnamed", "cytoplasm", "nucleus"]
    reread = {kw["name"]: kw for _, kw, _ in read_segmentation(out)}
    assert reread["widget k=3"]["metadata"]["cluster_names"] == {"0": "cytoplasm", "1": "nucleus", "2": "cytoplasm"}

    # the screenshot shows the Labels layer: hiding it changes the picture
    viewer.layers["cell k=3"].visible = False
    viewer.dims.set_point(0, 4)
    viewer.reset_view()
    with_classes = viewer.screenshot(canvas_only=True, flash=False)
    classes.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    assert with_classes.ndim == 3 and with_classes.shape[2] == 4 and with_classes[..., :3].std() > 0
    assert np.abs(with_classes.astype(int) - without.astype(int)).sum() > 0
    path = tmp_path / "screenshot.png"
    classes.visible = True
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    assert path.read_bytes()[:4] == b"\x89PNG"


@needs_display
def test_widgets_refuse_bad_input_with_a_message(make_napari_viewer, plugin, tiny_run, tmp_path, qtbot):
    from micromae.napari.widgets import EvaluateWidget, SegmentWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((40, 40, 3), np.uint8), name="rgb", rgb=True)
    seg_widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(seg_widget)
    seg_widget.reset_choices()
    seg_widget.checkpoint.value = tiny_run / "run" / "checkpoints" / "last.pt"
    seg_widget.output.value = str(tmp_path / "never.zarr")
    seg_widget.start()
    assert not seg_widget.busy and isinstance(seg_widget.error, MicromaeInputError)
    assert "1 channel(s)" in seg_widget.status.value and "3 channels" in seg_widget.status.value
    assert [layer.name for layer in viewer.layers] == ["rgb"] and not (tmp_path / "never.zarr").exists()
    seg_widget.checkpoint.value = tmp_path / "missing.pt"
    seg_widget.start()
    assert "checkpoint" in seg_widget.status.value

    viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="pred")
    viewer.add_labels(np.zeros((4, 8, 9), np.uint8), name="ref")
    ev = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(ev)
    ev.reset_choices()
    ev.prediction.value, ev.reference.value = viewer.layers["pred"], viewer.layers["ref"]
    ev.start()
    assert not ev.busy and "same size" in ev.status.value and "(4, 8, 9)" in ev.status.value


@needs_display
def test_evaluate_widget_shows_the_dice_of_micromae_evaluate(make_napari_viewer, plugin, seg, tiny_run, tmp_path,
                                                             qtbot):
    import json

    import tifffile

    from micromae.napari.widgets import EvaluateWidget

    viewer = make_napari_viewer()
    viewer.open(str(seg), plugin="micromae")
    ref = tifffile.imread(tiny_run / "data" / "labels.tif")
    classes = json.loads((tiny_run / "data" / "classes.json").read_text())["class_names"]
    viewer.add_labels(ref, name="reference", metadata={"class_names": classes})
    ev = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(ev)
    ev.reset_choices()
    ev.prediction.value, ev.reference.value = viewer.layers["cell k=3"], viewer.layers["reference"]
    ev.start()
    _wait(qtbot, ev)
    assert ev.error is None, ev.status.value
    assert cli_main(["evaluate", "segmentation", "--pred", str(seg), "--reference",
                     str(tiny_run / "data" / "labels.tif"), "--no-figures", "--out", str(tmp_path / "r")]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    per_class = metrics["hungarian"]["scores"]["per_class"]
    shown = dict(zip(*ev.table.to_dict("list").values()))
    assert shown and set(shown) <= set(classes)
    for name, dice in shown.items():
        assert dice == pytest.approx(per_class[name]["dice"], abs=1e-4)
    assert f"{metrics['hungarian']['scores']['mean_dice']:.3f}" in ev.status.value


@needs_display
def test_pretrain_widget_shows_the_loss_writes_a_run_and_cancels(make_napari_viewer, plugin, tmp_path, qtbot):
    from micromae.data.synthetic_em import make_em_volume
    from micromae.napari.widgets import PretrainWidget

    viewer = make_napari_viewer()
    viewer.add_image(make_em_volume(shape=(8, 96, 96), seed=1).image[0], name="slice")
    widget = PretrainWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.reset_choices()
    widget.preset.value, widget.steps.value = "maester_tiny", 2
    widget.run_dir.value = str(tmp_path / "run")
    widget.start()
    _wait(qtbot, widget)
    assert widget.error is None, widget.status.value
    assert len(widget.losses) == 2 and widget.loss.value.startswith(f"{widget.losses[-1]:.4f}")
    assert widget.result["checkpoint"].is_file() and (tmp_path / "run" / "log.jsonl").is_file()
    widget.start()  # the same folder again: refused, nothing overwritten
    assert "holds a run" in widget.status.value

    widget.run_dir.value, widget.steps.value = str(tmp_path / "long"), 10_000
    widget.start()
    qtbot.waitUntil(lambda: len(widget.losses) >= 3, timeout=60_000)
    widget.cancel()
    _wait(qtbot, widget)
    assert isinstance(widget.error, jobs.JobCancelled) and widget.status.value == "cancelled"
    assert len(widget.losses) < 10_000 and not (tmp_path / "long" / "checkpoints" / "last.pt").exists()


@needs_display
def test_sample_data_opens_in_the_viewer(make_napari_viewer, plugin):
    viewer = make_napari_viewer()
    viewer.open_sample("micromae", "synthetic-em")
    image, labels = viewer.layers["synthetic EM"], viewer.layers["synthetic EM classes"]
    assert image.data.shape == labels.data.shape and labels.data.max() == 5
    assert list(labels.features["class"])[3] == "nucleus"
    viewer.open_sample("micromae", "nuclei")
    assert viewer.layers["nuclei"].data.shape == viewer.layers["nuclei labels"].data.shape == (60, 256, 256)
    viewer.open_sample("micromae", "islet")
    assert viewer.layers["islet"].data.shape == (1024, 1024)
    assert tuple(viewer.layers["islet"].scale) == (0.005, 0.005)

"""Segmentation figures (confusion, UMAP, overlays, k sweep, 3-D rendering) and the Markdown/JSON report."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from micromae.data.synthetic_em import CLASS_NAMES, make_em_volume
from micromae.errors import MicromaeInputError
from micromae.evaluate.metrics import evaluate_segmentation, relabel, sweep_k_table
from micromae.evaluate.render3d import _surface_within, class_surface, render_volume_surfaces
from micromae.evaluate.report import markdown_table, write_segmentation_report
from micromae.evaluate.seg_figures import (
    class_colors,
    plot_confusion,
    plot_k_sweep,
    plot_overlays,
    plot_umap,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def em():
    return make_em_volume((16, 64, 64), seed=1)


@pytest.fixture(scope="module")
def clusters(em):
    """Cluster ids: a permutation of the classes with 10% of voxels set at random."""
    rng = np.random.default_rng(0)
    noisy = em.labels.copy()
    flip = rng.random(noisy.shape) < 0.1
    noisy[flip] = rng.integers(0, len(CLASS_NAMES), flip.sum())
    return np.array([2, 0, 5, 1, 3, 4])[noisy]


@pytest.fixture(scope="module")
def result(em, clusters):
    return evaluate_segmentation(clusters, em.labels, em.cell_mask, CLASS_NAMES, ignore_classes=["outside"])


def _check_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img[..., :3].std() > 0.02  # not blank
    return img


def test_class_colors_are_distinct_and_stable():
    for n in (6, 14, 25):
        c = class_colors(n)
        assert c.shape == (n, 4)
        assert len({tuple(np.round(x, 3)) for x in c}) == n
    np.testing.assert_array_equal(class_colors(6), class_colors(8)[:6])  # same class, same colour


def test_plot_confusion_both_normalisations(tmp_path, result):
    conf = result["hungarian"]["scores"]["confusion"]
    imgs = [_check_png(plot_confusion(conf["counts"], conf["ref_names"], conf["pred_names"],
                                      tmp_path / f"conf_{n}.png", "test", normalise=n)) for n in ("row", "col")]
    assert imgs[0].shape != imgs[1].shape or not np.array_equal(imgs[0], imgs[1])
    with pytest.raises(MicromaeInputError, match="confusion matrix"):
        plot_confusion(np.eye(3), ["a", "b"], ["a", "b", "c"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_overlays_and_k_sweep(tmp_path, em, clusters, result):
    mapped = relabel(clusters, result["hungarian"]["mapping"])
    img = _check_png(plot_overlays(em.image, em.labels, mapped, tmp_path / "overlays.png",
                                   class_names=CLASS_NAMES, skip_classes=(0,)))
    assert img.shape[0] > img.shape[1]  # three slices stacked as rows of three panels
    rows = sweep_k_table({6: result, 7: result})
    _check_png(plot_k_sweep(rows, tmp_path / "sweep.png"))
    with pytest.raises(MicromaeInputError, match="slices"):
        plot_overlays(em.image, em.labels, mapped, tmp_path / "x.png", slices=[99])


def test_plot_umap_two_panels(tmp_path, em, clusters, result):
    rng = np.random.default_rng(0)
    idx = rng.choice(em.labels.size, 500, replace=False)
    ref = em.labels.ravel()[idx]
    pred = relabel(clusters, result["hungarian"]["mapping"]).ravel()[idx]
    emb = 3 * np.eye(6)[ref] + rng.normal(size=(500, 6))
    img = _check_png(plot_umap(emb, ref, pred, CLASS_NAMES, tmp_path / "umap.png", max_points=400))
    assert img.shape[1] > 1.5 * img.shape[0]  # two panels side by side


def test_render_volume_surfaces(tmp_path, em):
    surf = class_surface(em.labels, 3, step_size=1)
    assert surf is not None
    verts, faces = surf
    assert faces.shape[1] == 3 and verts.min() >= -1 and (verts.max(0) <= np.array(em.labels.shape)).all()
    assert class_surface(em.labels, 9) is None  # absent class
    small = class_surface(em.labels, 3, step_size=1, max_size=32)  # block-averaged by 2
    assert small is not None and len(small[1]) < len(faces)
    np.testing.assert_allclose(small[0].mean(0), verts.mean(0), atol=2.5)  # same place in the volume
    capped = _surface_within(em.labels, 1, (1, 1, 1), 1, 128, max_faces=500, seed=0)
    assert len(capped[1]) <= 500 and capped[1].max() < len(capped[0])
    _check_png(render_volume_surfaces(em.labels, tmp_path / "render.png", CLASS_NAMES, max_faces=4000))
    _check_png(render_volume_surfaces(em.labels, tmp_path / "render_ds.png", CLASS_NAMES, classes=[3, 4, 9],
                                      spacing=(2, 1, 1), max_size=32))


def test_report_writes_metrics_and_markdown(tmp_path, result):
    fig = plot_k_sweep(sweep_k_table({6: result}), tmp_path / "figs" / "sweep.png")
    paths = write_segmentation_report(result, tmp_path / "report", "Test run", figures={"k sweep": fig},
                                      sweep_rows=sweep_k_table({6: result}))
    back = json.loads(paths["metrics"].read_text())
    assert back["hungarian"]["mapping"] == result["hungarian"]["mapping"]
    assert back["k_sweep"][0]["k"] == 6
    text = paths["report"].read_text()
    assert text.startswith("# Test run")
    dice = result["hungarian"]["scores"]["per_class"]["nucleus"]["dice"]
    assert f"| nucleus | {result['hungarian']['scores']['per_class']['nucleus']['n_ref']} | {dice:.4f} |" in text
    assert "![k sweep](../figs/sweep.png)" in text
    assert "| outside" not in text  # absent inside the mask, so no row
    assert not list((tmp_path / "report").glob(".*partial*"))


def test_markdown_table():
    text = markdown_table([{"a": 1, "b": 0.5}, {"a": None, "b": "x|y"}])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5000 |", "| – | x\\|y |"]
    assert markdown_table([[1, 2]], ["p", "q"]).splitlines()[-1] == "| 1 | 2 |"

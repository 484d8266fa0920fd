"""COCO error analysis (C75, C50, Loc, Sim, Oth, BG, FN) on a hand-made case where each error kind is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from micromae.cli import main as cli_main
from micromae.evaluate.coco import load_coco_gt
from micromae.evaluate.coco_analysis import coco_error_analysis

SIZE = 128


def rle(x: int, y: int, w: int = 20, h: int = 20) -> dict:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[y:y + h, x:x + w] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [SIZE, SIZE], "counts": r["counts"].decode()}


# category 1 (A) and 2 (B) share a supercategory; 3 (C) is another one
GT = {"images": [{"id": 1, "file_name": "a.tif", "height": SIZE, "width": SIZE}],
      "categories": [{"id": 1, "name": "A", "supercategory": "glia"}, {"id": 2, "name": "B", "supercategory": "glia"},
                     {"id": 3, "name": "C", "supercategory": "neuron"}],
      "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "segmentation": rle(x, y), "iscrowd": 0}
                      for i, (c, x, y) in enumerate([(1, 10, 10), (1, 50, 10), (1, 10, 50), (2, 50, 50),
                                                     (3, 90, 10), (1, 90, 50)])]}
# detections of A, best first: on B (similar-class confusion), on C (other-class confusion), on background,
# then a perfect one, one at IoU 0.6 (C50 only), one at IoU 0.25 (Loc only); the A at (90, 50) is missed
DETS = [{"image_id": 1, "category_id": 1, "segmentation": rle(x, y), "bbox": [x, y, 20, 20], "score": s}
        for x, y, s in [(50, 50, 0.95), (90, 10, 0.9), (95, 95, 0.85), (10, 10, 0.8), (55, 10, 0.7), (22, 50, 0.6)]]


def test_each_error_kind_moves_exactly_its_curve():
    out = coco_error_analysis(load_coco_gt(GT), DETS)
    a = {n: np.asarray(c) for n, c in out["per_category"][1]["curves"].items()}
    at = lambda name, r: float(a[name][int(round(r * 100))])  # noqa: E731
    # 4 objects of A: C75 finds 1 after 3 FPs, C50 2 of 5, Loc 3 of 6
    assert at("C75", 0.2) == pytest.approx(1 / 4) and at("C75", 0.3) == 0
    assert at("C50", 0.2) == pytest.approx(2 / 5) and at("C50", 0.45) == pytest.approx(2 / 5) and at("C50", 0.6) == 0
    assert at("Loc", 0.7) == pytest.approx(3 / 6) and at("Loc", 0.8) == 0
    assert at("Sim", 0.7) == pytest.approx(3 / 5)  # the detection on B no longer counts
    assert at("Oth", 0.7) == pytest.approx(3 / 4)  # nor the one on C
    assert at("BG", 0.7) == 1 and at("BG", 0.8) == 0  # background FP removed; the missed object stays
    assert (a["FN"] == 1).all()
    ap = out["per_category"][1]["ap"]
    assert [round(ap[n] * 101) for n in ("C75", "C50", "Loc", "Sim", "Oth", "BG")] == [
        round(26 / 4), round(51 * 2 / 5), round(76 / 2), round(76 * 3 / 5), round(76 * 3 / 4), 76]
    # B and C have objects but no detection: all zero up to FN; the overall curves average the three
    assert out["per_category"][2]["ap"]["Oth"] == 0 and out["per_category"][3]["ap"]["FN"] == 1
    assert out["ap"]["Loc"] == pytest.approx(ap["Loc"] / 3)


def test_a_singleton_supercategory_has_sim_equal_to_loc():
    gt = json.loads(json.dumps(GT))
    for c in gt["categories"]:
        c["supercategory"] = c["name"]
    a = coco_error_analysis(load_coco_gt(gt), DETS)["per_category"][1]["ap"]
    assert a["Sim"] == pytest.approx(a["Loc"]) and a["Oth"] > a["Sim"]


def test_evaluate_instances_writes_the_error_analysis(tmp_path):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "pred.json").write_text(json.dumps(DETS))
    out = tmp_path / "eval"
    assert cli_main(["evaluate", "instances", "--coco", str(tmp_path / "gt.json"), "--predictions",
                     str(tmp_path / "pred.json"), "--out", str(out)]) == 0
    assert (out / "error_analysis.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["error_analysis"]["ap"]) == {"C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"}
    assert "error_analysis.png" in (out / "report.md").read_text()

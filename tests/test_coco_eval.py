"""COCO evaluation: our numbers are pycocotools' own, a perfect prediction scores 1, results round-trip,
tiling stitches detections once, errors are clear, and `micromae evaluate instances --predictions` works."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from micromae.cli import main
from micromae.data.synthetic_mif import mif_to_coco
from micromae.errors import MicromaeInputError
from micromae.evaluate.coco import _tile_starts, coco_evaluate, load_coco_gt, predict_image, to_coco_results


def hand_made_gt() -> tuple[dict, list[np.ndarray]]:
    """Two 40 x 40 images with 3 and 2 rectangles (instance maps)."""
    a, b = np.zeros((40, 40), np.int32), np.zeros((40, 40), np.int32)
    a[2:10, 3:12], a[20:30, 20:26], a[30:38, 2:9] = 1, 2, 3
    b[5:15, 5:15], b[25:35, 10:30] = 1, 2
    return mif_to_coco([a, b], ["a.tif", "b.tif"]), [a, b]


def result(image_id: int, mask: np.ndarray, score: float) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {"image_id": image_id, "category_id": 1, "bbox": [x, y, w, h], "score": score,
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}}


def hand_made_detections(maps: list[np.ndarray]) -> list[dict]:
    """Some hits (shifted by a few pixels), a miss, and false positives at various scores."""
    a, b = maps
    shifted = np.roll(a == 2, 2, axis=1)
    fp = np.zeros((40, 40), bool)
    fp[12:18, 30:38] = True
    return [result(1, a == 1, 0.9), result(1, shifted, 0.8), result(1, fp, 0.85),
            result(2, b == 1, 0.7), result(2, np.roll(b == 2, 4, axis=0), 0.95), result(2, fp, 0.3)]


def pycocotools_stats(gt: dict, dets: list[dict], iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dets = copy.deepcopy(dets)
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox")
        e = COCOeval(coco_gt, coco_gt.loadRes(dets), iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_our_map_equals_cocoeval_run_directly():
    gt, maps = hand_made_gt()
    dets = hand_made_detections(maps)
    ours = coco_evaluate(gt, dets)
    for iou_type in ("bbox", "segm"):
        direct = pycocotools_stats(gt, dets, iou_type)
        np.testing.assert_allclose(ours[iou_type]["stats"], direct)
        assert (ours[iou_type]["mAP"], ours[iou_type]["mAP50"], ours[iou_type]["mAP75"]) == tuple(direct[:3])
        assert 0.0 < direct[0] < 1.0  # a case where the numbers mean something
        assert len(ours[iou_type]["curves"]["precision_iou50"]) == 101


def test_perfect_prediction_scores_one_and_nothing_scores_zero():
    gt, maps = hand_made_gt()
    perfect = [result(i + 1, m == k, 0.9) for i, m in enumerate(maps) for k in range(1, m.max() + 1)]
    metrics = coco_evaluate(gt, perfect)
    for m in metrics.values():
        assert m["mAP"] == m["mAP50"] == m["mAP75"] == 1.0
        assert min(m["curves"]["precision_iou75"]) == 1.0
    empty = coco_evaluate(gt, [])
    assert empty["bbox"]["mAP"] == 0.0 and empty["segm"]["detections"] == 0


def test_results_round_trip_and_gt_fill_in(tmp_path):
    gt, maps = hand_made_gt()
    masks = torch.from_numpy(np.stack([maps[0] == 1, maps[0] == 3]))
    pred = {"boxes": torch.tensor([[3.0, 2.0, 12.0, 10.0], [2.0, 30.0, 9.0, 38.0]]), "scores": torch.tensor([0.9, 0.5]),
            "labels": torch.tensor([1, 1]), "masks": masks}
    res = to_coco_results(pred, 1, category_ids=[7])
    assert [r["category_id"] for r in res] == [7, 7] and res[0]["bbox"] == [3.0, 2.0, 9.0, 8.0]
    decoded = mask_utils.decode({"size": res[1]["segmentation"]["size"],
                                 "counts": res[1]["segmentation"]["counts"].encode()})
    assert np.array_equal(decoded.astype(bool), masks[1].numpy())
    json.dumps(res)  # plain JSON
    stripped = copy.deepcopy(gt)
    for ann in stripped["annotations"]:
        del ann["area"], ann["bbox"], ann["iscrowd"]
    coco = load_coco_gt(stripped)
    assert coco.anns[1]["area"] == gt["annotations"][0]["area"] and coco.anns[1]["bbox"] == gt["annotations"][0]["bbox"]


def test_errors():
    gt, maps = hand_made_gt()
    with pytest.raises(MicromaeInputError, match="unknown ids"):
        coco_evaluate(gt, [result(99, maps[0] == 1, 0.5)])
    no_mask = [{k: v for k, v in result(1, maps[0] == 1, 0.5).items() if k != "segmentation"}]
    with pytest.raises(MicromaeInputError, match="segmentation"):
        coco_evaluate(gt, no_mask)
    assert coco_evaluate(gt, no_mask, iou_types=("bbox",))["bbox"]["mAP50"] > 0
    with pytest.raises(MicromaeInputError, match="at least one annotation"):
        coco_evaluate({**gt, "annotations": []}, [])


class OneBoxPerTile(torch.nn.Module):
    """Stands in for Mask R-CNN: in every tile, one detection of the bright square it sees (if any)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.roi_heads = type("Heads", (), {"nms_thresh": 0.5, "detections_per_img": 100})()

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        outs = []
        for img in images:
            ys, xs = torch.nonzero(img[0] > 0.5, as_tuple=True)
            if len(ys) == 0:
                outs.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                             "labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 1, *img.shape[1:])})
                continue
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            outs.append({"boxes": box, "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long),
                         "masks": (img[:1] > 0.5).float()[None]})
        return outs


def test_tiles_cover_the_image_and_stitch_each_object_once():
    assert _tile_starts(100, 32, 0.25) == [0, 24, 48, 68] and _tile_starts(20, 32, 0.25) == [0]
    image = torch.zeros(1, 100, 100)
    image[:, 40:46, 40:46] = 1.0  # seen whole by four overlapping tiles
    pred = predict_image(OneBoxPerTile(), image, inference="tiles", tile=32, overlap=0.25)
    assert len(pred["boxes"]) == 1 and pred["boxes"][0].tolist() == [40.0, 40.0, 46.0, 46.0]
    assert pred["masks"].shape == (1, 100, 100) and int(pred["masks"].sum()) == 36
    with pytest.raises(MicromaeInputError, match="inference"):
        predict_image(OneBoxPerTile(), image, inference="sliding")


def test_cli_scores_an_existing_results_file(tmp_path, capsys):
    gt, maps = hand_made_gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(hand_made_detections(maps)))
    out = tmp_path / "report"
    assert main(["evaluate", "instances", "--predictions", str(tmp_path / "res.json"), "--coco",
                 str(tmp_path / "gt.json"), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["bbox"]["mAP"] == pytest.approx(pycocotools_stats(gt, hand_made_detections(maps), "bbox")[0])
    assert {p.name for p in out.iterdir()} == {"metrics.json", "report.md", "pr_curves.png",
                                                 "error_analysis.png"}
    assert "box  mAP" in capsys.readouterr().out
    assert main(["evaluate", "instances", "--predictions", str(tmp_path / "missing.json"), "--coco",
                 str(tmp_path / "gt.json"), "--out", str(out)]) == 2

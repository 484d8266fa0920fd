"""COCO error analysis (Hoiem-style, as the COCO API's ``analyze()``; the DAMA paper's Fig. 3 f-j).

For each category, pycocotools' COCOeval is re-run with changed settings, and the precision-recall curves
(101 recall points, area all, ``maxDets`` 100) say how much each kind of error costs:

- ``C75``, ``C50``: PR at IoU 0.75 and 0.50 (their areas are AP75 and AP50);
- ``Loc``: PR at IoU 0.10 (localisation errors forgiven, duplicates still false positives);
- ``Sim``: at IoU 0.10, the category's detections against the ground truth of its supercategory with
  ``useCats=0``, objects of the *other* categories of the supercategory ignored: a detection on such an object
  is neither a false nor a true positive (confusions with similar classes removed);
- ``Oth``: the same against every object, every other category ignored (all class confusions removed);
- ``BG``: ``Oth`` with the background false positives removed too: 1 up to Oth's largest recall, then 0;
- ``FN``: 1 everywhere (what is left above BG are the missed objects).

Ignoring an object uses COCOeval's own ``ignore`` flag with its normal IoU (the MATLAB API's ``ignore``,
kept apart from ``iscrowd``, which would change the IoU). Undefined precision (-1) counts as 0, as there;
the overall curves are the mean over the categories that have ground truth. The area under each curve is
its mean over the recall points.
"""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from micromae.figures import plt, save_figure

__all__ = ["ERROR_CURVES", "coco_error_analysis", "plot_error_analysis"]

ERROR_CURVES = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")
_COLOURS = ("#ffffff", "#ffffff", "#4f82bd", "#bf4f4c", "#5ce661", "#8063a3", "#ff9900")  # the COCO API's


class _IgnoringEval(COCOeval):
    """COCOeval where ground truths marked ``analysis_ignore`` are ignored regions (matched detections are
    neither true nor false positives) with the ordinary IoU."""

    def _prepare(self) -> None:
        super()._prepare()
        for gts in self._gts.values():
            for g in gts:
                if g.get("analysis_ignore"):
                    g["ignore"] = 1


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _precision(gt: COCO, dets: list[dict], iou_type: str, iou_thrs: list[float], use_cats: bool,
               max_dets: int) -> np.ndarray:
    """``(T, R, K)`` precision (area all, the largest maxDets), -1 set to 0; zeros without detections."""
    k = len(gt.getCatIds()) if use_cats else 1
    if not dets:
        return np.zeros((len(iou_thrs), 101, k))
    with contextlib.redirect_stdout(io.StringIO()):
        e = _IgnoringEval(gt, gt.loadRes(copy.deepcopy(dets)), iou_type)
        e.params.iouThrs = np.array(iou_thrs, dtype=float)
        e.params.maxDets = [int(max_dets)]
        e.params.areaRng, e.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        e.params.useCats = int(use_cats)
        e.evaluate()
        e.accumulate()
    p = e.eval["precision"][:, :, :, 0, -1]
    return np.where(p < 0, 0.0, p)


def _with_ignored(gt: COCO, cat_id: int, keep_cats: set[int] | None) -> COCO:
    """A copy of ``gt`` with only the annotations of ``keep_cats`` (None: all), those of other categories
    than ``cat_id`` marked ignored."""
    data = copy.deepcopy(gt.dataset)
    anns = [a for a in data["annotations"] if keep_cats is None or a["category_id"] in keep_cats]
    for a in anns:
        a.pop("ignore", None)
        if a["category_id"] != cat_id:
            a["analysis_ignore"] = 1
    data["annotations"] = anns
    return _coco(data)


def coco_error_analysis(gt: COCO, results: list[dict], iou_type: str = "segm", max_dets: int = 100
                        ) -> dict[str, Any]:
    """The error-analysis curves of ``results`` against ``gt`` (module docstring).

    Returns ``{"recall": [101], "curves": {name: [101]}, "ap": {name: area}, "per_category": {cat_id:
    {"curves", "ap"}}, "iou_type"}`` with names :data:`ERROR_CURVES`; means over the categories with ground
    truth.
    """
    cat_ids = gt.getCatIds()
    cats = {c["id"]: c for c in gt.loadCats(cat_ids)}
    recall = np.linspace(0.0, 1.0, 101)
    ps = np.zeros((len(ERROR_CURVES), 101, len(cat_ids)))
    ps[:3] = _precision(gt, results, iou_type, [0.75, 0.5, 0.1], True, max_dets)
    for k, cat_id in enumerate(cat_ids):
        own = [r for r in results if r["category_id"] == cat_id]
        sup = cats[cat_id].get("supercategory", cats[cat_id].get("name"))
        similar = {c for c, info in cats.items() if info.get("supercategory", info.get("name")) == sup}
        similar.add(cat_id)
        ps[3, :, k] = _precision(_with_ignored(gt, cat_id, similar), own, iou_type, [0.1], False, max_dets)[0, :, 0]
        ps[4, :, k] = _precision(_with_ignored(gt, cat_id, None), own, iou_type, [0.1], False, max_dets)[0, :, 0]
    ps[5] = ps[4] > 0
    ps[6] = 1.0
    has_gt = [k for k, c in enumerate(cat_ids) if gt.getAnnIds(catIds=[c])]
    mean = ps[:, :, has_gt].mean(axis=2) if has_gt else np.zeros(ps.shape[:2])

    def pack(curves: np.ndarray) -> dict[str, Any]:
        return {"curves": {n: [float(v) for v in c] for n, c in zip(ERROR_CURVES, curves)},
                "ap": {n: float(c.mean()) for n, c in zip(ERROR_CURVES, curves)}}

    return {"iou_type": iou_type, "recall": [float(r) for r in recall], **pack(mean),
            "per_category": {int(c): pack(ps[:, :, k]) for k, c in enumerate(cat_ids)}}


def plot_error_analysis(analysis: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """The curves as the COCO API draws them: stacked areas between successive curves, each labelled with its
    area under the curve."""
    recall = np.asarray(analysis["recall"])
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    below = np.zeros_like(recall)
    for name, colour in zip(ERROR_CURVES, _COLOURS):
        curve = np.maximum(np.asarray(analysis["curves"][name]), below)
        ax.fill_between(recall, below, curve, color=colour, step=None, lw=0.5, edgecolor="#444444",
                        label=f"[{analysis['ap'][name]:.3f}] {name}")
        below = curve
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="recall", ylabel="precision",
           title=title or f"error analysis ({'mask' if analysis['iou_type'] == 'segm' else 'box'})")
    ax.title.set_fontsize(9)
    ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)

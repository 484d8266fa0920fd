"""Instance-segmentation evaluation with pycocotools: predictions as COCO results, box and mask mAP, PR curves.

Prediction (:func:`predict_image`) runs a fine-tuned Mask R-CNN on whole images. ``inference="whole"``
(default) gives the image to the detector in one pass: the backbone uses the sin-cos position embedding of
the image's own token grid, so every token keeps the embedding of its row and column (see
:mod:`micromae.models.heads.maskrcnn`). ``inference="tiles"`` cuts tiles of the training crop size (overlap
``tile_overlap``), keeps each detection only from the tile whose centre is nearest to the detection's box
centre, and removes remaining duplicates by NMS; masks are pasted back at their place in the image.
Soft masks are cut at 0.5 and written as compressed RLE.

Scoring (:func:`coco_evaluate`) is pycocotools' COCOeval for ``bbox`` and ``segm``: ``mAP`` (IoU
0.50:0.95), ``mAP50``, ``mAP75`` are its ``stats[0..2]`` (area all, ``maxDets`` 100 unless told otherwise),
and the precision-recall curves at IoU 0.5 and 0.75 come from ``eval['precision']`` (101 recall points,
mean over categories). For ``segm`` the results' boxes are dropped before loading, so areas come from the
masks (as detectron2 does).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import batched_nms
from tqdm.auto import tqdm

from micromae.data.coco import CocoInstanceDataset, check_coco, read_coco_json, segmentation_rle
from micromae.errors import at_least, input_error
from micromae.evaluate.coco_analysis import ERROR_CURVES, coco_error_analysis, plot_error_analysis
from micromae.evaluate.report import markdown_table
from micromae.figures import plt, save_figure
from micromae.io import atomic_path, check_output, write_files_atomically
from micromae.runtime import resolve_device
from micromae.train.maskrcnn import load_maskrcnn_model

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")

__all__ = ["coco_evaluate", "load_coco_gt", "plot_pr_curves", "predict_coco", "predict_image",
           "run_evaluate_instances", "to_coco_results"]


# ----------------------------------------------------------------------------------------------------------
# prediction


def _run(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Detector outputs on CPU with masks cut at 0.5: boxes (N, 4), scores, labels, masks (N, H, W) bool."""
    outputs = model(images)
    return [{"boxes": o["boxes"].float().cpu(), "scores": o["scores"].float().cpu(), "labels": o["labels"].cpu(),
             "masks": (o["masks"][:, 0] > 0.5).cpu()} for o in outputs]


def _tile_starts(n: int, tile: int, overlap: float) -> list[int]:
    """Tile starts covering ``n`` pixels: step ``tile * (1 - overlap)``, the last tile flush with the end."""
    if n <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    count = math.ceil((n - tile) / step) + 1
    return sorted({min(i * step, n - tile) for i in range(count)})


def _owner(centres: torch.Tensor, starts: list[int], tile: int) -> torch.Tensor:
    """Index of the tile (along one axis) whose centre is nearest to each detection centre ``(N,)``."""
    tile_centres = torch.tensor(starts, dtype=torch.float32) + tile / 2
    return (centres[:, None] - tile_centres[None]).abs().argmin(1)


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: torch.Tensor, inference: str = "whole", tile: int = 128,
                  overlap: float = 0.25, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Detections of one image ``(C, H, W)`` in [0, 1]: ``boxes (N, 4)`` x1 y1 x2 y2, ``scores (N,)``,
    ``labels (N,)`` (1..K), ``masks (N, H, W)`` bool, best first (module docstring for the modes)."""
    if inference not in ("whole", "tiles"):
        raise input_error("inference", "whole or tiles", repr(inference), "Use inference=whole")
    device = next(model.parameters()).device
    image = image.to(device, torch.float32)
    h, w = image.shape[-2:]
    if inference == "whole" or (h <= tile and w <= tile):
        return _run(model, [image])[0]
    rows, cols = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    windows = [(r, c) for r in rows for c in cols]
    kept: dict[str, list[torch.Tensor]] = {"boxes": [], "scores": [], "labels": [], "masks": []}
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        outputs = _run(model, [image[:, r:r + tile, c:c + tile] for r, c in chunk])
        for (r, c), out in zip(chunk, outputs):
            boxes = out["boxes"] + torch.tensor([c, r, c, r], dtype=torch.float32)
            cy, cx = (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2
            own = (_owner(cy, rows, tile) == rows.index(r)) & (_owner(cx, cols, tile) == cols.index(c))
            masks = torch.zeros((int(own.sum()), h, w), dtype=torch.bool)
            masks[:, r:r + tile, c:c + tile] = out["masks"][own]
            for key, value in (("boxes", boxes[own]), ("scores", out["scores"][own]),
                               ("labels", out["labels"][own]), ("masks", masks)):
                kept[key].append(value)
    merged = {k: torch.cat(v) for k, v in kept.items()}
    keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], model.roi_heads.nms_thresh)
    keep = keep[: model.roi_heads.detections_per_img]
    return {k: v[keep] for k, v in merged.items()}


def to_coco_results(pred: dict[str, torch.Tensor], image_id: Any, category_ids: list[int]) -> list[dict]:
    """COCO results entries of one image's detections (``bbox`` [x, y, w, h], RLE ``segmentation``)."""
    masks = np.asfortranarray(pred["masks"].numpy().astype(np.uint8).transpose(1, 2, 0))  # (H, W, N)
    rles = mask_utils.encode(masks) if len(pred["scores"]) else []
    results = []
    for box, score, label, rle in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist(),
                                      rles):
        x1, y1, x2, y2 = box
        results.append({"image_id": image_id, "category_id": int(category_ids[int(label) - 1]),
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5),
                        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}})
    return results


def predict_coco(model: torch.nn.Module, dataset: Any, category_ids: list[int], inference: str = "whole",
                 tile: int = 128, overlap: float = 0.25) -> list[dict]:
    """COCO results for every image of ``dataset`` (a :class:`~micromae.data.coco.CocoInstanceDataset`)."""
    model.eval()
    results: list[dict] = []
    for index in tqdm(range(len(dataset)), desc="predict", unit="image"):
        pred = predict_image(model, dataset.read_image(index), inference, tile, overlap)
        results += to_coco_results(pred, dataset.images[index]["id"], category_ids)
    return results


# ----------------------------------------------------------------------------------------------------------
# scoring


def load_coco_gt(gt: str | Path | dict) -> COCO:
    """Ground truth as a pycocotools COCO, quietly; missing ``iscrowd``/``area``/``bbox`` are filled in."""
    data = check_coco(copy.deepcopy(gt)) if isinstance(gt, dict) else read_coco_json(gt)
    sizes = {im["id"]: (im.get("height"), im.get("width")) for im in data["images"]}
    if any(None in s for s in sizes.values()):
        raise input_error("COCO images", "height and width for every image", "entries without them",
                          "Add height and width to the images of the JSON")
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann or "bbox" not in ann:
            rle = segmentation_rle(ann["segmentation"], *sizes[ann["image_id"]])
            ann.setdefault("area", float(mask_utils.area(rle)))
            ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _pr_curves(e: COCOeval) -> dict[str, list[float]]:
    """Precision at 101 recall points, IoU 0.5 and 0.75, area all, the last maxDets, mean over categories."""
    p = e.eval["precision"]  # (T iou, R recall, K categories, A areas, M maxDets), -1 where undefined
    curves = {"recall": [float(r) for r in e.params.recThrs]}
    for iou in (0.5, 0.75):
        t = int(np.argmin(np.abs(e.params.iouThrs - iou)))
        values = p[t, :, :, 0, -1]  # (R, K)
        masked = np.where(values > -1, values, np.nan)
        mean = np.nanmean(masked, axis=1) if np.isfinite(masked).any() else np.zeros(len(values))
        curves[f"precision_iou{int(iou * 100)}"] = [float(v) if np.isfinite(v) else 0.0 for v in mean]
    return curves


def coco_evaluate(gt: str | Path | dict | COCO, results: str | Path | list[dict],
                  iou_types: tuple[str, ...] = IOU_TYPES, max_dets: int = 100) -> dict[str, dict[str, Any]]:
    """COCOeval of ``results`` against ``gt`` for each IoU type.

    Returns ``{iou_type: {"mAP", "mAP50", "mAP75", ... (all 12 of stats), "stats": [12], "curves":
    {"recall", "precision_iou50", "precision_iou75"}, "summary": COCOeval's text, "detections": n}}``.
    ``max_dets``: the largest ``maxDets`` (100 is COCO's; raise it for images with more objects).
    """
    coco_gt = gt if isinstance(gt, COCO) else load_coco_gt(gt)
    results = read_results(results, coco_gt)
    out: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise input_error("iou_type", "bbox or segm", repr(iou_type), "Use bbox and/or segm")
        out[iou_type] = _evaluate_one(coco_gt, results_for(results, iou_type), iou_type, max_dets)
    return out


def results_for(results: list[dict], iou_type: str) -> list[dict]:
    """A copy of ``results`` for ``iou_type``: for ``segm`` every result needs a mask, and the boxes are dropped
    (areas then come from the masks)."""
    dets = copy.deepcopy(results)
    if iou_type == "segm":
        missing = [r for r in dets if "segmentation" not in r]
        if missing:
            raise input_error("predictions", "a segmentation in every result for mask mAP",
                              f"{len(missing)} results without one", "Score bbox only, or add the masks")
        for r in dets:
            r.pop("bbox", None)
    return dets


def read_results(results: str | Path | list[dict], coco_gt: COCO) -> list[dict]:
    """COCO results (a list, or the JSON file holding one), checked against the ground truth's image ids."""
    if isinstance(results, (str, Path)):
        path = Path(results)
        if not path.is_file():
            raise input_error("predictions", "an existing COCO results JSON", f"'{path}' does not exist",
                              "Pass the predictions.json written by micromae evaluate instances")
        try:
            results = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise input_error(f"predictions '{path}'", "a COCO results JSON file", f"a file that is not JSON ({exc})",
                              "Pass the predictions.json written by micromae evaluate instances") from exc
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise input_error("predictions", "a JSON list of COCO results (one object per detection)",
                          type(results).__name__ if not isinstance(results, list) else "a list of other values",
                          "Fix the file")
    unknown = {r.get("image_id") for r in results} - set(coco_gt.getImgIds())
    if unknown:
        raise input_error("predictions", "image ids of the ground-truth file", f"unknown ids {sorted(unknown)[:5]}",
                          "Score the predictions against the COCO file they were made for")
    return results


def _evaluate_one(coco_gt: COCO, dets: list[dict], iou_type: str, max_dets: int) -> dict[str, Any]:
    if not dets:  # pycocotools cannot load an empty result list: nothing detected scores 0
        zeros = dict.fromkeys(STAT_NAMES, 0.0)
        recall = np.linspace(0, 1, 101).tolist()
        return {**zeros, "stats": [0.0] * 12, "detections": 0, "summary": "no detections",
                "curves": {"recall": recall, "precision_iou50": [0.0] * 101, "precision_iou75": [0.0] * 101}}
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        coco_dt = coco_gt.loadRes(dets)
        e = COCOeval(coco_gt, coco_dt, iou_type)
        e.params.maxDets = [1, 10, int(max_dets)]
        e.evaluate()
        e.accumulate()
    with contextlib.redirect_stdout(summary := io.StringIO()):
        e.summarize()
    stats = [float(s) for s in e.stats]
    return {**dict(zip(STAT_NAMES, stats)), "stats": stats, "detections": len(dets),
            "summary": summary.getvalue(), "curves": _pr_curves(e)}


def plot_pr_curves(metrics: dict[str, dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Precision-recall curves (IoU 0.5 and 0.75) of every IoU type in ``metrics`` as one PNG."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.8), squeeze=False)
    for ax, (iou_type, m) in zip(axes[0], metrics.items()):
        c = m["curves"]
        for key, style, label in (("precision_iou50", "-", "IoU 0.50"), ("precision_iou75", "--", "IoU 0.75")):
            ax.plot(c["recall"], c[key], style, label=label)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=f"{'box' if iou_type == 'bbox' else 'mask'}: mAP {m['mAP']:.3f}, "
                     f"AP50 {m['mAP50']:.3f}, AP75 {m['mAP75']:.3f}")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# the verb


def _report(metrics: dict[str, dict[str, Any]], source: str, coco: str, analysis: dict[str, Any] | None) -> str:
    rows = [[("box" if t == "bbox" else "mask"), m["mAP"], m["mAP50"], m["mAP75"], m["detections"]]
            for t, m in metrics.items()]
    lines = ["# Instance segmentation", "", f"- predictions: {source}", f"- ground truth: {coco}", "",
             markdown_table(rows, ["", "mAP", "mAP@50", "mAP@75", "detections"]), "",
             "COCOeval (pycocotools), area all; mAP averages IoU 0.50:0.95.", "",
             "![precision-recall](pr_curves.png)", ""]
    if analysis is not None:
        lines += [f"## Error analysis ({'masks' if analysis['iou_type'] == 'segm' else 'boxes'})", "",
                  markdown_table([[analysis["ap"][n] for n in ERROR_CURVES]], list(ERROR_CURVES)), "",
                  "Area under each precision-recall curve of the COCO analysis: C75 / C50 at IoU 0.75 / 0.5, Loc "
                  "at IoU 0.1, Sim and Oth without similar-class / any class confusions, BG without background "
                  "false positives, FN = 1 (the rest are missed objects); mean over categories.", "",
                  "![error analysis](error_analysis.png)", ""]
    for t, m in metrics.items():
        lines += [f"## COCOeval summary: {t}", "", "```", m["summary"].rstrip(), "```", ""]
    return "\n".join(lines)


def run_evaluate_instances(coco: str | Path, out: str | Path, checkpoint: str | Path | None = None,
                           predictions: str | Path | None = None, image_root: str | Path | None = None,
                           axes: str | None = None, device: str = "auto", inference: str | None = None,
                           max_dets: int = 100, overwrite: bool = False) -> dict[str, dict[str, Any]]:
    """Predict ``coco``'s images with a Mask R-CNN ``checkpoint`` (or score existing ``predictions``) and
    write ``out/``: ``predictions.json`` (when predicted), ``metrics.json`` (with ``error_analysis``: the COCO
    analysis curves and their areas, :mod:`~micromae.evaluate.coco_analysis`), ``report.md``, ``pr_curves.png``,
    ``error_analysis.png``.
    ``inference``: ``whole`` or ``tiles`` (default: the run's config). Images are scaled to [0, 1] as in
    training (the checkpoint's ``data.normalize`` / ``data.percentiles``). Returns :func:`coco_evaluate`'s dict."""
    if (checkpoint is None) == (predictions is None):
        raise input_error("evaluate instances", "either --checkpoint or --predictions",
                          "both" if checkpoint else "neither", "Pass a checkpoint to predict, or a results JSON")
    at_least("--max-dets", max_dets, 1, "Pass --max-dets 1 or more (COCO's default is 100)")
    out = check_output(out, overwrite=overwrite, what="--out", folder=True)
    gt = load_coco_gt(coco)
    texts: dict[str, str] = {}
    if checkpoint is not None:
        model, cfg = load_maskrcnn_model(checkpoint, resolve_device(device, option="--device"))
        model.roi_heads.detections_per_img = max(int(max_dets), model.roi_heads.detections_per_img)
        dataset = CocoInstanceDataset(coco, image_root=image_root, axes=axes, crop_size=cfg.data.crop_size,
                                      normalize=cfg.data.normalize, percentiles=cfg.data.percentiles)
        if dataset.num_channels != cfg.model.in_chans:
            raise input_error(f"images of '{coco}'", f"{cfg.model.in_chans} channels (the checkpoint's model)",
                              f"{dataset.num_channels} channels", "Evaluate on images of the training panel "
                              "(or pass --axes if the channel axis is misread)")
        unknown = set(cfg.category_ids) - set(gt.getCatIds())
        if unknown:
            raise input_error(f"categories of '{coco}'", f"the training categories {cfg.category_ids}",
                              f"no category {sorted(unknown)}", "Evaluate on data labelled like the training set")
        results = predict_coco(model, dataset, cfg.category_ids, inference or cfg.inference, cfg.data.crop_size,
                               cfg.tile_overlap)
        texts["predictions.json"] = json.dumps(results)
        source = f"{checkpoint} (inference: {inference or cfg.inference})"
    else:
        results, source = predictions, str(predictions)
    results = read_results(results, gt)
    metrics = coco_evaluate(gt, results, max_dets=max_dets)
    # the error analysis of the masks (of the boxes when the results have no masks)
    kind = "segm" if all("segmentation" in r for r in results) else "bbox"
    analysis = coco_error_analysis(gt, results_for(results, kind), kind, max_dets)
    texts["metrics.json"] = json.dumps({"source": source, "ground_truth": str(coco), **metrics,
                                        "error_analysis": analysis}, indent=2)
    texts["report.md"] = _report(metrics, source, str(coco), analysis)
    with atomic_path(out, overwrite=overwrite) as tmp:  # the folder appears complete; --overwrite replaces it whole
        plot_pr_curves(metrics, tmp / "pr_curves.png", title=str(source))
        plot_error_analysis(analysis, tmp / "error_analysis.png", title=f"error analysis: {source}")
        write_files_atomically(tmp, {}, texts)
    return metrics

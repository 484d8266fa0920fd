"""Command-line verbs for instance segmentation: `micromae evaluate instances`.

Training is `micromae finetune maskrcnn_tiny` / `maskrcnn_brain` (the config's ``task: instances``).
"""

from __future__ import annotations

import argparse


def cmd_evaluate_instances(args: argparse.Namespace) -> int:
    from micromae.evaluate.coco import run_evaluate_instances

    metrics = run_evaluate_instances(args.coco, args.out, checkpoint=args.checkpoint, predictions=args.predictions,
                                     image_root=args.image_root, axes=args.axes, device=args.device,
                                     inference=args.inference, max_dets=args.max_dets,
                                     overwrite=args.overwrite)
    for iou_type, m in metrics.items():
        name = "box " if iou_type == "bbox" else "mask"
        print(f"{name} mAP {m['mAP']:.4f}  mAP@50 {m['mAP50']:.4f}  mAP@75 {m['mAP75']:.4f}  "
              f"({m['detections']} detections)")
    print(f"wrote {args.out}/metrics.json, report.md, pr_curves.png, error_analysis.png"
          + (", predictions.json" if args.checkpoint else ""))
    return 0


def register(sub: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add this module's verbs to the top-level (``sub``) and ``micromae evaluate`` sub-parsers."""
    q = evaluate.add_parser(
        "instances", help="COCO box and mask mAP of a Mask R-CNN run (pycocotools)",
        description="Predict the images of a COCO file with a fine-tuned Mask R-CNN checkpoint (or score an "
                    "existing COCO results file) and write metrics.json (box and mask mAP, mAP@50, mAP@75, "
                    "the rest of COCOeval's stats and the COCO error analysis of the masks: C75, C50, Loc, Sim, "
                    "Oth, BG, FN curves and their areas), report.md, pr_curves.png, error_analysis.png and "
                    "predictions.json to --out.")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="Mask R-CNN checkpoint, e.g. runs/maskrcnn_tiny/checkpoints/last.pt")
    source.add_argument("--predictions", help="COCO results JSON to score instead of predicting")
    q.add_argument("--coco", required=True, help="ground-truth COCO annotations.json")
    q.add_argument("--image-root", help="folder the file_name entries are relative to (default: the JSON's)")
    q.add_argument("--axes", help="dimension order of the image files, e.g. CYX or YXC (default: metadata)")
    q.add_argument("--inference", choices=("whole", "tiles"),
                   help="whole images in one pass, or crop-size tiles stitched (default: the run's config)")
    q.add_argument("--max-dets", type=int, default=100,
                   help="COCOeval's largest maxDets and the detections kept per image (default 100)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    q.add_argument("--out", required=True, help="report folder (must not exist yet)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder whole")
    q.set_defaults(func=cmd_evaluate_instances)

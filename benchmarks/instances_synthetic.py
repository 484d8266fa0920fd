"""Mask R-CNN with the ViT backbone on synthetic multiplex images: random init vs a DAMA-pre-trained encoder.

1. Data: the ``maskrcnn_tiny`` preset's training set (8 synthetic 7-channel images of 256×256, seed 0, about
   33 cells each, written by the trainer into the run folder) and a held-out test set written the same way
   with seed 1000 (``--test-images`` images).
2. Pre-training (for the second arm): ``dama_tiny`` (student1-student2, 32×32 crops, ``--pretrain-steps``
   steps) on its own synthetic images (16 images, seed 0), then branch 1's encoder.
3. Fine-tuning: ``maskrcnn_tiny`` as shipped (64-px crops, LSJ 0.5-1.5, AdamW, layer decay 0.7,
   ``--steps`` steps, batch 4, fine-tuning seed 0 or each of ``--seeds``), once from random init and once from
   the pre-trained encoder (``--checkpoint``: use that pre-training instead of running step 2).
4. Evaluation: ``run_evaluate_instances`` on the test images (whole 256×256 images predicted as 64-px tiles,
   the preset's ``inference: tiles``; and once in one pass, ``inference=whole``, for the random-init run).
5. Intensities: ``--normalize dtype`` (default; uint16 divided by 65535) or ``percentile`` (per image and
   channel, ``--percentiles`` to [0, 1]) for pre-training, fine-tuning, the token-variance crops and evaluation
   alike (the fine-tuned checkpoint carries the choice). ``--arms`` picks the fine-tuning runs (default: all
   four: random init and DAMA init, each with layer decay 0.7 and 1.0).

Figures (JSON lines, also ``<out>/instances_synthetic.jsonl``): ``box_mAP``, ``box_mAP50``, ``box_mAP75``,
``mask_mAP``, ``mask_mAP50``, ``mask_mAP75`` per arm and inference mode, and ``cpu_s`` per stage; the table
is ``<out>/instances_synthetic.md``.

    OMP_NUM_THREADS=1 python benchmarks/instances_synthetic.py [--quick] [--steps N] [--pretrain-steps N]
        [--normalize dtype|percentile] [--percentiles LOW HIGH] [--arms random,dama,random_ld1,dama_ld1]
        [--seeds 0 1 2] [--checkpoint dama_run/checkpoints/last.pt]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

from common import OUT_DIR, Reporter, log, resolve_device, timed
from micromae.config import resolve_config
from micromae.config import PretrainConfig, load_config
from micromae.data.synthetic_mif import write_mif_dataset
from micromae.evaluate.coco import run_evaluate_instances
from micromae.evaluate.report import markdown_table
from micromae.io import atomic_path
from micromae.train.maskrcnn import load_maskrcnn_config, run_maskrcnn_finetune
from micromae.train.pretrain import run_pretrain

QUICK_DATA = ["data.n_images=2", "data.synthetic_shape=[64,64]", "train.batch_size=2"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 steps, tiny images (for tests; figures mean nothing)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--steps", type=int, default=300, help="Mask R-CNN fine-tuning steps (default 300)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="dama_tiny steps (default 300)")
    parser.add_argument("--test-images", type=int, default=4, help="held-out 256×256 test images (default 4)")
    parser.add_argument("--normalize", default="dtype", choices=("dtype", "percentile", "minmax"),
                        help="intensity scaling of every stage (default dtype)")
    parser.add_argument("--percentiles", type=float, nargs=2, default=[0.5, 99.8], help="for --normalize percentile")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="fine-tuning seeds, each arm runs once per seed (default 0)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a dama_tiny pre-training checkpoint to use instead of pre-training here")
    parser.add_argument("--arms", default="random,dama,random_ld1,dama_ld1",
                        help="fine-tuning runs: random, dama (layer decay 0.7), random_ld1, dama_ld1 (1.0)")
    return parser.parse_args(argv)


def token_variance(checkpoint: Path | None, coco: Path, normalize: str = "dtype",
                   percentiles: tuple[float, float] = (0.5, 99.8)) -> float:
    """How much the encoder's patch tokens depend on the image: the variance across 8 test crops (32×32, the
    pre-training size) of each token, averaged over tokens and channels (tokens have unit total variance)."""
    from micromae.data.coco import CocoInstanceDataset, instance_batches
    from micromae.models import ViTEncoder
    from micromae.models.pretrained import load_encoder

    torch.manual_seed(0)
    encoder = (ViTEncoder(img_size=32, patch_size=4, in_chans=7, embed_dim=64, depth=4, num_heads=4,
                          pos_embed_weight=1.0) if checkpoint is None else load_encoder(checkpoint)[0].eval())
    data = CocoInstanceDataset(coco, crop_size=32, scale_range=None, normalize=normalize, percentiles=percentiles)
    crops = next(instance_batches(data, 8, seed=0))[1][0]
    with torch.no_grad():
        return float(encoder.eval()(crops)[:, 1:].var(0).mean())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    suffix = "" if args.normalize == "dtype" else f"_{args.normalize}"  # keeps the dtype results
    rep = Reporter(f"instances_synthetic{suffix}", args.out, device, args.quick)
    steps, pre_steps = (2, 2) if args.quick else (args.steps, args.pretrain_steps)
    common = [f"train.device={device.type}", "train.figure_every=0", "train.ckpt_every=0",
              f"data.normalize={args.normalize}", f"data.percentiles=[{args.percentiles[0]},{args.percentiles[1]}]"]
    norm = {"normalize": args.normalize, "percentiles": tuple(args.percentiles)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shape = (64, 64) if args.quick else (256, 256)
        test = write_mif_dataset(tmp / "test", n_images=1 if args.quick else args.test_images, shape=shape,
                                 seed=1000)["annotations"]
        pre_cfg = load_config(resolve_config("dama_tiny"), PretrainConfig, common + [f"train.steps={pre_steps}"]
                              + (["data.n_images=2", "data.synthetic_shape=[64,64]", "train.batch_size=2"]
                                 if args.quick else []))
        if args.checkpoint is None:
            log(f"pre-training dama_tiny for {pre_steps} steps")
            pre, wall, cpu = timed(lambda: run_pretrain(pre_cfg, tmp / "dama"))
            rep.emit("cpu_s", cpu, "s", None, stage="pretrain dama_tiny", steps=pre_steps, wall_s=wall)
            pretrained = pre.checkpoint
        else:
            pretrained = args.checkpoint
        for name, encoder in (("random init", None), ("DAMA (dama_tiny, branch 1)", pretrained)):
            rep.emit("token_var_across_images", token_variance(encoder, test, **norm), "1", None, encoder=name,
                     normalize=args.normalize)
        arms = {"random init": ("random", ["init=random"]),
                "DAMA (dama_tiny, branch 1)": ("dama", [f"init={pretrained}"]),
                "random init, layer_decay 1.0": ("random_ld1", ["init=random", "layer_decay=1.0"]),
                "DAMA, layer_decay 1.0": ("dama_ld1", [f"init={pretrained}", "layer_decay=1.0"])}
        chosen = set(args.arms.split(","))
        for arm, seed in ((a, sd) for a in arms for sd in args.seeds):
            key, init = arms[arm]
            if key not in chosen:
                continue
            cfg = load_maskrcnn_config(resolve_config("maskrcnn_tiny"), common + init + [f"train.steps={steps}",
                                       f"train.seed={seed}"] + (QUICK_DATA if args.quick else []))
            log(f"fine-tuning maskrcnn_tiny ({arm}, seed {seed}) for {steps} steps")
            torch.manual_seed(seed)
            result, wall, cpu = timed(partial(run_maskrcnn_finetune, cfg, tmp / f"run_{len(rows)}"))
            rep.emit("cpu_s", cpu, "s", None, stage=f"finetune {arm}", steps=steps, wall_s=wall)
            modes = ("tiles", "whole") if arm == "random init" else ("tiles",)
            for mode in modes:
                metrics, wall, cpu = timed(partial(run_evaluate_instances, test, tmp / f"eval_{len(rows)}",
                                                   checkpoint=result.checkpoint, device=device.type, inference=mode))
                rep.emit("cpu_s", cpu, "s", None, stage=f"evaluate {arm} ({mode})", wall_s=wall)
                for iou_type, name in (("bbox", "box"), ("segm", "mask")):
                    for key in ("mAP", "mAP50", "mAP75"):
                        rep.emit(f"{name}_{key}", metrics[iou_type][key], "AP", None, init=arm,
                                 inference=mode, steps=steps, normalize=args.normalize, seed=seed)
                label = arm if len(args.seeds) == 1 else f"{arm}, seed {seed}"
                rows.append([label, mode] + [metrics[t][k] for t in ("bbox", "segm")
                                             for k in ("mAP", "mAP50", "mAP75")])
    rep.close()
    table = markdown_table(rows, ["encoder", "inference", "box mAP", "box AP50", "box AP75", "mask mAP",
                                  "mask AP50", "mask AP75"])
    with atomic_path(args.out / f"instances_synthetic{suffix}.md", overwrite=True) as path:
        path.write_text(table + "\n")
    print(table, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

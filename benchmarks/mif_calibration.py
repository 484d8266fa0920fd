"""Calibrate a synthetic multiplex benchmark: how far the channel means get, and where a ViT fine-tuned from
random init with all training labels lands (issue 10, item 1: like the DAMA paper, there must be room above
random init).

1. Data: ``write_mif_pools`` with ``--realism`` (default ``paper``): ``--pretrain-images`` images for
   pre-training and ``--labelled-images`` other images whose single-cell crops (``--crop-size`` pixels,
   centred on each cell, type as label) are the labelled pool. Same generator seed as the comparison
   (``SEED``), so the crops calibrated here are the benchmark's.
2. Channel means: the crops as the classifier reads them (``load_labelled_crops``, ``data.normalize=dtype``,
   at the model's side), the 7 per-channel means of each crop, standardised, scikit-learn's
   ``LogisticRegression``, on the protocol's stratified 60/40 splits (``stratified_splits``, ``--folds``):
   mean ± std accuracy (``channel_means_accuracy``; goal <= 0.70).
3. Random init: the classification protocol (``run_evaluate_classification``, ``classify_tiny`` recipe, the
   dama_tiny encoder shape at ``--model-size`` with ``--patch-size``) fine-tuned for ``--steps`` steps on
   the whole train part of the first ``--finetune-folds`` splits (``random_init_accuracy``; goal 0.85-0.93).
   With ``--skip-finetune`` only step 2 runs (seconds).

One JSON line per figure (also ``<out>/mif_calibration.jsonl``, with the load average and the cores other
processes used), and the protocol's results under ``<out>/mif_calibration/``; settings other than
``--realism paper --crop-size 64`` write ``mif_calibration_<realism>_<crop>.*`` instead.

    OMP_NUM_THREADS=1 python benchmarks/mif_calibration.py [--realism paper|default] [--crop-size 64]
        [--model-size S] [--patch-size 8] [--steps 3000] [--skip-finetune] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import OUT_DIR, Reporter, log, own_cpu_seconds
from micromae.data.synthetic_mif import REALISM, write_mif_pools
from micromae.evaluate.classification import run_evaluate_classification, stratified_splits
from micromae.train.classify_data import load_labelled_crops

SEED = 2024  # generator seed of the benchmark's pools (never the presets' training seed 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny everything (for tests; the figures mean nothing)")
    p.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only (the calibration's budget)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"results folder (default {OUT_DIR})")
    p.add_argument("--realism", default="paper", choices=sorted(REALISM), help="generator preset (default paper)")
    p.add_argument("--crop-size", type=int, default=64, help="side of the single-cell crops (default 64)")
    p.add_argument("--model-size", type=int, default=None, help="the ViT's input side (default: --crop-size)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch side (default 8: 64 tokens at 64 px)")
    p.add_argument("--shape", type=int, default=512, help="image side (default 512)")
    p.add_argument("--labelled-images", type=int, default=13, help="images of the labelled pool (default 13)")
    p.add_argument("--pretrain-images", type=int, default=13, help="images of the pre-training pool (default 13)")
    p.add_argument("--folds", type=int, default=5, help="60/40 splits for the channel means (default 5)")
    p.add_argument("--finetune-folds", type=int, default=1, help="splits fine-tuned from random init (default 1)")
    p.add_argument("--steps", type=int, default=3000, help="fine-tuning steps (default 3000, the measured figures)")
    p.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch (default 32)")
    p.add_argument("--finetune-seed", type=int, default=0, help="fine-tuning seed (init, order; default 0)")
    p.add_argument("--skip-finetune", action="store_true", help="channel means only")
    p.add_argument("--data", type=Path, default=None, help="keep (or reuse) the pools in this folder")
    return p.parse_args(argv)


def finetune_overrides(args: argparse.Namespace) -> list[str]:
    """``classify_tiny`` with the model at ``--model-size`` / ``--patch-size`` and a fixed number of steps."""
    size = args.model_size or args.crop_size
    steps = 2 if args.quick else args.steps
    return [f"model.img_size={size}", f"model.patch_size={args.patch_size}", "train.epochs=null",
            f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}", f"train.batch_size={args.batch_size}",
            f"train.log_every={max(1, steps // 10)}", f"train.seed={args.finetune_seed}", "data.normalize=dtype"]


def channel_means_accuracy(means: np.ndarray, labels: np.ndarray, splits: list) -> list[float]:
    """Accuracy of a standardised logistic regression on ``means (N, C)`` for each (train, test) split."""
    out = []
    for train, test in splits:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        model.fit(means[train], labels[train])
        out.append(float(model.score(means[test], labels[test])))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default = (args.realism, args.crop_size) == ("paper", 64)  # other settings keep their own files
    name = "mif_calibration" + ("" if default else f"_{args.realism}_{args.crop_size}")
    name += f"_seed{args.finetune_seed}" if args.finetune_seed else ""
    rep = Reporter(name, args.out, torch.device("cpu"), args.quick)
    size = args.model_size or args.crop_size
    with contextlib.ExitStack() as stack:
        root = args.data or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mif_calibration_")))
        shape = (96, 96) if args.quick else (args.shape, args.shape)
        n_pre, n_lab = (1, 2) if args.quick else (args.pretrain_images, args.labelled_images)
        if not (root / "labelled" / "cells").is_dir():
            wall = time.perf_counter()
            write_mif_pools(root, n_pre, n_lab, shape=shape, seed=SEED, crop_size=args.crop_size,
                            realism=args.realism, overwrite=root.is_dir() and not any(root.iterdir()))
            log(f"wrote the pools in {time.perf_counter() - wall:.1f} s")
        cells = root / "labelled" / "cells"
        crops = load_labelled_crops(cells, size, normalize="dtype")
        labels = crops.labels.numpy()
        splits = stratified_splits(labels, 2 if args.quick else args.folds, 0.4, seed=0)
        acc = channel_means_accuracy(crops.images.mean(dim=(2, 3)).numpy(), labels, splits)
        counts = np.bincount(labels, minlength=len(crops.classes))
        rep.emit("channel_means_accuracy", float(np.mean(acc)), "fraction correct", None, std=float(np.std(acc)),
                 per_fold=acc, realism=args.realism, crop=args.crop_size, model_size=size, n_crops=len(labels),
                 classes=dict(zip(crops.classes, counts.tolist())), chance=float(counts.max() / counts.sum()),
                 bound=0.70)
        if not args.skip_finetune:
            cpu, wall = own_cpu_seconds(), time.perf_counter()
            results = run_evaluate_classification(
                {"random init": "random"}, cells, (root if args.quick else args.out) / name / "finetune",
                config="classify_tiny", overrides=finetune_overrides(args), methods=("finetune",),
                folds=1 if args.quick else args.finetune_folds, fractions=(1.0,), device="cpu")
            row = results["summary"][0]
            rep.emit("random_init_accuracy", row["accuracy_mean"], "fraction correct", None,
                     std=row["accuracy_std"], per_fold=row["accuracy_per_fold"], n_train=row["n_train"],
                     n_test=row["n_test"], steps=2 if args.quick else args.steps, batch=args.batch_size,
                     model_size=size, patch=args.patch_size, realism=args.realism, crop=args.crop_size,
                     seed=args.finetune_seed,
                     cpu_s=own_cpu_seconds() - cpu, wall_s=time.perf_counter() - wall, target=[0.85, 0.93])
    rep.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

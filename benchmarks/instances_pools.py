"""Mask R-CNN at 10 % of the labelled images, 3 seeds, on the paper-like multiplex pools of ``mif_comparison.py``:
random init vs each pre-trained encoder (DAMA paper, Table 2's protocol at a label share like Table 3's).

1. Data: the labelled pool that ``write_mif_pools`` wrote (``--pools DIR`` holding ``labelled/``: whole 512×512
   7-channel images, ``realism=paper``, COCO ``annotations.json``); the pre-training pool is never read here, so
   no test cell was seen in pre-training. ``--quick`` writes tiny pools (1 + 3 images of 128×128) into a temp
   folder and pre-trains a 2-step MAE on their pre-training crops, so the quick run has a pre-trained arm too.
2. Split by image, in the order of ``annotations.json``: the last ``--test-images`` images are the test set; the
   training set is the first ``max(1, round(--label-fraction × rest))`` of the others (half rounds up; 13 images
   at the defaults: 3 test, 1 of the other 10 for training). Both are written as COCO files (annotations
   filtered, images referenced by absolute path) into ``<run folder>/splits/{train,test}.json``; no image is in
   both (checked).
3. Fine-tuning, for each seed of ``--seeds`` and each arm (random init first, then every ``--checkpoint NAME=PATH``
   in the order given): ``maskrcnn_tiny`` with ``data.source=coco`` on the training split, the encoder shape of
   the first checkpoint (``img_size``, ``patch_size``, width, depth, heads, ...; without checkpoints
   ``--model-size`` / ``--patch-size`` at the preset's width), crops of the encoder's side, pyramid strides
   ``p, 2p, 4p, 8p`` for patch ``p`` (8 → 8, 16, 32, 64; the preset's anchors 16-128 px are kept), layer decay
   ``--layer-decay`` (default 1.0: 0.7 was measured to hurt short pre-trainings), ``data.normalize``
   ``--normalize`` (default ``dtype``, the comparison's pre-training; a checkpoint that stored another setting is
   warned about), ``--steps`` steps (default 300), batch ``--batch-size`` (4), the preset's LSJ and AdamW.
   The random-init arm has the same shape as the pre-trained ones.
4. Evaluation: ``run_evaluate_instances`` on the test split (whole images predicted as tiles of the crop size,
   the preset's ``inference: tiles``): box and mask mAP, AP50, AP75 per arm and seed.
5. Output: JSON lines (``box_mAP`` ... ``mask_mAP75`` per arm and seed; their ``_mean`` with ``std`` over seeds
   (population std, as ``mif_comparison.py``); ``gain_box_mAP`` / ``gain_mask_mAP`` of each pre-trained arm:
   mean over seeds of its difference to random init of the same seed, with ``above`` = seeds where it is higher;
   ``cpu_s`` and ``cpu_s_per_step`` per fine-tuning, ``cpu_s`` per evaluation; ``split_images`` with the file
   names), also ``<out>/instances_pools.jsonl``; the table ``<out>/instances_pools.md`` (rows: arms, random init
   first; columns: mean ± std over seeds, and the gains).

Costs (one thread, patch 8, 64-px crops, batch 4; measured 2026-12-02 on the 2-core VM with ~1 other core busy,
runs of 10 and 40 steps on the real pools): 0.29 CPU s per fine-tuning step plus ~0.4 s set-up, and 67-70 CPU s
to evaluate the 3 test images of 512×512 as 64-px tiles at overlap 0.25 (~120 tiles each; measured with a
barely trained model, 100 detections kept per image). Per arm and seed about ``0.29 × steps + 70`` CPU s: at
the defaults with six checkpoints (7 arms × 3 seeds × 300 steps) about 21 × 157 ≈ 3300 CPU s, 55 CPU minutes.
``--quick``: ~17 CPU s.

    OMP_NUM_THREADS=1 python benchmarks/instances_pools.py --pools /work/runs/mifcmp/pools \\
        --checkpoint DAMA=/work/runs/mifcmp/pretrain/DAMA/checkpoints/last.pt \\
        --checkpoint MAE=/work/runs/mifcmp/pretrain/MAE/checkpoints/last.pt  [... one per method]
        [--steps 300] [--seeds 0 1 2] [--label-fraction 0.1] [--test-images 3] [--layer-decay 1.0]
        [--normalize dtype] [--keep-runs DIR] [--device cpu] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import OUT_DIR, Reporter, log, resolve_device, timed
from micromae.cli_classify import parse_checkpoints as cli_parse_checkpoints
from micromae.config import PretrainConfig, load_config, resolve_config
from micromae.data.coco import read_coco_json
from micromae.data.synthetic_mif import write_mif_pools
from micromae.errors import MicromaeInputError, input_error
from micromae.evaluate.coco import run_evaluate_instances
from micromae.evaluate.report import markdown_table
from micromae.io.writers import atomic_path
from micromae.models.pretrained import ENCODER_FIELDS, input_normalization, read_encoder_weights
from micromae.train.maskrcnn import load_maskrcnn_config, run_maskrcnn_finetune
from micromae.train.pretrain import run_pretrain
from mif_calibration import SEED

BENCH = "instances_pools"
RANDOM = "random init"
METRICS = [(iou, name, key) for iou, name in (("bbox", "box"), ("segm", "mask")) for key in ("mAP", "mAP50", "mAP75")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny pools, 2 steps, 1 seed (for tests; figures mean nothing)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"results folder (default {OUT_DIR})")
    p.add_argument("--pools", type=Path, default=None,
                   help="folder with labelled/ as written by write_mif_pools (not needed with --quick)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a pre-trained encoder (repeatable); random init is always run too")
    p.add_argument("--model-size", type=int, default=64, help="ViT input side without checkpoints (default 64)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch side without checkpoints (default 8)")
    p.add_argument("--label-fraction", type=float, default=0.1,
                   help="share of the non-test images used for training (default 0.1)")
    p.add_argument("--test-images", type=int, default=3, help="last images of the labelled pool held out (default 3)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    p.add_argument("--batch-size", type=int, default=4, help="fine-tuning batch (default 4, the preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (default 0 1 2)")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay (default 1.0: none)")
    p.add_argument("--normalize", default="dtype", choices=("dtype", "percentile", "minmax"),
                   help="intensity scaling, as the encoders' pre-training (default dtype)")
    p.add_argument("--percentiles", type=float, nargs=2, default=[0.5, 99.8], help="for --normalize percentile")
    p.add_argument("--keep-runs", type=Path, default=None,
                   help="a new or empty folder to keep splits, runs and evaluations in (default: a temp folder)")
    return p.parse_args(argv)


def parse_checkpoints(specs: list[str]) -> dict[str, Path]:
    """``{name: path}`` of ``--checkpoint NAME=PATH`` options (the CLI's parser: existing files, unique names,
    none called ``random init``, which is the control every run has)."""
    return {name: Path(path) for name, path in
            cli_parse_checkpoints(specs, require_name=True, allow_random=False).items()}


def encoder_shape(checkpoints: dict[str, Path], model_size: int, patch_size: int) -> dict[str, Any]:
    """The encoder fields every arm uses: the first checkpoint's (all must agree), else ``maskrcnn_tiny``'s
    model at ``model_size`` / ``patch_size``."""
    if not checkpoints:
        model = load_maskrcnn_config(resolve_config("maskrcnn_tiny")).model
        shape = {k: getattr(model, k) for k in ENCODER_FIELDS}
        shape.update(img_size=model_size, patch_size=patch_size)
        if model_size % patch_size:
            raise input_error("--model-size", f"a multiple of --patch-size {patch_size}", str(model_size),
                              "e.g. --model-size 64 --patch-size 8")
        return shape
    shapes = {name: read_encoder_weights(path)[1].fields for name, path in checkpoints.items()}
    first, shape = next(iter(shapes.items()))
    for name, other in shapes.items():
        if other != shape:
            diff = {k: other[k] for k in ENCODER_FIELDS if other.get(k) != shape.get(k)}
            raise input_error(f"--checkpoint {name}", f"an encoder of {first}'s shape "
                              + str({k: shape[k] for k in diff}), str(diff),
                              "Compare encoders of one shape (same model.* settings in pre-training)")
    return dict(shape)


def pyramid_strides(patch: int) -> list[int]:
    """ViTDet's four levels from a stride-``patch`` token map: ``patch, 2 patch, 4 patch, 8 patch``."""
    return [patch, 2 * patch, 4 * patch, 8 * patch]


def split_counts(n_images: int, test_images: int, fraction: float) -> tuple[int, int]:
    """``(train, test)`` image counts: the last ``test_images`` test, ``max(1, round(fraction × rest))`` train
    (half rounds up)."""
    if not 0.0 < fraction <= 1.0:
        raise input_error("--label-fraction", "a share in (0, 1]", str(fraction), "e.g. --label-fraction 0.1")
    if test_images < 1 or n_images - test_images < 1:
        raise input_error("--test-images", f"at least 1 and at most {n_images - 1} (the labelled pool has "
                          f"{n_images} images, one at least must train)", str(test_images),
                          "Use fewer test images or a larger labelled pool")
    rest = n_images - test_images
    return max(1, min(rest, math.floor(fraction * rest + 0.5))), test_images


def write_splits(annotations: Path, test_images: int, fraction: float, out: Path) -> dict[str, Path]:
    """Write ``out/train.json`` and ``out/test.json``: the COCO subsets of the labelled pool by image (module
    docstring, step 2), ``file_name`` made absolute. Returns ``{"train": path, "test": path}``."""
    data = read_coco_json(annotations)
    images = data["images"]
    n_train, n_test = split_counts(len(images), test_images, fraction)
    parts = {"train": images[:n_train], "test": images[len(images) - n_test:]}
    ids = {k: {im["id"] for im in v} for k, v in parts.items()}
    files = {k: {im["file_name"] for im in v} for k, v in parts.items()}
    assert not ids["train"] & ids["test"] and not files["train"] & files["test"], "a test image is in training"
    root = annotations.parent.resolve()
    paths = {}
    for split, chosen in parts.items():
        subset = {**{k: v for k, v in data.items() if k not in ("images", "annotations")},
                  "images": [{**im, "file_name": str(root / im["file_name"])} for im in chosen],
                  "annotations": [a for a in data["annotations"] if a["image_id"] in ids[split]]}
        paths[split] = out / f"{split}.json"
        with atomic_path(paths[split]) as tmp:
            tmp.write_text(json.dumps(subset))
    return paths


def quick_pools(root: Path, device: torch.device) -> tuple[Path, dict[str, Path]]:
    """Tiny paper-like pools (1 pre-training, 3 labelled images of 128×128) and a 2-step MAE on the
    pre-training crops (64-px model, patch 8), for ``--quick``."""
    write_mif_pools(root / "pools", 1, 3, shape=(128, 128), seed=SEED, crop_size=64, realism="paper")
    cfg = load_config(resolve_config("dama_tiny"), PretrainConfig, [
        "objective=mae", "model.img_size=64", "model.patch_size=8", "data.source=images", "data.axes=CYX",
        f"data.root={root / 'pools' / 'pretrain' / 'cells'}", "data.normalize=dtype", "train.steps=2",
        "train.batch_size=2", "train.warmup_steps=1", "train.figure_every=0", "train.ckpt_every=0",
        f"train.device={device.type}"])
    return root / "pools", {"MAE (quick)": run_pretrain(cfg, root / "pretrain_quick").checkpoint}


def finetune_overrides(shape: dict[str, Any], args: argparse.Namespace, train_json: Path, steps: int,
                       device: torch.device) -> list[str]:
    """``maskrcnn_tiny`` overrides every arm shares (module docstring, step 3)."""
    model = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in shape.items()]
    strides = ",".join(map(str, pyramid_strides(int(shape["patch_size"]))))
    return model + [
        f"detector.strides=[{strides}]", "data.source=coco", f"data.annotations={train_json}",
        f"data.crop_size={shape['img_size']}", f"data.normalize={args.normalize}",
        f"data.percentiles=[{args.percentiles[0]},{args.percentiles[1]}]", f"layer_decay={args.layer_decay}",
        f"train.steps={steps}", f"train.batch_size={2 if args.quick else args.batch_size}",
        f"train.warmup_steps={max(1, min(20, steps // 10))}", f"train.log_every={max(1, steps // 10)}",
        "train.figure_every=0", f"train.ckpt_every={0 if args.quick else 100}", f"train.device={device.type}"]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "arm"


def summarise(results: dict[str, dict[int, dict[str, float]]]) -> tuple[list[list[Any]], list[dict[str, Any]]]:
    """Table rows (arm, then mean ± std of each metric, then the gains) and the gain records of each
    pre-trained arm over random init (paired by seed)."""
    rows, gains = [], []
    random = results[RANDOM]
    for arm, by_seed in results.items():
        row: list[Any] = [arm, len(by_seed)]
        for _, name, key in METRICS:
            values = [m[f"{name}_{key}"] for m in by_seed.values()]
            row.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}")
        for name in ("box_mAP", "mask_mAP"):
            if arm == RANDOM:
                row.append("")
                continue
            diffs = [by_seed[s][name] - random[s][name] for s in by_seed if s in random]
            gain = {"arm": arm, "figure": f"gain_{name}", "value": float(np.mean(diffs)),
                    "above": sum(d > 0 for d in diffs), "pairs": len(diffs), "per_seed": diffs}
            gains.append(gain)
            row.append(f"{gain['value']:+.3f} ({gain['above']}/{gain['pairs']})")
        rows.append(row)
    return rows, gains


HEADERS = (["encoder", "seeds"] + [f"{name} {key if key == 'mAP' else key[1:]}" for _, name, key in METRICS]
           + ["box mAP gain (seeds above)", "mask mAP gain (seeds above)"])


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    checkpoints = parse_checkpoints(args.checkpoint)
    if args.pools is None and not args.quick:
        raise input_error("--pools", "the folder write_mif_pools wrote (with labelled/annotations.json)",
                          "nothing", "Pass --pools DIR (mif_comparison.py --keep-runs DIR writes DIR/pools)")
    if args.keep_runs is not None and args.keep_runs.exists() and (
            not args.keep_runs.is_dir() or any(args.keep_runs.iterdir())):
        raise input_error("--keep-runs", "a new or empty folder", f"'{args.keep_runs}' (not empty)",
                          "Choose another folder, or remove that one")
    steps = 2 if args.quick else args.steps
    seeds = args.seeds[:1] if args.quick else args.seeds
    test_images = 1 if args.quick else args.test_images
    rep = Reporter(BENCH, args.out, device, args.quick)
    results: dict[str, dict[int, dict[str, float]]] = {}
    with contextlib.ExitStack() as stack:
        root = args.keep_runs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{BENCH}_")))
        root.mkdir(parents=True, exist_ok=True)
        pools = args.pools
        if args.quick and pools is None:
            pools, quick_ckpts = quick_pools(root / "quick", device)
            checkpoints = {**quick_ckpts, **checkpoints}
        annotations = pools / "labelled" / "annotations.json"
        if not annotations.is_file():
            raise input_error("--pools", "a folder with labelled/annotations.json (write_mif_pools)",
                              f"no '{annotations}'", "Pass the pools folder (e.g. /work/runs/mifcmp/pools)")
        shape = encoder_shape(checkpoints, args.model_size, args.patch_size)
        for name, path in checkpoints.items():  # says a warning when the checkpoint stored another scaling
            input_normalization(path, args.normalize, args.percentiles, who=f"--checkpoint {name}")
        splits = write_splits(annotations, test_images, args.label_fraction, root / "splits")
        for split, path in splits.items():
            files = [im["file_name"] for im in json.loads(path.read_text())["images"]]
            rep.emit("split_images", len(files), "images", None, split=split, files=files, coco=str(path),
                     label_fraction=args.label_fraction)
        base = finetune_overrides(shape, args, splits["train"], steps, device)
        log(f"encoder {shape}; train {splits['train']}, test {splits['test']}; "
            f"{1 + len(checkpoints)} arms × {len(seeds)} seeds × {steps} steps")
        arms = {RANDOM: "random", **{name: str(path) for name, path in checkpoints.items()}}
        for seed in seeds:
            for arm, init in arms.items():
                tag = f"{slug(arm)}_seed{seed}"
                cfg = load_maskrcnn_config(resolve_config("maskrcnn_tiny"),
                                           base + [f"init={init}", f"train.seed={seed}"])
                log(f"fine-tuning maskrcnn_tiny ({arm}, seed {seed}) for {steps} steps")
                torch.manual_seed(seed)
                result, wall, cpu = timed(partial(run_maskrcnn_finetune, cfg, root / "runs" / tag))
                rep.emit("cpu_s", cpu, "s", None, stage="finetune", arm=arm, seed=seed, steps=steps, wall_s=wall)
                rep.emit("cpu_s_per_step", cpu / steps, "s", None, arm=arm, seed=seed, steps=steps,
                         note="includes the run's set-up")
                metrics, wall, cpu = timed(partial(run_evaluate_instances, splits["test"], root / "eval" / tag,
                                                   checkpoint=result.checkpoint, device=device.type))
                rep.emit("cpu_s", cpu, "s", None, stage="evaluate", arm=arm, seed=seed, wall_s=wall)
                figures = {f"{name}_{key}": float(metrics[iou][key]) for iou, name, key in METRICS}
                results.setdefault(arm, {})[seed] = figures
                for figure, value in figures.items():
                    rep.emit(figure, value, "AP", None, arm=arm, seed=seed, steps=steps,
                             label_fraction=args.label_fraction, layer_decay=args.layer_decay,
                             normalize=args.normalize)
                log(f"{arm}, seed {seed}: box mAP {figures['box_mAP']:.3f}, mask mAP {figures['mask_mAP']:.3f}")
    rows, gains = summarise(results)
    for arm, by_seed in results.items():
        for figure in by_seed[seeds[0]]:
            values = [m[figure] for m in by_seed.values()]
            rep.emit(f"{figure}_mean", float(np.mean(values)), "AP", None, arm=arm, std=float(np.std(values)),
                     seeds=list(by_seed), per_seed=values)
    for gain in gains:
        rep.emit(gain.pop("figure"), gain.pop("value"), "AP", None, **gain)
    rep.close()
    table = markdown_table(rows, HEADERS)
    with atomic_path(args.out / f"{BENCH}.md", overwrite=True) as tmp:
        tmp.write_text(table + "\n")
    print(table, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except MicromaeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""Segmentation quality: MAESTER (exact cover-and-stride embeddings + k-means) next to classical baselines.

Per-class Dice on held-out and training synthetic EM-like volumes, and nucleus Dice on the real ``nuclei``
sample, all scored with :func:`micromae.evaluate.metrics.evaluate_segmentation`:

- **MAESTER**: a checkpoint (``--checkpoint``) or one pre-trained here with a preset (``--preset``, ``--set``
  overrides) on the synthetic volume of ``--train-seed``; ``micromae segment``'s pipeline in exact mode,
  k-means with k = ``--ks`` (the first is the main one); clusters mapped to classes by Hungarian matching
  (leftovers merged) and by majority vote.
- **intensity k-means**: scikit-learn ``KMeans`` on raw voxel grey values, with the same k's as MAESTER.
- **Otsu**: scikit-image ``threshold_otsu`` (2 classes) and ``threshold_multiotsu`` (3, 4, 5 classes),
  mapped by Hungarian matching.
- **nuclei** (``--nuclei``): the preset pre-trained on ``sample:nuclei`` (percentile normalisation, the
  sample is uint16 with a narrow range), k = 2..4, nucleus Dice of the best mapping; next to Otsu.
  Reference: instance ids > 0 = nucleus.

With ``--cell-mask`` the synthetic volumes are fitted and scored inside the cell mask only, with "outside" left
out of the mean (the betaSeg convention, as ``micromae demo`` reports); by default every voxel counts.

Each line on stdout is a JSON object (one method, one mapping, one data set) with the per-class Dice and the
CPU seconds (process CPU time over all threads) and wall seconds of the part that produced it; the same lines
go to ``<out>/segmentation_quality.jsonl`` and a Markdown table to ``<out>/segmentation_quality.md``.

    python benchmarks/segmentation_quality.py --preset maester_tiny --seeds 1 0 [--nuclei]
    python benchmarks/segmentation_quality.py --checkpoint runs/demo/pretrain/checkpoints/last.pt --seeds 1
    python benchmarks/segmentation_quality.py --quick          # smoke test: tiny volume, 20 steps
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import clock as timed_clock
from micromae.config import resolve_config
from micromae.config import PretrainConfig, load_config
from micromae.data.synthetic_em import CLASS_NAMES, make_em_volume, write_em_volume
from micromae.evaluate.metrics import evaluate_segmentation
from micromae.segment.pipeline import run_segment
from micromae.segment.volume import SegmentSettings

OUT_DIR = Path(__file__).resolve().parent / "out"
NUCLEI_CLASSES = ["background", "nucleus"]


def log(msg: str) -> None:
    print(f"[segmentation_quality] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ scoring
def score_rows(pred: np.ndarray, ref: np.ndarray, names: list[str], base: dict[str, Any],
               mappings: tuple[str, ...] = ("hungarian", "majority"), mask: np.ndarray | None = None,
               ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """pred (Z, Y, X) cluster ids, ref (Z, Y, X) class ids → one row per mapping with per-class Dice.

    mask: (Z, Y, X) bool, count only these voxels (the cell mask); ignore: classes left out of the mean."""
    result = evaluate_segmentation(pred, ref, mask=mask, class_names=names, ignore_classes=ignore)
    rows = []
    for mapping in mappings:
        scores = result[mapping]["scores"]
        dice = {n: round(scores["per_class"][n]["dice"] or 0.0, 4) for n in names if n not in ignore}
        rows.append({**base, "mapping": mapping, "mean_dice": round(scores["mean_dice"], 4), "dice": dice,
                     "ari": round(result["clusters"]["ari"], 4)})
    return rows


# ------------------------------------------------------------------------------------------------ baselines
def intensity_kmeans(image: np.ndarray, k: int = 6, n_fit: int = 100_000, seed: int = 0,
                     fit_values: np.ndarray | None = None) -> np.ndarray:
    """image (Z, Y, X) → cluster ids (Z, Y, X): KMeans on grey values fitted on ``n_fit`` random voxels
    (of ``fit_values``, e.g. the voxels inside a mask, when given)."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(seed)
    flat = image.reshape(-1, 1).astype(np.float32)
    pool = flat if fit_values is None else np.asarray(fit_values, np.float32).reshape(-1, 1)
    fit = pool[rng.choice(len(pool), min(n_fit, len(pool)), replace=False)]
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(fit)
    return km.predict(flat).reshape(image.shape).astype(np.uint8)


def otsu_classes(image: np.ndarray, classes: int, fit_values: np.ndarray | None = None) -> np.ndarray:
    """image → (Z, Y, X) class ids from Otsu (2 classes) or multi-Otsu (3+) thresholds (computed on
    ``fit_values`` when given)."""
    from skimage.filters import threshold_multiotsu, threshold_otsu

    values = image if fit_values is None else fit_values
    thresholds = [threshold_otsu(values)] if classes == 2 else threshold_multiotsu(values, classes=classes)
    return np.digitize(image, np.asarray(thresholds)).astype(np.uint8)


def baseline_rows(image: np.ndarray, ref: np.ndarray, names: list[str], base: dict[str, Any],
                  otsu: tuple[int, ...] = (2, 3, 4, 5), kmeans_k: tuple[int, ...] = (6,),
                  mask: np.ndarray | None = None, ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Intensity k-means (both mappings) and Otsu / multi-Otsu (Hungarian) rows; fitted inside ``mask``."""
    rows = []
    inside = image if mask is None else image[mask]
    for k in kmeans_k:
        with timed_clock(digits=1) as clock:
            pred = intensity_kmeans(image, k, fit_values=inside)
        rows += score_rows(pred, ref, names, {**base, "method": f"intensity k-means (k={k})", **clock},
                           mask=mask, ignore=ignore)
    for classes in otsu:
        with timed_clock(digits=1) as clock:
            pred = otsu_classes(image, classes, fit_values=inside)
        label = "Otsu (2 classes)" if classes == 2 else f"multi-Otsu ({classes} classes)"
        rows += score_rows(pred, ref, names, {**base, "method": label, **clock}, mappings=("hungarian",),
                           mask=mask, ignore=ignore)
    return rows


# ------------------------------------------------------------------------------------------------ MAESTER
def random_init_rows(checkpoint: Path, image: np.ndarray, ref: np.ndarray, names: list[str], base: dict[str, Any],
                     ks: list[int], work: Path, n_samples: int, n_random: int, mask: np.ndarray | None = None,
                     ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The control: the same pipeline (``micromae segment``, exact, the same k's and samples) with ``n_random``
    random-init encoders of the checkpoint's shape; per seed and per k one row per mapping, then one
    aggregated row per k and mapping (mean Dice per class, ``mean_dice`` the mean over seeds, its
    ``mean_dice_std`` / ``mean_dice_min`` / ``mean_dice_max``)."""
    from micromae.evaluate.pretraining import write_random_init_checkpoint

    per_seed: list[dict[str, Any]] = []
    for i in range(n_random):
        seed = 1000 + i
        ckpt = write_random_init_checkpoint(checkpoint, seed, work / f"random_init_{seed}.pt")
        labels, clock = maester_labels(ckpt, image, ks, work, n_samples, mask=mask)
        for j, k in enumerate(ks):
            timing = clock if j == 0 else {"cpu_s": 0.0, "wall_s": 0.0, "note": "same encoder pass as the first k"}
            per_seed += score_rows(labels[k], ref, names, {**base, "method": f"random-init encoder seed {seed} "
                                                           f"(k={k})", "control_seed": seed, "k": k, **timing},
                                   mask=mask, ignore=ignore)
    rows = list(per_seed)
    for k in ks:
        for mapping in ("hungarian", "majority"):
            part = [r for r in per_seed if r["k"] == k and r["mapping"] == mapping]
            means = np.array([r["mean_dice"] for r in part])
            dice = {n: round(float(np.mean([r["dice"][n] for r in part])), 4) for n in part[0]["dice"]}
            rows.append({**base, "method": f"random-init encoder, mean of {n_random} (k={k})", "mapping": mapping,
                         "mean_dice": round(float(means.mean()), 4), "dice": dice,
                         "mean_dice_std": round(float(means.std(ddof=1)) if len(means) > 1 else 0.0, 4),
                         "mean_dice_min": round(float(means.min()), 4), "mean_dice_max": round(float(means.max()), 4),
                         "cpu_s": round(sum(r["cpu_s"] for r in part), 1),
                         "wall_s": round(sum(r["wall_s"] for r in part), 1)})
    return rows



def pretrain(preset: str, overrides: list[str], run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Pre-train ``preset`` with ``overrides`` in ``run_dir`` (resumed if there); returns (checkpoint, timing)."""
    from micromae.train.pretrain import run_pretrain

    cfg = load_config(resolve_config(preset), PretrainConfig, overrides)
    log(f"pre-training {preset} {' '.join(overrides)} in {run_dir}")
    with timed_clock(digits=1) as clock:
        result = run_pretrain(cfg, run_dir, resume="auto")
    return Path(result.checkpoint), {**clock, "steps": result.step, "final_loss": round(result.last_loss, 5)}


def maester_labels(checkpoint: Path, image: np.ndarray, ks: list[int], work: Path, n_samples: int,
                   seed: int = 0, mask: np.ndarray | None = None) -> tuple[dict[int, np.ndarray], dict[str, float]]:
    """Exact-mode ``micromae segment`` of ``image`` → {k: cluster ids (Z, Y, X)} and its timing.

    mask: k-means is fitted on pixels inside it only (as ``micromae segment --mask``)."""
    out = work / f"seg_{time.monotonic_ns()}.zarr"
    with timed_clock(digits=1) as clock:
        run_segment(checkpoint, image, out, k=ks[0], sweep=ks[1:], settings=SegmentSettings(mode="exact"),
                    n_samples=n_samples, seed=seed, device="cpu", overwrite=True, save_sample=False,
                    mask_path=None if mask is None else mask.astype(np.uint8))
    import zarr

    group = zarr.open_group(store=str(out), mode="r")
    labels = {ks[0]: np.asarray(group["labels"][:])}
    labels.update({k: np.asarray(group[f"labels_k{k}"][:]) for k in ks[1:]})
    return labels, clock


def synthetic_rows(checkpoint: Path, seed: int, shape: tuple[int, int, int], args: argparse.Namespace,
                   work: Path, role: str) -> list[dict[str, Any]]:
    """All methods on the synthetic volume of ``seed`` (every ``z_step``-th slice)."""
    vol = make_em_volume(shape, seed=seed)
    image, ref = vol.image[:: args.z_step], vol.labels[:: args.z_step]
    mask = vol.cell_mask[:: args.z_step] if args.cell_mask else None
    ignore = ("outside",) if args.cell_mask else ()
    where = ", inside the cell mask" if args.cell_mask else ""
    base = {"bench": "segmentation_quality", "data": f"synthetic seed {seed} ({role}{where})",
            "shape": list(image.shape)}
    names = list(CLASS_NAMES)
    labels, clock = maester_labels(checkpoint, image, args.ks, work, args.samples, mask=mask)
    rows = []
    for i, k in enumerate(args.ks):
        timing = clock if i == 0 else {"cpu_s": 0.0, "wall_s": 0.0, "note": "same encoder pass as the first k"}
        rows += score_rows(labels[k], ref, names, {**base, "method": f"MAESTER (k={k})", **timing}, mask=mask,
                           ignore=ignore)
    rows += random_init_rows(checkpoint, image, ref, names, base, args.ks, work, args.samples, args.random, mask,
                             ignore)
    return rows + baseline_rows(image, ref, names, base, kmeans_k=tuple(args.ks), mask=mask, ignore=ignore)


def nuclei_rows(args: argparse.Namespace, work: Path, train_overrides: list[str]) -> list[dict[str, Any]]:
    """MAESTER pre-trained on the real nuclei sample (k = 2..4, best mapping) next to Otsu."""
    from micromae.data.samples import load_sample

    sample = load_sample("nuclei")
    image = sample.image[:: args.z_step]
    ref = (sample.labels[:: args.z_step] > 0).astype(np.uint8)
    base = {"bench": "segmentation_quality", "data": "nuclei sample", "shape": list(image.shape)}
    rows: list[dict[str, Any]] = []
    ckpt = args.nuclei_checkpoint
    if ckpt is None:
        overrides = [o for o in train_overrides if not o.startswith("data.")]
        overrides += ["data.source=sample:nuclei", "data.normalize=percentile"]
        ckpt, clock = pretrain(args.preset, overrides, work / "pretrain_nuclei")
        rows.append({**base, "method": f"MAESTER pre-training ({args.preset})", **clock})
    labels, clock = maester_labels(Path(ckpt), image, [4, 2, 3], work, args.samples)
    for k in (2, 3, 4):
        timing = clock if k == 4 else {"cpu_s": 0.0, "wall_s": 0.0, "note": "same encoder pass as k=4"}
        rows += score_rows(labels[k], ref, NUCLEI_CLASSES, {**base, "method": f"MAESTER (k={k})", **timing})
    rows += random_init_rows(Path(ckpt), image, ref, NUCLEI_CLASSES, base, [4, 2, 3], work, args.samples,
                             args.random)
    return rows + baseline_rows(image, ref, NUCLEI_CLASSES, base, otsu=(2,), kmeans_k=())


# ------------------------------------------------------------------------------------------------ supervised
def supervised_rows(checkpoint: Path | None, train_seed: int, shape: tuple[int, ...], args: argparse.Namespace,
                    work: Path, extra: list[str]) -> list[dict[str, Any]]:
    """Segmenter and ViT-decoder baselines (``--supervised`` presets) trained on the partial labels of the
    training volume (the presets keep every other Z slice), from random init and from the MAESTER
    ``checkpoint``; scored on every ``--seeds`` volume with their own class ids (no mapping)."""
    from micromae.evaluate.metrics import segmentation_scores
    from micromae.segment.sliding_window import predict_volume
    from micromae.train.seg_finetune import load_seg_finetune_config, load_seg_model, run_seg_finetune

    inits = [("random", "random")] + ([("MAESTER", str(checkpoint))] if checkpoint else [])
    volumes = {seed: make_em_volume(shape, seed=seed) for seed in args.seeds}
    rows = []
    for preset in args.supervised:
        for tag, init in inits:
            overrides = [f"init={init}", f"data.synthetic_shape=[{','.join(map(str, shape))}]",
                         f"data.synthetic_seed={train_seed}", "data.source=synthetic"]
            overrides += [o for o in extra if o.startswith("train.") or o.startswith("data.planes")]
            cfg = load_seg_finetune_config(resolve_config(preset), overrides)
            log(f"supervised {preset} from {tag}: {cfg.train.steps} steps on partial labels of seed {train_seed}")
            with timed_clock(digits=1) as clock:
                result = run_seg_finetune(cfg, work / f"{preset}_{tag}")
            model = load_seg_model(result.checkpoint)
            for seed, vol in volumes.items():
                image, ref = vol.image[:: args.z_step], vol.labels[:: args.z_step]
                mask = vol.cell_mask[:: args.z_step] if args.cell_mask else None
                ignore = ("outside",) if args.cell_mask else ()
                with timed_clock(digits=1) as predict_clock:
                    pred = predict_volume(model, image, batch_size=64)
                scores = segmentation_scores(pred=pred, ref=ref, mask=mask, class_names=list(CLASS_NAMES),
                                             ignore_classes=ignore)
                role = "training, half the slices labelled" if seed == train_seed else "held out"
                where = ", inside the cell mask" if args.cell_mask else ""
                dice = {n: round(scores["per_class"][n]["dice"] or 0.0, 4) for n in CLASS_NAMES if n not in ignore}
                rows.append({"bench": "segmentation_quality", "data": f"synthetic seed {seed} ({role}{where})",
                             "shape": list(image.shape), "method": f"{preset} (supervised, init {tag}, "
                             f"{result.step} steps)", "mapping": "none (own classes)",
                             "mean_dice": round(scores["mean_dice"], 4), "dice": dice,
                             "ari": round(scores["ari"], 4), "cpu_s": round(clock["cpu_s"], 1),
                             "wall_s": round(clock["wall_s"], 1), "predict_cpu_s": round(predict_clock["cpu_s"], 1),
                             "note": "CPU/wall seconds = training"})
    return rows


# ------------------------------------------------------------------------------------------------ output
def markdown(rows: list[dict[str, Any]]) -> str:
    """One table per data set: method, mapping, per-class Dice, mean Dice, CPU and wall seconds."""
    lines = ["# Segmentation quality (per-class Dice)", ""]
    for data in dict.fromkeys(r["data"] for r in rows):
        part = [r for r in rows if r["data"] == data]
        train = [r for r in part if "dice" not in r]
        scored = [r for r in part if "dice" in r and "control_seed" not in r]  # per-seed controls: jsonl only
        lines += [f"## {data}, shape {part[0]['shape']}", ""]
        for r in train:
            lines.append(f"{r['method']}: {r['steps']} steps, final loss {r['final_loss']}, "
                         f"{r['cpu_s']} CPU s, {r['wall_s']} wall s.")
        if not scored:
            lines.append("")
            continue
        names = list(scored[0]["dice"])
        lines += ["", "| method | mapping | " + " | ".join(names) + " | mean | CPU s | wall s |",
                  "|---|---|" + "---|" * (len(names) + 3)]
        for r in scored:
            dice = " | ".join(f"{r['dice'][n]:.3f}" for n in names)
            mean = f"{r['mean_dice']:.3f}" + (f" ± {r['mean_dice_std']:.3f} [{r['mean_dice_min']:.3f}, "
                                              f"{r['mean_dice_max']:.3f}]" if "mean_dice_std" in r else "")
            lines.append(f"| {r['method']} | {r['mapping']} | {dice} | {mean} | {r['cpu_s']} | {r['wall_s']} |")
        lines.append("")
    return "\n".join(lines)


def emit(row: dict[str, Any], sink: list[dict[str, Any]]) -> None:
    sink.append(row)
    print(json.dumps(row), flush=True)


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("segmentation_quality.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
                       ("segmentation_quality.md", markdown(rows))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)
    log(f"wrote {out / 'segmentation_quality.md'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a pre-training checkpoint (else one is trained with --preset)")
    p.add_argument("--preset", default="maester_tiny", help="preset to pre-train (default maester_tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for pre-training (repeatable)")
    p.add_argument("--train-seed", type=int, default=None, help="seed of the training volume (default: preset's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 0], help="synthetic volumes to evaluate")
    p.add_argument("--ks", type=int, nargs="+", default=[6, 8], help="k-means k for MAESTER (first = main)")
    p.add_argument("--samples", type=int, default=50_000, help="pixel embeddings k-means is fitted on")
    p.add_argument("--z-step", type=int, default=1, help="evaluate every N-th slice only (default: all)")
    p.add_argument("--cell-mask", action="store_true",
                   help="synthetic data: fit and score inside the cell mask only, 'outside' left out of the mean")
    p.add_argument("--supervised", nargs="*", default=["segmenter_tiny", "vitdec_tiny"], metavar="PRESET",
                   help="supervised baselines to train on partial labels (default segmenter_tiny vitdec_tiny; "
                        "none: --supervised with no names)")
    p.add_argument("--random", type=int, default=3,
                   help="random-init encoders of the same shape run through the same pipeline (default 3)")
    p.add_argument("--nuclei", action="store_true", help="also pre-train and evaluate on the nuclei sample")
    p.add_argument("--nuclei-checkpoint", type=Path, help="a checkpoint pre-trained on sample:nuclei")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny volume, 20 steps (numbers mean nothing)")
    p.add_argument("--work", type=Path, help="folder for runs and Zarr outputs (default: a temporary one)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder for the outputs (default {OUT_DIR})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if not torch.cuda.is_available() else
                          torch.get_num_threads())
    cfg = load_config(resolve_config(args.preset), PretrainConfig, args.overrides)
    shape = tuple(cfg.data.synthetic_shape)
    train_seed = cfg.data.synthetic_seed if args.train_seed is None else args.train_seed
    extra = []
    if args.quick:
        shape, args.samples, args.z_step, args.random = (8, 64, 64), 2000, 1, 2
        extra = ["train.steps=20", "train.log_every=10", "train.ckpt_every=20", "train.figure_every=20",
                 "data.planes=[YX]"]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            data = work / f"train_volume_seed{train_seed}"
            if not (data / "image.tif").is_file():
                write_em_volume(data, make_em_volume(shape, seed=train_seed))
            overrides = args.overrides + extra + ["data.source=files", f"data.paths=[{data / 'image.tif'}]",
                                                  "data.axes=ZYX"]
            checkpoint, clock = pretrain(args.preset, overrides, work / f"pretrain_seed{train_seed}")
            emit({"bench": "segmentation_quality", "data": f"synthetic seed {train_seed} (training)",
                  "shape": list(shape), "method": f"MAESTER pre-training ({args.preset})",
                  "overrides": args.overrides, **clock}, rows)
        for seed in args.seeds:
            role = "training" if (args.checkpoint is None and seed == train_seed) else "held out"
            for row in synthetic_rows(checkpoint, seed, shape, args, work, role):
                emit(row, rows)
        for row in supervised_rows(checkpoint, train_seed, shape, args, work, extra):
            emit(row, rows)
        if args.nuclei or args.nuclei_checkpoint:
            if args.quick:
                args.z_step = 20
            for row in nuclei_rows(args, work, args.overrides + extra):
                emit(row, rows)
    write_outputs(rows, args.out)
    return rows


if __name__ == "__main__":
    main()

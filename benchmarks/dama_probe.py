"""DAMA vs MAE vs data2vec: a short CPU pre-training of each, then a linear probe on cell type.

1. Pre-training: the ``dama_tiny`` preset (32×32×7, patches 4, 64 wide, 4 blocks, batch 8, 300 steps, seed 0,
   16 synthetic multiplex images of 256×256) run by the trainer (``run_pretrain``) once per method, changing
   only the objective: DAMA (``student1-student2``), DAMA-ema, MAE and data2vec (mask ratio 0.8 and K = 2 of
   the preset for all). Each run's CPU time (this process, all threads) and wall time are reported.
2. Probe data: fresh synthetic images (seed 1000, never seen in pre-training), one square crop centred on every
   cell (``extract_cell_crops``), scaled to [0, 1] as in training (``--normalize dtype``: uint16 / 65535;
   ``percentile``: each whole image per channel, ``--percentiles`` to [0, 1], before cutting), resized to the
   model's 32×32 (``--crop-level``: each cut crop scaled on its own instead, as a loader of crop files
   does). Two crop sides: 16 pixels (resized ×2: the scale pre-training saw, whose augmentation cuts
   0.5 × 32 = 16-pixel crops and resizes them to 32) and 32 pixels (the native scale, more context).
3. Features: the frozen encoder (branch 1 for DAMA) on all patches, the patch tokens after the final norm,
   averaged (global average pool); plus two references: the random-init encoder (built as the runs build
   theirs, seed 0) and the raw per-channel mean intensity of the crop (7 numbers).
4. Linear probe: standardised features, ``sklearn`` ``LogisticRegression``, 60/40 stratified splits over
   ``--seeds`` seeds (the same splits for every feature set); mean ± std accuracy over the splits.

Figures (JSON lines, also ``<out>/dama_probe.jsonl``): ``pretrain_cpu_s`` per method, ``probe_accuracy``
per feature set and crop side, and with ``--token-variance`` ``token_var_across_crops`` per encoder (variance
of each patch token across the held-out crops, averaged over tokens and channels); ``<out>/dama_probe.md``
holds the table. With ``--normalize`` other than dtype the files are named ``dama_probe_<mode>[_crop].*``.

    python benchmarks/dama_probe.py [--quick] [--device auto|cpu|cuda] [--out DIR] [--steps N] [--seeds N]
        [--normalize dtype|percentile] [--percentiles LOW HIGH] [--crop-level] [--methods DAMA,MAE]
        [--token-variance]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common import OUT_DIR, Reporter, log, own_cpu_seconds, resolve_device
from micromae.config import resolve_config
from micromae.config import PretrainConfig, load_config
from micromae.data.channel_norm import normalize_channels
from micromae.data.synthetic_mif import CELL_TYPES, extract_cell_crops, make_mif_image
from micromae.io.writers import atomic_path
from micromae.models import ViTEncoder
from micromae.models.pretrained import load_encoder
from micromae.train.pretrain import build_model, run_pretrain

METHODS = {
    "DAMA": ["objective=dama", "dama.config=student1-student2"],
    "DAMA-ema": ["objective=dama", "dama.config=ema"],
    "MAE": ["objective=mae"],
    "data2vec": ["objective=data2vec"],
}
QUICK = ["data.synthetic_shape=[64,64]", "data.n_images=4", "train.batch_size=4", "train.log_every=1"]
HELD_OUT_SEED = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 steps, few cells (for tests; figures mean nothing)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                        help="where to pre-train (default: cpu, as the figures in BENCHMARKS.md)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"folder for the results (default: {OUT_DIR})")
    parser.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the preset's 300)")
    parser.add_argument("--seeds", type=int, default=None, help="probe splits (default: 5; --quick: 2)")
    parser.add_argument("--held-out-images", type=int, default=None,
                        help="fresh 256x256 images cut into cell crops (default: 30; --quick: 2)")
    parser.add_argument("--normalize", default="dtype", choices=("dtype", "percentile", "minmax"),
                        help="intensity scaling in pre-training and of the probe images (default dtype)")
    parser.add_argument("--percentiles", type=float, nargs=2, default=[0.5, 99.8], help="for --normalize percentile")
    parser.add_argument("--token-variance", action="store_true",
                        help="also emit token_var_across_crops per encoder and crop side")
    parser.add_argument("--crop-level", action="store_true",
                        help="scale each probe crop on its own (not the whole image before cutting)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"pre-training methods (default {','.join(METHODS)})")
    parser.add_argument("--keep-runs", type=Path, default=None, help="keep the run folders here (default: temp)")
    return parser.parse_args(argv)


def method_config(method: str, args: argparse.Namespace, device: torch.device) -> PretrainConfig:
    """``dama_tiny`` with the method's objective; no figures, one checkpoint at the end."""
    overrides = METHODS[method] + ["train.figure_every=0", "train.ckpt_every=0", f"train.device={device.type}",
                                   f"data.normalize={args.normalize}",
                                   f"data.percentiles=[{args.percentiles[0]},{args.percentiles[1]}]"]
    if args.quick:
        overrides += QUICK + ["train.steps=2"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    return load_config(resolve_config("dama_tiny"), overrides=overrides)


def pretrain(rep: Reporter, method: str, cfg: PretrainConfig, run_dir: Path) -> Path:
    """Run the trainer for ``method``; emit its CPU time; return the final checkpoint."""
    log(f"pre-training {method}: {cfg.train.steps} steps of batch {cfg.train.batch_size} into {run_dir}")
    cpu, wall = own_cpu_seconds(), time.perf_counter()
    result = run_pretrain(cfg, run_dir)
    cpu, wall = own_cpu_seconds() - cpu, time.perf_counter() - wall
    rep.emit("pretrain_cpu_s", cpu, "CPU seconds", None, method=method, objective=cfg.objective,
             dama_config=cfg.dama.config if cfg.objective == "dama" else None, steps=result.step,
             batch=cfg.train.batch_size, wall_s=wall, last_loss=result.last_loss)
    return result.checkpoint


def held_out_crops(n_images: int, shape: tuple[int, int], sides: list[int], img_size: int,
                   n_cells: int | None, normalize: str = "dtype", percentiles: tuple[float, float] = (0.5, 99.8),
                   crop_level: bool = False) -> tuple[dict[int, torch.Tensor], np.ndarray]:
    """Crops of every cell of ``n_images`` fresh images: ``{side: (N, C, img_size, img_size) float32}`` in
    [0, 1] (each whole image scaled by ``normalize`` before cutting; ``crop_level``: each crop after), and the
    labels ``(N,)`` (indexes of ``CELL_TYPES``)."""
    crops: dict[int, list[torch.Tensor]] = {s: [] for s in sides}
    labels = []
    for i in range(n_images):
        mif = make_mif_image(shape, seed=[HELD_OUT_SEED, i], n_cells=n_cells)
        if not crop_level:
            mif.image = normalize_channels(mif.image, normalize, percentiles)
        for side in sides:
            cut, lab, _ = extract_cell_crops(mif, side)
            if crop_level:
                cut = np.stack([normalize_channels(c, normalize, percentiles) for c in cut])
            x = torch.from_numpy(cut)
            if side != img_size:
                x = TF.resize(x, [img_size, img_size], interpolation=TF.InterpolationMode.BILINEAR,
                              antialias=side > img_size)
            crops[side].append(x)
        labels.append(lab)
    return {s: torch.cat(c) for s, c in crops.items()}, np.concatenate(labels)


@torch.inference_mode()
def pooled_features(encoder: ViTEncoder, imgs: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Global average pool of the patch tokens after the final norm: ``(N, C, H, W)`` -> ``(N, D)``."""
    encoder.eval()
    out = [encoder(imgs[i:i + batch])[:, 1:].mean(dim=1) for i in range(0, len(imgs), batch)]
    return torch.cat(out).float().numpy()


@torch.inference_mode()
def token_variance(encoder: ViTEncoder, imgs: torch.Tensor, n: int = 256) -> float:
    """Variance of each patch token (after the final norm) across the first ``n`` crops, averaged over tokens
    and channels: how much the encoder's output depends on the image."""
    return float(encoder.eval()(imgs[:n])[:, 1:].var(0).mean())


def linear_probe(features: np.ndarray, labels: np.ndarray, seeds: int) -> list[float]:
    """Test accuracy of a standardised logistic regression on 60/40 stratified splits (seeds 0..seeds-1)."""
    accuracies = []
    for seed in range(seeds):
        x_tr, x_te, y_tr, y_te = train_test_split(features, labels, test_size=0.4, stratify=labels,
                                                  random_state=seed)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        accuracies.append(float(clf.fit(x_tr, y_tr).score(x_te, y_te)))
    return accuracies


def markdown_table(rows: list[dict], sides: list[int], img_size: int, cpu: dict[str, dict]) -> str:
    """One row per feature set: accuracy per crop side (mean ± std), pre-training CPU and wall seconds."""
    crops = " | ".join(f"crop {s} px → {img_size} (acc.)" for s in sides)
    head = f"| features | {crops} | pre-training CPU s (wall s) |"
    lines = [head, "|" + "---|" * (len(sides) + 2)]
    for name in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for side in sides:
            r = next(r for r in rows if r["method"] == name and r["crop"] == side)
            cells.append(f"{r['value']:.3f} ± {r['std']:.3f}")
        run = cpu.get(name)
        time_cell = f"{run['value']:.0f} ({run['wall_s']:.0f})" if run else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {time_cell} |")
    return "\n".join(lines) + "\n"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling renamed onto it (never half-written)."""
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


def pretrained_encoders(rep: Reporter, cfgs: dict[str, PretrainConfig], keep: Path | None) -> dict[str, ViTEncoder]:
    """Pre-train every method (run folders under ``keep``, else a temporary folder); return the encoders
    (branch 1) of their final checkpoints and the random-init encoder the runs start from."""
    with contextlib.ExitStack() as stack:
        root = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dama_probe_")))
        checkpoints = {m: pretrain(rep, m, cfg, root / m) for m, cfg in cfgs.items()}
        encoders = {m: load_encoder(ckpt, branch=1)[0].eval() for m, ckpt in checkpoints.items()}
    base = next(iter(cfgs.values()))
    torch.manual_seed(base.train.seed)
    encoders["random init"] = build_model(base).encoder
    return encoders


def probe_all(rep: Reporter, encoders: dict[str, ViTEncoder], crops: dict[int, torch.Tensor], labels: np.ndarray,
              seeds: int, token_var: bool = False) -> list[dict]:
    """Emit ``probe_accuracy`` for every encoder and the raw channel means, per crop side (and
    ``token_var_across_crops`` per encoder with ``token_var``); return the lines."""
    counts = {CELL_TYPES[k]: int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    log(f"probe: {len(labels)} cells {counts}, crop sides {list(crops)}, {seeds} splits")
    rows = []
    for side, imgs in crops.items():
        sets = {m: pooled_features(e, imgs) for m, e in encoders.items()}
        for m, e in encoders.items() if token_var else ():
            rep.emit("token_var_across_crops", token_variance(e, imgs), "1", None, method=m, crop=side)
        sets["raw channel means"] = imgs.mean(dim=(2, 3)).numpy()
        for name, feats in sets.items():
            acc = linear_probe(feats, labels, seeds)
            rows.append(rep.emit("probe_accuracy", float(np.mean(acc)), "fraction correct", None, method=name,
                                 crop=side, std=float(np.std(acc)), accuracies=acc, n_cells=len(labels),
                                 class_counts=counts, feature_dim=int(feats.shape[1]), splits=seeds,
                                 chance=max(counts.values()) / len(labels)))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    suffix = ("" if args.normalize == "dtype" else f"_{args.normalize}") + ("_crop" if args.crop_level else "")
    rep = Reporter(f"dama_probe{suffix}", args.out, device, args.quick)
    cfgs = {m: method_config(m, args, device) for m in args.methods.split(",")}
    encoders = pretrained_encoders(rep, cfgs, args.keep_runs)
    base = next(iter(cfgs.values()))
    img_size = base.model.img_size
    sides = [round(base.data.crop_scale * img_size), img_size]
    shape = (128, 128) if args.quick else tuple(base.data.synthetic_shape[-2:])
    n_images = args.held_out_images or (2 if args.quick else 30)
    crops, labels = held_out_crops(n_images, shape, sides, img_size, n_cells=12 if args.quick else None,
                                   normalize=args.normalize, percentiles=tuple(args.percentiles),
                                   crop_level=args.crop_level)
    rows = probe_all(rep, encoders, crops, labels, args.seeds or (2 if args.quick else 5), args.token_variance)
    cpu = {line["method"]: line for line in rep.lines if line["figure"] == "pretrain_cpu_s"}
    table = markdown_table(rows, sides, img_size, cpu)
    log("\n" + table)
    rep.close()
    write_text_atomic(args.out / f"dama_probe{suffix}.md", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The DAMA paper's comparison (Table 1, Fig. 4) on the paper-like synthetic multiplex benchmark: random init vs
MAE vs DAMA vs DAMA-rand vs data2vec vs SimMIM vs MoCo-v3, each pre-trained for the same CPU budget, evaluated
by k-NN, linear probe and fine-tuning at several shares of the labelled training part over repeated 60/40 splits.

1. Pools (``write_mif_pools``, the data of ``mif_calibration.py``: ``realism=paper``, seed ``SEED``, 64-px
   crops centred on each cell): ``--pretrain-images`` images whose crops are the pre-training pool and
   ``--labelled-images`` other images whose crops are the labelled pool (about 4000 crops each at the
   defaults, like the paper's 4000 + 4000). No image is in both.
2. Pre-training: each method's tiny preset (``dama_tiny`` with the objective switched; ``simmim_tiny``,
   ``mocov3_tiny``) with the model at the crops' side (``--model-size`` 64, patches ``--patch-size`` 8: 64
   tokens) on the pre-training pool's crops (``data.source=images``; a random crop of ``--crop-scale`` of the
   side, resized; MoCo-v3 its two views). **Equal CPU budget**: a method's cost per step is measured (after a
   5-step warm-up run, the difference between runs of ``2 × --timing-steps`` and ``--timing-steps`` steps,
   which removes the set-up); its step count is ``--budget-min`` CPU minutes divided by that. The CPU seconds
   actually used are reported per method. ``--checkpoint-every-min M`` also keeps the weights after every M
   budgeted CPU minutes of the same run (one cosine schedule over the whole budget, so an early checkpoint
   has not had its learning rate decayed); they are evaluated as ``METHOD@<minutes>min``, the gain against
   pre-training minutes.
3. Protocol (``run_evaluate_classification`` on the labelled pool, the same splits for every encoder; fold i
   runs with seed i, so the random-init control is a new random network in every fold): k-NN (k = 20) and
   linear probe on frozen features on ``--folds`` splits at ``--fractions``; fine-tuning (``classify_tiny``
   recipe, ``--finetune-steps`` steps for every share, so every run costs the same) on the first
   ``--finetune-folds`` splits at ``--finetune-fractions``.
4. Output: JSON lines (``pretrain_cpu_s`` per method, ``accuracy`` per encoder, method and share, with mean ±
   std over folds), ``<out>/mif_comparison.md`` (table: rows encoders, columns method @ share, plus the
   channel-means baseline of the same splits), ``mif_comparison_finetune.png`` (fine-tuning accuracy against the
   labelled share, one line per encoder; also for ``--combine``), ``mif_comparison_rows.json`` (its rows) and the
   protocol's ``results.md`` / ``accuracy_vs_fraction.png`` under ``<out>/mif_comparison/{probes,finetune}/``.

Running in parts on a shared CPU: pre-train with ``--pretrain-only --keep-runs DIR --methods ...`` (two such
processes at once share DIR once the pools are written), evaluate with ``--keep-runs DIR --encoders ...`` and
an ``--out`` per part, then write one table with ``--combine OUT1,OUT2 --out OUT``.

Costs at the defaults, one thread: pools ~2 min; pre-training 6 × ``--budget-min`` CPU minutes; probes a few
minutes; fine-tuning ``encoders × folds × shares`` runs of ``--finetune-steps`` steps at ~0.095 CPU s per step.

    OMP_NUM_THREADS=1 python benchmarks/mif_comparison.py [--quick] [--budget-min 20] [--methods DAMA,MAE]
        [--folds 5] [--finetune-folds 5] [--fractions 0.1,0.2,0.5,1.0] [--finetune-fractions 0.1]
        [--finetune-steps 3000] [--keep-runs DIR] [--pretrain-only] [--encoders ...] [--combine OUT1,OUT2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import OUT_DIR, Reporter, log, own_cpu_seconds
from classification_protocol import table
from micromae.config import PretrainConfig, load_config, resolve_config
from micromae.data.synthetic_mif import write_mif_pools
from micromae.io.writers import atomic_path
from micromae.evaluate.classification import plot_data_efficiency, run_evaluate_classification, stratified_splits
from micromae.train.classify_data import load_labelled_crops
from micromae.train.pretrain import run_pretrain
from mif_calibration import SEED, channel_means_accuracy

METHODS = {  # name: (preset, overrides)
    "MAE": ("dama_tiny", ["objective=mae"]),
    "DAMA": ("dama_tiny", ["objective=dama", "dama.config=student1-student2", "dama.masking=adaptive"]),
    "DAMA-rand": ("dama_tiny", ["objective=dama", "dama.config=student1-student2", "dama.masking=random_overlap"]),
    "data2vec": ("dama_tiny", ["objective=data2vec"]),
    "SimMIM": ("simmim_tiny", []),
    "MoCo-v3": ("mocov3_tiny", []),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny everything (for tests; the figures mean nothing)")
    p.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only (the budget is in CPU minutes)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"results folder (default {OUT_DIR})")
    p.add_argument("--methods", default=",".join(METHODS), help=f"pre-training methods (default {','.join(METHODS)})")
    p.add_argument("--budget-min", type=float, default=20.0, help="CPU minutes of pre-training per method")
    p.add_argument("--checkpoint-every-min", type=float, default=None,
                   help="also keep a checkpoint every this many CPU minutes of pre-training; each joins the encoders "
                        "as METHOD@<minutes>min (the gain against pre-training minutes, within one schedule)")
    p.add_argument("--timing-steps", type=int, default=50,
                   help="steps timed (runs of N and 2N steps) to set each method's step count (default 50)")
    p.add_argument("--cpu-s-per-step", type=float, default=None,
                   help="skip the timing and use this CPU cost per step (one method per call): repeats an earlier "
                        "run's schedule exactly (its pretrain_cpu_s_per_step), whatever the load now")
    p.add_argument("--crop-size", type=int, default=64, help="side of the cell crops (default 64)")
    p.add_argument("--model-size", type=int, default=None, help="the ViT's input side (default: --crop-size)")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch side (default 8)")
    p.add_argument("--normalize", default="dtype", choices=("dtype", "channel_stats"),
                   help="intensity scaling for pre-training and evaluation (default dtype: / 65535; channel_stats: "
                        "one percentile range per channel for each folder)")
    p.add_argument("--crop-scale", type=float, default=0.5, help="pre-training random crop, share of the side")
    p.add_argument("--pretrain-images", type=int, default=13, help="images of the pre-training pool (default 13)")
    p.add_argument("--labelled-images", type=int, default=13, help="images of the labelled pool (default 13)")
    p.add_argument("--fractions", default="0.1,0.2,0.5,1.0", help="shares of the train part (default 10..100 %%)")
    p.add_argument("--folds", type=int, default=5, help="60/40 splits for the probes (default 5)")
    p.add_argument("--finetune-folds", type=int, default=5, help="splits fine-tuned (default 5)")
    p.add_argument("--finetune-steps", type=int, default=3000,
                   help="fine-tuning steps per run (default 3000, as the calibration of random init)")
    p.add_argument("--finetune-fractions", default=None,
                   help="shares fine-tuned (default: --fractions); the probes always run at --fractions")
    p.add_argument("--skip-finetune", action="store_true", help="probes only")
    p.add_argument("--skip-probes", action="store_true",
                   help="fine-tuning only (the k-NN and linear probes of these encoders are in an earlier part)")
    p.add_argument("--encoders", default=None,
                   help="evaluate only these (names of --methods and 'random init'; to evaluate in parallel parts)")
    p.add_argument("--combine", default=None, metavar="OUT1,OUT2",
                   help="only write the table of earlier parts' --out folders (their mif_comparison_rows.json) "
                        "into --out")
    p.add_argument("--pretrain-only", action="store_true",
                   help="write the pools and pre-train --methods into --keep-runs, then stop (to pre-train in parts)")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep pools and pre-training runs here (reused)")
    return p.parse_args(argv)


def model_overrides(args: argparse.Namespace) -> list[str]:
    size = args.model_size or args.crop_size
    return [f"model.img_size={size}", f"model.patch_size={args.patch_size}"]


def method_config(method: str, args: argparse.Namespace, pool: Path, steps: int,
                  ckpt_every: int = 0, extra: tuple[str, ...] = ()) -> PretrainConfig:
    """The method's tiny preset, on the pre-training pool's crops, for ``steps`` steps (a checkpoint every
    ``ckpt_every`` steps, all kept, when > 0), with ``extra`` overrides last."""
    preset, method_overrides = METHODS[method]
    overrides = method_overrides + model_overrides(args) + [
        "data.source=images", f"data.root={pool}", "data.axes=CYX", f"data.crop_scale={args.crop_scale}",
        f"data.normalize={args.normalize}", f"train.steps={steps}",
        f"train.warmup_steps={max(1, min(20, steps // 10))}",
        "train.figure_every=0", f"train.ckpt_every={ckpt_every}", f"train.keep_checkpoints={max(2, steps)}",
        "train.device=cpu", f"train.log_every={max(1, steps // 10)}"]
    if args.quick:
        overrides += ["train.batch_size=4"]
    overrides += list(extra)
    return load_config(resolve_config(preset), PretrainConfig, overrides)


def budget_steps(rep: Reporter, method: str, args: argparse.Namespace, pool: Path, root: Path) -> tuple[int, float]:
    """Steps that fill ``--budget-min`` CPU minutes, and the CPU seconds per step. A run costs set-up (reading
    the pool, building the model) plus steps, so the cost per step is the difference between a
    ``2 × --timing-steps`` and a ``--timing-steps`` run of the method, divided by ``--timing-steps``, after a
    5-step warm-up run."""
    if args.cpu_s_per_step is not None:
        steps = max(1, math.floor(args.budget_min * 60 / args.cpu_s_per_step + 1e-9))
        rep.emit("pretrain_cpu_s_per_step", args.cpu_s_per_step, "CPU seconds", None, method=method, steps=steps,
                 timing_steps=0, given=True, budget_min=args.budget_min)
        return steps, args.cpu_s_per_step
    if args.quick:
        return 2, args.budget_min * 60 / 2  # 2 steps fill the budget
    used = []  # a first short run takes the one-off costs (reading the pool into the page cache, lazy imports)
    run_pretrain(method_config(method, args, pool, 5), root / "timing" / f"{method}_warmup")
    for n in (args.timing_steps, 2 * args.timing_steps):
        cpu = own_cpu_seconds()
        run_pretrain(method_config(method, args, pool, n), root / "timing" / f"{method}_{n}")
        used.append(own_cpu_seconds() - cpu)
    per_step = max(used[1] - used[0], 1e-3) / args.timing_steps
    steps = max(1, math.floor(args.budget_min * 60 / per_step))
    rep.emit("pretrain_cpu_s_per_step", per_step, "CPU seconds", None, method=method, steps=steps,
             timing_steps=args.timing_steps, setup_cpu_s=used[0] - per_step * args.timing_steps,
             budget_min=args.budget_min)
    return steps, per_step


def pretrain_all(rep: Reporter, args: argparse.Namespace, pool: Path, root: Path) -> dict[str, str]:
    """``{name: checkpoint}`` of every method (reused from ``root`` when there), plus ``random init``. With
    ``--encoders``, a method none of whose encoders is asked for is not pre-trained here (another process may be
    pre-training it: its finished early checkpoints can be evaluated)."""
    checkpoints: dict[str, str] = {}
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}: choose among {', '.join(METHODS)}")
        run_dir = root / "pretrain" / method
        last = run_dir / "checkpoints" / "last.pt"
        marks = run_dir / "checkpoint_minutes.json"
        wanted = args.encoders is None or any(n.split("@")[0] == method for n in args.encoders.split(","))
        if not last.is_file() and wanted:
            steps, per_step = budget_steps(rep, method, args, pool, root)
            every = 0
            if args.checkpoint_every_min:
                every = max(1, math.floor(args.checkpoint_every_min * 60 / per_step))
                # the budgeted minutes of each kept step file before the last (written first, so the early
                # checkpoints can be evaluated while the run goes on)
                minutes = {f"{k * args.checkpoint_every_min:g}": f"step_{k * every:07d}.pt"
                           for k in range(1, math.ceil(args.budget_min / args.checkpoint_every_min - 1e-9))
                           if k * every < steps}
                run_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(marks, overwrite=True) as tmp:
                    tmp.write_text(json.dumps({"minutes": minutes, "final": f"step_{steps:07d}.pt"}, indent=2))
            log(f"pre-training {method}: {steps} steps" + (f", a checkpoint every {every}" if every else ""))
            cpu, wall = own_cpu_seconds(), time.perf_counter()
            result = run_pretrain(method_config(method, args, pool, steps, every), run_dir)
            rep.emit("pretrain_cpu_s", own_cpu_seconds() - cpu, "CPU seconds", None, method=method,
                     steps=result.step, wall_s=time.perf_counter() - wall, last_loss=result.last_loss,
                     budget_min=args.budget_min)
        if marks.is_file():
            saved = json.loads(marks.read_text())
            for minute, name in saved["minutes"].items():
                checkpoints[f"{method}@{minute}min"] = str(run_dir / "checkpoints" / name)
            # with kept checkpoints last.pt is written at every one of them: only the final step file says the
            # run finished its schedule
            last = run_dir / "checkpoints" / saved["final"]
        checkpoints[method] = str(last)
    checkpoints["random init"] = "random"
    if args.encoders:
        names = args.encoders.split(",")
        if unknown := [n for n in names if n not in checkpoints]:
            raise SystemExit(f"--encoders {unknown}: choose among {', '.join(checkpoints)}")
        checkpoints = {n: p for n, p in checkpoints.items() if n in names}
    if missing := [n for n, p in checkpoints.items() if p != "random" and not Path(p).is_file()]:
        raise SystemExit(f"encoders {missing}: no checkpoint yet (pre-training not finished or stopped?); "
                         "finish it, or pass --encoders with the checkpoints that exist")
    return checkpoints


def combine(args: argparse.Namespace) -> int:
    """The table of several parts (``--combine``): their rows (``mif_comparison_rows.json``), one channel-means
    row; a (encoder, method, share) evaluated in two parts is refused."""
    rows, baseline, seen = [], None, set()
    for part in args.combine.split(","):
        path = Path(part) / "mif_comparison_rows.json"
        if not path.is_file():
            raise SystemExit(f"--combine: no {path}; pass the --out folders of finished parts")
        saved = json.loads(path.read_text())
        for r in saved["rows"]:
            key = (r["encoder"], r["method"], r["fraction"])
            if key in seen:
                raise SystemExit(f"--combine: {key} is in two parts; evaluate each encoder in one part only")
            seen.add(key)
            rows.append(r)
        baseline = saved["baseline"]
    write_table(args.out, rows, baseline, keep_rows=False)
    return 0


def write_table(out: Path, rows: list[dict], baseline: dict, keep_rows: bool = True) -> None:
    """``out/mif_comparison.md`` (logged too), the fine-tuning rows as ``out/mif_comparison_finetune.png``
    (accuracy against the labelled share, Fig. 4 style) and, with ``keep_rows``, the rows for ``--combine``."""
    text = table(rows + [baseline])
    log("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "mif_comparison.md", overwrite=True) as tmp:
        tmp.write_text(text)
    if finetuned := [r for r in rows if r["method"] == "finetune"]:
        plot_data_efficiency(finetuned, out / "mif_comparison_finetune.png",
                             title="Fine-tuning accuracy vs labelled share (mean ± std over splits)")
    if keep_rows:
        with atomic_path(out / "mif_comparison_rows.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps({"rows": rows, "baseline": baseline}, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.combine:
        return combine(args)
    if args.pretrain_only and args.keep_runs is None:
        raise SystemExit("--pretrain-only keeps nothing without --keep-runs DIR: pass the folder to pre-train into")
    if args.skip_probes and args.skip_finetune:
        raise SystemExit("--skip-probes with --skip-finetune leaves nothing to evaluate: drop one of them "
                         "(or pass --pretrain-only to pre-train only)")
    if args.cpu_s_per_step is not None and (args.cpu_s_per_step <= 0 or len(args.methods.split(",")) != 1):
        raise SystemExit(f"--cpu-s-per-step {args.cpu_s_per_step} with --methods {args.methods}: it needs one method "
                         "and a cost > 0 (each method has its own cost per step; pass them in separate calls)")
    rep = Reporter("mif_comparison", args.out, torch.device("cpu"), args.quick)
    fractions = [float(f) for f in args.fractions.split(",")]
    folds = 2 if args.quick else args.folds
    with contextlib.ExitStack() as stack:
        root = args.keep_runs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mif_comparison_")))
        pools = root / "pools"
        if not (pools / "labelled" / "cells").is_dir():
            n_pre, n_lab = (1, 2) if args.quick else (args.pretrain_images, args.labelled_images)
            write_mif_pools(pools, n_pre, n_lab, shape=(128, 128) if args.quick else (512, 512), seed=SEED,
                            crop_size=args.crop_size, realism="paper")
        checkpoints = pretrain_all(rep, args, pools / "pretrain" / "cells", root)
        if args.pretrain_only:
            rep.close()
            return 0
        cells = pools / "labelled" / "cells"
        results = (root / "results") if args.quick else args.out / "mif_comparison"
        common = dict(config="classify_tiny", device="cpu", fractions=fractions)
        size_overrides = model_overrides(args) + [f"data.normalize={args.normalize}"]
        cpu = own_cpu_seconds()
        rows = []
        if not args.skip_probes:
            probes = run_evaluate_classification(checkpoints, cells, results / "probes", methods=("knn", "linear"),
                                                 folds=folds, probe_epochs=100, overrides=size_overrides, **common)
            rows += probes["summary"]
            rep.emit("cpu_s", own_cpu_seconds() - cpu, "CPU seconds", None, phase="probes")
        if not args.skip_finetune:
            steps = 2 if args.quick else args.finetune_steps
            finetune = size_overrides + ["train.epochs=null", f"train.steps={steps}",
                                         f"train.warmup_steps={max(1, steps // 20)}", "train.batch_size=32"
                                         if not args.quick else "train.batch_size=4",
                                         f"train.log_every={max(1, steps // 10)}"]
            cpu = own_cpu_seconds()
            ft_fractions = [float(f) for f in (args.finetune_fractions or args.fractions).split(",")]
            ft = run_evaluate_classification(checkpoints, cells, results / "finetune", methods=("finetune",),
                                             folds=1 if args.quick else args.finetune_folds, overrides=finetune,
                                             **{**common, "fractions": ft_fractions})
            rows += ft["summary"]
            rep.emit("cpu_s", own_cpu_seconds() - cpu, "CPU seconds", None, phase="finetune")
        crops = load_labelled_crops(cells, args.model_size or args.crop_size, normalize="dtype")
        labels = crops.labels.numpy()
        splits = stratified_splits(labels, folds, 0.4, seed=0)  # the protocol's splits (same files, same seed)
        acc = channel_means_accuracy(crops.images.mean(dim=(2, 3)).numpy(), labels, splits)
        baseline = {"encoder": "channel means", "method": "linear", "fraction": 1.0,
                    "accuracy_mean": float(np.mean(acc)), "accuracy_std": float(np.std(acc)),
                    "n_train": len(splits[0][0])}
        rep.emit("channel_means_accuracy", baseline["accuracy_mean"], "fraction correct", None,
                 std=baseline["accuracy_std"], per_fold=acc)
    for r in rows:
        rep.emit("accuracy", r["accuracy_mean"], "fraction correct", None, encoder=r["encoder"], method=r["method"],
                 fraction=r["fraction"], std=r["accuracy_std"], per_fold=r["accuracy_per_fold"], folds=r["folds"],
                 n_train=r["n_train"], n_test=r["n_test"])
    rep.close()
    write_table(args.out, rows, baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

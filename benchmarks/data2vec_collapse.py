"""Why data2vec's regression target loses its spread on the multiplex benchmark: short data2vec pre-trainings
that change one thing each (target normalisation, top-K averaging, the teacher's EMA momentum, the input
scaling, the position embedding's weight), with the target's spread logged over training and a linear probe of
the result.

Set-up: the pools and the data2vec settings of ``mif_comparison.py`` (``dama_tiny`` with
``objective=data2vec``, 64-px crops, 8-px patches, ``--crop-scale``), ``--steps`` steps per variant (one
cosine schedule each, the EMA momentum cosine-scheduled from ``dama.ema_momentum`` to 1).

Figures per variant (JSON lines, ``<out>/data2vec_collapse.md`` and ``data2vec_collapse.png``):

- ``target_std_tokens`` / ``target_std_images`` (``models.data2vec.target_spread``): the target's standard
  deviation across the tokens of an image and across images at one position, at the first and the last logged
  step. With a per-token layer-normalised target (unit spread over features) values near 0 mean the target no
  longer depends on where or on what the token is; with ``instance`` normalisation every block's output has
  unit spread across tokens by construction (their average over ``K`` blocks somewhat less), so only the spread
  across images tells;
- ``image_share``: ``target_std_images / target_std_tokens`` at the last step, how much of the target's
  variation comes from the image rather than from the position;
- ``linear``: linear-probe accuracy (5 types, chance 0.20) of the pre-trained encoder at 100 % of the train
  part of the labelled pool, ``--folds`` 60/40 splits of the classification protocol, beside a random-init
  encoder of the same shape on the same splits.

The control ``momentum 1`` never moves the teacher (it stays the student's random initialisation), so its
spread is what a random network gives these inputs; a trained teacher whose spread falls below it has collapsed
toward a target that depends on less than a random one does.

    OMP_NUM_THREADS=1 python benchmarks/data2vec_collapse.py [--quick] [--keep-runs DIR] [--steps 3000]
        [--variants "layer norm (default),instance norm"] [--folds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from common import OUT_DIR, Reporter, log, own_cpu_seconds
import torch

from micromae.data.synthetic_mif import write_mif_pools
from micromae.evaluate.classification import run_evaluate_classification
from micromae.evaluate.report import markdown_table
from micromae.figures import save_figure
from micromae.io.writers import atomic_path
from micromae.train.pretrain import run_pretrain
from mif_calibration import SEED
import mif_comparison

VARIANTS = {  # name: overrides of mif_comparison's data2vec configuration
    "layer norm (default)": [],
    "instance norm": ["dama.data2vec_target_norm=instance"],
    "K=1": ["dama.K=1"],
    "K=4": ["dama.K=4"],
    "momentum 1 (teacher frozen)": ["dama.ema_momentum=1.0"],
    "momentum 0.98": ["dama.ema_momentum=0.98"],
    "channel_stats scaling": ["data.normalize=channel_stats"],
    "position weight 0.1": ["model.pos_embed_weight=0.1"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny everything (for tests; the figures mean nothing)")
    p.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only (short runs on the shared cores)")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"results folder (default {OUT_DIR})")
    p.add_argument("--steps", type=int, default=3000, help="pre-training steps per variant (default 3000)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS (default all)")
    p.add_argument("--folds", type=int, default=3, help="60/40 splits of the linear probe (default 3)")
    p.add_argument("--crop-scale", type=float, default=1.0, help="pre-training random crop, share of the side")
    p.add_argument("--keep-runs", type=Path, default=None,
                   help="pools and runs here (a mif_comparison --keep-runs folder reuses its pools)")
    return p.parse_args(argv)


def spread_records(run_dir: Path) -> list[dict]:
    """The logged steps of a data2vec run that carry the target's spread."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "target_std_tokens" in r]


def plot(curves: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for name, recs in curves.items():
        steps = [r["step"] for r in recs]
        for ax, key in zip(axes, ("target_std_tokens", "target_std_images")):
            ax.plot(steps, [r.get(key, float("nan")) for r in recs], label=name)
    for ax, title in zip(axes, ("across the tokens of an image", "across images at one position")):
        ax.set_yscale("log")
        ax.set_xlabel("pre-training step")
        ax.set_title(f"target spread {title}", fontsize=9)
    axes[0].set_ylabel("standard deviation")
    axes[1].legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--variants {unknown}: choose among {', '.join(VARIANTS)}")
    if args.steps < 2:
        raise SystemExit(f"--steps {args.steps}: at least 2 (the spread is compared between the first and last log)")
    rep = Reporter("data2vec_collapse", args.out, torch.device("cpu"), args.quick)
    cmp_args = mif_comparison.parse_args(["--crop-scale", str(args.crop_scale)] + (["--quick"] if args.quick else []))
    steps = 4 if args.quick else args.steps
    folds = 2 if args.quick else args.folds
    with contextlib.ExitStack() as stack:
        root = args.keep_runs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="data2vec_collapse_")))
        pools = root / "pools"
        if not (pools / "labelled" / "cells").is_dir():
            n_pre, n_lab = (1, 2) if args.quick else (cmp_args.pretrain_images, cmp_args.labelled_images)
            write_mif_pools(pools, n_pre, n_lab, shape=(128, 128) if args.quick else (512, 512), seed=SEED,
                            crop_size=cmp_args.crop_size, realism="paper")
        curves, rows, checkpoints = {}, [], {"random init": "random"}
        for name in names:  # a variant's run folder is named by its place in VARIANTS, so any subset reuses it
            run_dir = root / "data2vec_collapse" / f"v{list(VARIANTS).index(name)}_{steps}"
            extra = tuple(VARIANTS[name]) + (f"train.log_every={max(1, steps // 20)}",)
            cfg = mif_comparison.method_config("data2vec", cmp_args, pools / "pretrain" / "cells", steps, extra=extra)
            log(f"data2vec variant {name!r}: {steps} steps")
            cpu = own_cpu_seconds()
            if not (run_dir / "checkpoints" / "last.pt").is_file():
                shutil.rmtree(run_dir, ignore_errors=True)  # a stopped run's log would mix into the new one
                run_pretrain(cfg, run_dir)
            recs = spread_records(run_dir)
            curves[name] = recs
            first, last = recs[0], recs[-1]
            row = {"variant": name, "overrides": " ".join(VARIANTS[name]) or "–",
                   "tokens first": first["target_std_tokens"], "tokens last": last["target_std_tokens"],
                   "images first": first.get("target_std_images"), "images last": last.get("target_std_images"),
                   "loss last": last["loss_f"]}
            row["image share last"] = row["images last"] / max(row["tokens last"], 1e-12)
            rows.append(row)
            checkpoints[name] = str(run_dir / "checkpoints" / "last.pt")
            rep.emit("target_spread", row["images last"], "std", None, variant=name, steps=steps,
                     first_step=first["step"], last_step=last["step"], tokens_first=row["tokens first"],
                     tokens_last=row["tokens last"], images_first=row["images first"], loss_last=row["loss last"],
                     image_share=row["image share last"], cpu_s=own_cpu_seconds() - cpu)
        size = mif_comparison.model_overrides(cmp_args)
        probes = run_evaluate_classification(checkpoints, pools / "labelled" / "cells",
                                             args.out / "data2vec_collapse_probes", methods=("linear",), folds=folds,
                                             fractions=(1.0,),
                                             probe_epochs=100, overrides=size, config="classify_tiny", device="cpu")
        linear = {r["encoder"]: r for r in probes["summary"]}
        for row in rows:
            r = linear[row["variant"]]
            row["linear 100 %"] = f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}"
            rep.emit("linear_accuracy", r["accuracy_mean"], "fraction correct", None, variant=row["variant"],
                     std=r["accuracy_std"], per_fold=r["accuracy_per_fold"], folds=r["folds"])
        ref = linear["random init"]
        rep.emit("linear_accuracy", ref["accuracy_mean"], "fraction correct", None, variant="random init",
                 std=ref["accuracy_std"], per_fold=ref["accuracy_per_fold"], folds=ref["folds"])
        rows.append({"variant": "random init (no pre-training)", "overrides": "–",
                     "linear 100 %": f"{ref['accuracy_mean']:.3f} ± {ref['accuracy_std']:.3f}"})
    rep.close()
    cols = ["variant", "overrides", "tokens first", "tokens last", "images first", "images last",
            "image share last", "loss last", "linear 100 %"]
    text = markdown_table([{c: r.get(c, "–") for c in cols} for r in rows], cols)
    log("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "data2vec_collapse.md", overwrite=True) as tmp:
        tmp.write_text(text)
    plot(curves, args.out / "data2vec_collapse.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

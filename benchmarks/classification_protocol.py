"""Cell-type classification with the DAMA paper's protocol on synthetic multiplex crops, at a CPU budget:
random init vs encoders pre-trained with DAMA and with MAE.

1. Pre-training: the ``dama_tiny`` preset (32×32×7, patches 4, 64 wide, 4 blocks, batch 8, seed 0, 16 synthetic
   256×256 images) run by the trainer once with ``objective=dama`` (student1-student2) and once with
   ``objective=mae``, ``--pretrain-steps`` steps each (default 300, the preset's).
2. Labelled crops: ``--images`` fresh synthetic images (generator seed 1000, never seen in pre-training), one
   32×32 crop centred on every cell (``write_mif_dataset(..., crop_size=32)``: the native scale, at which the
   task is not trivial), classes = the 5 cell types.
3. Protocol (``micromae.evaluate.classification``): the same stratified 60/40 splits for every encoder;
   within each, a stratified nested share of the train part (``--fractions``).
   - frozen-feature probes (linear probe and k-NN, k = 20, weighted votes) on ``--probe-folds`` splits;
   - fine-tuning (``classify_tiny`` recipe with ``FINETUNE`` overrides: a fixed number of steps for every
     share, so every run costs the same) on the first ``--finetune-folds`` splits, shares
     ``--finetune-fractions``.
4. Output: one JSON line per (encoder, method, share) with mean ± std accuracy over folds (``accuracy``),
   the CPU seconds of each phase (``cpu_s``); ``<out>/classification_protocol.md`` (table) and
   ``<out>/classification_protocol/{probes,finetune}/`` (the protocol's own results.md / PNG per part).

5. Intensities: ``--normalize dtype`` (default, uint16 / 65535) or ``percentile`` (per image and channel,
   ``--percentiles`` to [0, 1]) in pre-training (whole images) and for the labelled crops (per crop file: the
   loader reads the crop files). Results of other modes than dtype go to ``*_<mode>`` names.
   ``--crop-normalize`` scales the crops otherwise than the pre-training images. ``--skip-finetune`` runs
   the probes only.

    OMP_NUM_THREADS=1 python benchmarks/classification_protocol.py [--quick] [--out DIR] [--pretrain-steps N]
        [--normalize dtype|percentile] [--percentiles LOW HIGH] [--crop-normalize MODE] [--skip-finetune]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from common import OUT_DIR, Reporter, log, own_cpu_seconds, resolve_device
from micromae.config import resolve_config
from micromae.config import PretrainConfig, load_config
from micromae.data.synthetic_mif import write_mif_dataset
from micromae.io.writers import atomic_path
from micromae.evaluate.classification import run_evaluate_classification
from micromae.evaluate.report import markdown_table
from micromae.train.pretrain import run_pretrain

PRETRAIN = {"DAMA": ["objective=dama", "dama.config=student1-student2"], "MAE": ["objective=mae"]}
FINETUNE = ["train.epochs=null", "train.steps=400", "train.warmup_steps=40", "train.log_every=100"]
QUICK_PRETRAIN = ["data.synthetic_shape=[64,64]", "data.n_images=4", "train.batch_size=4", "train.steps=2"]
HELD_OUT_SEED = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny everything (for tests; the figures mean nothing)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="default cpu")
    p.add_argument("--out", type=Path, default=OUT_DIR, help=f"results folder (default {OUT_DIR})")
    p.add_argument("--pretrain-steps", type=int, default=300, help="pre-training steps per method (default 300)")
    p.add_argument("--images", type=int, default=20, help="held-out 256×256 images cut into crops (default 20)")
    p.add_argument("--fractions", default="0.025,0.05,0.1,0.2,1.0", help="probe shares of the train part")
    p.add_argument("--finetune-fractions", default="0.05,0.1,1.0", help="fine-tuning shares of the train part")
    p.add_argument("--probe-folds", type=int, default=5, help="splits for the probes (default 5)")
    p.add_argument("--finetune-folds", type=int, default=3, help="splits for fine-tuning (default 3)")
    p.add_argument("--finetune-steps", type=int, default=None, help="override FINETUNE's steps")
    p.add_argument("--normalize", default="dtype", choices=("dtype", "percentile", "minmax"),
                   help="intensity scaling in pre-training and of the crops (default dtype)")
    p.add_argument("--percentiles", type=float, nargs=2, default=[0.5, 99.8], help="for --normalize percentile")
    p.add_argument("--crop-normalize", default=None, choices=("dtype", "percentile", "minmax"),
                   help="scaling of the labelled crops (default: --normalize)")
    p.add_argument("--skip-finetune", action="store_true", help="probes only")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep pre-training runs and crops here")
    return p.parse_args(argv)


def normalize_overrides(args: argparse.Namespace, crops: bool = False) -> list[str]:
    """``data.normalize`` / ``data.percentiles`` overrides (the same keys in dama_tiny and classify_tiny);
    ``crops``: for the labelled crops (``--crop-normalize`` if given)."""
    mode = (args.crop_normalize or args.normalize) if crops else args.normalize
    return [f"data.normalize={mode}", f"data.percentiles=[{args.percentiles[0]},{args.percentiles[1]}]"]


def pretrain(rep: Reporter, args: argparse.Namespace, root: Path, device: torch.device) -> dict[str, str]:
    """Pre-train each method with dama_tiny; return ``{name: checkpoint}`` plus ``random``."""
    checkpoints: dict[str, str] = {}
    for name, overrides in PRETRAIN.items():
        extra = QUICK_PRETRAIN if args.quick else [f"train.steps={args.pretrain_steps}"]
        cfg = load_config(resolve_config("dama_tiny"), PretrainConfig, overrides + extra + normalize_overrides(args)
                          + ["train.figure_every=0", "train.ckpt_every=0", f"train.device={device.type}"])
        run_dir = root / "pretrain" / name
        if (run_dir / "checkpoints" / "last.pt").is_file():  # kept from an earlier call (--keep-runs)
            checkpoints[name] = str(run_dir / "checkpoints" / "last.pt")
            continue
        cpu, wall = own_cpu_seconds(), time.perf_counter()
        result = run_pretrain(cfg, run_dir)
        rep.emit("cpu_s", own_cpu_seconds() - cpu, "CPU seconds", None, phase=f"pretrain {name}", steps=result.step,
                 wall_s=time.perf_counter() - wall, last_loss=result.last_loss)
        checkpoints[name] = str(result.checkpoint)
    checkpoints["random init"] = "random"
    return checkpoints


def run_part(rep: Reporter, name: str, checkpoints: dict[str, str], cells: Path, out: Path, **kwargs) -> list[dict]:
    """One protocol call; emit its CPU time and one ``accuracy`` line per summary row."""
    cpu, wall = own_cpu_seconds(), time.perf_counter()
    result = run_evaluate_classification(checkpoints, cells, out, **kwargs)
    rep.emit("cpu_s", own_cpu_seconds() - cpu, "CPU seconds", None, phase=name, wall_s=time.perf_counter() - wall)
    s = result["settings"]
    for r in result["summary"]:
        rep.emit("accuracy", r["accuracy_mean"], "fraction correct", None, encoder=r["encoder"], method=r["method"],
                 fraction=r["fraction"], std=r["accuracy_std"], per_fold=r["accuracy_per_fold"], folds=r["folds"],
                 n_train=r["n_train"], n_test=r["n_test"], chance=s["chance"], n_crops=s["n_crops"])
    return result["summary"]


def table(rows: list[dict]) -> str:
    """Rows = encoder; columns = method @ share (mean ± std over folds)."""
    order = ("knn", "linear", "finetune")
    cols = sorted({(r["method"], r["fraction"]) for r in rows}, key=lambda c: (order.index(c[0]), c[1]))
    out = []
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        line = {"encoder": enc}
        for m, f in cols:
            r = next((r for r in rows if (r["encoder"], r["method"], r["fraction"]) == (enc, m, f)), None)
            line[f"{m} {100 * f:g}% (n={r['n_train'] if r else '-'})"] = (
                f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}" if r else "–")
        out.append(line)
    return markdown_table(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    suffix = "" if args.normalize == "dtype" else f"_{args.normalize}"  # keeps the dtype results
    if args.crop_normalize not in (None, args.normalize):
        suffix += f"_crops_{args.crop_normalize}"
    rep = Reporter(f"classification_protocol{suffix}", args.out, device, args.quick)
    frac = [float(x) for x in args.fractions.split(",")]
    ft_frac = [float(x) for x in args.finetune_fractions.split(",")]
    finetune = FINETUNE + ([f"train.steps={args.finetune_steps}"] if args.finetune_steps else [])
    if args.quick:
        finetune += ["train.steps=2", "train.warmup_steps=1"]
    with contextlib.ExitStack() as stack:
        root = args.keep_runs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cls_protocol_")))
        checkpoints = pretrain(rep, args, root, device)
        data = root / "heldout"
        if not (data / "cells").is_dir():
            n = 2 if args.quick else args.images
            write_mif_dataset(data, n_images=n, shape=(256, 256), seed=HELD_OUT_SEED, crop_size=32)
        results = args.out / f"classification_protocol{suffix}"
        if args.quick:
            results = root / "results"
        common = dict(config="classify_tiny", device=device.type)
        rows = run_part(rep, "probes", checkpoints, data / "cells", results / "probes", methods=("knn", "linear"),
                        folds=2 if args.quick else args.probe_folds, fractions=frac, probe_epochs=100,
                        overrides=normalize_overrides(args, crops=True), **common)
        if not args.skip_finetune:
            rows += run_part(rep, "finetune", checkpoints, data / "cells", results / "finetune", methods=("finetune",),
                             folds=1 if args.quick else args.finetune_folds, fractions=ft_frac,
                             overrides=finetune + normalize_overrides(args, crops=True), **common)
    text = table(rows)
    log("\n" + text)
    rep.close()
    path = args.out / f"classification_protocol{suffix}.md"
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

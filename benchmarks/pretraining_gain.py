"""What MAESTER pre-training buys over random-init encoders, on a held-out synthetic EM volume.

For each checkpoint (given, or every ``step_*.pt`` / ``last.pt`` of the given run folders), run
:func:`micromae.evaluate.pretraining.evaluate_pretraining` on a synthetic volume of a seed no preset trains on
(default 7, 48 x 192 x 192, scored inside the cell mask: "outside" is the ignore value), against 3 random-init
encoders of the same shape and the hand-made multiscale features. The control rows depend only on the encoder's
shape and the data, so they are computed once per shape and cached (``--cache``).

One JSON line per checkpoint on stdout and in ``<out>/pretraining_gain.jsonl``: run, step, the run's wall-clock
seconds of training up to that step (from its ``log.jsonl``), the headline scores and the gains.
With ``--train PRESET [--set k=v ...] --name NAME`` a run is first pre-trained here (its wall and CPU time
recorded), then scored.

    python benchmarks/pretraining_gain.py --runs runs/demo/pretrain
    python benchmarks/pretraining_gain.py --train maester_tiny --name base --set train.steps=4800
    python benchmarks/pretraining_gain.py --quick      # smoke test: tiny volume, tiny model, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from micromae.config import PretrainConfig, apply_overrides, load_config, resolve_config
from micromae.data.synthetic_em import CLASS_NAMES, make_em_volume
from micromae.evaluate.pretraining import PretrainingEval, evaluate_pretraining
from micromae.models.pretrained import load_checkpoint, load_encoder
from micromae.train.pretrain import run_pretrain

OUT_DIR = Path(__file__).resolve().parent / "out"


def log(msg: str) -> None:
    print(f"[pretraining_gain] {msg}", file=sys.stderr, flush=True)


def checkpoints_of(run: Path) -> list[Path]:
    ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
    last = run / "checkpoints" / "last.pt"
    return ckpts + ([last] if last.is_file() else [])


def step_and_time(ckpt: Path) -> tuple[int | None, float | None]:
    """(optimiser step, the run's wall seconds up to it) from the checkpoint and the run's log.jsonl."""
    step = int(load_checkpoint(ckpt).get("step", -1))
    logf = ckpt.parent.parent / "log.jsonl"
    t = None
    if logf.is_file():
        for line in logf.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step") is not None and rec["step"] <= step and "time" in rec:
                t = rec["time"]
    return step, t


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per scored checkpoint: run, step, training minutes, the checkpoint's scores and its gains."""
    keys = list(rows[0]["gain"])
    head = ("| run | step | train min | " + " | ".join(f"{k} (gain)" for k in keys) + " |\n|---|---|---|"
            + "---|" * len(keys))
    lines, seen = [head], set()
    for r in rows:
        if (r["run"], r["step"]) in seen:  # last.pt of a finished run = its final step file
            continue
        seen.add((r["run"], r["step"]))
        t = r.get("train_wall_s_at_step")
        cells = " | ".join(f"{r['pretrained'][k]:.3f} ({r['gain'][k]:+.3f})" for k in keys)
        lines.append(f"| {r['run']} | {r['step']} | {t / 60:.1f} | {cells} |" if t is not None else
                     f"| {r['run']} | {r['step']} | - | {cells} |")
    ctrl = rows[0]
    lines.append("| random-init mean (sd) | 0 | 0 | " + " | ".join(
        f"{ctrl['random_mean'][k]:.3f} ({ctrl['random_std'][k]:.3f})" for k in keys) + " |")
    if ctrl.get("handmade"):
        lines.append("| hand-made features | - | - | " + " | ".join(f"{ctrl['handmade'][k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="run folders: score every checkpoint in them")
    ap.add_argument("--checkpoints", nargs="*", default=[], help="checkpoints to score")
    ap.add_argument("--train", help="pre-train this preset first (then score its checkpoints)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for --train")
    ap.add_argument("--name", help="run name for --train (folder under --out)")
    ap.add_argument("--seed", type=int, default=7, help="held-out volume seed (default 7)")
    ap.add_argument("--shape", type=int, nargs=3, default=[48, 192, 192])
    ap.add_argument("--ks", type=int, nargs="+", default=[6, 8, 10])
    ap.add_argument("--random", type=int, default=3, help="random-init encoders")
    ap.add_argument("--cache", type=Path, default=None, help="controls cache folder (default <out>/controls)")
    ap.add_argument("--out", type=Path, default=OUT_DIR / "pretraining_gain")
    ap.add_argument("--last-only", action="store_true", help="score only last.pt of each run")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny volume and model")
    ap.add_argument("--table", type=Path, help="print the Markdown table of this pretraining_gain.jsonl and exit")
    args = ap.parse_args(argv)
    if args.table:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        print(markdown(rows))
        return rows

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or out / "controls"
    cache.mkdir(parents=True, exist_ok=True)
    settings = PretrainingEval(ks=tuple(args.ks), n_random=args.random, ignore=0, class_names=list(CLASS_NAMES))
    shape = tuple(args.shape)
    runs = [Path(r) for r in args.runs]
    extra: dict[str, dict[str, Any]] = {}
    if args.quick:
        shape = (8, 40, 44)
        settings = PretrainingEval(ks=(3,), n_random=2, n_fit=2000, n_probe=1500, min_probe_pixels=50, ignore=0,
                                   class_names=list(CLASS_NAMES))
        args.train = args.train or "maester_tiny"
        args.name = args.name or "quick"
        args.set = ["model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=1",
                    "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
                    "data.synthetic_shape=[12,40,40]", "train.batch_size=8", "train.steps=3",
                    "train.figure_every=0", "train.ckpt_every=2", *args.set]
    if args.train:
        cfg = apply_overrides(load_config(resolve_config(args.train), PretrainConfig), args.set)
        run_dir = out / (args.name or cfg.name)
        load = os.getloadavg()
        t0, c0 = time.time(), cpu_seconds()
        run_pretrain(cfg, run_dir)
        extra[str(run_dir)] = {"train_wall_s": round(time.time() - t0, 1), "train_cpu_s": round(cpu_seconds() - c0, 1),
                               "load_before": [round(x, 2) for x in load], "overrides": args.set,
                               "preset": args.train}
        runs.append(run_dir)

    vol = make_em_volume(shape=shape, seed=args.seed)
    image = vol.image.astype(np.float32) / 255.0  # uint8: the presets' scaling (auto = dtype for 8-bit)
    reference = np.where(vol.cell_mask, vol.labels, 0).astype(np.int64)
    ckpts = [Path(c) for c in args.checkpoints]
    for run in runs:
        found = checkpoints_of(run)
        ckpts += found[-1:] if args.last_only else found
    rows = []
    for ckpt in ckpts:
        encoder, meta = load_encoder(ckpt)
        encoder.eval()
        key_file = cache / ("controls_" + "_".join(f"{k}{v}" for k, v in sorted(meta.fields.items())) + ".json")
        controls = json.loads(key_file.read_text()) if key_file.is_file() else None
        t0 = time.time()
        try:
            result = evaluate_pretraining(encoder, image, reference, settings, progress=False, controls=controls)
        except Exception as exc:  # another data/settings digest: recompute
            if controls is None or "controls" not in str(exc):
                raise
            result = evaluate_pretraining(encoder, image, reference, settings, progress=False)
        if controls is None or controls.get("controls_key") != result["controls_key"]:
            key_file.write_text(json.dumps({k: result[k] for k in ("controls_key", "random", "handmade")}))
        step, t = step_and_time(ckpt)
        run_key = str(ckpt.parent.parent)
        row = {"run": ckpt.parent.parent.name, "checkpoint": ckpt.name, "step": step, "train_wall_s_at_step": t,
               "eval_s": round(time.time() - t0, 1), **extra.get(run_key, {}),
               "pretrained": result["headline"]["pretrained"], "random_mean": result["headline"]["random_mean"],
               "random_std": {k: v["std"] for k, v in result["random_summary"].items()},
               "random_max": {k: v["max"] for k, v in result["random_summary"].items()},
               "handmade": result["headline"].get("handmade"), "gain": result["gain"],
               "volume": {"seed": args.seed, "shape": list(shape)}, "fields": meta.fields}
        print(json.dumps(row), flush=True)
        with open(out / "pretraining_gain.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        log(f"{row['run']}/{ckpt.name} step {step}: gain " + ", ".join(f"{k} {v:+.3f}" for k, v in row["gain"].items()))
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()

"""One prepared GPU check for MAESTER: pre-train the paper-shape model on a synthetic volume within a time
budget, then measure what it bought (``evaluate_pretraining`` against random-init encoders of its shape).

Steps: (1) a 30-step probe run measures steps/s; (2) a fresh run of ``maester_betaseg`` (the paper's
architecture, 80-px FOV, 5-px tokens, width 192, 14 blocks; bf16 autocast on CUDA) on the synthetic volume
(seed 0) with as many steps as fit in ``--train-minutes``; (3) ``evaluate_pretraining`` on a held-out
synthetic volume (seed 7), inside the cell mask, 3 random-init encoders, hand-made features. One JSON file:
``$OUT/gpu_maester.json`` (or ``--out``).

    python benchmarks/gpu_maester.py --out $OUT --train-minutes 5        # on a GPU machine, < 8 minutes
    python benchmarks/gpu_maester.py --quick --out /tmp/gpu              # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from micromae.config import PretrainConfig, load_config, resolve_config
from micromae.data.synthetic_em import CLASS_NAMES, make_em_volume, write_em_volume
from micromae.evaluate.pretraining import PretrainingEval, evaluate_pretraining
from micromae.models.pretrained import load_encoder
from micromae.train.pretrain import run_pretrain


def log(msg: str) -> None:
    print(f"[gpu_maester] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")))
    ap.add_argument("--train-minutes", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-4 * 8, help="default: the paper's 1.5e-4 scaled to batch 256")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 256, 256], help="training volume")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu",
                  "torch": torch.__version__, "quick": args.quick}
    model = [] if not args.quick else ["model.img_size=20", "model.patch_size=5", "model.embed_dim=16",
                                       "model.depth=1", "model.num_heads=2", "model.decoder_embed_dim=16",
                                       "model.decoder_depth=1", "model.decoder_num_heads=2"]
    shape = (12, 48, 48) if args.quick else tuple(args.shape)
    heldout_shape = (8, 40, 44) if args.quick else (48, 192, 192)
    batch = 8 if args.quick else args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = write_em_volume(work / "train", make_em_volume(shape=shape, seed=0))
        base = [*model, "data.source=files", f"data.paths=[{data['image']}]", "data.axes=ZYX", "data.num_workers=4",
                f"train.batch_size={batch}", f"train.lr={args.lr}", "train.figure_every=0", "train.log_every=10",
                f"train.device={dev}", "train.schedule=cosine", "train.warmup_steps=100", "train.min_lr=1e-6"]
        if args.quick:
            base.append("data.num_workers=0")
        probe_steps = 3 if args.quick else 30
        cfg = load_config(resolve_config("maester_betaseg"), PretrainConfig,
                          [*base, f"train.steps={probe_steps}", "train.warmup_steps=0", "train.ckpt_every=100000"])
        t0 = time.time()
        run_pretrain(cfg, work / "probe")
        probe_s = time.time() - t0
        rate = probe_steps / probe_s  # includes start-up: an underestimate
        steps = max(10, int(rate * args.train_minutes * 60)) if not args.quick else 6
        log(f"probe: {rate:.1f} steps/s (with start-up); training {steps} steps")
        cfg = load_config(resolve_config("maester_betaseg"), PretrainConfig,
                          [*base, f"train.steps={steps}", f"train.ckpt_every={steps}"])
        t0 = time.time()
        result = run_pretrain(cfg, work / "run")
        train_s = time.time() - t0
        if dev == "cuda":
            torch.cuda.synchronize()
        info.update({"steps": steps, "batch_size": batch, "train_s": round(train_s, 1),
                     "crops_per_s": round(steps * batch / train_s, 1), "final_loss": result.last_loss,
                     "crops_seen": steps * batch})
        encoder, _ = load_encoder(result.checkpoint)
        encoder = encoder.to(dev).eval()
        vol = make_em_volume(shape=heldout_shape, seed=7)
        image = vol.image.astype(np.float32) / 255.0
        reference = np.where(vol.cell_mask, vol.labels, 0).astype(np.int64)
        settings = PretrainingEval(ignore=0, class_names=list(CLASS_NAMES), batch_size=1024)
        if args.quick:
            settings = PretrainingEval(ks=(3,), n_random=2, n_fit=2000, n_probe=1500, min_probe_pixels=50,
                                       ignore=0, class_names=list(CLASS_NAMES))
        t0 = time.time()
        res = evaluate_pretraining(encoder, image, reference, settings, progress=True)
        info.update({"eval_s": round(time.time() - t0, 1), "heldout_shape": list(heldout_shape),
                     "pretrained": res["headline"]["pretrained"], "random_mean": res["headline"]["random_mean"],
                     "random_spread": {k: [v["min"], v["max"]] for k, v in res["random_summary"].items()},
                     "handmade": res["headline"].get("handmade"), "gain": res["gain"]})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_maester.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()

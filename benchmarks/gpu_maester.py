"""One prepared GPU check for micromae (at most 8 minutes on one GPU): the CUDA-only checks, the speed figures,
and MAESTER pre-training within a time budget with what it bought. One JSON file: ``$OUT/gpu_maester.json``.

1. checks (each ``{"ok": ..., ...}``): a bf16 pre-training step of the paper model (finite loss, bf16
   activations, weights moved); bit-exact resume on the device (tiny model, torch sampler, 3 + 3 steps vs 6);
   DDP with NCCL on one GPU (world size 1 in a child process: DDP gradients equal plain ones); CPU-vs-GPU
   segmentation agreement of the paper-shape encoder (overlapped tile reads, k-means on the CPU features;
   tolerance: >= 0.999 of pixels agree in fp32, >= 0.95 in bf16).
2. benchmarks: the matmul peak (bf16 8192^3 on CUDA), the encoder's bf16 forward throughput and MFU against
   timm's VisionTransformer of the same shape (same weights, interleaved), the paper-model training step's
   crops/s and MFU, crops/s of both samplers alone and of whole pre-training runs with each, exact
   cover-and-stride pixels/s of the paper model, and the projected time of the paper's 5.6 M-crop recipe.
3. pre-training and its evaluation: (a) a 30-step probe run measures steps/s; (b) a fresh run of
   ``maester_betaseg`` (80-px FOV, 5-px tokens, width 192, 14 blocks; bf16 on CUDA) on the synthetic volume
   (seed 0, generated in memory) for as many steps as fit in ``--train-minutes`` (cut to what the 8-minute
   budget leaves); (c) ``evaluate_pretraining`` on a held-out synthetic volume (seed 7), inside the cell mask,
   3 random-init encoders, hand-made features.

The GPU machine has no Zarr: every path here keeps volumes in memory, and where zarr is not installed a
placeholder module that raises on first use lets micromae import (``--no-zarr`` forces it, for the test).

    python benchmarks/gpu_maester.py --out $OUT                       # on a GPU machine, < 8 minutes
    python benchmarks/gpu_maester.py --quick --no-zarr --out /tmp/gpu # CPU smoke test (figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

RECIPE_CROPS = 5_600_000  # the paper's MAESTER recipe (supplement): 5.6 M crops of 80 x 80
BUDGET_S = 8 * 60


def zarr_guard(force: bool = False) -> bool:
    """Where zarr is not installed (or ``force``), register a placeholder ``zarr`` module whose every
    attribute raises ModuleNotFoundError, so that micromae imports; returns whether it was installed."""
    if not force:
        try:
            import zarr  # noqa: F401
            return False
        except ModuleNotFoundError:
            pass

    class Missing(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            raise ModuleNotFoundError(f"zarr is not installed here (zarr.{name} was used); gpu_maester.py keeps "
                                      "every volume in memory and must not reach Zarr code")

    sys.modules["zarr"] = Missing("zarr")
    return True


def log(msg: str) -> None:
    print(f"[gpu_maester] {msg}", file=sys.stderr, flush=True)



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stopwatch(fn, device: torch.device) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


TINY_MODEL = ["model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=1", "model.num_heads=2",
              "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2"]


# ----------------------------------------------------------------------------------------------- 1. checks
def check_bf16_step(device: torch.device, quick: bool) -> dict:
    """One AdamW step of the paper MAE under bf16 autocast: finite loss, bf16 activations, weights moved."""
    from micromae.models import mae_maester, mae_tiny_test

    torch.manual_seed(0)
    model = (mae_tiny_test() if quick else mae_maester()).to(device).train()
    size = model.encoder.img_size[0] if isinstance(model.encoder.img_size, (tuple, list)) else model.encoder.img_size
    imgs = torch.rand(8 if quick else 256, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        out = model(imgs)
    out.loss.backward()
    opt.step()
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    loss = float(out.loss.detach())
    return {"ok": bool(np.isfinite(loss) and out.pred.dtype == torch.bfloat16 and moved), "loss": loss,
            "pred_dtype": str(out.pred.dtype), "weights_moved": moved, "batch": imgs.shape[0]}


def check_resume(device: torch.device, work: Path) -> dict:
    """6 steps straight vs 3 + resume + 3 on the device (torch sampler, default amp): identical weights."""
    from micromae.config import PretrainConfig, apply_overrides
    from micromae.train.checkpoint import load_checkpoint
    from micromae.train.pretrain import run_pretrain

    cfg = apply_overrides(PretrainConfig(), [*TINY_MODEL, "data.synthetic_shape=[12,40,40]", "data.sampler=torch",
                                             "train.batch_size=16", "train.steps=6", "train.ckpt_every=100",
                                             "train.figure_every=0", f"train.device={device.type}",
                                             "train.schedule=cosine", "train.warmup_steps=2"])
    run_pretrain(cfg, work / "resume_straight")
    run_pretrain(cfg, work / "resume_split", stop_after=3)
    run_pretrain(cfg, work / "resume_split", resume="auto")
    a = load_checkpoint(work / "resume_straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(work / "resume_split" / "checkpoints" / "last.pt")["model"]
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"ok": diff == 0.0, "max_abs_weight_diff": diff, "amp": "bf16" if device.type == "cuda" else "off"}


def ddp_child(out: Path) -> None:
    """Child process: DDP (NCCL on CUDA, gloo on CPU) at world size 1; one bf16 step's gradients vs plain."""
    import torch.distributed as dist

    from micromae.models import mae_maester, mae_tiny_test

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = (mae_maester() if cuda else mae_tiny_test()).to(device)
        twin = (mae_maester() if cuda else mae_tiny_test()).to(device)
        twin.load_state_dict(plain.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(twin, device_ids=[0] if cuda else None)
        size = plain.encoder.img_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        imgs = torch.rand(32, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        grads = []
        for module in (plain, ddp):
            torch.manual_seed(1)  # same masks
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = module(imgs).loss
            loss.backward()
        for p, q in zip(plain.parameters(), twin.parameters()):
            grads.append(float((p.grad - q.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)))
        # tolerance: fused attention backward may accumulate in another order from one call to the next
        result = {"ok": max(grads) <= 1e-2, "backend": backend, "world_size": dist.get_world_size(),
                  "max_rel_grad_diff": max(grads), "tolerance": 1e-2}
    finally:
        dist.destroy_process_group()
    out.write_text(json.dumps(result))


def check_ddp(work: Path, no_zarr: bool) -> dict:
    out = work / "ddp.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-child", str(out)] + (["--no-zarr"] if no_zarr else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0 or not out.exists():
        return {"ok": False, "error": proc.stderr[-1500:]}
    return json.loads(out.read_text())


def check_segmentation(device: torch.device, quick: bool) -> dict:
    """Exact cover-and-stride labels of the paper-shape encoder: CPU (today's per-tile path) vs the device
    (overlapped tile reads, fp32 and bf16), k-means fitted on the CPU features."""
    from bench_cover_stride import paper_encoder
    from micromae.data.synthetic_em import make_em_volume
    from micromae.segment.cluster import fit_kmeans
    from micromae.segment.cover_stride import embed_pixels_region, embed_region
    from micromae.segment.prefetch import tile_reads
    from micromae.segment.volume import SegmentSettings

    shape = (8, 40, 40) if quick else (8, 96, 96)
    vol = make_em_volume(shape=shape, seed=3).image[:2]
    rng = (0.0, 255.0)
    cpu_enc = paper_encoder(quick, torch.device("cpu"))
    cpu = [embed_pixels_region(cpu_enc, vol[z], 0, 0, shape[1], shape[2], intensity_range=rng) for z in range(2)]
    flat = torch.cat([f.reshape(f.shape[0], -1).T for f in cpu])
    model = fit_kmeans(flat.numpy()[::7], 6, seed=0)
    want = np.stack([model.predict_map(f).numpy() for f in cpu])
    dev_enc = paper_encoder(quick, device)
    dev_enc.load_state_dict(cpu_enc.state_dict())
    result: dict[str, Any] = {"shape": [2, *shape[1:]], "k": 6, "tolerance": {"fp32": 0.999, "bf16": 0.95}}
    for amp in (False, True):
        settings = SegmentSettings()
        got = np.zeros_like(want)
        tiles = [(0, 0, shape[1], shape[2])]
        for (z, _), region in tile_reads(dev_enc, vol, 0, [0, 1], tiles, settings, rng):
            feats = embed_region(dev_enc, region, 0, amp=amp)
            got[z] = model.predict_map(feats.float()).cpu().numpy()
        result["bf16" if amp else "fp32"] = float((got == want).mean())
    result["ok"] = result["fp32"] >= 0.999 and result["bf16"] >= 0.95
    return result


# ----------------------------------------------------------------------------------------------- 2. benchmarks
def bench_encoder_vs_timm(device: torch.device, quick: bool, peak: float) -> dict:
    from bench_encoder import build_pair, time_interleaved
    from common import encoder_flops, median

    batch = 4 if quick else 1024
    ours, ref = build_pair(device)
    imgs = torch.rand(batch, 1, 80, 80, generator=torch.Generator().manual_seed(0)).to(device)
    t_ours, t_ref = time_interleaved(ours, ref, imgs, 1 if quick else 3, 2 if quick else 10)
    flops = encoder_flops(ours, batch)
    return {"batch": batch, "images_per_s": batch / median(t_ours), "timm_images_per_s": batch / median(t_ref),
            "mfu": flops / median(t_ours) / 1e9 / peak, "timm_mfu": flops / median(t_ref) / 1e9 / peak,
            "vs_timm": float(np.median([r / o for o, r in zip(t_ours, t_ref)])), "goal_vs_timm": 0.97}


def bench_train_step(device: torch.device, quick: bool, peak: float) -> dict:
    from bench_pretrain import time_steps
    from common import mae_flops, median

    batch = 4 if quick else 1024
    times, model = time_steps(batch, device, 1 if quick else 3, 2 if quick else 10)
    seconds = median(times)
    return {"batch": batch, "crops_per_s": batch / seconds, "mfu": 3 * mae_flops(model, batch) / seconds / 1e9 / peak,
            "goal_crops_per_s": 20_000}


def bench_samplers(device: torch.device, quick: bool, consumed: float) -> dict:
    """Crops/s of the numpy sampler (``sample_batch`` in this process) and of the torch sampler on the device."""
    from bench_sampler import QUICK_SHAPE, VOLUME_SHAPE, build_sampler
    from micromae.data.torch_sampler import TorchPlaneCropSampler

    batch, count = (32, 2) if quick else (1024, 10)
    numpy_sampler = build_sampler(QUICK_SHAPE if quick else VOLUME_SHAPE)
    volumes = numpy_sampler.volumes
    torch_sampler = TorchPlaneCropSampler(volumes, fov=80, planes=("YX", "ZX", "ZY"), pad=4, min_crop_frac=0.5,
                                          flip_p=0.5, seed=0, rank=0, device=device)
    rates = {}
    for name, sampler in (("numpy", numpy_sampler), ("torch", torch_sampler)):
        sampler.sample_batch(0, batch)
        _, seconds = stopwatch(lambda s=sampler: [s.sample_batch(i, batch) for i in range(1, count + 1)], device)
        rates[name] = batch * count / seconds
    return {"batch": batch, "numpy_crops_per_s": rates["numpy"], "torch_crops_per_s": rates["torch"],
            "torch_vs_numpy": rates["torch"] / rates["numpy"], "torch_vs_train_step": rates["torch"] / consumed,
            "goal_torch_vs_train_step": 10.0, "torch_storage": str(torch_sampler.storage)}


def bench_pretrain_runs(device: torch.device, quick: bool, work: Path) -> dict:
    """Whole pre-training runs of the paper model (engine, sampler, AdamW, logging) with each sampler: crops/s
    over the steps after the first logging window (start-up excluded)."""
    from micromae.config import PretrainConfig, load_config, resolve_config
    from micromae.train.log import read_log
    from micromae.train.pretrain import run_pretrain

    steps, batch, every = (4, 8, 2) if quick else (60, 1024, 20)
    out = {"batch": batch, "steps": steps}
    workers = 0 if quick else min(8, os.cpu_count() or 1)
    for sampler in ("numpy", "torch"):
        over = [*(TINY_MODEL if quick else []), "data.source=synthetic",
                f"data.synthetic_shape={[12, 48, 48] if quick else [96, 256, 256]}".replace(" ", ""),
                f"data.sampler={sampler}", f"data.num_workers={workers if sampler == 'numpy' else 0}",
                f"train.batch_size={batch}", f"train.steps={steps}", f"train.log_every={every}",
                "train.figure_every=0", f"train.ckpt_every={steps}", f"train.device={device.type}"]
        cfg = load_config(resolve_config("maester_betaseg"), PretrainConfig, over)
        run_pretrain(cfg, work / f"e2e_{sampler}")
        records = read_log(work / f"e2e_{sampler}")
        out[f"{sampler}_crops_per_s"] = float(np.median([r["crops_per_s"] for r in records[1:]]))
    out["projected_recipe_minutes"] = RECIPE_CROPS / out["torch_crops_per_s"] / 60
    out["goal_crops_per_s"] = 20_000
    return out


def bench_cover_stride_exact(device: torch.device, quick: bool, peak: float) -> dict:
    from bench_cover_stride import flop_per_pixel, paper_encoder
    from micromae.segment.cover_stride import auto_batch_size, embed_pixels

    enc = paper_encoder(quick, device)
    size = 20 if quick else 512
    image = torch.rand(size, size, generator=torch.Generator().manual_seed(1)).to(device)
    embed_pixels(enc, image[:min(size, 64), :min(size, 64)], batch_size=0)  # warm-up
    _, seconds = stopwatch(lambda: embed_pixels(enc, image, batch_size=0), device)
    pixels_per_s = size * size / seconds
    return {"image": size, "batch": auto_batch_size(enc, device), "pixels_per_s": pixels_per_s,
            "mfu": pixels_per_s * flop_per_pixel(enc, size, size) / 1e9 / peak, "goal_pixels_per_s": 1e6,
            "minutes_per_1e9_voxels": 1e9 / pixels_per_s / 60}


# ----------------------------------------------------------------------------------------------- 3. pre-train + eval
def pretrain_and_evaluate(args: argparse.Namespace, dev: str, work: Path, info: dict, deadline: float) -> None:
    from micromae.config import PretrainConfig, load_config, resolve_config
    from micromae.data.synthetic_em import CLASS_NAMES, make_em_volume
    from micromae.evaluate.pretraining import PretrainingEval, evaluate_pretraining
    from micromae.models.pretrained import load_encoder
    from micromae.train.pretrain import run_pretrain

    model = TINY_MODEL if args.quick else []
    shape = (12, 48, 48) if args.quick else tuple(args.shape)
    heldout_shape = (8, 40, 44) if args.quick else (48, 192, 192)
    batch = 8 if args.quick else args.batch_size
    base = [*model, "data.source=synthetic", f"data.synthetic_shape=[{','.join(map(str, shape))}]",
            "data.synthetic_seed=0", f"data.num_workers={0 if args.quick else 4}",
            f"train.batch_size={batch}", f"train.lr={args.lr}", "train.figure_every=0", "train.log_every=10",
            f"train.device={dev}", "train.schedule=cosine", "train.warmup_steps=100", "train.min_lr=1e-6"]
    probe_steps = 3 if args.quick else 30
    cfg = load_config(resolve_config("maester_betaseg"), PretrainConfig,
                      [*base, f"train.steps={probe_steps}", "train.warmup_steps=0", "train.ckpt_every=100000"])
    t0 = time.time()
    run_pretrain(cfg, work / "probe")
    rate = probe_steps / (time.time() - t0)  # includes start-up: an underestimate
    eval_reserve_s = 90.0
    minutes = min(args.train_minutes, max(0.25, (deadline - time.time() - eval_reserve_s) / 60))
    steps = max(10, int(rate * minutes * 60)) if not args.quick else 6
    log(f"probe: {rate:.1f} steps/s (with start-up); training {steps} steps ({minutes:.2f} min)")
    cfg = load_config(resolve_config("maester_betaseg"), PretrainConfig,
                      [*base, f"train.steps={steps}", f"train.ckpt_every={steps}"])
    t0 = time.time()
    result = run_pretrain(cfg, work / "run")
    if dev == "cuda":
        torch.cuda.synchronize()
    train_s = time.time() - t0
    info.update({"steps": steps, "batch_size": batch, "train_s": round(train_s, 1), "train_minutes": minutes,
                 "crops_per_s": round(steps * batch / train_s, 1), "final_loss": result.last_loss,
                 "crops_seen": steps * batch, "sampler": cfg.data.sampler})
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
    res = evaluate_pretraining(encoder, image, reference, settings, progress=not args.quick)
    info.update({"eval_s": round(time.time() - t0, 1), "heldout_shape": list(heldout_shape),
                 "pretrained": res["headline"]["pretrained"], "random_mean": res["headline"]["random_mean"],
                 "random_spread": {k: [v["min"], v["max"]] for k, v in res["random_summary"].items()},
                 "handmade": res["headline"].get("handmade"), "gain": res["gain"]})


def timed_section(name: str, fn, results: dict) -> Any:
    """Run ``fn``; record its result (or the error, so one failure does not lose the other figures)."""
    t0 = time.time()
    log(f"{name} ...")
    try:
        value = fn()
    except Exception as exc:  # a failed check is a result too
        value = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1500]}
    if isinstance(value, dict):
        value["seconds"] = round(time.time() - t0, 1)
    results[name] = value
    log(f"{name}: {json.dumps(value)[:300]}")
    return value


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")))
    ap.add_argument("--train-minutes", type=float, default=2.0, help="pre-training time (cut to fit 8 minutes)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1.5e-4 * 8, help="default: the paper's 1.5e-4 scaled to batch 256")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 256, 256], help="training volume")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-zarr", action="store_true", help="use the zarr placeholder even if zarr is installed")
    ap.add_argument("--skip", nargs="*", default=[], choices=("checks", "benchmarks", "pretrain"))
    ap.add_argument("--ddp-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    start = time.time()
    guarded = zarr_guard(force=args.no_zarr)
    if args.ddp_child:
        ddp_child(args.ddp_child)
        return {}
    from common import measure_peak

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    info: dict = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu",
                  "torch": torch.__version__, "quick": args.quick, "zarr_placeholder": guarded,
                  "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "checks" not in args.skip:
            checks: dict = {}
            timed_section("bf16_step", lambda: check_bf16_step(device, args.quick), checks)
            timed_section("resume_bit_exact", lambda: check_resume(device, work), checks)
            timed_section("ddp_one_gpu", lambda: check_ddp(work, guarded), checks)
            timed_section("segmentation_cpu_vs_device", lambda: check_segmentation(device, args.quick), checks)
            info["checks"] = checks
            info["checks_ok"] = all(c.get("ok") for c in checks.values())
        if "benchmarks" not in args.skip:
            peak = measure_peak(device, n=512 if args.quick else None, warmup=1 if args.quick else 3,
                                repeat=2 if args.quick else 10, warmup_s=0.1 if args.quick else 2.0)["gflops"]
            bench: dict = {"peak_gflops": peak}
            timed_section("encoder_vs_timm", lambda: bench_encoder_vs_timm(device, args.quick, peak), bench)
            step = timed_section("train_step", lambda: bench_train_step(device, args.quick, peak), bench)
            consumed = step.get("crops_per_s") or 1.0
            timed_section("samplers", lambda: bench_samplers(device, args.quick, consumed), bench)
            timed_section("pretrain_runs", lambda: bench_pretrain_runs(device, args.quick, work), bench)
            timed_section("cover_stride_exact", lambda: bench_cover_stride_exact(device, args.quick, peak), bench)
            info["benchmarks"] = bench
        if "pretrain" not in args.skip:
            pretrain_and_evaluate(args, dev, work, info, start + BUDGET_S)
    info["wall_s"] = round(time.time() - start, 1)
    info["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_maester.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()

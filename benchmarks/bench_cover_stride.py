"""Cover-and-stride pixel embedding (docs/METHODS.md, cover-and-stride): MFU, speed-up over the naive reference,
fast modes.

Figures (one JSON line each; goals in docs/METHODS.md, figures in BENCHMARKS.md "Segmentation"):

- ``peak`` / ``peak_end``: matmul GFLOP/s at the start and the end of the run (the MFU denominator is ``peak``).
- ``cover_stride_mfu`` (goal >= 0.8): exact embedding of a 256x256 image with the paper encoder (p 5, FOV 80,
  192 wide, 14 blocks), ``pixels/s x FLOP/pixel / peak`` with FLOP/pixel = analytic encoder FLOPs x windows /
  pixels; ``cover_stride_pixels_per_s``; ``encoder_mfu_same_batch``: the encoder alone on random windows at
  the same batch size (timed before and after the embedding), and ``cover_stride_vs_encoder`` (the ratio of
  the two MFUs: below 1 by what our bookkeeping costs). Both MFU lines also carry ``mfu_vs_local_peak``, against
  the median of two short peak readings taken just before and just after these timings (the machine's speed
  drifts; this is the reading to trust when ``peak`` and ``peak_end`` disagree).
- The pre-trained tiny encoder is cached in ``<out>/seg_tiny_fov60_<steps>steps`` (reused when its config
  matches; pre-training runs on one torch thread).
- ``naive_speedup`` (goal >= 10): exact vs ``embed_pixels_naive`` (one window per pixel) on a 40x40 crop.
- ``speedup_central_8``, ``speedup_central_12``, ``speedup_fast`` (goal >= 20 for fast): the same 256x256
  image in each mode, time of exact / time of the mode.
- ``tiny_speedup_<mode>`` and ``dice_<mode>`` (mode exact, central_8, central_12, fast): a tiny MAESTER
  encoder with FOV 60 (12x12 tokens, so c = 4, 8, 12 all mean something) pre-trained with ``run_pretrain``
  on the synthetic EM volume; k-means (k = 6, centres fitted once on
  exact-mode samples inside the cell mask) labels the embeddings of every mode; mean Dice (Hungarian mapping,
  inside the cell mask) against the reference labels, with ``dice_change`` = mode - exact and
  ``agreement_with_exact`` (fraction of pixels given the same cluster as exact mode).

``--quick`` swaps the paper encoder for a 1-block stand-in and trains the tiny encoder for 2 steps on a small
volume: seconds long, for the tests; its figures mean nothing.

    python benchmarks/bench_cover_stride.py [--quick] [--device auto|cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import sys
import time
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import (Reporter, encoder_flops, log, measure_peak, median, parse_args, report_peak, resolve_device,
                    time_call, timed)
from micromae.models import ViTEncoder, vit_maester
from micromae.segment.cover_stride import count_windows, embed_pixels, embed_pixels_batch, embed_pixels_naive

MODES: dict[str, dict[str, Any]] = {"exact": {}, "central_8": {"central_tokens": 8},
                                    "central_12": {"central_tokens": 12}, "fast": {"mode": "fast"}}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the image side, the naive crop side, batch size and tiny-encoder settings."""

    image: int = 256
    naive_crop: int = 40
    batch_size: int = 256
    fast_repeat: int = 3
    tiny_steps: int = 1000
    tiny_volume: tuple[int, int, int] = (64, 192, 192)
    tiny_planes: tuple[str, ...] = ("YX", "ZX", "ZY")
    tiny_batch: int = 64
    eval_slices: int = 8
    eval_crop: int = 0  # 0: whole planes; else the top-left eval_crop x eval_crop of each evaluated slice
    samples: int = 20_000
    k: int = 6


FULL = Plan()
QUICK = Plan(image=20, naive_crop=8, batch_size=64, fast_repeat=1, tiny_steps=2, tiny_volume=(16, 64, 64),
             tiny_planes=("YX",), tiny_batch=4, eval_slices=1, eval_crop=32, samples=500)


# ----------------------------------------------------------------------------------------------- helpers
def flop_per_pixel(encoder: torch.nn.Module, height: int, width: int, **mode: Any) -> float:
    """Analytic encoder FLOPs of every window ``mode`` computes for a ``height x width`` image, per pixel."""
    return encoder_flops(encoder, 1) * count_windows(height, width, encoder, **mode) / (height * width)


def label_agreement(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of pixels (inside ``mask``) where the label maps ``a`` and ``b`` (same shape) agree."""
    same = np.asarray(a) == np.asarray(b)
    return float(same[mask].mean() if mask is not None else same.mean())


def paper_encoder(quick: bool, device: torch.device) -> ViTEncoder:
    """The MAESTER encoder in eval mode (random weights: speed does not depend on them); with ``quick`` a
    1-block, 32-wide stand-in with FOV 60 (12x12 tokens, so that c = 12 stays valid)."""
    torch.manual_seed(0)
    if quick:
        enc = ViTEncoder(img_size=60, patch_size=5, in_chans=1, embed_dim=32, depth=1, num_heads=1, mlp_ratio=2.0)
    else:
        enc = vit_maester()
    return enc.to(device).eval()


def local_peak(device: torch.device, quick: bool) -> float:
    """A short matmul-peak reading (GFLOP/s) taken next to a timing: on a shared machine the speed drifts
    during a run, and an MFU against the peak measured minutes earlier can be off by a factor of two."""
    return measure_peak(device, n=1024 if quick else None, warmup=1, repeat=3 if quick else 5, warmup_s=0.5)["gflops"]


def encoder_alone(encoder: ViTEncoder, batch: int, device: torch.device, repeat: int) -> list[float]:
    """Seconds per forward of ``encoder`` on ``batch`` random windows, ``repeat`` times."""
    windows = torch.rand(batch, encoder.in_chans, *encoder.img_size,
                         generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        return [time_call(lambda: encoder.forward_features(windows), device) for _ in range(repeat)]


# ----------------------------------------------------------------------------------------------- paper encoder
def bench_paper(rep: Reporter, plan: Plan, device: torch.device, peak: float, quick: bool) -> None:
    """Figures 1-3 on the paper encoder: MFU, fast-mode speed-ups (``plan.image`` square), naive speed-up.

    Drift-resistant order (A B A): encoder alone, exact, encoder alone, the three modes, exact again, encoder
    alone; the exact time is the mean of its two runs, the encoder's the median of its six forwards.
    """
    enc, size, batch = paper_encoder(quick, device), plan.image, plan.batch_size
    image = torch.rand(size, size, generator=torch.Generator().manual_seed(1)).to(device)
    windows = count_windows(size, size, enc)

    def exact() -> float:
        log(f"paper encoder: exact embedding of {size}x{size} ({windows} windows, batch {batch})")
        return time_call(lambda: embed_pixels(enc, image, batch_size=batch), device)

    encoder_alone(enc, batch, device, 1)  # warm-up
    local = [local_peak(device, quick)]
    t_enc = encoder_alone(enc, batch, device, 2)
    t_exact = [exact()]
    t_enc += encoder_alone(enc, batch, device, 2)
    t_mode = {}
    for name in ("central_8", "central_12", "fast"):
        log(f"paper encoder: {name} on {size}x{size} ({count_windows(size, size, enc, **MODES[name])} windows)")
        t_mode[name] = median([time_call(partial(embed_pixels, enc, image, batch_size=batch, **MODES[name]), device)
                               for _ in range(plan.fast_repeat if name == "fast" else 1)])
    t_exact.append(exact())
    t_enc += encoder_alone(enc, batch, device, 2)
    local.append(local_peak(device, quick))

    seconds = sum(t_exact) / len(t_exact)
    fpp = flop_per_pixel(enc, size, size)
    pixels_per_s = size * size / seconds
    gflops, enc_gflops = pixels_per_s * fpp / 1e9, encoder_flops(enc, batch) / median(t_enc) / 1e9
    ctx = dict(image=size, windows=windows, batch=batch, peak_gflops=peak, local_peak_gflops=local,
               seconds_exact_runs=t_exact)
    rep.emit("cover_stride_mfu", gflops / peak, "fraction of peak", 0.8, gflop_per_pixel=fpp / 1e9,
             seconds=seconds, gflops=gflops, mfu_vs_local_peak=gflops / median(local), **ctx)
    rep.emit("cover_stride_pixels_per_s", pixels_per_s, "pixels/s", None, seconds=seconds, **ctx)
    rep.emit("encoder_mfu_same_batch", enc_gflops / peak, "fraction of peak", None, encoder_seconds=t_enc,
             gflops=enc_gflops, mfu_vs_local_peak=enc_gflops / median(local), **ctx)
    rep.emit("cover_stride_vs_encoder", gflops / enc_gflops, "ratio", None, **ctx)
    for name, t in t_mode.items():
        rep.emit(f"speedup_{name}", seconds / t, "x", 20.0 if name == "fast" else None, seconds=t,
                 seconds_exact=seconds, windows_mode=count_windows(size, size, enc, **MODES[name]), **ctx)
    bench_naive(rep, enc, image[:plan.naive_crop, :plan.naive_crop], batch, device, peak)


def bench_naive(rep: Reporter, enc: ViTEncoder, crop: torch.Tensor, batch: int, device: torch.device,
                peak: float) -> None:
    """Exact vs ``embed_pixels_naive`` on ``crop`` (H, W): exact timed before (after a warm-up) and after."""
    n = crop.shape[-1]
    log(f"paper encoder: naive vs exact on a {n}x{n} crop")
    t_exact = [time_call(lambda: embed_pixels(enc, crop, batch_size=batch), device) for _ in range(2)][1:]
    naive, t_naive, _ = timed(lambda: embed_pixels_naive(enc, crop, batch_size=batch), device)
    exact, t_after, _ = timed(lambda: embed_pixels(enc, crop, batch_size=batch), device)
    t_exact.append(t_after)
    seconds = sum(t_exact) / len(t_exact)
    diff = (naive.to(exact.device) - exact).abs().max().item()
    rep.emit("naive_speedup", t_naive / seconds, "x", 10.0, crop=n, windows_exact=count_windows(n, n, enc),
             windows_naive=n * n, seconds_naive=t_naive, seconds_exact=seconds, seconds_exact_runs=t_exact,
             max_abs_diff=diff, batch=batch, peak_gflops=peak)


# ----------------------------------------------------------------------------------------------- tiny encoder
def tiny_config(plan: Plan, device: torch.device) -> Any:
    """The ``maester_tiny`` preset with FOV 60 (12x12 tokens of 5 px) and ``plan``'s steps and volume."""
    from importlib import resources

    from micromae.config import PretrainConfig, load_config

    z, y, x = plan.tiny_volume
    overrides = ["name=maester_tiny_fov60", "model.img_size=60", "model.patch_size=5", f"train.steps={plan.tiny_steps}",
                 f"train.batch_size={plan.tiny_batch}", f"data.synthetic_shape=[{z},{y},{x}]",
                 f"data.planes=[{','.join(plan.tiny_planes)}]", f"train.device={device.type}",
                 "train.figure_every=0", "train.ckpt_every=0", "train.log_every=50"]
    if plan.tiny_steps < 50:
        overrides.append("train.warmup_steps=0")
    preset = Path(str(resources.files("micromae") / "configs" / "maester_tiny.yaml"))
    return load_config(preset, PretrainConfig, overrides)


def pretrained_tiny(plan: Plan, device: torch.device, out: Path) -> tuple[Path, float | None, Any]:
    """Checkpoint of the tiny FOV-60 encoder, trained now or reused from ``out`` when its config matches;
    also the training seconds (None when reused) and the config."""
    import shutil

    from micromae.config import PretrainConfig, load_config
    from micromae.train.pretrain import run_pretrain

    cfg = tiny_config(plan, device)
    run_dir = Path(out) / f"seg_tiny_fov60_{plan.tiny_steps}steps"
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file() and load_config(run_dir / "config.yaml", PretrainConfig) == cfg:
        log(f"reusing the pre-trained tiny encoder {last}")
        return last, None, cfg
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"pre-training the tiny FOV-60 encoder for {plan.tiny_steps} steps into {run_dir}")
    # One thread: the tiny model's small matmuls gain little from a second core, and on a shared 2-core
    # machine under load two threads ran 5x slower than one (OpenMP threads waiting on each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        result = run_pretrain(cfg, run_dir)
    finally:
        torch.set_num_threads(threads)
    return Path(result.checkpoint), time.perf_counter() - start, cfg


def bench_tiny(rep: Reporter, plan: Plan, device: torch.device, out: Path) -> None:
    """Figure 3's Dice change: every mode's embeddings labelled by the same k-means centres, scored against
    the synthetic volume's reference labels inside the cell mask; and the tiny encoder's speed-ups."""
    from micromae.data.synthetic_em import make_em_volume
    from micromae.evaluate.metrics import evaluate_segmentation
    from micromae.segment.cluster import fit_kmeans
    from micromae.segment.fit import sample_pixel_embeddings
    from micromae.models.pretrained import load_encoder

    ckpt, train_s, cfg = pretrained_tiny(plan, device, out)
    encoder = load_encoder(ckpt)[0].to(device).eval()
    em = make_em_volume(tuple(cfg.data.synthetic_shape), seed=cfg.data.synthetic_seed)
    rng = (0.0, 255.0)  # uint8, data.normalize = dtype as in pre-training
    log(f"k-means (k = {plan.k}) on {plan.samples} exact-mode samples inside the cell mask")
    sample = sample_pixel_embeddings(encoder, em.image, plan.samples, rng, mask=em.cell_mask, seed=0,
                                     batch_size=plan.batch_size, progress=False)
    centres = fit_kmeans(sample.features, plan.k, seed=0)
    zs = np.linspace(0, em.image.shape[0] - 1, plan.eval_slices + 2)[1:-1].round().astype(int)
    side = plan.eval_crop or None
    stack, ref, mask = (a[zs, :side, :side] for a in (em.image, em.labels, em.cell_mask))
    stack = stack[:, None]  # (S, 1, H, W) uint8
    ctx = dict(encoder="maester_tiny FOV 60 (12x12 tokens of 5 px, 64 wide, 4 blocks)", steps=plan.tiny_steps,
               pretrain_seconds=train_s, k=plan.k, samples=plan.samples, slices=zs.tolist(),
               plane=list(stack.shape[-2:]), volume=list(em.image.shape))
    def embed(kw: dict[str, Any]) -> tuple[float, torch.Tensor]:
        result, seconds, _ = timed(lambda: embed_pixels_batch(encoder, stack, batch_size=plan.batch_size,
                                                              intensity_range=rng, **kw), device)
        return seconds, result

    seconds, labels, scores = {}, {}, {}
    for name, kw in MODES.items():
        log(f"tiny encoder: {name} on {len(zs)} slices of {stack.shape[-2]}x{stack.shape[-1]}")
        seconds[name], feats = embed(kw)
        flat = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        labels[name] = centres.predict(flat).reshape(ref.shape).cpu().numpy()
        scores[name] = evaluate_segmentation(labels[name], ref, mask=mask, class_names=em.class_names,
                                             n_clusters=plan.k)["hungarian"]["scores"]
    log("tiny encoder: exact again (timings A B A)")
    t_exact = [seconds["exact"], embed(MODES["exact"])[0]]
    seconds["exact"] = sum(t_exact) / 2
    windows_exact = len(zs) * count_windows(*stack.shape[-2:], encoder)
    dice_exact = scores["exact"]["mean_dice"]
    for name, kw in MODES.items():
        windows = len(zs) * count_windows(*stack.shape[-2:], encoder, **kw)
        if name != "exact":
            rep.emit(f"tiny_speedup_{name}", seconds["exact"] / seconds[name], "x", None, seconds=seconds[name],
                     seconds_exact=seconds["exact"], seconds_exact_runs=t_exact, windows_mode=windows,
                     windows_exact=windows_exact, **ctx)
        rep.emit(f"dice_{name}", scores[name]["mean_dice"], "mean Dice (Hungarian, in cell mask)", None,
                 dice_exact=dice_exact, dice_change=scores[name]["mean_dice"] - dice_exact,
                 agreement_with_exact=label_agreement(labels[name], labels["exact"], mask),
                 per_class={c: v["dice"] for c, v in scores[name]["per_class"].items()},
                 seconds=seconds[name], windows=windows, **ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    device = resolve_device(args.device)
    plan = QUICK if args.quick else FULL
    rep = Reporter("bench_cover_stride", args.out, device, args.quick)
    peak = report_peak(rep, device, args.quick)
    with torch.inference_mode():
        bench_paper(rep, plan, device, peak, args.quick)
    bench_tiny(rep, plan, device, args.out)
    report_peak(rep, device, args.quick, figure="peak_end")
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

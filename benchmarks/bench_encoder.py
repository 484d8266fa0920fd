"""Encoder inference: the MAESTER encoder (80x80, 5x5 tokens, 192 wide, 14 blocks, 1 head, MLP 2) forward at
batch 64 under ``torch.inference_mode``, against timm's ``VisionTransformer`` of the same shape and weights.

Figures: peak (and peak_end, measured again after the timings), encoder_gflops, encoder_mfu (goal >= 0.85),
encoder_images_per_s, timm_gflops, timm_mfu, encoder_vs_timm (our throughput / timm's, goal >= 0.97). The
two models are timed interleaved (ours, timm, ours, timm, ...) so that drift in the machine's speed hits
both alike; the ratio is the median of the per-pair ratios.

    python benchmarks/bench_encoder.py [--quick] [--device auto|cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import sys

import torch
from timm.models.vision_transformer import VisionTransformer

from common import (Reporter, autocast, encoder_flops, log, median, parse_args, report_peak, resolve_device,
                    time_call)
from micromae.models import ViTEncoder

MAESTER_ENCODER = dict(img_size=80, patch_size=5, in_chans=1, embed_dim=192, depth=14, num_heads=1,
                       mlp_ratio=2.0, qkv_bias=True, pos_embed_weight=0.08)


def build_pair(device: torch.device) -> tuple[ViTEncoder, VisionTransformer]:
    """Our encoder and a timm VisionTransformer carrying the same weights, both in eval mode on ``device``."""
    torch.manual_seed(0)
    ours = ViTEncoder(**MAESTER_ENCODER)
    ref = VisionTransformer(**ours.timm_kwargs)
    ref.load_state_dict(ours.to_timm_state_dict(), strict=True)
    return ours.to(device).eval(), ref.to(device).eval()


def time_interleaved(ours: ViTEncoder, ref: VisionTransformer, imgs: torch.Tensor, warmup: int, repeat: int
                     ) -> tuple[list[float], list[float]]:
    """Seconds per forward of each model, timed ABAB... after ``warmup`` calls of each."""
    device = imgs.device

    def run(model) -> None:
        with torch.inference_mode(), autocast(device):
            model.forward_features(imgs)

    for _ in range(warmup):
        run(ours)
        run(ref)
    t_ours, t_ref = [], []
    for _ in range(repeat):
        t_ours.append(time_call(lambda: run(ours), device))
        t_ref.append(time_call(lambda: run(ref), device))
    return t_ours, t_ref


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    device = resolve_device(args.device)
    rep = Reporter("bench_encoder", args.out, device, args.quick)
    peak = report_peak(rep, device, args.quick)
    batch, warmup, repeat = (4, 1, 2) if args.quick else (64, 2, 7)
    ours, ref = build_pair(device)
    imgs = torch.rand(batch, 1, 80, 80, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():  # same weights, same function: check before timing anything
        diff = (ours.forward_features(imgs) - ref.forward_features(imgs)).abs().max().item()
    log(f"encoder forward, batch {batch}, {warmup} warm-up + {repeat} interleaved pairs (max |ours - timm| "
        f"= {diff:.2e})")
    t_ours, t_ref = time_interleaved(ours, ref, imgs, warmup, repeat)
    flops = encoder_flops(ours, batch)
    ctx = dict(batch=batch, repeat=repeat, gflop_per_image=flops / batch / 1e9, peak_gflops=peak)
    gflops_ours, gflops_ref = flops / median(t_ours) / 1e9, flops / median(t_ref) / 1e9
    rep.emit("encoder_gflops", gflops_ours, "GFLOP/s", None, median_s=median(t_ours), **ctx)
    rep.emit("encoder_mfu", gflops_ours / peak, "fraction of peak", 0.85, **ctx)
    rep.emit("encoder_images_per_s", batch / median(t_ours), "images/s", None, **ctx)
    rep.emit("timm_gflops", gflops_ref, "GFLOP/s", None, median_s=median(t_ref), **ctx)
    rep.emit("timm_mfu", gflops_ref / peak, "fraction of peak", None, **ctx)
    pair_ratios = [r / o for o, r in zip(t_ours, t_ref)]  # throughput ours / throughput timm, per pair
    rep.emit("encoder_vs_timm", median(pair_ratios), "ratio", 0.97, pairs=[round(r, 4) for r in pair_ratios],
             max_abs_diff=diff, **ctx)
    report_peak(rep, device, args.quick, figure="peak_end")
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

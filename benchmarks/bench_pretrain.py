"""Pre-training step: one full MAESTER MAE step (forward + backward + AdamW step) at batch 32 and 64.

MFU counts the forward FLOPs (encoder on the visible tokens + decoder on all tokens, see ``common.mae_flops``)
times 3 for forward + backward; the AdamW update and the element-wise work are not counted. Figures: peak
(and peak_end, measured again after the timings), and per batch: pretrain_mfu (goal >= 0.5),
pretrain_gflops, pretrain_images_per_s.

    python benchmarks/bench_pretrain.py [--quick] [--device auto|cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from common import Reporter, autocast, log, mae_flops, median, parse_args, report_peak, resolve_device, time_call
from micromae.models import MaskedAutoencoder, mae_maester

# MAESTER's optimiser (AdamW 1.5e-4, wd 1e-5, betas 0.9/0.999)
ADAMW = dict(lr=1.5e-4, weight_decay=1e-5, betas=(0.9, 0.999))


def make_step(model: MaskedAutoencoder, imgs: torch.Tensor) -> Callable[[], None]:
    """A closure doing one training step on ``imgs`` ``(B, 1, 80, 80)`` (AdamW as in MAESTER). It reads no
    value back (no device sync), so the caller's timer decides when to wait for the device."""
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    device = imgs.device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = model(imgs).loss
        loss.backward()
        optimizer.step()

    return step


def time_steps(batch: int, device: torch.device, warmup: int, repeat: int) -> tuple[list[float], MaskedAutoencoder]:
    """Seconds per training step of a fresh paper-default MAE at ``batch`` (after ``warmup`` steps)."""
    torch.manual_seed(0)
    model = mae_maester().to(device).train()
    imgs = torch.rand(batch, 1, 80, 80, generator=torch.Generator().manual_seed(0)).to(device)
    step = make_step(model, imgs)
    for _ in range(warmup):
        step()
    return [time_call(step, device) for _ in range(repeat)], model


def report_batch(rep: Reporter, batch: int, device: torch.device, peak: float, warmup: int, repeat: int) -> None:
    log(f"MAE training step, batch {batch}: {warmup} warm-up + {repeat} timed steps")
    times, model = time_steps(batch, device, warmup, repeat)
    flops = 3 * mae_flops(model, batch)
    seconds = median(times)
    ctx = dict(batch=batch, repeat=repeat, median_s=seconds, gflop_per_image=flops / batch / 1e9,
               mask_ratio=model.mask_ratio, peak_gflops=peak)
    rep.emit("pretrain_mfu", flops / seconds / 1e9 / peak, "fraction of peak", 0.5, **ctx)
    rep.emit("pretrain_gflops", flops / seconds / 1e9, "GFLOP/s", None, **ctx)
    rep.emit("pretrain_images_per_s", batch / seconds, "images/s", None, **ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    device = resolve_device(args.device)
    rep = Reporter("bench_pretrain", args.out, device, args.quick)
    peak = report_peak(rep, device, args.quick)
    plan = [(2, 1, 2), (4, 1, 2)] if args.quick else [(32, 2, 6), (64, 1, 4)]
    for batch, warmup, repeat in plan:
        report_batch(rep, batch, device, peak, warmup, repeat)
    report_peak(rep, device, args.quick, figure="peak_end")
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

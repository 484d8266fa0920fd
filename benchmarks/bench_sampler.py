"""Data pipeline: crops/s the MAESTER plane-crop sampler delivers, divided by crops/s a training step consumes.

The sampler cuts 80x80 crops (batch 32) from the three orthogonal planes of the synthetic EM volume
``make_em_volume(shape=(96, 256, 256), seed=0)`` (the generator's default depth, 64, is too thin for an 80-px
FOV in the ZX and ZY planes with 4 px padding), measured four ways: ``sample_batch`` in the main
process, through ``make_loader`` with ``num_workers=0`` and ``num_workers=1``, and the on-device sampler
(``TorchPlaneCropSampler`` on ``--device``, same draws; mode ``torch_sample_batch``). The consumer is one
training step of the paper-default MAE at batch 32 (forward + backward + AdamW), timed in the same run. Each
path is timed alone: the rate a worker delivers while training runs beside it on the same cores is lower.

Figures: peak (and peak_end, measured again after the timings), train_crops_per_s, per mode:
sampler_crops_per_s and data_ratio (goal >= 5), and torch_vs_numpy: the torch sampler's crops/s over numpy's
``sample_batch`` (goal >= 5; on a CPU the two do the same work, see BENCHMARKS.md).

    python benchmarks/bench_sampler.py [--quick] [--device auto|cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Iterator

import torch

from bench_pretrain import time_steps
from common import Reporter, log, median, parse_args, report_peak, resolve_device
from micromae.data.sampler import PlaneCropSampler, make_loader
from micromae.data.synthetic_em import make_em_volume
from micromae.data.torch_sampler import TorchPlaneCropSampler

BATCH = 32
VOLUME_SHAPE = (96, 256, 256)
QUICK_SHAPE = (72, 96, 96)  # the smallest volume on which an 80-px FOV fits in all three planes (4 px padding)


MAESTER_SAMPLER = dict(fov=80, planes=("YX", "ZX", "ZY"), pad=4, min_crop_frac=0.5, flip_p=0.5, seed=0, rank=0)


def build_sampler(shape: tuple[int, int, int], device: torch.device | None = None) -> PlaneCropSampler:
    """The MAESTER sampler (FOV 80, three planes, pad 4, crops of [40, 80] px, flips) on one synthetic volume;
    with ``device``, the torch sampler building batches there."""
    volume = make_em_volume(shape=shape, seed=0).image
    if device is not None:
        return TorchPlaneCropSampler([volume], device=device, **MAESTER_SAMPLER)
    return PlaneCropSampler([volume], **MAESTER_SAMPLER)


def rate_of(batches: Iterator[torch.Tensor], warmup: int, count: int) -> float:
    """Crops/s over ``count`` consecutive batches, after ``warmup`` batches (worker start-up excluded)."""
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    crops = sum(next(batches).shape[0] for _ in range(count))
    return crops / (time.perf_counter() - start)


def direct(sampler: PlaneCropSampler) -> Iterator[torch.Tensor]:
    """Batches 0, 1, ... of ``sampler`` in this process (waiting for the device after each)."""
    step = 0
    device = getattr(sampler, "device", torch.device("cpu"))
    while True:
        batch = sampler.sample_batch(step, BATCH)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        yield batch
        step += 1


def sampler_rates(sampler: PlaneCropSampler, warmup: int, count: int,
                  on_device: PlaneCropSampler | None = None) -> dict[str, float]:
    """Crops/s of ``sample_batch``, of ``make_loader`` with 0 and 1 workers (fresh steps for each), and of the
    torch sampler ``on_device``."""
    rates = {"sample_batch": rate_of(direct(sampler), warmup, count)}
    if on_device is not None:
        rates["torch_sample_batch"] = rate_of(direct(on_device), warmup, count)
    for workers in (0, 1):
        loader = make_loader(sampler, BATCH, start_step=0, num_workers=workers)
        stream = iter(loader)
        rates[f"make_loader_workers{workers}"] = rate_of((b for _, b in stream), warmup, count)
        del stream, loader  # shuts the persistent worker down before the next measurement
        gc.collect()
    return rates


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    device = resolve_device(args.device)
    rep = Reporter("bench_sampler", args.out, device, args.quick)
    peak = report_peak(rep, device, args.quick)
    shape = QUICK_SHAPE if args.quick else VOLUME_SHAPE
    warmup, count = (1, 2) if args.quick else (3, 30)
    log(f"synthetic EM volume {shape}, sampler: {warmup} warm-up + {count} batches of {BATCH} per mode")
    sampler = build_sampler(shape)
    rates = sampler_rates(sampler, warmup, count, build_sampler(shape, device))
    train_batch, train_warmup, train_repeat = (2, 1, 2) if args.quick else (BATCH, 1, 4)
    log(f"MAE training step, batch {train_batch}: {train_warmup} warm-up + {train_repeat} timed")
    times, _ = time_steps(train_batch, device, train_warmup, train_repeat)
    consumed = train_batch / median(times)
    ctx = dict(batch=BATCH, volume_shape=list(shape), peak_gflops=peak)
    rep.emit("train_crops_per_s", consumed, "crops/s", None, train_batch=train_batch, repeat=train_repeat,
             **ctx)
    for mode, rate in rates.items():
        rep.emit("sampler_crops_per_s", rate, "crops/s", None, mode=mode, batches=count, **ctx)
        rep.emit("data_ratio", rate / consumed, "ratio", 5.0, mode=mode, train_batch=train_batch, **ctx)
    rep.emit("torch_vs_numpy", rates["torch_sample_batch"] / rates["sample_batch"], "ratio", 5.0,
             torch_device=str(device), **ctx)
    report_peak(rep, device, args.quick, figure="peak_end")
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

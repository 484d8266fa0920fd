"""DAMA cost: one DAMA training step ÷ one MAE training step on the same encoder (goal: at most 2.1 with two
students, 1.6 with an EMA teacher).

A step is what the trainer does per batch: ``objective.loss`` (forward, under bf16 autocast on CUDA),
backward, gradient clipping when the preset clips, AdamW (``micromae.train.optim.build_optimizer``), then
``objective.after_step`` (the EMA update of the teacher). Every objective is built by the trainer's own
``build_model`` / ``build_objective`` from a preset with ``torch.manual_seed(0)``, so branch 1 starts from the
same weights everywhere, and all of them get the same batch of random 7-channel images.

Shapes (``--quick`` shrinks them; the figures then mean nothing):

- ``vit_s``: ``dama_brain`` with a ViT-S/16 encoder (384 wide, 12 blocks, 6 heads, MLP 4) on 128×128×7, mask
  ratio 0.8, K = 6, and a lighter MAE decoder (256 wide, 4 blocks, 8 heads, MLP 4) so that it runs on a CPU
  in minutes; batch 8 on CPU, 64 on CUDA.
- ``dama_tiny``: the ``dama_tiny`` preset as it is (32×32×7, patches 4, 64 wide, 4 blocks, K = 2), batch 8.

Timing is interleaved in one process: every round runs ``MAE, X1, MAE, X2, MAE, X3, MAE, X4, MAE``, and the
ratio of ``Xi`` in that round is its time over the mean of the two MAE steps around it, so a drift of the
machine's speed hits both sides alike; the figure is the median over rounds. Each line also carries, for a
machine shared with other jobs, ``ratio_of_min`` (fastest variant step over fastest MAE step: load only ever
adds time) and ``cpu_ratio`` (the same bracketed ratio of this process's CPU seconds, which other processes
do not inflate, though a thread spinning while its partner is descheduled does). Figures per shape:
``dama_cost`` for ``student1-student2`` (goal <= 2.1) and ``ema`` (goal <= 1.6), and for information
``shared`` and ``data2vec``; plus ``peak`` / ``peak_end``.

These goals are upper bounds, unlike the other benchmarks' goals: ``met`` is ``value <= goal`` here and every
such line carries ``"goal_is": "at most"``.

    python benchmarks/bench_dama.py [--quick] [--device auto|cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from common import Reporter, autocast, log, median, parse_args, report_peak, resolve_device, timed
from micromae.config import resolve_config
from micromae.config import PretrainConfig, load_config
from micromae.train.optim import build_optimizer
from micromae.train.pretrain import build_model, build_objective

VIT_S = ["model.embed_dim=384", "model.depth=12", "model.num_heads=6", "model.mlp_ratio=4.0",
         "model.decoder_embed_dim=256", "model.decoder_depth=4", "model.decoder_num_heads=8",
         "model.decoder_mlp_ratio=4.0"]
# --quick: same code paths, toy sizes (K = 6 needs 6 blocks)
VIT_S_QUICK = ["model.img_size=32", "model.patch_size=8", "model.embed_dim=48", "model.depth=6", "model.num_heads=3",
               "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2"]
# name -> (preset, overrides, batch on CPU, batch on CUDA, rounds, quick overrides)
SHAPES = {
    "vit_s": ("dama_brain", VIT_S, 8, 64, 5, VIT_S + VIT_S_QUICK),
    "dama_tiny": ("dama_tiny", [], 8, 8, 15, []),
}
# variant -> (overrides on top of the shape, goal: at most this many MAE steps, or None)
VARIANTS = {
    "student1-student2": (["objective=dama", "dama.config=student1-student2"], 2.1),
    "ema": (["objective=dama", "dama.config=ema"], 1.6),
    "shared": (["objective=dama", "dama.config=shared"], None),
    "data2vec": (["objective=data2vec"], None),
}


def shape_config(shape: str, quick: bool, extra: list[str]) -> PretrainConfig:
    """The preset of ``shape`` with its overrides (the quick ones under ``quick``) and ``extra``."""
    preset, overrides, _, _, _, quick_overrides = SHAPES[shape]
    return load_config(resolve_config(preset), overrides=(quick_overrides if quick else overrides) + extra)


def make_step(cfg: PretrainConfig, imgs: torch.Tensor) -> tuple[Callable[[], None], int]:
    """A closure doing one trainer step of ``cfg``'s objective on ``imgs`` ``(B, C, H, W)``, and the number of
    trained parameters. Branch 1 is initialised from seed 0 whatever the objective."""
    torch.manual_seed(0)
    model = build_model(cfg)
    objective = build_objective(cfg, model)
    module = objective.model.to(imgs.device).train()
    optimizer = build_optimizer(module, cfg.train)
    counter = [0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(imgs.device):
            loss, _ = objective.loss(module, imgs)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
        optimizer.step()
        objective.after_step(counter[0])
        counter[0] += 1

    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return step, trained


def wall_cpu(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one call of ``fn``."""
    return timed(fn, device)[1:]


def time_rounds(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, rounds: int
                ) -> dict[str, dict[str, list[float]]]:
    """Run ``MAE, X1, MAE, X2, ..., MAE`` ``rounds`` times after ``warmup`` steps of each.

    Returns, per name, ``wall`` and ``cpu`` seconds of every timed step and, per variant, ``ratio`` and
    ``cpu_ratio``: its time over the mean of the two MAE steps around it (wall-clock, CPU time).
    """
    variants = [name for name in steps if name != "mae"]
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    out = {name: {"wall": [], "cpu": [], "ratio": [], "cpu_ratio": []} for name in steps}
    for _ in range(rounds):
        before = wall_cpu(steps["mae"], device)
        for name in variants:
            t = wall_cpu(steps[name], device)
            after = wall_cpu(steps["mae"], device)
            for rec, times in ((out[name], t), (out["mae"], before)):
                rec["wall"].append(times[0])
                rec["cpu"].append(times[1])
            out[name]["ratio"].append(t[0] / (0.5 * (before[0] + after[0])))
            out[name]["cpu_ratio"].append(t[1] / max(0.5 * (before[1] + after[1]), 1e-9))
            before = after
        out["mae"]["wall"].append(before[0])
        out["mae"]["cpu"].append(before[1])
    return out


def report_shape(rep: Reporter, shape: str, device: torch.device, quick: bool) -> None:
    """Build MAE and every variant for ``shape``, time them interleaved, emit one ``dama_cost`` per variant."""
    _, _, batch_cpu, batch_cuda, rounds, _ = SHAPES[shape]
    batch, warmup = (2, 1) if quick else (batch_cuda if device.type == "cuda" else batch_cpu, 2)
    rounds = 1 if quick else rounds
    mae_cfg = shape_config(shape, quick, ["objective=mae"])
    m = mae_cfg.model
    imgs = torch.rand(batch, m.in_chans, m.img_size, m.img_size, generator=torch.Generator().manual_seed(0))
    imgs = imgs.to(device)
    steps, params = {}, {}
    steps["mae"], params["mae"] = make_step(mae_cfg, imgs)
    for name, (extra, _) in VARIANTS.items():
        steps[name], params[name] = make_step(shape_config(shape, quick, extra), imgs)
    log(f"{shape}: {m.img_size}x{m.img_size}x{m.in_chans}, patch {m.patch_size}, encoder {m.embed_dim}x{m.depth}, "
        f"decoder {m.decoder_embed_dim}x{m.decoder_depth}, batch {batch}: {warmup} warm-up + {rounds} rounds")
    t = time_rounds(steps, device, warmup, rounds)
    shape_ctx = dict(shape=shape, batch=batch, rounds=rounds, img_size=m.img_size, in_chans=m.in_chans,
                     patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                     decoder_embed_dim=m.decoder_embed_dim, decoder_depth=m.decoder_depth,
                     mask_ratio=m.mask_ratio, K=mae_cfg.dama.K, mae_median_s=median(t["mae"]["wall"]),
                     mae_params=params["mae"])
    for name, (_, goal) in VARIANTS.items():
        rec = t[name]
        value = median(rec["ratio"])
        rep.emit("dama_cost", value, "DAMA step time / MAE step time", goal,
                 met=None if goal is None else bool(value <= goal), goal_is="at most", config=name,
                 median_s=median(rec["wall"]), ratios=[round(r, 4) for r in rec["ratio"]],
                 ratio_of_min=min(rec["wall"]) / min(t["mae"]["wall"]), cpu_ratio=median(rec["cpu_ratio"]),
                 cpu_ratios=[round(r, 4) for r in rec["cpu_ratio"]], trained_params=params[name], **shape_ctx)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    device = resolve_device(args.device)
    rep = Reporter("bench_dama", args.out, device, args.quick)
    report_peak(rep, device, args.quick)
    for shape in SHAPES:
        report_shape(rep, shape, device, args.quick)
    report_peak(rep, device, args.quick, figure="peak_end")
    rep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

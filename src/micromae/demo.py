"""``micromae demo``: the main job end to end on embedded synthetic data, in a few CPU minutes.

1. write a synthetic EM-like volume with exact labels to ``OUT/data/``;
2. pre-train the tiny MAESTER model on it (``OUT/pretrain/``: config, log, checkpoints, figures);
3. draw the loss curve.
Re-running continues where the last run stopped (``--resume auto``) instead of starting again.
"""

from __future__ import annotations

import time
from pathlib import Path

from micromae.config import PretrainConfig, load_config
from micromae.train.log import read_log, say


def run_demo(out: Path, steps: int | None = None, preset: str = "maester_tiny") -> dict[str, Path]:
    """Run the demo into ``out``; returns the paths of what it wrote."""
    from micromae.cli import resolve_config
    from micromae.data.synthetic_em import make_em_volume, write_em_volume
    from micromae.evaluate.figures import plot_loss_curves
    from micromae.train.pretrain import run_pretrain

    t0 = time.time()
    out = Path(out)
    cfg: PretrainConfig = load_config(resolve_config(preset), PretrainConfig)
    data_dir = out / "data"
    image = data_dir / "image.tif"
    if not image.is_file():
        say(f"writing a synthetic EM-like volume {tuple(cfg.data.synthetic_shape)} to {data_dir}")
        vol = make_em_volume(shape=tuple(cfg.data.synthetic_shape), seed=cfg.data.synthetic_seed)
        write_em_volume(data_dir, vol)
    overrides = ["data.source=files", f"data.paths=[{image}]", "data.axes=ZYX"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    cfg = load_config(resolve_config(preset), PretrainConfig, overrides)
    run_dir = out / "pretrain"
    result = run_pretrain(cfg, run_dir, resume="auto")
    curve = plot_loss_curves(read_log(run_dir), run_dir / "figures" / "loss.png")
    figures = sorted((run_dir / "figures").glob("reconstruction_step*.png"))
    outputs = {"data": data_dir, "run_dir": run_dir, "checkpoint": run_dir / "checkpoints" / "last.pt",
               "loss_curve": curve}
    if figures:
        outputs["reconstruction"] = figures[-1]
    say(f"demo finished in {time.time() - t0:.0f} s: {result.step} steps, final loss {result.last_loss:.4f}")
    for name, path in outputs.items():
        say(f"  {name:<15} {path}")
    return outputs

"""``micromae demo``: the main job end to end on embedded synthetic data, in a few CPU minutes.

1. write a synthetic EM-like volume with exact labels to ``OUT/data/``;
2. pre-train the tiny MAESTER model on it (``OUT/pretrain/``: config, log, checkpoints, figures);
3. segment it without labels: exact pixel embeddings + k-means (``OUT/segmentation.ome.zarr``), with a k sweep;
4. evaluate against the known classes inside the cell mask (``OUT/report/``: metrics.json, report.md, PNGs);
5. measure what pre-training bought (``OUT/pretraining/``): on a held-out synthetic volume (another seed), the
   checkpoint's pixel embeddings against three random-init encoders of the same shape and hand-made features
   (k-means Dice and a held-out pixel probe); the table is appended to ``OUT/report/report.md``.
Re-running continues where the last run stopped (``--resume auto``) instead of starting again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from micromae.config import PretrainConfig, load_config, resolve_config
from micromae.data.synthetic_em import make_em_volume, write_em_volume
from micromae.evaluate.pretraining import PretrainingEval, run_evaluate_pretraining
from micromae.evaluate.segmentation import run_evaluate_segmentation
from micromae.io import atomic_path
from micromae.runtime import say
from micromae.segment.pipeline import run_segment
from micromae.train.pretrain import run_pretrain


def run_demo(out: Path, steps: int | None = None, preset: str = "maester_tiny", k: int = 6,
             sweep: tuple[int, ...] = (4, 5, 7, 8, 9, 10), samples: int = 20_000, segment: bool = True,
             overrides: list[str] | tuple[str, ...] = (), heldout_shape: tuple[int, int, int] | None = None
             ) -> dict[str, Path]:
    """Run the demo into ``out``; returns the paths of what it wrote. ``overrides``: config key=value pairs;
    ``heldout_shape``: the held-out volume of step 5 (default ``HELDOUT_SHAPE``)."""
    t0 = time.time()
    out = Path(out)
    cfg: PretrainConfig = load_config(resolve_config(preset), PretrainConfig, list(overrides))
    data_dir = out / "data"
    image = data_dir / "image.tif"
    if not image.is_file():
        say(f"writing a synthetic EM-like volume {tuple(cfg.data.synthetic_shape)} to {data_dir}")
        vol = make_em_volume(shape=tuple(cfg.data.synthetic_shape), seed=cfg.data.synthetic_seed)
        write_em_volume(data_dir, vol)
    file_overrides = [*overrides, "data.source=files", f"data.paths=[{image}]", "data.axes=ZYX"]
    if steps is not None:
        file_overrides.append(f"train.steps={steps}")
    cfg = load_config(resolve_config(preset), PretrainConfig, file_overrides)
    run_dir = out / "pretrain"
    result = run_pretrain(cfg, run_dir, resume="auto")
    curve = run_dir / "figures" / "loss.png"
    figures = sorted((run_dir / "figures").glob("reconstruction_step*.png"))
    outputs = {"data": data_dir, "run_dir": run_dir, "checkpoint": run_dir / "checkpoints" / "last.pt",
               "loss_curve": curve}
    if figures:
        outputs["reconstruction"] = figures[-1]
    if segment:
        outputs.update(_segment_and_evaluate(out, outputs["checkpoint"], data_dir, k, sweep, samples))
        outputs.update(_pretraining_gain(out, outputs["checkpoint"], outputs["report"], cfg.data.synthetic_seed,
                                         heldout_shape or HELDOUT_SHAPE))
    say(f"demo finished in {time.time() - t0:.0f} s: {result.step} steps, final loss {result.last_loss:.4f}")
    for name, path in outputs.items():
        say(f"  {name:<15} {path}")
    return outputs


def _segment_and_evaluate(out: Path, checkpoint: Path, data_dir: Path, k: int, sweep: tuple[int, ...],
                          samples: int) -> dict[str, Path]:
    seg = out / "segmentation.ome.zarr"
    if not seg.exists():
        run_segment(checkpoint, data_dir / "image.tif", seg, k=k, sweep=sweep, n_samples=samples,
                    mask_path=data_dir / "cell_mask.tif")
    report = run_evaluate_segmentation(seg, data_dir / "labels.tif", out / "report", mask=data_dir / "cell_mask.tif",
                                       image=data_dir / "image.tif", overwrite=True)  # derived: redone each run
    scores = report["result"]["hungarian"]["scores"]["per_class"]
    say("Dice per class (Hungarian mapping, inside the cells): " +
        ", ".join(f"{name} {v['dice']:.2f}" for name, v in scores.items() if v["dice"] is not None))
    return {"segmentation": seg, "report": report["report"], "metrics": report["metrics"]}


HELDOUT_SHAPE = (24, 128, 128)  # small enough for a few CPU minutes with four encoders


def _pretraining_gain(out: Path, checkpoint: Path, report: Path, train_seed: int,
                      shape: tuple[int, int, int]) -> dict[str, Path]:
    """Score the checkpoint against random-init encoders on a held-out synthetic volume; append to report.md."""
    heldout = out / "heldout"
    if not (heldout / "image.tif").is_file():
        seed = train_seed + 7
        say(f"writing a held-out synthetic volume {shape} (seed {seed}) to {heldout}")
        write_em_volume(heldout, make_em_volume(shape=shape, seed=seed))
    folder = out / "pretraining"
    if not (folder / "pretraining.json").is_file():
        run_evaluate_pretraining(checkpoint, heldout / "image.tif", heldout / "labels.tif", folder,
                                 PretrainingEval(ignore=0))
    result = json.loads((folder / "pretraining.json").read_text())
    text = report.read_text()
    marker = "\n## What pre-training bought\n"
    if marker not in text:
        section = (folder / "pretraining.md").read_text().split("\n", 1)[1]  # without its title
        with atomic_path(report, overwrite=True) as tmp:
            tmp.write_text(text.rstrip() + "\n" + marker + "\nOn a held-out volume (" +
                           f"{' x '.join(map(str, shape))}, another seed), scored inside the cells; "
                           f"full report in `{folder.name}/pretraining.md`.\n" + section)
    say("gain over random-init encoders (held-out volume): " +
        ", ".join(f"{k} {v:+.3f}" for k, v in result["gain"].items()))
    return {"pretraining": folder / "pretraining.md"}

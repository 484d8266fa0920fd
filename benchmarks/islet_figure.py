"""MAESTER clusters over real EM (the ``islet`` sample) beside the clusters of a random-init encoder.

The sample (1024 x 1024 SEM of a mouse pancreatic islet at 5 nm/px, no labels) is binned ``--bin`` x
``--bin`` (default 2: 10 nm/px, so the tiny preset's 36-px field of view spans 360 nm, about one insulin
granule with its halo), a preset is pre-trained on it (a 2-D image: YX crops), and the image is segmented with
k-means (``--k``) on exact pixel embeddings of that checkpoint and of a random-init encoder of the same shape
(the same pipeline). Writes ``<out>/islet_clusters.png`` (image, MAESTER clusters, random-init clusters) and
``<out>/islet.json`` (timings, cluster sizes, the mean intensity of each cluster).

There are no labels: the figure is for the eye, never a Dice claim.

    python benchmarks/islet_figure.py --out docs/images          # ~10-20 CPU minutes
    python benchmarks/islet_figure.py --quick --out /tmp/islet   # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import zarr

from micromae.config import PretrainConfig, load_config, resolve_config
from micromae.data.samples import load_sample
from micromae.evaluate.pretraining import write_random_init_checkpoint
from micromae.figures import save_figure
from micromae.segment.pipeline import run_segment
from micromae.train.pretrain import run_pretrain


def log(msg: str) -> None:
    print(f"[islet_figure] {msg}", file=sys.stderr, flush=True)


def binned(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor block (scikit-image), trailing rows/columns that fill no block dropped."""
    from skimage.transform import downscale_local_mean

    h, w = (s // factor * factor for s in image.shape)
    return np.round(downscale_local_mean(image[:h, :w], (factor, factor))).astype(np.uint8)


def cluster_order(labels: np.ndarray, image: np.ndarray, k: int) -> np.ndarray:
    """Relabel clusters by mean intensity (darkest first), so both panels share one colour scale."""
    means = [image[labels == c].mean() if (labels == c).any() else np.inf for c in range(k)]
    rank = np.argsort(np.argsort(means))
    return rank[labels]


def figure(image: np.ndarray, panels: dict[str, np.ndarray], k: int, title: str):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)), 4.6))
    axes[0].imshow(image, cmap="gray")
    axes[0].set_title("islet SEM (binned)", fontsize=9)
    for ax, (name, lab) in zip(axes[1:], panels.items()):
        ax.imshow(image, cmap="gray")
        ax.imshow(lab, cmap="tab10", vmin=0, vmax=9, alpha=0.55, interpolation="nearest")
        ax.set_title(f"{name}, k = {k}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="maester_tiny")
    ap.add_argument("--set", nargs="*", default=[], help="pre-training overrides")
    ap.add_argument("--bin", type=int, default=2)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--checkpoint", type=Path, help="skip pre-training: use this checkpoint")
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    ap.add_argument("--work", type=Path, help="run folder (default: a temporary one)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sample = load_sample("islet")
    image = binned(sample.image, args.bin)
    overrides = list(args.set)
    if args.quick:
        image = image[:96, :96]
        overrides = ["model.img_size=20", "model.patch_size=5", "model.embed_dim=16", "model.depth=1",
                     "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1",
                     "train.batch_size=8", "train.steps=3", "train.figure_every=0", *overrides]
    info: dict = {"bin": args.bin, "nm_per_px": 5 * args.bin, "shape": list(image.shape), "k": args.k,
                  "preset": args.preset, "overrides": overrides}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        path = work / "islet_binned.tif"
        tifffile.imwrite(path, image)
        ckpt = args.checkpoint
        if ckpt is None:
            cfg = load_config(resolve_config(args.preset), PretrainConfig,
                              [*overrides, "data.source=files", f"data.paths=[{path}]"])
            t0 = time.time()
            ckpt = run_pretrain(cfg, work / "run", resume="auto").checkpoint
            info["pretrain_wall_s"] = round(time.time() - t0, 1)
        rand = write_random_init_checkpoint(ckpt, 1000, work / "random_init.pt")
        panels = {}
        for name, c in (("MAESTER", ckpt), ("random-init encoder", rand)):
            out = work / f"seg_{name.split()[0]}.zarr"
            t0 = time.time()
            run_segment(c, path, out, k=args.k, n_samples=50_000 if not args.quick else 2000, overwrite=True,
                        save_sample=False)
            lab = np.asarray(zarr.open_group(str(out), mode="r")["labels"])[0]
            panels[name] = cluster_order(lab, image, args.k)
            info[name] = {"segment_wall_s": round(time.time() - t0, 1),
                          "cluster_fraction": [round(float((panels[name] == c).mean()), 4) for c in range(args.k)],
                          "cluster_mean_intensity": [round(float(image[panels[name] == c].mean()), 1)
                                                     if (panels[name] == c).any() else None for c in range(args.k)]}
        args.out.mkdir(parents=True, exist_ok=True)
        save_figure(figure(image, panels, args.k, "clusters ordered by mean intensity (same colours = same rank); "
                           "no labels exist for this image"), args.out / "islet_clusters.png")
    (args.out / "islet.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()

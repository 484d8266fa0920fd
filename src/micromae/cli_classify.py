"""Command-line verbs for cell classification: `micromae probe`, `micromae evaluate classification`.

Fine-tuning itself is `micromae finetune classify_tiny ...` (a config with ``task: classification``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from micromae.errors import input_error

CHECKPOINT_HELP = ("an encoder to evaluate: a pre-training or fine-tuning checkpoint (.pt), an encoder from "
                   "`micromae export-encoder` (.safetensors), or `random` (an untrained network, the baseline); "
                   "NAME=PATH sets the name shown in tables and plots. Repeat for several encoders")
DATA_HELP = ("folder with one sub-folder of single-cell crops (multi-channel TIFFs) per cell type, e.g. the "
             "cells/ folder of `micromae data synth-mif`")


def parse_checkpoints(items: list[str], *, require_name: bool = False, allow_random: bool = True) -> dict[str, str]:
    """``["DAMA=a.pt", "b.pt", "random"]`` -> ``{"DAMA": "a.pt", "b": "b.pt", "random init": "random"}``.

    Every path must be an existing file and every name used once. ``require_name``: only ``NAME=PATH`` items;
    ``allow_random=False``: no ``random`` item and no encoder named ``random init`` (for callers that always run
    the random-init control themselves)."""
    named: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep:
            if require_name:
                raise input_error("--checkpoint", "NAME=PATH, e.g. DAMA=runs/dama/checkpoints/last.pt", repr(item),
                                  "Name each pre-trained encoder")
            name, path = ("random init" if item == "random" else Path(item).stem), item
        if not allow_random and (path == "random" or name == "random init"):
            raise input_error(f"--checkpoint {item!r}", "a checkpoint file under a name other than 'random init'",
                              repr(item), "The random-init control always runs; pass only pre-trained encoders")
        if not name or not path or name in named:
            raise input_error(f"--checkpoint {item!r}", "PATH, NAME=PATH or random, each name once",
                              "an empty or repeated name", "Name each encoder differently, e.g. DAMA=runs/a.pt")
        if path != "random" and not Path(path).is_file():
            raise input_error(f"--checkpoint {item!r}", "an existing .pt or .safetensors file, or random",
                              f"no file '{path}' (no such file)", "Check the path (e.g. runs/NAME/checkpoints/last.pt)")
        named[name] = path
    return named


def _list(text: str | None, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()] if text else []


def _channels(text: str | None) -> list[str | int] | None:
    return [int(c) if c.isdigit() else c for c in _list(text)] or None


def cmd_probe(args: argparse.Namespace) -> int:
    from micromae.evaluate.probe import run_probe

    result = run_probe(parse_checkpoints(args.checkpoint), args.data, out=args.out, axes=args.axes,
                       channels=_channels(args.channels), size=args.size, branch=args.branch, folds=args.folds,
                       test_size=args.test_size, seed=args.seed, k=args.k, vote=args.vote, pool=args.pool,
                       device=args.device, normalize=args.normalize, percentiles=args.percentiles,
                       overwrite=args.overwrite)
    s = result["settings"]
    print(f"{s['n_crops']} crops, {len(s['classes'])} classes (chance {s['chance']:.3f}), {s['folds']} splits:")
    for r in result["rows"]:
        print(f"  {r['encoder']:<24} linear probe {r['linear_mean']:.3f} ± {r['linear_std']:.3f}   "
              f"k-NN {r['knn_mean']:.3f} ± {r['knn_std']:.3f}")
    if args.out:
        print(f"wrote {Path(args.out) / 'probe.json'} and probe.md")
    return 0


def cmd_evaluate_classification(args: argparse.Namespace) -> int:
    from micromae.evaluate.classification import run_evaluate_classification

    fractions = _list(args.fractions, float) or [1.0]
    result = run_evaluate_classification(
        parse_checkpoints(args.checkpoint), args.data, args.out, config=args.config, overrides=args.overrides,
        methods=_list(args.methods), folds=args.folds, test_size=args.test_size, fractions=fractions,
        seed=args.seed, branch=args.branch, k=args.k, vote=args.vote, keep_checkpoints=args.keep_checkpoints,
        device=args.device)
    for r in result["summary"]:
        print(f"  {r['encoder']:<20} {r['method']:<8} {r['fraction']:>5.0%} of train: accuracy "
              f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} ({r['folds']} folds)")
    print(f"wrote {Path(args.out) / 'results.md'}, results.json and accuracy_vs_fraction.png")
    return 0


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH|random", help=CHECKPOINT_HELP)
    q.add_argument("--data", required=True, metavar="FOLDER", help=DATA_HELP)
    q.add_argument("--branch", type=int, default=1, choices=(1, 2),
                   help="for DAMA checkpoints: which of the two networks to use (default 1)")
    q.add_argument("--folds", type=int, default=None,
                   help="how many random train/test splits to average over (default: probe 5, evaluate 10)")
    q.add_argument("--test-size", type=float, default=0.4,
                   help="share of the crops held out for testing in each split (default 0.4: the paper's 60/40)")
    q.add_argument("--seed", type=int, default=0, help="random seed of the splits (default 0)")
    q.add_argument("--k", type=int, default=20, help="k-NN: number of nearest training crops that vote (default 20)")
    q.add_argument("--vote", choices=("weighted", "majority"), default="weighted",
                   help="k-NN: weighted = closer neighbours count more (exp(similarity/0.07), DINO); "
                        "majority = one vote each (default weighted)")
    q.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:N, mps")


def register(sub: argparse._SubParsersAction, evaluate: argparse._SubParsersAction) -> None:
    """Add this module's verbs to the top-level (``sub``) and ``micromae evaluate`` sub-parsers."""
    p = sub.add_parser(
        "probe", help="how well frozen encoder features tell cell types apart (linear probe and k-NN, seconds)",
        description="Quick check of a pre-trained encoder: compute one feature vector per cell crop with the "
                    "encoder left unchanged, then measure how well a linear classifier (linear probe) and a "
                    "nearest-neighbour vote (k-NN) predict the cell type on held-out crops, over repeated "
                    "stratified train/test splits. Compare encoders by passing several --checkpoint, including "
                    "`random` as the untrained baseline. Example: micromae probe --checkpoint "
                    "DAMA=runs/dama_tiny/checkpoints/last.pt --checkpoint random --data synth/cells --out probe/")
    _common(p)
    p.add_argument("--axes", help="dimension order of the crop files, e.g. CYX or YXC (default: from metadata)")
    p.add_argument("--channels", help="comma-separated channel names or numbers to use (default: all)")
    p.add_argument("--size", type=int, help="resize crops to this side (default: the encoder's input size)")
    p.add_argument("--pool", choices=("avg", "cls"), default="avg",
                   help="feature of a crop: average of its patch tokens (avg, default) or the class token (cls)")
    p.add_argument("--normalize", choices=("dtype", "percentile", "minmax", "channel_stats"),
                   help="how crops are scaled to [0, 1] (default: as each checkpoint was trained); for folders of "
                        "crops use dtype or channel_stats (one range per channel for the folder), not percentile")
    p.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="for percentile / channel_stats (default 0.5 99.8)")
    p.add_argument("--out", help="folder for probe.json and probe.md, must not exist yet (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder whole")
    p.set_defaults(func=lambda a: cmd_probe(_default_folds(a, 5)))

    q = evaluate.add_parser(
        "classification", help="cell-type classification accuracy with the DAMA paper's protocol",
        description="Fine-tune (and/or probe) each encoder on repeated random stratified splits of the labelled "
                    "crops (default 10 splits, 60% train / 40% test) and report mean accuracy, error and the "
                    "per-split numbers; with --fractions also how accuracy grows with the share of training "
                    "crops used (the paper's Fig. 4). Writes results.md, results.json and "
                    "accuracy_vs_fraction.png to --out; rerunning the same command continues an interrupted "
                    "evaluation. Example: micromae evaluate classification --checkpoint "
                    "DAMA=runs/dama/checkpoints/last.pt --checkpoint random --data synth/cells --config "
                    "classify_tiny --fractions 0.1,0.5,1 --out eval_cls")
    _common(q)
    q.add_argument("--config", default="classify_tiny",
                   help="fine-tuning recipe: a YAML file or preset (classify_tiny for CPU, classify_brain for "
                        "the paper's recipe; default classify_tiny)")
    q.add_argument("overrides", nargs="*", metavar="key=value",
                   help="changes to the recipe, e.g. train.epochs=50 train.batch_size=32")
    q.add_argument("--methods", default="finetune",
                   help="comma-separated: finetune (train the whole network), linear (linear probe), knn "
                        "(k-NN on frozen features) (default finetune)")
    q.add_argument("--fractions", default="1.0",
                   help="shares of the training part to train on, e.g. 0.1,0.2,0.5,1.0 (default 1.0)")
    q.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every fine-tuned network (default: keep only logs and scores)")
    q.add_argument("--out", required=True, help="report folder")
    q.set_defaults(func=lambda a: cmd_evaluate_classification(_default_folds(a, 10)))


def _default_folds(args: argparse.Namespace, folds: int) -> argparse.Namespace:
    if args.folds is None:
        args.folds = folds
    return args

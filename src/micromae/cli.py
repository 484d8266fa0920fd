"""``micromae <verb>``: the command-line interface. Every verb mirrors a Python function of the package."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from micromae import cli_classify, cli_export, cli_instances, cli_measure, cli_segment
from micromae.config import FINETUNE_TASKS, PretrainConfig, finetune_task, list_presets, resolve_config
from micromae.config_tasks import TASK_CONFIGS as FINETUNE_CONFIGS
from micromae.errors import MicromaeInputError, at_least, input_error, os_error_message

__all__ = ["build_parser", "main"]

# ----------------------------------------------------------------------------------------------------------
# verbs: each imports what it runs (torch and the rest) inside, so that `micromae --help` stays fast


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import timm
    import torch
    import torchvision

    import micromae
    from micromae.data.samples import sample_status
    from micromae.runtime import resolve_device

    print(f"micromae     {micromae.__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    print(f"torchvision  {torchvision.__version__}")
    print(f"timm         {timm.__version__}")
    dev = resolve_device("auto")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(f"device       {dev} ({name}); {torch.get_num_threads()} CPU threads")
    print(f"presets      {', '.join(list_presets())}")
    print("sample data:")
    for sample, status in sample_status().items():
        print(f"  {sample:<14} {status}")
    return 0


def cmd_synth_em(args: argparse.Namespace) -> int:
    from micromae.data.synthetic_em import make_em_volume, write_em_volume
    from micromae.io import atomic_path, check_output

    if len(args.shape) != 3 or min(args.shape) < 1:
        raise input_error("--shape", "three positive sizes Z Y X", str(args.shape), "e.g. --shape 64 256 256")
    at_least("--seed", args.seed, 0)
    out = check_output(args.out, overwrite=args.overwrite, what="--out", folder=True,
                       need_bytes=4 * args.shape[0] * args.shape[1] * args.shape[2])
    vol = make_em_volume(shape=tuple(args.shape), seed=args.seed)
    with atomic_path(out, overwrite=args.overwrite) as tmp:  # all files appear at once; --overwrite replaces whole
        write_em_volume(tmp, vol, betaseg_layout=args.betaseg_layout)
    print(f"wrote synthetic EM volume {tuple(args.shape)} (seed {args.seed}) to {out}")
    return 0


def cmd_synth_mif(args: argparse.Namespace) -> int:
    from micromae.data.synthetic_mif import write_mif_dataset

    from micromae.io import check_output

    if len(args.shape) != 2 or min(args.shape) < 64:
        raise input_error("--shape", "two sizes H W of at least 64", str(args.shape), "e.g. --shape 512 512")
    at_least("--seed", args.seed, 0)
    at_least("--n-images", args.n_images, 1)
    at_least("--crop-size", args.crop_size, 8)
    out = Path(args.out)
    empty_folder = out.is_dir() and not any(out.iterdir())
    check_output(out, overwrite=args.overwrite or empty_folder, what="--out", folder=True)
    paths = write_mif_dataset(out, n_images=args.n_images, shape=tuple(args.shape), seed=args.seed,
                              crop_size=args.crop_size, overwrite=args.overwrite, realism=args.realism)
    print(f"wrote {args.n_images} synthetic multiplex images ({args.realism} realism), cell crops and COCO "
          f"annotations to {paths['root']}")
    return 0


def cmd_export_encoder(args: argparse.Namespace) -> int:
    from micromae.io import check_output
    from micromae.train.export import export_encoder

    out = check_output(args.output, overwrite=args.overwrite, suffixes=(".safetensors",), folder=False)
    check_output(out.with_suffix(".json"), overwrite=args.overwrite, what="--output's description", folder=False)
    path = export_encoder(args.checkpoint, out, branch=args.branch)
    print(f"wrote the encoder (branch {args.branch}) to {path} and {path.with_suffix('.json')}")
    return 0


def cmd_betaseg_labels(args: argparse.Namespace) -> int:
    from micromae.data.betaseg import load_betaseg_cell
    from micromae.io import atomic_path, check_output, write_files_atomically

    out = check_output(args.out, overwrite=args.overwrite, what="--out", folder=True)
    cell = load_betaseg_cell(args.root, args.cell)
    with atomic_path(out, overwrite=args.overwrite) as tmp:
        write_files_atomically(
            tmp, {"labels.tif": cell.labels, "cell_mask.tif": cell.cell_mask.astype("uint8")},
            texts={"classes.json": json.dumps({"class_names": list(cell.class_names)}, indent=2)},
            compress=("labels.tif", "cell_mask.tif"))
    print(f"wrote {out / 'labels.tif'}, {out / 'cell_mask.tif'}, {out / 'classes.json'}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from micromae.config import PretrainConfig, load_config
    from micromae.train.pretrain import run_pretrain

    if args.stop_after is not None:
        at_least("--stop-after", args.stop_after, 1)
    cfg = load_config(resolve_config(args.config), PretrainConfig, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    result = run_pretrain(cfg, run_dir, resume=args.resume, stop_after=args.stop_after)
    print(f"pre-training stopped at step {result.step} (loss {result.last_loss:.4f}); "
          f"checkpoint: {result.checkpoint}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    path = resolve_config(args.config)
    task = finetune_task(path)
    if task == "classification":
        from micromae.train.classify import load_classify_config as load, run_classify_finetune as run
    elif task == "instances":
        from micromae.train.maskrcnn import load_maskrcnn_config as load, run_maskrcnn_finetune as run
    else:
        from micromae.train.seg_finetune import load_seg_finetune_config as load, run_seg_finetune as run

    if args.stop_after is not None:
        at_least("--stop-after", args.stop_after, 1)
    cfg = load(path, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    result = run(cfg, run_dir, resume=args.resume, stop_after=args.stop_after)
    print(f"fine-tuning ({task}) stopped at step {result.step} (loss {result.last_loss:.4f}); "
          f"checkpoint: {result.checkpoint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from micromae.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from micromae.evaluate.segmentation import run_evaluate_segmentation

    names = args.class_names.split(",") if args.class_names else None
    ignore = args.ignore.split(",") if args.ignore else ()
    run_evaluate_segmentation(args.pred, args.reference, args.out, mask=args.mask, image=args.image,
                              class_names=names, ignore=ignore, figures=not args.no_figures,
                              overwrite=args.overwrite)
    return 0


def cmd_evaluate_pretraining(args: argparse.Namespace) -> int:
    from micromae.evaluate.pretraining import PretrainingEval, run_evaluate_pretraining

    settings = PretrainingEval(ks=tuple(args.k), n_random=args.random_encoders, planes=args.planes,
                               n_probe=args.probe_pixels, n_fit=args.fit_pixels, ignore=args.ignore,
                               central_tokens=args.central_tokens, handmade=not args.no_handmade,
                               class_names=args.class_names.split(",") if args.class_names else None)
    run_evaluate_pretraining(args.checkpoint, args.image, args.reference, args.out, settings, mask=args.mask,
                             axes=args.axes, normalize=args.normalize, device=args.device,
                             overwrite=args.overwrite)
    return 0


# the config class of each task (config layer: no torch, `micromae --help` stays fast)
TASK_CONFIGS = {"pretrain": PretrainConfig, **FINETUNE_CONFIGS}


def task_config_class(task: str) -> type:
    """The config dataclass of ``task`` (``pretrain`` or a fine-tuning task of :data:`FINETUNE_TASKS`)."""
    return TASK_CONFIGS[task]


def cmd_config_keys(args: argparse.Namespace) -> int:
    from micromae.config import config_keys, to_dict

    cls = task_config_class(args.task)
    defaults = to_dict(cls())
    for key in config_keys(cls):
        node = defaults
        for part in key.split("."):
            node = node[part]
        print(f"{key} = {node!r}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="micromae",
        description="Self-supervised masked autoencoders for microscopy (MAESTER, DAMA).",
        epilog="Run `micromae VERB --help` for the options of each verb.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("info", help="versions, device and installed sample data")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("data", help="make or convert data")
    data_sub = p.add_subparsers(dest="data_verb", required=True, metavar="DATA_VERB")
    q = data_sub.add_parser("synth-em", help="write a synthetic EM-like volume with exact labels",
                            description="Write a synthetic EM-like volume (image.tif) with semantic labels "
                                        "(labels.tif: 0 outside, 1 cytoplasm, 2 membrane, 3 nucleus, "
                                        "4 mitochondria, 5 granules), cell_mask.tif and instances.tif.")
    q.add_argument("--out", required=True, help="output folder (must not exist yet)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder whole")
    q.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"),
                   help="volume size in voxels (default 64 256 256)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--betaseg-layout", action="store_true",
                   help="write the betaSeg file layout (<cell>_source.tif + per-class masks) instead")
    q.set_defaults(func=cmd_synth_em)
    q = data_sub.add_parser("synth-mif", help="write synthetic multiplex immunofluorescence images with labels",
                            description="Write synthetic 7-channel images (DAPI, Histones, NeuN, S100, Olig2, Iba1, "
                                        "RECA1) with instance masks and 5 cell types: images/, instances/, "
                                        "cells/<type>/ (single-cell crops: the classification set), "
                                        "annotations.json (COCO) and channels.json.")
    q.add_argument("--out", required=True, help="output folder (must not exist yet, or be empty)")
    q.add_argument("--n-images", type=int, default=8, help="number of images (default 8)")
    q.add_argument("--shape", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                   help="image size (default 512 512)")
    q.add_argument("--crop-size", type=int, default=100, help="side of the single-cell crops (default 100)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--realism", default="default", choices=("default", "paper"),
                   help="generator preset: default (sparse cells, separate marker levels; what the tests and "
                        "earlier benchmarks use) or paper (dense tissue, neighbours in every crop, dim positives "
                        "and bright off-target markers: crops like the DAMA paper's)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder whole")
    q.set_defaults(func=cmd_synth_mif)
    q = data_sub.add_parser("betaseg-labels", help="turn a betaSeg cell's masks into one label volume",
                            description="Combine the per-class masks of a betaSeg cell into labels.tif (0 outside, "
                                        "1 cytoplasm, then the organelles), cell_mask.tif and classes.json, ready "
                                        "for micromae evaluate segmentation.")
    q.add_argument("--root", required=True, help="betaSeg folder (flat, or one sub-folder per cell)")
    q.add_argument("--cell", required=True, help="cell name, e.g. high_c4")
    q.add_argument("--out", required=True, help="output folder (must not exist yet)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder whole")
    q.set_defaults(func=cmd_betaseg_labels)

    p = sub.add_parser("pretrain", help="pre-train a masked autoencoder",
                       description="Pre-train a masked autoencoder from a YAML config (a path or a preset "
                                   "name), with dotted key=value overrides, e.g. "
                                   "`micromae pretrain maester_tiny train.steps=200 data.source=files "
                                   "data.paths=[cell.tif]`. Multi-GPU: `torchrun --nproc_per_node N -m "
                                   "micromae pretrain ...`.")
    p.add_argument("config", help="YAML config file or preset name (`micromae info` lists presets)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (`micromae config-keys` lists every key and its default)")
    p.add_argument("--run-dir", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", metavar="auto|CKPT",
                   help="continue a run: `auto` picks the newest intact, finite checkpoint in RUN_DIR/checkpoints, "
                        "or give a checkpoint")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N optimiser steps in this invocation (for job time limits; resume later)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="train a supervised model: cell classifier, Mask R-CNN, segmentation baselines",
                       description="Fine-tune from a YAML config or preset with key=value overrides; the "
                                   "config's task: picks the trainer. classification (classify_tiny, "
                                   "classify_brain): cell-type classifier on class folders of crops; instances "
                                   "(maskrcnn_tiny, maskrcnn_brain): Mask R-CNN on COCO data; segmentation "
                                   "(segmenter_tiny, vitdec_tiny, segmenter_betaseg, vitdec_betaseg): baselines "
                                   "on (partial) labels. e.g. `micromae finetune classify_tiny "
                                   "init=runs/dama_tiny/checkpoints/last.pt data.root=cells/`.")
    p.add_argument("config", help="YAML config file or preset name")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--run-dir", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", metavar="auto|CKPT", help="continue a run (auto: the newest intact checkpoint)")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N optimiser steps in this invocation")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("demo", help="the main job on embedded synthetic data, in a few CPU minutes",
                       description="Generate a synthetic EM-like volume, pre-train the tiny MAESTER model on "
                                   "it, and write the run folder with loss curve and reconstruction figures.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the tiny preset's)")
    p.set_defaults(func=cmd_demo)

    cli_segment.register(sub)
    cli_measure.register(sub)

    p = sub.add_parser("evaluate", help="score results against references")
    ev = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    q = ev.add_parser("segmentation", help="Dice/IoU/ARI/NMI of a label volume against reference classes",
                      description="Map clusters to reference classes (Hungarian with leftovers merged, and "
                                  "majority vote), score Dice/IoU per class, confusion matrices, ARI/NMI, a k "
                                  "sweep when the prediction has labels_k<K>, and write metrics.json, "
                                  "report.md and PNG figures to --out.")
    q.add_argument("--pred", required=True, help="micromae segment output (.zarr) or any label volume")
    q.add_argument("--reference", required=True, help="reference class volume")
    q.add_argument("--mask", help="evaluate inside this mask only (e.g. the cell mask)")
    q.add_argument("--image", help="the raw image, for slice overlays (default: the input recorded in --pred)")
    q.add_argument("--class-names", help="comma-separated class names (default: classes.json beside the reference)")
    q.add_argument("--ignore", help="comma-separated classes left out of the mean Dice")
    q.add_argument("--no-figures", action="store_true", help="numbers only")
    q.add_argument("--out", required=True, help="report folder (must not exist yet)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder whole")
    q.set_defaults(func=cmd_evaluate)

    q = ev.add_parser("pretraining", help="what pre-training bought: a checkpoint against random-init encoders",
                      description="Score a checkpoint's exact pixel embeddings (k-means Dice for each --k, and a "
                                  "linear pixel probe scored on held-out planes) against random-init encoders of "
                                  "the same shape through the same pipeline, and against hand-made multiscale "
                                  "features; write pretraining.md, pretraining.json and pretraining.png to --out.")
    q.add_argument("checkpoint", help="pre-training checkpoint (.pt) or exported encoder (.safetensors)")
    q.add_argument("--image", required=True, help="image or volume (a file micromae reads)")
    q.add_argument("--reference", required=True, help="reference class labels, same shape (partial labels: --ignore)")
    q.add_argument("--ignore", type=int, default=None,
                   help="reference value that is not a label (e.g. 0 outside the cells, 255 unlabelled)")
    q.add_argument("--mask", help="score inside this mask only")
    q.add_argument("--k", type=int, nargs="+", default=[6, 8, 10], help="k-means k's (default 6 8 10)")
    q.add_argument("--random-encoders", type=int, default=3, help="random-init controls (default 3)")
    q.add_argument("--planes", type=int, default=4, help="Z planes evaluated (default 4; alternate train/held-out)")
    q.add_argument("--probe-pixels", type=int, default=20_000, help="labelled pixels the probe is fitted on")
    q.add_argument("--fit-pixels", type=int, default=50_000, help="pixels the k-means are fitted on")
    q.add_argument("--central-tokens", type=int, default=None, help="cover-and-stride central tokens")
    q.add_argument("--class-names", help="comma-separated class names (default: classes.json beside the reference)")
    q.add_argument("--no-handmade", action="store_true", help="skip the hand-made feature row")
    q.add_argument("--axes", help="axes of --image when its metadata does not say (e.g. ZYX)")
    q.add_argument("--normalize", choices=("dtype", "minmax", "percentile"),
                   help="intensity scaling (default: the checkpoint's)")
    q.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    q.add_argument("--out", required=True, help="report folder (must not exist yet)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing report folder whole")
    q.set_defaults(func=cmd_evaluate_pretraining)

    cli_classify.register(sub, ev)
    cli_instances.register(sub, ev)

    p = sub.add_parser("export-encoder", help="save a checkpoint's ViT encoder for fine-tuning or timm",
                       description="Write the encoder of a pre-training checkpoint (MAE, data2vec, or DAMA branch "
                                   "1 or 2) as safetensors whose keys load into timm's VisionTransformer, with "
                                   "a JSON file of its shape beside it.")
    p.add_argument("--checkpoint", required=True, help="pre-training checkpoint")
    p.add_argument("--output", required=True, help="output .safetensors file")
    p.add_argument("--branch", type=int, default=1, choices=(1, 2), help="DAMA branch (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output and its .json")
    p.set_defaults(func=cmd_export_encoder)
    cli_export.register(sub)

    p = sub.add_parser("config-keys", help="every config key with its default",
                       description="Every dotted key a config of TASK accepts, with its default.")
    p.add_argument("task", nargs="?", default="pretrain", choices=tuple(TASK_CONFIGS),
                   help="pretrain (default) or a fine-tuning task: " + ", ".join(FINETUNE_TASKS))
    p.set_defaults(func=cmd_config_keys)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` where ``key=value`` overrides may also follow the options.

    argparse takes a verb's positionals (config, overrides) in one run, so a word after an option is left over;
    for a verb with ``overrides`` such words are appended to them in order (``parse_intermixed_args`` does not
    work with sub-parsers). Anything else left over is refused with argparse's usual message.
    """
    args, extras = parser.parse_known_args(argv)
    if extras and hasattr(args, "overrides") and not any(x.startswith("-") for x in extras):
        args.overrides = [*(args.overrides or []), *extras]
        extras = []
    if extras:
        parser.error("unrecognized arguments: " + " ".join(extras))
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return args.func(args)
    except MicromaeInputError as exc:
        print(f"micromae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("micromae: interrupted; run the same command again to resume (pretrain / finetune: add --resume auto)",
              file=sys.stderr)
        return 130
    except OSError as exc:  # a full or read-only disk, no permission, a file where a folder is expected, ...
        message = os_error_message(exc)
        if message is None:
            raise  # not something the user controls: an internal error keeps its traceback
        print(f"micromae: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from micromae.train.engine import TrainingDiverged

        if isinstance(exc, TrainingDiverged):
            print(f"micromae: error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())

"""``micromae <verb>``: the command-line interface. Every verb mirrors a Python function of the package."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from micromae.errors import MicromaeInputError, input_error

PRESET_DIR = "configs"


def resolve_config(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped preset (``maester_tiny`` or ``maester_tiny.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    bundled = resources.files("micromae") / PRESET_DIR / f"{stem}.yaml"
    if bundled.is_file():
        return Path(str(bundled))
    raise input_error("config", "a YAML file or a preset name", repr(name_or_path),
                      "Presets: " + ", ".join(list_presets()))


def list_presets() -> list[str]:
    folder = resources.files("micromae") / PRESET_DIR
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


# ----------------------------------------------------------------------------------------------------------
# verbs


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import timm
    import torch
    import torchvision

    import micromae
    from micromae.data.samples import sample_status
    from micromae.train.distributed import resolve_device

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

    if len(args.shape) != 3 or min(args.shape) < 1:
        raise input_error("--shape", "three positive sizes Z Y X", str(args.shape), "e.g. --shape 64 256 256")
    vol = make_em_volume(shape=tuple(args.shape), seed=args.seed)
    out = write_em_volume(args.out, vol, betaseg_layout=args.betaseg_layout)
    print(f"wrote synthetic EM volume {tuple(args.shape)} (seed {args.seed}) to {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from micromae.config import PretrainConfig, load_config
    from micromae.train.pretrain import run_pretrain

    cfg = load_config(resolve_config(args.config), PretrainConfig, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    result = run_pretrain(cfg, run_dir, resume=args.resume, stop_after=args.stop_after)
    print(f"pre-training stopped at step {result.step} (loss {result.last_loss:.4f}); "
          f"checkpoint: {result.checkpoint}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from micromae.demo import run_demo

    run_demo(Path(args.out), steps=args.steps)
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from micromae.config import PretrainConfig, config_keys, to_dict

    defaults = to_dict(PretrainConfig())
    for key in config_keys(PretrainConfig):
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
    q.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256], metavar=("Z", "Y", "X"),
                   help="volume size in voxels (default 64 256 256)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    q.add_argument("--betaseg-layout", action="store_true",
                   help="write the betaSeg file layout (<cell>_source.tif + per-class masks) instead")
    q.set_defaults(func=cmd_synth_em)

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
                   help="continue a run: `auto` picks RUN_DIR/checkpoints/last.pt, or give a checkpoint")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N optimiser steps in this invocation (for job time limits; resume later)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="the main job on embedded synthetic data, in a few CPU minutes",
                       description="Generate a synthetic EM-like volume, pre-train the tiny MAESTER model on "
                                   "it, and write the run folder with loss curve and reconstruction figures.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="pre-training steps (default: the tiny preset's)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config-keys", help="every config key with its default")
    p.set_defaults(func=cmd_config_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MicromaeInputError as exc:
        print(f"micromae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("micromae: interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        from micromae.train.engine import TrainingDiverged

        if isinstance(exc, TrainingDiverged):
            print(f"micromae: error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())

"""Run configuration: dataclasses that load from and save to YAML, with dotted ``key=value`` overrides.

A run is described by one :class:`PretrainConfig` with three sections (``model``, ``data``, ``train``) plus
a few top-level fields. Presets live in ``configs/*.yaml``. The CLI reads a preset and applies overrides::

    micromae pretrain configs/maester_tiny.yaml train.steps=200 model.mask_ratio=0.6

Unknown keys and values of the wrong type are rejected with the list of valid keys, never ignored; a
``Literal[...]`` annotation lists a field's valid choices, and the coercer checks them for every config tree.
Presets are found by :func:`resolve_config` (a path or a shipped preset name), and :func:`finetune_task`
reads which trainer a fine-tuning YAML is for.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from micromae.architectures import MAESTER
from micromae.errors import MicromaeInputError, input_error


# string fields that take one of a fixed set of values: the coercer checks them (one place for every config)
# auto: dtype for 8-bit data, percentile otherwise; channel_stats: multi-channel folders only
Normalize = Literal["auto", "dtype", "minmax", "percentile", "channel_stats"]
Amp = Literal["auto", "bf16", "off"]  # auto: bf16 on CUDA


@dataclass
class ModelConfig:
    """The masked autoencoder. Defaults are MAESTER's (``micromae.architectures.MAESTER``: supplement
    Tables S1/S3 of the paper)."""

    in_chans: int = MAESTER["in_chans"]
    img_size: int = MAESTER["img_size"]  # the field of view (FOV), pixels
    patch_size: int = MAESTER["patch_size"]
    embed_dim: int = MAESTER["embed_dim"]
    depth: int = MAESTER["depth"]
    num_heads: int = MAESTER["num_heads"]
    mlp_ratio: float = MAESTER["mlp_ratio"]
    qkv_bias: bool = MAESTER["qkv_bias"]
    pos_embed_weight: float = MAESTER["pos_embed_weight"]  # encoder adds the fixed sin-cos embedding times this
    drop_path_rate: float = 0.0
    decoder_embed_dim: int = MAESTER["decoder_embed_dim"]
    decoder_depth: int = MAESTER["decoder_depth"]
    decoder_num_heads: int = MAESTER["decoder_num_heads"]
    decoder_mlp_ratio: float = MAESTER["decoder_mlp_ratio"]
    decoder_pos_embed_weight: float = MAESTER["decoder_pos_embed_weight"]
    mask_ratio: float = MAESTER["mask_ratio"]
    norm_pix_loss: bool = MAESTER["norm_pix_loss"]


@dataclass
class DataConfig:
    """Where training crops come from and how they are cut (MAESTER.md §2).

    ``source`` is one of:
      - ``synthetic``: a synthetic EM-like volume generated from ``synthetic_shape`` and ``synthetic_seed``;
      - ``files``: the volumes in ``paths`` (TIFF, OME-TIFF, Zarr, HDF5 ``file.h5:key``, ``.npy``), read lazily;
      - ``betaseg``: the cells ``betaseg_cells`` of a betaSeg folder ``root``;
      - ``sample:NAME``: a real sample volume shipped in a PyPI package (``micromae info`` lists them);
      - ``images``: a folder ``root`` of multi-channel 2-D TIFFs (DAMA; ``axes`` e.g. CYX or YXC);
      - ``synthetic_mif``: ``n_images`` synthetic multiplex images (DAMA), written once into the run folder.
    The first four feed the MAESTER plane-crop sampler; the last two DAMA's augmentation (DAMA.md §1).
    """

    source: str = "synthetic"
    paths: list[str] = field(default_factory=list)
    axes: str | None = None  # dimension order of the files, e.g. ZYX; None: from metadata or rank
    key: str | None = None  # HDF5 dataset, when not given as file.h5:key
    root: str | None = None  # betaSeg folder
    betaseg_cells: list[str] = field(default_factory=lambda: ["high_c1", "high_c2", "high_c3"])
    synthetic_shape: list[int] = field(default_factory=lambda: [96, 256, 256])  # Z + 2·pad ≥ FOV for ZX/ZY crops
    synthetic_seed: int = 0
    planes: list[str] = field(default_factory=lambda: ["YX", "ZX", "ZY"])
    pad: int = 4
    pad_mode: Literal["constant", "reflect"] = "constant"
    min_crop_frac: float = 0.5
    flip_p: float = 0.5
    normalize: Normalize = "auto"  # auto: dtype for 8-bit data, percentile for 16-bit and float
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    num_workers: int = 0
    sampler: Literal["auto", "numpy", "torch"] = "auto"  # plane crops / DAMA augmentation: numpy or on the device
    n_images: int = 16  # synthetic_mif: how many images (each synthetic_shape[-2:] pixels)
    crop_scale: float = 0.5  # images/synthetic_mif: side of the random crop resized to the FOV, as a fraction


@dataclass
class DamaConfig:
    """DAMA's second branch, adaptive mask and feature regression (DAMA.md §1); used when objective=dama
    (``K``, ``beta`` and ``ema_momentum`` also by objective=data2vec)."""

    config: Literal["student1-student2", "shared", "ema"] = "student1-student2"
    masking: Literal["adaptive", "random_overlap"] = "adaptive"  # random_overlap: DAMA-rand
    overlap_ratio: float = 0.5  # 0: adaptive without overlap
    K: int = 6  # top blocks averaged into the regression target
    beta: float = 2.0  # smooth-L1 beta
    alpha: float = 1.0  # weight of the feature loss
    pairing: Literal["position", "index"] = "position"  # index: the public code's i-th with i-th visible token
    target_softmax: bool = False  # the public code's softmax on both sides
    stop_grad_target: bool | None = None  # None: true for ema, false for two students
    ema_momentum: float = 0.996  # cosine-scheduled to 1 over the run
    emulate_public_code: bool = False  # reproduce the batch-wide masking bug (ablation only)
    # objective=data2vec: each block's output normalised per token (layer, DAMA's target) or over tokens
    data2vec_target_norm: Literal["layer", "instance"] = "layer"


@dataclass
class MocoConfig:
    """MoCo v3's heads, loss and views (objective=mocov3; the encoder is ``model.*``)."""

    dim: int = 256  # projector / predictor output width
    mlp_dim: int = 4096  # their hidden width
    temperature: float = 0.2
    ema_momentum: float = 0.99  # of the momentum encoder, cosine-scheduled to 1 over the run
    crop_min_scale: float = 0.3  # smallest area fraction of a view's random resized crop
    gain: list[float] = field(default_factory=lambda: [0.7, 1.3])  # intensity factor per image (all channels)
    blur_p: float = 0.5
    blur_sigma: float = 1.0  # largest Gaussian-blur sigma, pixels
    noise: float = 0.03  # largest additive Gaussian-noise std


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Steps are counted, not epochs (crops are sampled, MAESTER.md §2)."""

    steps: int = 1000
    batch_size: int = 32  # per process (per GPU under torchrun)
    lr: float = 1.5e-4
    weight_decay: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    no_decay_bias_norm: bool = False  # exclude biases, norms and tokens from weight decay
    schedule: Literal["constant", "cosine"] = "constant"  # cosine: linear warm-up, then cosine to min_lr
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 disables
    accum_steps: int = 1  # micro-batches per optimiser step
    amp: Amp = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    figure_every: int = 500
    keep_checkpoints: int = 2  # step checkpoints kept besides last.pt
    compile: bool = False  # torch.compile the training model (inductor; random ops drawn as in eager mode)


@dataclass
class PretrainConfig:
    """One pre-training run."""

    name: str = "maester"
    objective: Literal["mae", "dama", "data2vec", "simmim", "mocov3"] = "mae"  # simmim: model.mask_ratio
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dama: DamaConfig = field(default_factory=DamaConfig)
    mocov3: MocoConfig = field(default_factory=MocoConfig)


# ----------------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking

def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += _valid_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(value: Any, t: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``t`` and return it converted (int → float, tuple → list)."""
    origin = typing.get_origin(t)
    if origin is Literal:
        allowed = typing.get_args(t)
        if not all(isinstance(a, type(value)) for a in allowed):
            raise _type_error(key, type(allowed[0]), value)
        if value not in allowed:
            raise input_error(f"config key '{key}'", "one of " + ", ".join(map(str, allowed)), repr(value),
                              "Pick one of the listed values")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except MicromaeInputError:
                pass
        raise _type_error(key, t, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, t, value)
        (item_t,) = typing.get_args(t)
        return [_coerce(v, item_t, f"{key}[{i}]") for i, v in enumerate(value)]
    if t is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, t, value)
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, t, value)
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, t, value)
    if t is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, t, value)
    return value


def _type_error(key: str, t: Any, value: Any) -> MicromaeInputError:
    return input_error(
        f"config key '{key}'", f"a value of type {_type_name(t)}", f"{value!r} ({type(value).__name__})",
        "Fix the value in the YAML file or the key=value override",
    )


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise input_error(
            f"config section '{prefix.rstrip('.') or '<top>'}'",
            "one of the keys " + ", ".join(_valid_keys(cls, prefix)),
            "unknown key(s) " + ", ".join(prefix + k for k in unknown),
            "Check the spelling (`micromae config-keys` lists every key)",
        )
    kwargs = {}
    for name, value in data.items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            if value is not None and not isinstance(value, dict):
                raise _type_error(prefix + name, t, value)
            kwargs[name] = from_dict(t, value, prefix + name + ".")
        else:
            kwargs[name] = _coerce(value, t, prefix + name)
    return cls(**kwargs)


def options_from_kwargs(cls: type, options: dict, what: str) -> Any:
    """``cls(**options)`` for an options dataclass, rejecting unknown names with the list of valid ones, then
    ``.validate()`` when the class has it (the synthetic-data generators' ``**options``)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise input_error(f"{what} options", f"names among {sorted(known)}", repr(unknown), "Check the spelling")
    opts = cls(**options)
    if hasattr(opts, "validate"):
        opts.validate()
    return opts


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (lists, not tuples, so YAML stays readable)."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a copy of ``cfg`` with dotted ``key=value`` overrides applied.

    Values are parsed as YAML (``train.steps=200``, ``data.planes=[YX,ZX]``, ``data.axes=null``).
    """
    data = to_dict(cfg)
    valid = _valid_keys(type(cfg))
    for item in overrides:
        if "=" not in item:
            raise input_error(
                f"override '{item}'", "the form key=value (e.g. train.steps=200)", "no '='",
                "Write each override as section.key=value",
            )
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in valid:
            raise input_error(
                f"override '{item}'", "one of the keys " + ", ".join(valid), f"unknown key '{key}'",
                "Check the spelling of the key",
            )
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(type(cfg), data)


def load_config(path: str | Path, cls: type = PretrainConfig, overrides: list[str] | None = None) -> Any:
    """Read a YAML preset into ``cls`` and apply overrides."""
    path = Path(path)
    if not path.is_file():
        raise input_error(
            "config file", "an existing YAML file", f"'{path}' does not exist",
            "Pass a path such as configs/maester_tiny.yaml",
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise input_error(f"config file '{path}'", "valid YAML", f"a parse error: {exc}",
                          "Fix the YAML syntax") from exc
    if data is not None and not isinstance(data, dict):
        raise input_error(f"config file '{path}'", "a mapping of sections", type(data).__name__,
                          "Write the file as `section: {key: value}`")
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML (the resolved configuration of a run)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_keys(cls: type = PretrainConfig) -> list[str]:
    """Every dotted key a config of type ``cls`` accepts."""
    return _valid_keys(cls)


# ----------------------------------------------------------------------------------------------------------
# presets: the YAML files shipped in micromae/configs, and the fine-tuning task a YAML names

PRESET_DIR = "configs"
FINETUNE_TASKS = ("segmentation", "classification", "instances")


def list_presets() -> list[str]:
    """Names of the shipped presets (``maester_tiny``, ``dama_brain``, ...), sorted."""
    folder = resources.files("micromae") / PRESET_DIR
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name_or_path: str | Path) -> Path:
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


def finetune_task(path: str | Path) -> str:
    """The ``task`` key of a fine-tuning YAML (default ``segmentation``): which trainer runs it."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise input_error(f"config '{path}'", "valid YAML", f"a parse error ({exc})", "Fix the file") from exc
    task = data.get("task", "segmentation") if isinstance(data, dict) else "segmentation"
    if task not in FINETUNE_TASKS:
        raise input_error(f"config '{path}' task", f"one of {list(FINETUNE_TASKS)}", repr(task),
                          "Set task: classification (cell types), instances (Mask R-CNN) or segmentation")
    return task
